"""Official BEiT-3 checkpoints (`.pth` from unilm/beit3) -> our `BEiT3ForRetrieval`, key for key.

One path, in timm's `checkpoint_filter_fn` style:
  read (memory-mapped, weights only) -> unwrap "model"/"module" -> infer the dimensions from tensor shapes
  -> refuse pretrain-only checkpoints -> resize the vision position table if asked -> compare the key set
  with the model's (missing / unexpected keys are named and refused; never a silent strict=False) ->
  build the model on the meta device and `load_state_dict(assign=True)`.

Memory: `torch.load(mmap=True)` maps the file instead of reading it, and `assign=True` makes the model's
parameters *be* those tensors, so loading a checkpoint costs about one copy of it (file pages), not two.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.errors import InputError
from pipeline.teachers.beit3_model import BEIT3_PRESETS, FIRST_POSITION, BEiT3Dims, BEiT3ForRetrieval
from pipeline.weights import refused_object

HEAD_KEYS = ("vision_head.weight", "language_head.weight")
_LAYER_KEY = re.compile(r"^beit3\.encoder\.layers\.(\d+)\.")
_MAX_LISTED = 8  # key names listed in an error message before "... and N more"


@dataclass(frozen=True)
class LoadedCheckpoint:
    model: BEiT3ForRetrieval
    dims: BEiT3Dims  # the dimensions of the model as built (image size after any interpolation)
    checkpoint_image_size: int  # the image size the checkpoint's position table was trained for
    path: Path


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The raw state dict of a checkpoint file, memory-mapped, tensors only (no code from the file runs).

    Training checkpoints of unilm/beit3 may carry their argparse `args` next to the weights; those are
    allowed through the weights-only unpickler and dropped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: BEiT-3 checkpoint file not found")
    with open(path, "rb") as f:
        head = f.read(4)
    if not _looks_like_torch_save(head):  # else the unpickler reads random bytes as opcodes, and says so
        raise InputError(
            f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a legacy torch.save file; "
            f"it starts with bytes {head.hex(' ') or 'nothing: the file is empty'})"
        )
    safe = getattr(torch.serialization, "safe_globals", None)

    def load(mmap: bool):
        if safe is None:  # torch < 2.5
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
        with safe([argparse.Namespace]):
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)

    try:
        try:
            obj = load(mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = load(mmap=False)  # a legacy (pre-zip) file cannot be mapped: read it once instead
    except pickle.UnpicklingError as err:
        raise InputError(
            f"{path}: holds objects other than tensors and cannot be loaded safely as weights only "
            f"({refused_object(err)})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise InputError(
            f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''})"
        ) from None
    return unwrap_state_dict(obj, path)


def _looks_like_torch_save(head: bytes) -> bool:
    """torch.save writes a zip archive (since 1.6) or, legacy, a pickle (protocol 2) of its magic number."""
    return head.startswith(b"PK\x03\x04") or head.startswith(b"\x80\x02\x8a")


def unwrap_state_dict(obj, path: str | Path = "checkpoint") -> dict[str, Tensor]:
    """The weights of a checkpoint object: under "model" or "module", or the dict itself; a DDP "module."
    key prefix is removed. Non-tensor entries are refused by name."""
    if isinstance(obj, dict):
        for key in ("model", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise InputError(f"{path}: no state dict found (expected a dict of tensors under 'model' or 'module')")
    if all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise InputError(f"{path}: entries that are not tensors: {_names(bad)}")
    return dict(obj)


# ---------------------------------------------------------------------------------------------------
# Dimensions from shapes
# ---------------------------------------------------------------------------------------------------
def _need(state: dict[str, Tensor], key: str, ndim: int, path) -> Tensor:
    t = state.get(key)
    if t is None:
        raise InputError(f"{path}: not a BEiT-3 checkpoint (no key {key!r})")
    if t.ndim != ndim:
        raise InputError(f"{path}: {key} has shape {tuple(t.shape)}, expected {ndim} dimensions")
    return t


def infer_dims(state: dict[str, Tensor], num_heads: int | None = None, path: str | Path = "checkpoint") -> BEiT3Dims:
    """Width, depth, FFN width, patch, image size, vocabulary and text positions read from tensor shapes.

    Heads cannot be read from shapes: they come from the preset whose width matches, else `num_heads`.
    Works on meta tensors too (only shapes are read)."""
    text = _need(state, "beit3.text_embed.weight", 2, path)
    vocab, d = text.shape
    proj = _need(state, "beit3.vision_embed.proj.weight", 4, path)
    if proj.shape[0] != d or proj.shape[1] != 3 or proj.shape[2] != proj.shape[3]:
        raise InputError(
            f"{path}: beit3.vision_embed.proj.weight has shape {tuple(proj.shape)}, expected ({d}, 3, P, P)"
        )
    patch = proj.shape[-1]
    depth = _depth(state, path)
    ffn = _need(state, "beit3.encoder.layers.0.ffn.A.fc1.weight", 2, path).shape[0]
    rows_a = _need(state, "beit3.encoder.embed_positions.A.weight", 2, path).shape[0]
    grid = math.isqrt(max(rows_a - FIRST_POSITION - 1, 0))
    if grid < 1 or grid * grid != rows_a - FIRST_POSITION - 1:
        raise InputError(
            f"{path}: beit3.encoder.embed_positions.A.weight has {rows_a} rows, expected "
            f"G*G + 3 for a square patch grid"
        )
    text_positions = _need(state, "beit3.encoder.embed_positions.B.weight", 2, path).shape[0]
    heads = _heads(d, num_heads, path)
    return BEiT3Dims(
        embed_dim=d,
        depth=depth,
        num_heads=heads,
        ffn_dim=ffn,
        patch_size=patch,
        image_size=grid * patch,
        vocab_size=vocab,
        text_positions=text_positions,
    )


def _depth(state, path) -> int:
    ids = {int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))}
    if not ids:
        raise InputError(f"{path}: not a BEiT-3 checkpoint (no beit3.encoder.layers.* keys)")
    if ids != set(range(max(ids) + 1)):
        gaps = sorted(set(range(max(ids) + 1)) - ids)
        raise InputError(f"{path}: encoder layers are not numbered 0..{max(ids)}: missing layer(s) {gaps[:8]}")
    return max(ids) + 1


def _heads(width: int, num_heads: int | None, path) -> int:
    by_width = {p.embed_dim: p.num_heads for p in BEIT3_PRESETS.values()}
    if width in by_width:
        if num_heads is not None and num_heads != by_width[width]:
            raise InputError(
                f"{path}: width {width} is a preset width with {by_width[width]} heads, "
                f"but num_heads={num_heads} was given"
            )
        return by_width[width]
    if num_heads is None:
        raise InputError(
            f"{path}: width {width} matches no preset ("
            + ", ".join(f"{k}={p.embed_dim}" for k, p in BEIT3_PRESETS.items())
            + "); pass num_heads"
        )
    if num_heads <= 0 or width % num_heads:
        raise InputError(f"{path}: num_heads={num_heads} does not divide the width {width}")
    return num_heads


def check_preset(dims: BEiT3Dims, preset: str | None, path: str | Path = "checkpoint") -> None:
    """Refuse a checkpoint whose architecture is not the requested preset (None / "auto": anything)."""
    if preset in (None, "auto"):
        return
    if preset not in BEIT3_PRESETS:
        raise InputError(f"unknown BEiT-3 preset {preset!r}; known: {', '.join(BEIT3_PRESETS)}")
    p = BEIT3_PRESETS[preset]
    diffs = [
        f"{name} {getattr(dims, name)} (preset: {getattr(p, name)})"
        for name in ("embed_dim", "depth", "num_heads", "ffn_dim", "patch_size")
        if getattr(dims, name) != getattr(p, name)
    ]
    if diffs:
        raise InputError(f"{path}: checkpoint does not match preset {preset!r}: " + ", ".join(diffs))


# ---------------------------------------------------------------------------------------------------
# The filter: state dict of the file -> state dict of our model
# ---------------------------------------------------------------------------------------------------
def interpolate_vision_positions(table: Tensor, new_grid: int) -> Tensor:
    """[3 + G*G, D] -> [3 + new_grid^2, D]: the patch grid resized bicubically (align_corners=False, as
    unilm/beit3's load_model_and_may_interpolate); the first 3 rows (2 unused + [CLS]) are kept."""
    extra = FIRST_POSITION + 1
    old_grid = math.isqrt(table.shape[0] - extra)
    if old_grid == new_grid:
        return table
    d = table.shape[1]
    grid = table[extra:].float().reshape(1, old_grid, old_grid, d).permute(0, 3, 1, 2)  # [1,D,G,G]
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, d).to(table.dtype)
    return torch.cat([table[:extra], grid], dim=0)


def checkpoint_filter_fn(
    state: dict[str, Tensor], dims: BEiT3Dims, path: str | Path = "checkpoint"
) -> dict[str, Tensor]:
    """Validate and adapt an official state dict (already unwrapped) for `BEiT3ForRetrieval(dims)`.

    Refuses, naming the keys: pretrain-only checkpoints (no retrieval heads), missing keys, unexpected
    keys, shape mismatches. Resizes the vision position table to `dims.image_size`."""
    missing_heads = [k for k in HEAD_KEYS if k not in state]
    if missing_heads:
        extras = [k for k in state if not k.startswith("beit3.") and k != "logit_scale"]
        raise InputError(
            f"{path}: a pretrain-only BEiT-3 checkpoint (no {' / '.join(missing_heads)}): retrieval features "
            "need the image-text heads of an itc or retrieval fine-tuned checkpoint "
            "(beit3_*_itc_patch16_224.pth or beit3_*_patch16_384_{coco,f30k}_retrieval.pth); heads are never "
            "initialised at random"
            + (f"; it carries pretraining-only weights instead (MLM/MIM heads): {_names(extras)}" if extras else "")
        )
    state = dict(state)
    key = "beit3.encoder.embed_positions.A.weight"
    if key in state and state[key].ndim == 2:
        state[key] = interpolate_vision_positions(state[key], dims.grid_size)

    with torch.device("meta"):
        expected = BEiT3ForRetrieval(dims).state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_names(unexpected)}")
        raise InputError(
            f"{path}: does not match a BEiT-3 retrieval model of the inferred dimensions "
            f"({_describe(dims)}): " + "; ".join(parts)
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if wrong:
        raise InputError(
            f"{path}: tensor shapes do not match the inferred dimensions ({_describe(dims)}): " + _names(wrong)
        )
    bad_dtype = [k for k in expected if not state[k].is_floating_point()]
    if bad_dtype:
        raise InputError(f"{path}: tensors that are not floating point: {_names(bad_dtype)}")
    return state


def load_beit3_checkpoint(
    path: str | Path, *, num_heads: int | None = None, image_size: int | None = None, preset: str | None = None
) -> LoadedCheckpoint:
    """Read an official retrieval checkpoint into a `BEiT3ForRetrieval` in eval mode, float32, on the CPU.

    `image_size`: None keeps the checkpoint's own; another size interpolates the position table.
    `preset`: if given (not "auto"), the checkpoint must be that architecture."""
    path = Path(path)
    state = read_checkpoint(path)
    dims = infer_dims(state, num_heads=num_heads, path=path)
    check_preset(dims, preset, path)
    ckpt_size = dims.image_size
    if image_size is not None and int(image_size) != ckpt_size:
        if int(image_size) <= 0 or int(image_size) % dims.patch_size:
            raise InputError(
                f"image_size={image_size} is not a positive multiple of the patch size {dims.patch_size} of {path}"
            )
        dims = dims.with_image_size(int(image_size))
    state = checkpoint_filter_fn(state, dims, path)
    # fp16/bf16 files become fp32 here (a copy, tensor by tensor); fp32 tensors stay the mapped ones.
    state = {k: (v if v.dtype == torch.float32 else v.float()) for k, v in state.items()}
    with torch.device("meta"):
        model = BEiT3ForRetrieval(dims)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    return LoadedCheckpoint(model=model, dims=dims, checkpoint_image_size=ckpt_size, path=path)


# ---------------------------------------------------------------------------------------------------
def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


def _describe(d: BEiT3Dims) -> str:
    return (
        f"width {d.embed_dim}, depth {d.depth}, heads {d.num_heads}, FFN {d.ffn_dim}, patch {d.patch_size}, "
        f"image {d.image_size}, vocab {d.vocab_size}"
    )
