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
A frozen text tower loaded from a directory (the demo's MiniLM) is not copied: model.safetensors then lacks
text_tower.*, there is no text_tower/, and student_config.json's `text.frozen_tower` names its source and the
SHA-256 of its files (pipeline/towers/frozen.py); `kdpipe export` writes a copy with the tower in text_tower/.
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
from pipeline.towers.frozen import TowerSource, materialize
from pipeline.towers.image import ImageTower, ImageTowerConfig, build_image_tower
from pipeline.towers.text import HFTextTower, TextTowerConfig, build_text_tower

STUDENT_FORMAT = "kdpipe-student"
STUDENT_VERSION = 2  # 2: a frozen text tower may be referenced by digest (text.frozen_tower) instead of saved
READABLE_VERSIONS = (1, 2)


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

    def __init__(
        self,
        cfg: StudentConfig,
        dim: int,
        *,
        weights: bool = True,
        key: str = "distill.student",
        text_tower: HFTextTower | None = None,
    ) -> None:
        """`key`: where `cfg` came from, for the towers' messages (params.yaml's section, or a saved student's
        file); `text_tower`: one built already (load_student: a frozen tower loaded from its source)."""
        super().__init__()
        self.config, self.dim = cfg, int(dim)
        self.image_tower: ImageTower = build_image_tower(cfg.image, key=f"{key}.image", weights=weights)
        self.text_tower: HFTextTower = text_tower or build_text_tower(cfg.text, key=f"{key}.text", weights=weights)
        self._text_source: TowerSource | None = None  # set by frozen_text_source() or load_student
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

    def frozen_text_source(self) -> TowerSource | None:
        """Where the frozen text tower's files are and their digests, when it is referenced rather than saved
        (frozen and loaded from a directory); None otherwise. Digested once, when first asked (distill: at setup,
        so that the files recorded are the ones it trained with)."""
        tower = self.text_tower
        if self._text_source is None and tower.frozen and tower.source_dir is not None:
            from pipeline.pretrained_assets import MINILM_PACKAGE

            packaged = self.config.text.backend == "minilm" and self.config.text.path is None
            self._text_source = TowerSource.of(tower.source_dir, MINILM_PACKAGE if packaged else None)
        return self._text_source

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """The state a student's files hold: every entry, minus a frozen text tower referenced by digest."""
        state = self.state_dict()
        if self.frozen_text_source() is None:
            return state
        return {k: v for k, v in state.items() if not k.startswith("text_tower.")}

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
    source = model.frozen_text_source()  # a frozen tower from a directory: referenced, not copied
    towers = [("image_tower", model.image_tower)] + ([("text_tower", model.text_tower)] if source is None else [])
    for name, tower in towers:
        with atomic_dir(directory / name, TOWER) as tmp:
            tower.save(tmp)
    state = {k: v.detach().contiguous().cpu() for k, v in model.own_state_dict().items()}
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
        "text": {
            "max_tokens": model.text_tower.max_tokens,
            "pooling": model.config.text.pooling,
            **({"frozen_tower": source.to_json()} if source is not None else {}),
        },
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
    if (
        not isinstance(meta, dict)
        or meta.get("format") != STUDENT_FORMAT
        or meta.get("version") not in READABLE_VERSIONS
    ):
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
    # weights come from model.safetensors only, loaded strictly; a referenced frozen text tower from its source.
    image_cfg = cfg.image
    if image_cfg.backend == "hf_vit":
        image_cfg = replace(image_cfg, path=directory / "image_tower")
    text_cfg = replace(cfg.text, path=directory / "text_tower", tokenizer=directory / "text_tower", backend="hf_bert")
    again = "export the student again (kdpipe distill) or copy its directory whole"
    source, text_tower = _referenced_text_tower(meta, directory, text_cfg, str(meta_path))
    model = DualEncoderStudent(
        replace(cfg, image=image_cfg, text=text_cfg),
        meta["dim"],
        weights=False,
        key=f"{meta_path}:config",
        text_tower=text_tower,
    )
    model.config, model._text_source = cfg, source
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
    if source is not None:  # the referenced tower's weights are its own files', not in model.safetensors
        missing = [k for k in missing if not k.startswith("text_tower.")]
    if missing or unexpected:
        raise InputError(
            f"{weights}: does not match student_config.json (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    return model.to(device).eval()


def _referenced_text_tower(
    meta: dict, directory: Path, text_cfg: TextTowerConfig, where: str
) -> tuple[TowerSource | None, HFTextTower | None]:
    """The frozen text tower a student references (student_config.json's text.frozen_tower), loaded from its
    source once every recorded digest matches; (None, None) for a student that saved its text tower."""
    ref = (meta.get("text") or {}).get("frozen_tower") if isinstance(meta.get("text"), dict) else None
    if ref is None:
        return None, None
    source = TowerSource.from_json(ref, where)
    tower_dir = source.directory(directory, where)
    source.check(tower_dir, where)
    tower = build_text_tower(replace(text_cfg, path=tower_dir, tokenizer=None), key=f"{where}: text.frozen_tower")
    if not tower.frozen:
        raise InputError(f"{where}: text.frozen_tower belongs to a frozen text tower (config.text.freeze is false)")
    return source, tower


def materialize_frozen_tower(directory: Path | str) -> bool:
    """Make the student copy in `directory` self-contained: a frozen text tower it references (a package's, or
    another directory's) is copied into its text_tower/ (hard links where possible) and its student_config.json
    (replaced, never written in place: it may be a hard link to the original's) points there. False when there
    was nothing to do."""
    directory = Path(directory)
    meta_path = directory / "student_config.json"
    meta = read_json(meta_path)
    ref = (meta.get("text") or {}).get("frozen_tower")
    if ref is None:
        return False
    source = TowerSource.from_json(ref, str(meta_path))
    if source.package is None and not Path(source.path).is_absolute():
        return False  # already inside the student directory
    meta["text"]["frozen_tower"] = materialize(source, directory, directory).to_json()
    write_text_durably(meta_path, json.dumps(meta, indent=2) + "\n")
    return True
