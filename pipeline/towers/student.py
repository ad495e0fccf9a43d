"""The student: a dual encoder (image tower + text tower), each followed by a linear projection to the
teacher's dimension and L2 normalization (DSMD: ViT-B/16 in21k with the last layer's CLS + BERT-base uncased
with its pooler output, 30 tokens, Xavier-normal projections with gain 1.414).

Images arrive as prepare's uint8 cache rows [B, H, W, 3] and are converted, resized (if the cache has
another size) and normalized on the model's device: the data path moves 1 byte per pixel, not 4.

On disk (`save_student` / `load_student`), usable without kdpipe:
    model.safetensors     every parameter (image_tower.*, text_tower.*, image_proj.*, text_proj.*)
    student_config.json   format, dim, the StudentConfig, the resolved normalization constants
    image_tower/          ViTModel.from_pretrained(...) (+ preprocessor_config.json with mean/std)
    text_tower/           AutoModel.from_pretrained(...) and AutoTokenizer.from_pretrained(...)
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import from_dict, to_dict
from pipeline.errors import InputError, reading_file
from pipeline.store.durable import atomic_dir, atomic_path, write_text_durably
from pipeline.store.ownership import Output, any_of, claim
from pipeline.text_files import read_json
from pipeline.towers.image import ImageTower, ImageTowerConfig, build_image_tower
from pipeline.towers.text import HFTextTower, TextTowerConfig, build_text_tower

STUDENT_FORMAT = "kdpipe-student"
STUDENT_VERSION = 1


@dataclass(frozen=True)
class StudentConfig:
    """Section `distill.student`."""

    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    proj_init_gain: float = 1.414  # Xavier-normal gain of both projections (DSMD); biases start at 0
    # Projections with a bias (DSMD's nn.Linear; configs/ keep it) or without (the default): a bias-free
    # projection is what transformers' dual encoder, open_clip and sentence-transformers compute, so a
    # bias-free student exports exactly to each of them (`kdpipe export`); a bias after BERT's tanh pooler or
    # after a mean over tokens has no place there.
    proj_bias: bool = False


class DualEncoderStudent(nn.Module):
    """`forward(images_uint8, input_ids, attention_mask) -> (s_v, s_t)`, both [B, dim] fp32 L2-normalized."""

    def __init__(self, cfg: StudentConfig, dim: int, *, weights: bool = True, key: str = "distill.student") -> None:
        super().__init__()
        self.config, self.dim = cfg, int(dim)
        # key: where `cfg` came from, for the towers' messages (params.yaml's section, or a saved student's file)
        self.image_tower: ImageTower = build_image_tower(cfg.image, key=f"{key}.image", weights=weights)
        self.text_tower: HFTextTower = build_text_tower(cfg.text, key=f"{key}.text", weights=weights)
        self.image_proj = nn.Linear(self.image_tower.out_dim, self.dim, bias=cfg.proj_bias)
        self.text_proj = nn.Linear(self.text_tower.out_dim, self.dim, bias=cfg.proj_bias)
        for proj in (self.image_proj, self.text_proj):
            nn.init.xavier_normal_(proj.weight, gain=cfg.proj_init_gain)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if weights:  # a whole CLIP as both towers (TinyCLIP-like): its own projections, where they fit
            from pipeline.towers.hf_models import dual_projections

            start = dual_projections(cfg, self.dim)
            if start is not None:
                with torch.no_grad():
                    self.image_proj.weight.copy_(start[0])
                    self.text_proj.weight.copy_(start[1])
        # [1, 3, 1, 1] constants that follow .to(device) but are not parameters nor saved state.
        self.register_buffer("pixel_mean", torch.tensor(self.image_tower.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.image_tower.std).view(1, 3, 1, 1), persistent=False)
        self.image_size = cfg.image.image_size

    @property
    def device(self) -> torch.device:
        return self.image_proj.weight.device

    # -- images ---------------------------------------------------------------------------------------
    def to_float(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] (any device) -> float [B, 3, H, W] in [0, 1] on the model's device."""
        if isinstance(images, np.ndarray):
            with warnings.catch_warnings():
                # Read-only arrays (PIL's pixels, a memory-mapped cache) are fine: the tensor is only read
                # (`.float()` below copies), so torch's "not writable" warning would only alarm the user.
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                images = torch.from_numpy(np.ascontiguousarray(images))
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        return x.float().div_(255.0)

    def normalize_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """float [B, 3, H, W] in [0, 1] -> the tower's input: resized to image_size if needed, normalized."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False
            )
        return (x - self.pixel_mean) / self.pixel_std

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalized pixels [B, 3, S, S] -> [B, dim] fp32 L2-normalized."""
        return F.normalize(self.image_proj(self.image_tower(pixels)).float(), dim=-1)

    def encode_images(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] (prepare's cache rows) -> [B, dim] fp32 L2-normalized."""
        return self.encode_pixels(self.normalize_pixels(self.to_float(images)))

    # -- texts ----------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.text_tower.tokenize(texts)

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """A `tokenize` result (any device) -> the text tower's pooled features [B, F] (before the projection)."""
        ids = tokens["input_ids"].to(self.device, non_blocking=True)
        mask = tokens["attention_mask"].to(self.device, non_blocking=True)
        return self.text_tower(ids, mask)

    def project_text(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled text-tower features [B, F] -> [B, dim] fp32 L2-normalized."""
        return F.normalize(self.text_proj(features).float(), dim=-1)

    def encode_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """A `tokenize` result (any device) -> [B, dim] fp32 L2-normalized."""
        return self.project_text(self.text_features(tokens))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(texts))

    # -- both (the training step; one module call so that DDP and torch.compile see it) -----------------
    def forward(
        self,
        pixels: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        text_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized pixels [B, 3, S, S] and tokens [B, L] -> (s_v, s_t) [B, dim] fp32 L2-normalized.
        `text_features` [B, F]: the (frozen) text tower's features of these captions, computed beforehand;
        the tower is then skipped."""
        if text_features is None:
            text_features = self.text_features({"input_ids": input_ids, "attention_mask": attention_mask})
        return self.encode_pixels(pixels), self.project_text(text_features)


def build_student(cfg: StudentConfig, dim: int) -> DualEncoderStudent:
    """A student with its towers' weights loaded from the configured local paths (or randomly initialized)."""
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    return DualEncoderStudent(cfg, dim)


# -- saving and loading ---------------------------------------------------------------------------------
# What a save may write into or replace: a student directory (its config, or distill's record of the run that
# is writing it), and in it a tower directory (a Hugging Face style config.json)
STUDENT_DIR = Output(
    "a student directory", directory=True, recognise=any_of("student_config.json", "distill_config.yaml")
)
TOWER = Output("a saved tower", directory=True, recognise=any_of("config.json"))


def save_student(model: DualEncoderStudent, directory: Path | str, pixels: dict | None = None) -> None:
    """Write the exported student into `directory` (other files there, e.g. checkpoints/, are kept). `pixels`:
    how its training images were made from files (pipeline/data/pixels.py PixelRecipe.describe()), recorded as
    `image.pixels` so that search and export make any other image the same way.

    Each piece is written under a temporary name, fsync'd and renamed, and student_config.json goes last, so
    an interrupted save never leaves a config next to mismatched weights."""
    from safetensors.torch import save_file
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bars inside distill's own progress output
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    directory = Path(directory)
    claim(directory, STUDENT_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "student_config.json").unlink(missing_ok=True)
    for name, tower in (("image_tower", model.image_tower), ("text_tower", model.text_tower)):
        with atomic_dir(directory / name, TOWER) as tmp:
            tower.save(tmp)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    meta = {
        "format": STUDENT_FORMAT,
        "version": STUDENT_VERSION,
        "dim": model.dim,
        "config": to_dict(model.config),
        "image": {
            "backend": model.config.image.backend,
            "size": model.image_size,
            "mean": list(model.image_tower.mean),
            "std": list(model.image_tower.std),
            "input": "uint8 RGB [B, H, W, 3] -> /255 -> resize to size -> (x - mean) / std",
            **({"pixels": pixels} if pixels is not None else {}),
        },
        "text": {"max_tokens": model.text_tower.max_tokens, "pooling": model.config.text.pooling},
        "usage": "image: normalize(image_proj(pool(image_tower(x)))); text: normalize(text_proj(pool(text_tower(t))))",
    }
    write_text_durably(directory / "student_config.json", json.dumps(meta, indent=2) + "\n")


def load_student(directory: Path | str, device: str | torch.device = "cpu") -> DualEncoderStudent:
    """A student saved by `save_student` (distill's `<workdir>/student/`), in eval mode on `device`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / "student_config.json"
    if not meta_path.is_file():
        raise InputError(f"{directory}: no student here (student_config.json missing); run `kdpipe distill` first")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != STUDENT_FORMAT or meta.get("version") != STUDENT_VERSION:
        raise InputError(f"{meta_path}: not a {STUDENT_FORMAT} v{STUDENT_VERSION} student")
    if (
        not isinstance(meta.get("config"), dict)
        or isinstance(meta.get("dim"), bool)
        or not isinstance(meta.get("dim"), int)
    ):
        raise InputError(f"{meta_path}: no student config and dim in it (the file was edited or cut short)")
    raw = dict(meta["config"])
    raw.setdefault("proj_bias", True)  # students saved before `proj_bias` existed all had biased projections
    cfg = from_dict(StudentConfig, raw, "student_config.json:config")
    # The architecture comes from the saved towers (not from the original paths, which may be gone); the
    # weights come from model.safetensors only, loaded strictly.
    image_cfg = cfg.image
    if image_cfg.backend == "hf_vit":
        image_cfg = replace(image_cfg, path=directory / "image_tower")
    text_cfg = replace(cfg.text, path=directory / "text_tower", tokenizer=directory / "text_tower", backend="hf_bert")
    again = "export the student again (kdpipe distill) or copy its directory whole"
    model = DualEncoderStudent(
        replace(cfg, image=image_cfg, text=text_cfg), meta["dim"], weights=False, key=f"{meta_path}:config"
    )
    model.config = cfg
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise InputError(f"{directory}: model.safetensors missing")
    with reading_file(weights, "a safetensors file", again):
        state = load_file(str(weights))
    own = model.state_dict()
    for key, tensor in state.items():  # load_state_dict would raise a RuntimeError listing every mismatch
        if key in own and tensor.shape != own[key].shape:
            raise InputError(
                f"{weights}: {key} has shape {list(tensor.shape)}, the student of student_config.json needs "
                f"{list(own[key].shape)} (weights of another student?); {again}"
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(
            f"{weights}: does not match student_config.json (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    return model.to(device).eval()
