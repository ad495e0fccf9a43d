"""ONNX encoders: onnxruntime gives the PyTorch student's embeddings to 1e-4 at any batch size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from deploy_helpers import SIZE, tiny_student

from pipeline.deploy.onnx import OnnxEncoders, export_onnx

pytestmark = pytest.mark.usefixtures("one_thread")


def test_onnxruntime_matches_torch_with_dynamic_batch(tokenizer_dir, tmp_path):
    pytest.importorskip("onnx", reason="onnx is the optional extra kdpipe[onnx]")
    pytest.importorskip("onnxruntime", reason="onnxruntime is the optional extra kdpipe[onnx]")
    model = tiny_student(tokenizer_dir, seed=2, biases=("image", "text"))  # ONNX holds any bias
    export_onnx(model, tmp_path)
    assert not model.training  # the exporter must not leave dropout on
    enc = OnnxEncoders(tmp_path, threads=1)
    rng = np.random.default_rng(0)
    texts = ["a dog", "the red cat sits on a man with a blue photo of the woman in it", "runs", "of of of"]
    for n in (1, 5):  # neither is the batch of 2 that was traced
        images = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
        with torch.no_grad():
            ref = model.encode_images(images).numpy()
        np.testing.assert_allclose(enc.images(images), ref, atol=1e-4)
        tok = model.tokenize((texts * 2)[:n])
        with torch.no_grad():
            ref = model.encode_tokens(tok).numpy()
        np.testing.assert_allclose(enc.tokens(tok["input_ids"].numpy(), tok["attention_mask"].numpy()), ref, atol=1e-4)
    # a shorter (dynamically padded) token length gives the same embeddings: padding is masked
    short = model.text_tower.tokenizer(texts, padding=True, truncation=True, max_length=12, return_tensors="np")
    with torch.no_grad():
        ref = model.encode_tokens(model.tokenize(texts)).numpy()
    np.testing.assert_allclose(enc.tokens(short["input_ids"], short["attention_mask"]), ref, atol=1e-4)
