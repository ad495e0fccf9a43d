"""The student as a stock transformers VisionTextDualEncoderModel: loaded with transformers alone, it gives
kdpipe's embeddings (projection biases included); students without a stock equivalent are refused in one
line; `kdpipe export` writes the model card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from deploy_helpers import SIZE, tiny_student, tiny_workdir
from typer.testing import CliRunner

from pipeline.deploy.hf import save_dual_encoder, text_bias_is_zero
from pipeline.errors import InputError
from stages.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["A dog runs", "the cat sits on a man in red", "photo"]


def test_transformers_alone_gives_kdpipe_embeddings(tokenizer_dir, tmp_path):
    model = tiny_student(tokenizer_dir, seed=3)
    assert not text_bias_is_zero(model)
    save_dual_encoder(model, tmp_path / "hf")
    # transformers only from here on: no kdpipe class is involved in loading
    from transformers import AutoImageProcessor, AutoTokenizer, VisionTextDualEncoderModel

    dual, info = VisionTextDualEncoderModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))  # none left random
    dual.eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    images = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    proc = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        pixels = torch.from_numpy(proc(list(images), return_tensors="np")["pixel_values"])
        ours = model.encode_pixels(pixels)  # same pixels for both: only the models are compared
        theirs = F.normalize(dual.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        assert torch.allclose(ours, theirs, atol=1e-5)
        t = tok(TEXTS, padding=True, truncation=True, max_length=12, return_tensors="pt")
        bias = torch.tensor(dual.config.kdpipe_text_projection_bias)
        theirs = F.normalize(dual.get_text_features(**t).pooler_output + bias, dim=-1)
        assert torch.allclose(model.encode_texts(TEXTS), theirs, atol=1e-5)
        # and the bias matters: without it the features are not the student's
        assert not torch.allclose(
            model.encode_texts(TEXTS), F.normalize(dual.get_text_features(**t).pooler_output, dim=-1), atol=1e-3
        )
    # the image processor normalizes as the student does
    assert np.allclose(pixels.numpy(), model.normalize_pixels(model.to_float(images)).numpy(), atol=1e-6)


@pytest.mark.parametrize("text_pooling", ["mean", "cls"])
def test_no_stock_equivalent_is_one_clear_error(tokenizer_dir, tmp_path, text_pooling):
    model = tiny_student(tokenizer_dir, seed=0, pooling=text_pooling)
    with pytest.raises(InputError, match=f"text pooling {text_pooling}"):
        save_dual_encoder(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


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
    # a copy beside the student, which (a DVC output under `dvc repro`) is left as it was
    assert sorted(p.relative_to(paths.student) for p in paths.student.rglob("*")) == before
    out = paths.workdir / "export" / "student"
    for f in paths.student.rglob("*"):
        if f.is_file():
            assert (out / f.relative_to(paths.student)).read_bytes() == f.read_bytes()
    from pipeline.towers.student import load_student

    load_student(out)
    card = (out / "README.md").read_text()
    assert "tiny-teacher" in card and paths.features.exists()
    from pipeline.data.index import read_fingerprint

    assert read_fingerprint(paths.index_dir) in card  # the dataset it was distilled on
    assert "| teacher |" in card and "321.50" in card
    assert "VisionTextDualEncoderModel.from_pretrained" in card
    assert (out / "hf" / "config.json").is_file()
    # --out the student directory: in place
    result = CliRunner().invoke(app, ["export", "--workdir", str(paths.workdir), "--out", str(paths.student)])
    assert result.exit_code == 0, result.output
    assert (paths.student / "README.md").is_file() and not (paths.student / "hf").exists()
