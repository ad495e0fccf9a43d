"""The student as a stock transformers VisionTextDualEncoderModel: loaded with transformers alone, its stock calls
give kdpipe's embeddings and its stock forward / zero-shot pipeline the student's probabilities (logit scale =
1 / the training temperature); its image processor makes kdpipe's pixels from image files; students without an
exact stock equivalent are refused in one line; `kdpipe export` writes the model card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from deploy_helpers import SIZE, finished_run, squash, tiny_student, tiny_workdir
from PIL import Image
from typer.testing import CliRunner

from pipeline.data.pixels import ResizeConfig, decode_image
from pipeline.deploy.hf import save_dual_encoder
from pipeline.deploy.pixels import StudentPixels, hf_image_processor, student_pixels
from pipeline.deploy.scale import LogitScale, training_logit_scale
from pipeline.errors import InputError
from stages.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["A dog runs", "the cat sits on a man in red", "photo"]
PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def pixels_of(model, mode: str = "squash", resize: int = SIZE, filter: str = "bilinear") -> StudentPixels:
    rc = ResizeConfig(mode=mode, resize=resize, crop=SIZE, filter=filter)
    return student_pixels({"resize": rc.describe()}, "cache", SIZE, model.image_tower.mean, model.image_tower.std, "t")


def test_transformers_stock_calls_give_kdpipe_embeddings_and_probabilities(tokenizer_dir, tmp_path):
    # an image projection bias (folded into ViT's linear pooler) and a text projection bias still at its zero init
    model = tiny_student(tokenizer_dir, seed=3, biases=("image",))
    assert torch.count_nonzero(model.image_proj.bias) and not torch.count_nonzero(model.text_proj.bias)
    save_dual_encoder(model, tmp_path / "hf", pixels_of(model), LogitScale(0.05, "test"))
    # transformers only from here on: no kdpipe class is involved in loading, no manual step in computing
    from transformers import AutoImageProcessor, AutoTokenizer, VisionTextDualEncoderModel, pipeline

    dual, info = VisionTextDualEncoderModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))  # none left random
    dual.eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    images = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    proc = AutoImageProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    with torch.no_grad():
        pixels = torch.from_numpy(proc(list(images), return_tensors="np")["pixel_values"])
        ours_v = model.encode_images(images)
        theirs_v = F.normalize(dual.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        assert torch.allclose(ours_v, theirs_v, atol=1e-5)
        t = tok(TEXTS, padding=True, truncation=True, return_tensors="pt")
        ours_t = model.encode_texts(TEXTS)
        theirs_t = F.normalize(dual.get_text_features(**t).pooler_output, dim=-1)
        assert torch.allclose(ours_t, theirs_t, atol=1e-5)
        # the stock forward: logits = (1 / T) cos, so its softmax is the student's (exp(0) = 1 made it flat)
        out = dual(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=pixels)
        torch.testing.assert_close(out.logits_per_image, 20.0 * ours_v @ ours_t.T, rtol=0, atol=1e-4)
    # the zero-shot pipeline: the student's probabilities over the labels
    zero_shot = pipeline("zero-shot-image-classification", model=str(tmp_path / "hf"))
    got = zero_shot(Image.fromarray(images[0]), candidate_labels=TEXTS, hypothesis_template="{}")
    expected = torch.softmax(20.0 * ours_v[0] @ ours_t.T, dim=0)
    assert {r["label"]: round(r["score"], 4) for r in got} == {x: round(float(p), 4) for x, p in zip(TEXTS, expected)}
    # a caption longer than max_tokens is cut where the student cuts it, by `truncation=True` alone
    long = "dog " * 40
    with torch.no_grad():
        t = tok([long], padding=True, truncation=True, return_tensors="pt")
        assert t["input_ids"].shape[1] == 12
        theirs = F.normalize(dual.get_text_features(**t).pooler_output, dim=-1)
        assert torch.allclose(model.encode_texts([long]), theirs, atol=1e-5)


def test_a_text_projection_bias_is_refused_in_one_line(tokenizer_dir, tmp_path):
    model = tiny_student(tokenizer_dir, seed=0, biases=("text",))
    with pytest.raises(InputError, match="text projection bias.*proj_bias: false"):
        save_dual_encoder(model, tmp_path / "hf", pixels_of(model), LogitScale(0.05, "test"))
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("text_pooling", ["mean", "cls"])
def test_no_stock_equivalent_is_one_clear_error(tokenizer_dir, tmp_path, text_pooling):
    model = tiny_student(tokenizer_dir, seed=0, pooling=text_pooling)
    with pytest.raises(InputError, match=f"text pooling {text_pooling}"):
        save_dual_encoder(model, tmp_path / "hf", pixels_of(model), LogitScale(0.05, "test"))
    assert not (tmp_path / "hf").exists()


def _photo(path, size: tuple[int, int], mode: str, seed: int):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    img.save(path)
    return path


@pytest.mark.parametrize("mode", ["squash", "shorter_side_center_crop"])
@pytest.mark.parametrize("filter", ["bilinear", "bicubic"])
def test_the_image_processor_makes_kdpipes_pixels(tokenizer_dir, tmp_path, mode, filter):
    """transformers' CLIPImageProcessor (PIL backend) from the exported config against kdpipe's decode_image
    (pipeline/data/pixels.py): the same uint8 pixels for every image mode and aspect, except the documented
    one-pixel crop offset."""
    from transformers import CLIPImageProcessor

    model = tiny_student(tokenizer_dir, seed=0)
    px = pixels_of(model, mode, resize=24 if mode != "squash" else SIZE, filter=filter)
    config = hf_image_processor(px)
    proc = CLIPImageProcessor.from_dict(config)
    raw = CLIPImageProcessor.from_dict(config | {"do_rescale": False, "do_normalize": False})
    # widths: the resized long side minus the crop is 0, 1, 2 mod 4 (exact) and 3 mod 4 (one pixel apart)
    sizes = [(48, 32), (32, 51), (40, 40), (50, 32), (33, 47)]
    for i, (size, image_mode) in enumerate(zip(sizes, ["RGB", "RGBA", "L", "P", "RGB"])):
        path = _photo(tmp_path / f"{i}.png", size, image_mode, i)
        ours = decode_image(path, px.resize)
        theirs = raw(Image.open(path), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        long_side = int(24 * max(size) / min(size))
        if mode == "shorter_side_center_crop" and (long_side - SIZE) % 4 == 3:
            # transformers' window starts at (side - crop) // 2, kdpipe's at round((side - crop) / 2), one pixel
            # further along the long side (pixels.py says so): both windows of the same resized image
            (w, h), box = px.resize.geometry(*size)
            resized = np.asarray(Image.open(path).convert("RGB").resize((w, h), PIL_FILTERS[filter]))
            top, left = (h - SIZE) // 2, (w - SIZE) // 2
            np.testing.assert_array_equal(theirs.astype(np.uint8), resized[top : top + SIZE, left : left + SIZE])
            assert box[:2] != (left, top) and np.array_equal(ours, resized[box[1] : box[3], box[0] : box[2]])
            continue
        np.testing.assert_array_equal(theirs.astype(np.uint8), ours, err_msg=f"{size} {image_mode}")
        # and the normalized pixels are the student's
        full = proc(Image.open(path), return_tensors="pt")["pixel_values"]
        mine = model.normalize_pixels(model.to_float(ours[None].copy()))
        torch.testing.assert_close(full, mine, rtol=0, atol=1e-6)


def test_the_logit_scale_is_the_training_temperature(tokenizer_dir, tmp_path):
    model = tiny_student(tokenizer_dir, seed=0)
    finished_run(tmp_path, model, temperature=0.07)
    scale = training_logit_scale(tmp_path)
    assert scale.temperature == 0.07 and abs(scale.log_scale - np.log(1 / 0.07)) < 1e-12
    assert "pair_temperature" in scale.source
    # the baseline's own loss section, not the distilled one's
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    (tmp_path / "train_summary.json").write_text(json.dumps(summary | {"baseline": True}))
    assert training_logit_scale(tmp_path).temperature == 0.05  # baseline_loss: pair_temperature's default
    (tmp_path / "train_summary.json").unlink()
    with pytest.raises(InputError, match="train_summary.json missing"):
        training_logit_scale(tmp_path)


def test_export_cli_writes_model_card(tokenizer_dir, tmp_path):
    paths = tiny_workdir(tmp_path, tokenizer_dir)
    paths.metrics_detail.write_text(
        json.dumps(
            {
                "dataset": "toy",
                "split": "test",
                "n_images": 9,
                "n_captions": 18,
                "teacher": {"rsum": 321.5, "i2t_r1": 50.0},
            }
        )
    )
    before = sorted(p.relative_to(paths.student) for p in paths.student.rglob("*"))
    result = CliRunner().invoke(app, ["export", "--workdir", str(paths.workdir), "--hf"])
    assert result.exit_code == 0, result.output
    assert "logit scale 1/0.05" in result.output
    # a copy beside the student, which (a DVC output under `dvc repro`) is left as it was
    assert sorted(p.relative_to(paths.student) for p in paths.student.rglob("*")) == before
    out = paths.workdir / "export" / "student"
    for f in paths.student.rglob("*"):
        if f.is_file():
            assert (out / f.relative_to(paths.student)).read_bytes() == f.read_bytes()
    from pipeline.towers.student import load_student

    load_student(out)
    card = (out / "README.md").read_text()
    assert "**tiny-teacher**" in card and paths.features.exists()
    from pipeline.data.index import read_fingerprint

    assert read_fingerprint(paths.index_dir) in card  # the dataset it was distilled on
    assert "| teacher |" in card and "321.50" in card
    assert "VisionTextDualEncoderModel.from_pretrained" in card and "squash" in card
    assert "kdpipe_text_projection_bias" not in card  # nothing to add by hand
    assert json.loads((out / "hf" / "preprocessor_config.json").read_text()) == hf_image_processor(
        student_pixels(squash(), "x", SIZE, (0.5,) * 3, (0.5,) * 3, "t")
    )
    # --out the student directory: in place
    result = CliRunner().invoke(app, ["export", "--workdir", str(paths.workdir), "--out", str(paths.student)])
    assert result.exit_code == 0, result.output
    assert (paths.student / "README.md").is_file() and not (paths.student / "hf").exists()


def test_unknown_student_pixels_are_refused_in_one_line(tokenizer_dir, tmp_path):
    paths = tiny_workdir(tmp_path, tokenizer_dir)
    import shutil

    shutil.rmtree(paths.images)
    result = CliRunner().invoke(app, ["export", "--workdir", str(paths.workdir), "--hf"])
    assert result.exit_code == 2 and "the student's pixels are unknown" in result.output
    assert not (paths.workdir / "export" / "student").exists()  # nothing written
