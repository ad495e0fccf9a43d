"""BEiT-3 as a frozen retrieval teacher: the official checkpoint, tokenizer and eval transform behind the
`Teacher` interface, and a feature-extractor API of its own:

    teacher = BEiT3Teacher.from_checkpoint("beit3_large_patch16_384_f30k_retrieval.pth", tokenizer="beit3.spm",
                                           device="cuda", dtype=torch.bfloat16)
    image_emb = teacher.encode_images([PIL images])    # [N, 1024] float32, L2-normalized
    text_emb = teacher.encode_texts(["a dog", ...])     # [M, 1024] float32, L2-normalized

Eval transform (unilm/beit3 `build_transform(is_train=False)`): PIL bicubic resize to exactly S x S (no
crop, aspect ratio squashed), to [0, 1], normalize with mean = std = 0.5. On CUDA, bf16 / fp16 run under
autocast (the official evaluation runs under fp16 autocast); on the CPU the teacher computes in float32.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.data.image_file import to_rgb
from pipeline.devices import resolve_device
from pipeline.errors import InputError
from pipeline.hashing import sha256_file
from pipeline.teachers import BEiT3TeacherConfig
from pipeline.teachers.base import Teacher, TokenBatch
from pipeline.teachers.beit3_checkpoint import load_beit3_checkpoint
from pipeline.teachers.beit3_model import BEIT3_PRESETS, BEiT3Dims, BEiT3ForRetrieval, preset_of
from pipeline.teachers.beit3_tokenizer import BEiT3Tokenizer

MEAN = STD = 0.5  # IMAGENET_INCEPTION_MEAN / _STD of the official transform
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.float32 / bfloat16 / float16, or their names ("bf16", "fp16", "float32", ...)."""
    if isinstance(dtype, str):
        names = {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
        }
        if dtype.lower().removeprefix("torch.") not in names:
            raise InputError(f"dtype {dtype!r}: the BEiT-3 teacher computes in float32, bfloat16 or float16")
        return names[dtype.lower().removeprefix("torch.")]
    if dtype not in _DTYPES:
        raise InputError(f"dtype {dtype}: the BEiT-3 teacher computes in float32, bfloat16 or float16")
    return dtype


def resize_image(image: Image.Image, size: int) -> np.ndarray:
    """The official eval resize: RGB, PIL bicubic to exactly size x size -> uint8 [S, S, 3]."""
    return np.asarray(to_rgb(image).resize((size, size), Image.BICUBIC))


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,S,S] (or [3,S,S]) -> float32 in [0,1] -> (x - 0.5) / 0.5, on the tensor's device.
    Same operations as torchvision ToTensor + Normalize, so the same float32 values."""
    return pixels.float().div(255).sub(MEAN).div(STD)


class BEiT3Teacher(Teacher):
    def __init__(
        self,
        model: BEiT3ForRetrieval,
        tokenizer: BEiT3Tokenizer | None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        checkpoint: Path | None = None,
        checkpoint_image_size: int | None = None,
        seed: int | None = None,
    ):
        """Prefer the constructors: `from_checkpoint`, `from_config`, `from_model` (in-memory weights).
        `tokenizer` None: a model-only teacher (benchmarks) whose `tokenize` refuses."""
        self.device = resolve_device(device)
        dtype = resolve_dtype(dtype)
        if self.device.type == "cpu" and dtype != torch.float32:
            warnings.warn(
                f"BEiT-3 teacher on the CPU computes in float32 ({_DTYPES[dtype]} autocast is used on CUDA only)",
                stacklevel=3,
            )
            dtype = torch.float32
        self.dtype = dtype
        self.dims: BEiT3Dims = model.dims
        if tokenizer is not None and tokenizer.vocab_size > self.dims.vocab_size:
            raise InputError(
                f"{tokenizer.path}: tokenizer has {tokenizer.vocab_size} ids but the model's text "
                f"embedding only {self.dims.vocab_size} rows (tokenizer and checkpoint do not match)"
            )
        if tokenizer is not None and tokenizer.max_len > self.dims.max_text_len:
            raise InputError(
                f"max_text_len={tokenizer.max_len} exceeds the model's {self.dims.max_text_len} text positions"
            )
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.dim = self.dims.embed_dim
        self.image_size = self.dims.image_size
        self.max_text_len = tokenizer.max_len if tokenizer is not None else None
        self.preset = preset_of(self.dims)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.checkpoint_image_size = checkpoint_image_size
        self.seed = seed
        arch = self.preset or f"d{self.dims.embed_dim}x{self.dims.depth}"
        self.name = f"beit3-{arch}-{self.image_size}"
        self._identity: dict[str, Any] | None = None

    # -- constructors ---------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        tokenizer: str | Path,
        num_heads: int | None = None,
        image_size: int | None = None,
        max_text_len: int = 64,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        preset: str | None = None,
    ) -> BEiT3Teacher:
        """An official retrieval checkpoint (dimensions read from its tensor shapes) and its beit3.spm.
        `image_size` None: the checkpoint's own; `preset`: if given, the checkpoint must be that one."""
        device = resolve_device(device)  # fail before reading gigabytes
        tok = BEiT3Tokenizer(tokenizer, max_len=max_text_len)
        loaded = load_beit3_checkpoint(path, num_heads=num_heads, image_size=image_size, preset=preset)
        return cls(
            loaded.model,
            tok,
            device=device,
            dtype=dtype,
            checkpoint=loaded.path,
            checkpoint_image_size=loaded.checkpoint_image_size,
        )

    @classmethod
    def from_config(
        cls, cfg: BEiT3TeacherConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> BEiT3Teacher:
        if cfg.checkpoint is None:
            raise InputError("extract.teacher.beit3.checkpoint is not set (path to an official BEiT-3 retrieval .pth)")
        if cfg.tokenizer is None:
            raise InputError("extract.teacher.beit3.tokenizer is not set (path to beit3.spm)")
        return cls.from_checkpoint(
            cfg.checkpoint,
            tokenizer=cfg.tokenizer,
            num_heads=cfg.num_heads,
            image_size=cfg.image_size,
            max_text_len=cfg.max_text_len,
            device=device,
            dtype=dtype,
            preset=None if cfg.preset == "auto" else cfg.preset,
        )

    @classmethod
    def from_model(
        cls,
        model: BEiT3ForRetrieval,
        tokenizer: BEiT3Tokenizer | str | Path | None,
        *,
        max_text_len: int = 64,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int | None = None,
    ) -> BEiT3Teacher:
        """A teacher around weights already in memory (tests, benchmarks); tokenizer None: model only."""
        if tokenizer is not None and not isinstance(tokenizer, BEiT3Tokenizer):
            tokenizer = BEiT3Tokenizer(tokenizer, max_len=max_text_len)
        return cls(model, tokenizer, device=device, dtype=dtype, seed=seed)

    @classmethod
    def random(
        cls,
        dims: BEiT3Dims | str,
        tokenizer: BEiT3Tokenizer | str | Path | None,
        *,
        seed: int = 0,
        image_size: int | None = None,
        max_text_len: int = 64,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> BEiT3Teacher:
        """Random weights (deterministic in `seed`) for a preset name or explicit dims."""
        if isinstance(dims, str):
            if dims not in BEIT3_PRESETS:
                raise InputError(f"unknown BEiT-3 preset {dims!r}; known: {', '.join(BEIT3_PRESETS)}")
            dims = BEIT3_PRESETS[dims]
        if image_size is not None:
            dims = dims.with_image_size(image_size)
        model = BEiT3ForRetrieval(dims).init_random(seed)
        return cls.from_model(model, tokenizer, max_text_len=max_text_len, device=device, dtype=dtype, seed=seed)

    # -- Teacher interface ----------------------------------------------------------------------------
    def logit_scale(self) -> float:
        """exp of the retrieval model's learned `logit_scale` (read from the checkpoint with the weights)."""
        return float(self.model.logit_scale.detach().float().exp())

    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            ident: dict[str, Any] = {
                "kind": "beit3",
                "name": self.name,
                "preset": self.preset,
                "dims": asdict(self.dims),
                "image_size": self.image_size,
                "max_text_len": self.max_text_len,
                "dtype": _DTYPES[self.dtype],
                "tokenizer": None
                if self.tokenizer is None
                else {"file": self.tokenizer.path.name, "sha256": sha256_file(self.tokenizer.path)},
            }
            if self.checkpoint is not None:
                ident["checkpoint"] = {
                    "file": self.checkpoint.name,
                    "sha256": sha256_file(self.checkpoint),
                    "image_size": self.checkpoint_image_size,
                }
            else:  # in-memory weights: identified by their content
                ident["checkpoint"] = None
                ident["random_init_seed"] = self.seed
                ident["weights_sha256"] = _state_sha256(self.model)
            self._identity = ident
        return dict(self._identity)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> float32 [3, S, S] (bicubic resize, [0,1], mean = std = 0.5), on the CPU."""
        return normalize_pixels(self.preprocess_image_uint8(image))

    def preprocess_image_uint8(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> uint8 [3, S, S] (the resize only): 4x less to move to the GPU, where
        `encode_image_batch` normalizes it."""
        return torch.from_numpy(resize_image(image, self.image_size).copy()).permute(2, 0, 1)

    def tokenize(self, texts: list[str], pad_to_max_len: bool = False) -> TokenBatch:
        """Captions -> {"input_ids", "padding_mask"} padded to the longest of the batch (or to max_len)."""
        return self._tok()(texts, pad_to_max_len=pad_to_max_len)

    def token_lengths(self, texts: list[str]) -> list[int]:
        return self._tok().lengths(texts)

    def _tok(self) -> BEiT3Tokenizer:
        if self.tokenizer is None:
            raise InputError(f"teacher {self.name} was built without a tokenizer (model only)")
        return self.tokenizer

    def _autocast(self):
        return torch.autocast(
            device_type=self.device.type,
            dtype=self.dtype,
            enabled=self.device.type == "cuda" and self.dtype != torch.float32,
        )

    @torch.inference_mode()
    def encode_image_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,S,S] float (normalized) or uint8 (resized only) -> [B,D] float32, L2-normalized."""
        pixels = pixels.to(self.device, non_blocking=True)
        if pixels.dtype == torch.uint8:
            pixels = normalize_pixels(pixels)
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size}, got {tuple(pixels.shape)}")
        with self._autocast():
            return self.model.encode_image(pixels.float())

    @torch.inference_mode()
    def encode_text_batch(self, tokens: TokenBatch) -> torch.Tensor:
        ids = tokens["input_ids"].to(self.device, non_blocking=True)
        mask = tokens.get("padding_mask")
        mask = None if mask is None else mask.to(self.device, non_blocking=True)
        with self._autocast():
            return self.model.encode_text(ids, mask)


def _state_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


__all__ = ["BEiT3Teacher", "BEiT3Dims", "BEIT3_PRESETS", "resize_image", "normalize_pixels"]
