"""The student's two encoders as ONNX graphs (dynamic batch), run with onnxruntime without torch.

    image.onnx   images uint8 [B, S, S, 3] (prepare's cache rows, S = the student's image_size)
                 -> embedding float32 [B, dim], L2-normalized (scaling and normalization are in the graph)
    text.onnx    input_ids, attention_mask int64 [B, L] (the tokenizer in text_tower/, L <= max_tokens)
                 -> embedding float32 [B, dim], L2-normalized

Resizing stays outside the image graph: an antialiased resize does not export faithfully, and a gallery is
resized once when it is cached anyway. onnx and onnxruntime are the optional extra `kdpipe[onnx]`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import InputError
from pipeline.store.durable import atomic_dir
from pipeline.store.ownership import Output
from pipeline.towers.student import DualEncoderStudent

OPSET = 17


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise InputError("export --onnx: needs onnx and onnxruntime; install kdpipe[onnx]") from None
    return onnxruntime


class _ImageEncoder(nn.Module):
    def __init__(self, student: DualEncoderStudent) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0  # uint8 [B, S, S, 3] -> [B, 3, S, S] in [0, 1]
        return self.student.encode_pixels((x - self.student.pixel_mean) / self.student.pixel_std)


class _TextEncoder(nn.Module):
    def __init__(self, student: DualEncoderStudent) -> None:
        super().__init__()
        self.student = student

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.student.encode_tokens({"input_ids": input_ids, "attention_mask": attention_mask})


ONNX_FILES = ("image.onnx", "text.onnx")
ONNX_DIR = Output("an ONNX export", directory=True, names=frozenset(ONNX_FILES))  # what export_onnx replaces


def export_onnx(model: DualEncoderStudent, directory: Path | str) -> tuple[Path, Path]:
    """Write image.onnx and text.onnx into `directory`, swapped in together (the model is traced on the CPU in
    fp32); an existing `directory` is replaced only when it holds nothing but those two files."""
    import_onnxruntime()
    model = getattr(model, "_orig_mod", model).float().cpu().eval()
    directory = Path(directory)
    s = model.image_size
    images = torch.zeros(2, s, s, 3, dtype=torch.uint8)
    tokens = model.tokenize(["a photo", "two words here"])
    jobs = [
        (_ImageEncoder(model), (images,), ["images"], ONNX_FILES[0]),
        (
            _TextEncoder(model),
            (tokens["input_ids"], tokens["attention_mask"]),
            ["input_ids", "attention_mask"],
            ONNX_FILES[1],
        ),
    ]
    with atomic_dir(directory, ONNX_DIR) as tmp:
        for module, args, names, name in jobs:
            module.eval()  # the exporter restores the wrapper's mode on every submodule afterwards: keep it eval
            axes = {n: {0: "batch"} | ({1: "tokens"} if n != "images" else {}) for n in names}
            with warnings.catch_warnings(), torch.no_grad():
                # the TorchScript exporter: no onnxscript dependency, and its tracer warnings are about
                # Python-side shape checks of transformers that are constant for a fixed architecture
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module,
                    args,
                    str(tmp / name),
                    input_names=names,
                    output_names=["embedding"],
                    dynamic_axes=axes | {"embedding": {0: "batch"}},
                    opset_version=OPSET,
                    dynamo=False,
                )
    return directory / ONNX_FILES[0], directory / ONNX_FILES[1]


class OnnxEncoders:
    """The exported pair, run with onnxruntime on the CPU: `images(uint8) -> [B, dim]`, `tokens(...) -> [B, dim]`."""

    def __init__(self, directory: Path | str, threads: int = 0) -> None:
        ort = import_onnxruntime()
        directory = Path(directory)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # 0: onnxruntime's default (one per core)
        for name in ("image.onnx", "text.onnx"):
            if not (directory / name).is_file():
                raise InputError(f"{directory}: {name} missing; run `kdpipe export --onnx` first")
        providers = ["CPUExecutionProvider"]
        self.image = ort.InferenceSession(str(directory / "image.onnx"), opts, providers=providers)
        self.text = ort.InferenceSession(str(directory / "text.onnx"), opts, providers=providers)

    def images(self, images: np.ndarray) -> np.ndarray:
        return self.image.run(None, {"images": np.ascontiguousarray(images, dtype=np.uint8)})[0]

    def tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        return self.text.run(None, feed)[0]
