"""The demo's cross-encoder: a small fusion head over the LiT teacher's frozen towers, scoring (image, caption) pairs.

    x_v = standardize(EffNet-Lite(x))                     [1280]  pooled backbone features, as the LiT heads see them
    x_t = MiniLM(s)                                        [384]   sentence embedding
    h_v = W_v x_v + b_v,  h_t = W_t x_t + b_t              [H]
    logit(x, s) = tau cos(v(x), u(s))  +  w_o . GELU(W_f [h_v * h_t ; h_v ; h_t] + b_f) + b_o

The first term is the LiT teacher's own score at its logit scale tau = 1 / fit_teacher.temperature (v, u: its
two heads, frozen, copied into the file); the second a learned joint function of the pair: the product
h_v * h_t weighs agreement feature by feature and both sides enter the nonlinearity together, which makes
the sum a (small) single-stream teacher for LEMKD / MCAD / DCD built only from parts that ship in packages.
w_o starts at 0, so training starts from the dual encoder's ranking and learns a correction to it. Why the
residual: a fusion MLP alone, fitted on the 1,129 training emoji, ranks the val emoji worse than the dual
encoder it should teach beside (rerank R@1 of the LiT top 16: 9.1-12.8 vs LiT's 14.1-15.8); with it, 15.1-16.1.

`kdpipe fit-cross-encoder` trains it (pipeline/teachers/fit_fusion.py) on the teacher's training pairs only,
against the heads' hard negatives; the head file (`cross_encoder.safetensors`) holds its weights, the heads,
the standardization, and in its metadata the backbone, resolution and fit settings; its sha256 is in identity().
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline.errors import InputError
from pipeline.hashing import sha256_file
from pipeline.pretrained_assets import MINILM_DIM
from pipeline.store.durable import atomic_path
from pipeline.teachers.base import CrossEncoder, TokenBatch
from pipeline.teachers.lit import IMAGE_FEATURE_DIM, FrozenTowers, LiTHeads
from pipeline.teachers.minilm import MAX_TEXT_LEN

HEAD_FORMAT = "kdpipe-fusion-head"
HEAD_VERSION = 1


class FusionHead(nn.Module):
    """The LiT heads (frozen) and the fusion MLP (trained): buffers and parameters of one file."""

    def __init__(self, variant: str, image_size: int, hidden: int, heads: LiTHeads, scale: float):
        super().__init__()
        self.variant, self.image_size, self.hidden = variant, int(image_size), int(hidden)
        self.register_buffer("image_mean", heads.image_mean.detach().float().clone())  # [1280]
        self.register_buffer("image_std", heads.image_std.detach().float().clone())  # [1280]
        self.register_buffer("lit_image_weight", heads.image_weight.detach().float().clone())  # [D, 1280]
        self.register_buffer("lit_image_bias", heads.image_bias.detach().float().clone())  # [D]
        self.register_buffer("lit_text_weight", heads.text_weight.detach().float().clone())  # [D, 384]
        self.register_buffer("lit_text_bias", heads.text_bias.detach().float().clone())  # [D]
        self.register_buffer("lit_scale", torch.tensor(float(scale)))  # tau of the dual-encoder term
        self.image_proj = nn.Linear(IMAGE_FEATURE_DIM, hidden)
        self.text_proj = nn.Linear(MINILM_DIM, hidden)
        self.fuse = nn.Linear(3 * hidden, hidden)
        self.out = nn.Linear(hidden, 1)

    def image_parts(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[P, 1280] backbone features -> (standardized [P, 1280], LiT embedding [P, D], normalized): the frozen
        part of project_images, which a fit computes once for every image instead of once per step."""
        x = (features.to(self.image_mean.dtype) - self.image_mean) / self.image_std
        return x, F.normalize(F.linear(x, self.lit_image_weight, self.lit_image_bias), dim=-1)

    def project_images(self, features: torch.Tensor) -> torch.Tensor:
        """[P, 1280] backbone features -> [P, D + H]: the LiT embedding (normalized), then h_v."""
        x, lit = self.image_parts(features)
        return torch.cat([lit, self.image_proj(x)], dim=-1)

    def project_texts(self, features: torch.Tensor) -> torch.Tensor:
        """[P, 384] MiniLM embeddings -> [P, D + H]: the LiT embedding (normalized), then h_t."""
        x = features.to(self.image_mean.dtype)
        lit = F.normalize(F.linear(x, self.lit_text_weight, self.lit_text_bias), dim=-1)
        return torch.cat([lit, self.text_proj(x)], dim=-1)

    def fused(self, p_v: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
        """Projected pairs [P, D + H] x [P, D + H] -> [P] logits."""
        d = self.lit_image_weight.shape[0]
        h_v, h_t = p_v[..., d:], p_t[..., d:]
        z = F.gelu(self.fuse(torch.cat([h_v * h_t, h_v, h_t], dim=-1)))
        return self.lit_scale * (p_v[..., :d] * p_t[..., :d]).sum(-1) + self.out(z).squeeze(-1)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return self.fused(self.project_images(image_features), self.project_texts(text_features))

    def save(self, path: Path | str, fit: dict[str, Any] | None = None) -> str:
        """Write the head (safetensors, atomically); returns the file's sha256. One metadata entry of sorted
        JSON, so the bytes (and the sha256 the mined store records) are the same from run to run."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": HEAD_FORMAT,
            "version": HEAD_VERSION,
            "variant": self.variant,
            "image_size": self.image_size,
            "hidden": self.hidden,
            "dim": int(self.lit_image_weight.shape[0]),
            "fit": fit or {},
        }
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"kdpipe": json.dumps(meta, sort_keys=True)})
        return sha256_file(path)

    @classmethod
    def load(cls, path: Path | str, key: str = "mine.cross_encoder.fusion.head") -> FusionHead:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"{key}: {path} not found; run `kdpipe fit-cross-encoder` (after fit-teacher)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("kdpipe", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except Exception as err:  # a truncated or foreign file
            raise InputError(f"{key}: {path} is not a fusion-head file ({type(err).__name__})") from None
        if meta.get("format") != HEAD_FORMAT or meta.get("version") != HEAD_VERSION:
            raise InputError(f"{key}: {path} is not a {HEAD_FORMAT} v{HEAD_VERSION} file")
        d = int(meta["dim"])
        blank = LiTHeads(
            meta["variant"],
            meta["image_size"],
            torch.zeros(IMAGE_FEATURE_DIM),
            torch.ones(IMAGE_FEATURE_DIM),
            torch.zeros(d, IMAGE_FEATURE_DIM),
            torch.zeros(d),
            torch.zeros(d, MINILM_DIM),
            torch.zeros(d),
        )
        head = cls(meta["variant"], meta["image_size"], meta["hidden"], blank, 1.0)
        expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        if found != expected:
            raise InputError(f"{key}: {path} holds {sorted(found.items())}, expected {sorted(expected.items())}")
        head.load_state_dict(tensors, strict=True)
        return head.eval().requires_grad_(False)


class FusionCrossEncoder(CrossEncoder):
    """Frozen EfficientNet-Lite + frozen MiniLM + the fitted fusion head, behind the CrossEncoder interface.
    States: an image's pooled backbone features [1280], a caption's MiniLM embedding [384] (float32)."""

    def __init__(
        self, towers: FrozenTowers, head: FusionHead, *, head_file: Path | None = None, dtype=torch.float32
    ) -> None:
        if (towers.variant, towers.image_size) != (head.variant, head.image_size):
            raise InputError(
                f"the fusion head was fitted on efficientnet-{head.variant} at {head.image_size} px, "
                f"not efficientnet-{towers.variant} at {towers.image_size} px"
            )
        self.towers, self.head = towers, head.to(towers.device)
        self.device, self.dtype = towers.device, dtype
        self.head_file = Path(head_file) if head_file is not None else None
        self.name = f"fusion(effnet-{head.variant}@{head.image_size}+minilm-l6, h{head.hidden})"
        self._identity: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, cfg, device: torch.device | str = "cpu", dtype=torch.float32) -> FusionCrossEncoder:
        head = FusionHead.load(cfg.head)
        return cls(FrozenTowers(head.variant, head.image_size, device), head, head_file=cfg.head, dtype=dtype)

    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            self._identity = {
                "name": self.name,
                "kind": "fusion",
                **self.towers.weights_identity(),
                "head": self.head_file.name if self.head_file else None,
                "head_sha256": sha256_file(self.head_file) if self.head_file else None,
                "image_size": self.head.image_size,
                "hidden": self.head.hidden,
                "lit_scale": float(self.head.lit_scale),
                "max_text_len": MAX_TEXT_LEN,
                "dtype": str(self.dtype).replace("torch.", ""),
            }
        return dict(self._identity)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return self.towers.preprocess_image(image)

    def tokenize(self, texts: list[str]) -> TokenBatch:
        return self.towers.tokenize(texts)

    def _autocast(self):
        if self.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast(device_type=self.device.type, dtype=self.dtype)
        return torch.autocast(device_type=self.device.type, enabled=False)

    def image_states(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.towers.image_features(pixels).float()

    def text_states(self, tokens: TokenBatch) -> torch.Tensor:
        with self._autocast():
            return self.towers.text_features(tokens).float()

    def score_states(self, image_states: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        return self.head(image_states, text_states).float()

    def image_state_bytes(self) -> int:
        return IMAGE_FEATURE_DIM * 4

    def text_state_bytes(self) -> int:
        return MINILM_DIM * 4


__all__ = ["FusionHead", "FusionCrossEncoder", "HEAD_FORMAT"]
