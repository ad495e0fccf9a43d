"""extract.teacher.kind hf: tiny CLIP and SigLIP built offline; the stored rows equal what transformers
computes directly, through `kdpipe prepare` + `kdpipe extract` (and SigLIP2's NaFlex patches); each model's
padding; logit scale and bias."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from hf_models import tiny_blip_retrieval, tiny_clip, tiny_siglip, tiny_siglip2
from PIL import Image
from typer.testing import CliRunner

from pipeline.data.index import DatasetIndex
from pipeline.errors import InputError
from pipeline.store.features import open_store
from pipeline.teachers import HFTeacherConfig, TeacherConfig, build_teacher
from stages.cli import app

CAPTIONS = ["a photo of a cat", "a dog", "two birds in the sky over the grass", "red car", "the quick brown fox"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        "clip": tiny_clip(root / "clip"),
        "siglip": tiny_siglip(root / "siglip"),
        "siglip2": tiny_siglip2(root / "siglip2"),
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Five images of different sizes and a JSONL with one caption each (train 3, test 2)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    lines = []
    for i, caption in enumerate(CAPTIONS):
        size = (40 + 7 * i, 33 + 5 * i)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"{i}.png")
        lines.append({"image": f"{i}.png", "caption": caption, "split": "train" if i < 3 else "test"})
    (root / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def direct(model_dir: Path, images: list[Path], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """transformers alone, as its model card does it: the processor's pixels and the tokenizer's ids."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    max_length = model.config.model_type in ("siglip", "siglip2")
    padding = "max_length" if max_length else True
    with torch.no_grad():
        pixels = processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")
        tokens = tokenizer(texts, padding=padding, truncation=True, return_tensors="pt")
        if max_length:  # as the model cards call them: no attention mask
            tokens = {"input_ids": tokens["input_ids"]}
        img = model.get_image_features(**pixels).pooler_output
        txt = model.get_text_features(**tokens).pooler_output
    return F.normalize(img, dim=-1).numpy(), F.normalize(txt, dim=-1).numpy()


def params_file(tmp_path: Path, dataset: Path, teacher: dict) -> Path:
    params = {
        "workdir": str(tmp_path / "work"),
        "prepare": {
            "dataset": {"name": "d", "format": "jsonl", "annotations": str(dataset / "d.jsonl")},
            "image": {"resize": 20, "crop": 16},
        },
        "extract": {
            "teacher": teacher,
            "store_dtype": "float32",
            "image_batch_size": 2,
            "text_batch_size": 2,
            "chunk_rows": 2,
        },
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.parametrize("kind", ["clip", "siglip", "siglip2"])
def test_kdpipe_extract_stores_what_transformers_computes(kind, models, dataset, tmp_path):
    params = params_file(tmp_path, dataset, {"kind": "hf", "hf": {"path": str(models[kind])}})
    for stage in ("prepare", "extract"):
        r = CliRunner().invoke(app, [stage, "--params", str(params)])
        assert r.exit_code == 0, r.output
    index = DatasetIndex.load(tmp_path / "work" / "index")
    store = open_store(tmp_path / "work" / "features.zarr", expect_fingerprint=index.fingerprint)
    for split in ("train", "test"):
        view, rows = index.split(split), store.split(split)
        img, txt = direct(models[kind], list(view.image_path), view.caption_text.tolist())
        np.testing.assert_allclose(np.asarray(rows.image_emb), img, rtol=0, atol=2e-6)
        np.testing.assert_allclose(np.asarray(rows.text_emb), txt, rtol=0, atol=2e-6)
    teacher = store.teacher
    assert teacher["kind"] == "hf" and teacher["model_type"] == kind and teacher["dim"] == store.dim
    assert teacher["logit_scale"] == pytest.approx(math.exp(2.3 if kind == "clip" else 2.0), rel=1e-6)
    assert teacher["logit_bias"] == (None if kind == "clip" else pytest.approx(-1.5))
    assert set(teacher["weights"]) == {"model.safetensors"} and len(teacher["config_sha256"]) == 64


def test_siglip_is_padded_to_max_length_whatever_the_batch(models):
    """SigLIP pools the last position: a caption's feature must not depend on its batch's longest caption."""
    teacher = build_teacher(TeacherConfig(kind="hf", hf=HFTeacherConfig(path=str(models["siglip"]))))
    alone = teacher.encode_texts(["red car"])
    batched = teacher.encode_texts(["red car", CAPTIONS[2]])[:1]
    torch.testing.assert_close(alone, batched, rtol=0, atol=1e-6)
    tokens = teacher.tokenize(["red car"])
    assert list(tokens) == ["input_ids"] and tokens["input_ids"].shape[1] == teacher.max_text_len == 16
    padded_to_longest = teacher.tokenizer(["red car"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        other = F.normalize(teacher.model.get_text_features(input_ids=padded_to_longest).pooler_output, dim=-1)
    assert not torch.allclose(other, alone, atol=1e-4)  # the convention matters: the test would see a wrong one


def test_a_hub_id_is_read_from_the_local_cache(models, monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    repo = tmp_path / "cache" / "models--acme--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("c0ffee" * 6 + "abcd")
    shutil.copytree(models["clip"], repo / "snapshots" / ("c0ffee" * 6 + "abcd"))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    teacher = build_teacher(TeacherConfig(kind="hf", hf=HFTeacherConfig(path="acme/tiny-clip")))
    local = build_teacher(TeacherConfig(kind="hf", hf=HFTeacherConfig(path=str(models["clip"]))))
    assert teacher.name == "clip:acme/tiny-clip"
    same = {k: v for k, v in teacher.identity().items() if k != "name"}
    assert same == {k: v for k, v in local.identity().items() if k != "name"}
    with pytest.raises(
        InputError, match="acme/absent is not a local directory and not in the local Hugging Face cache"
    ):
        build_teacher(TeacherConfig(kind="hf", hf=HFTeacherConfig(path="acme/absent")))


def test_models_it_does_not_run_are_one_line(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(InputError, match="is a 'bert' model; the hf teacher runs clip, siglip, siglip2"):
        build_teacher(TeacherConfig(kind="hf", hf=HFTeacherConfig(path=str(tmp_path / "bert"))))


def test_blip_itc_rows_give_the_scores_of_blips_own_retrieval_forward(dataset, tmp_path):
    """BLIP has no get_*_features: the oracle is BlipForImageTextRetrieval(use_itm_head=False), whose output is
    the cosine matrix of its ITC embeddings; the stored rows must multiply into it."""
    from transformers import AutoImageProcessor, AutoTokenizer, BlipForImageTextRetrieval

    model_dir = tiny_blip_retrieval(tmp_path / "blip")
    params = params_file(tmp_path, dataset, {"kind": "hf", "hf": {"path": str(model_dir)}})
    for stage in ("prepare", "extract"):
        r = CliRunner().invoke(app, [stage, "--params", str(params)])
        assert r.exit_code == 0, r.output
    index = DatasetIndex.load(tmp_path / "work" / "index")
    store = open_store(tmp_path / "work" / "features.zarr")
    assert store.teacher["model_type"] == "blip" and store.teacher["logit_scale"] is None
    model = BlipForImageTextRetrieval.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for split in ("train", "test"):
        view, rows = index.split(split), store.split(split)
        pixels = processor(images=[Image.open(p).convert("RGB") for p in view.image_path], return_tensors="pt")
        tokens = tokenizer(view.caption_text.tolist(), padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            scores = model(**tokens, **pixels, use_itm_head=False).itm_score.numpy()  # [images, captions]
        ours = np.asarray(rows.image_emb) @ np.asarray(rows.text_emb).T
        np.testing.assert_allclose(ours, scores, rtol=0, atol=5e-6)
