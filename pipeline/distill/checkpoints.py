"""Checkpoint and resume: the training state (`TrainState`), checkpoints/last.pt written and read back, the
check that a checkpoint belongs to this config and these inputs (`comparable`), and starting over
(`clear_outputs`)."""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.distill.config import ADDED_KEYS, RUNTIME_KEYS
from pipeline.errors import InputError
from pipeline.store.durable import atomic_path

CHECKPOINT_FORMAT = "kdpipe-distill-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class TrainState:
    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0  # optimizer steps done
    best_rsum: float = -math.inf
    best_epoch: int = -1
    history: list = field(default_factory=list)  # val metrics per evaluated epoch


def save_checkpoint(
    path: Path, *, model, optimizer, scheduler, balancer, state: TrainState, cfg_dict: dict, meta: dict, loss=None
) -> None:
    """`loss`: the loss module, whose parameters (a learned student temperature) the checkpoint holds too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "meta": meta,
        "config": cfg_dict,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "balancer": balancer.state_dict(),
        "loss": {} if loss is None else loss.state_dict(),
        "state": dataclasses.asdict(state),
        # The step seeds make these redundant for the loop itself; kept so that code run between steps
        # (or a future change) continues the same streams.
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
    }
    # Through a Python file object: torch.save(path) writes from C++ and reports a full disk only as
    # "unexpected pos"; this way the OSError (ENOSPC) surfaces and atomic_path names the checkpoint.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(blob, f)


def with_added_keys(cfg: dict, added: dict) -> dict:
    """`cfg` with each key of `added` it lacks, sub-sections merged key by key."""
    out = dict(cfg)
    for k, v in added.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = with_added_keys(out[k], v)
        elif k not in out:
            out[k] = v
    return out


def comparable(cfg_dict: dict) -> dict:
    return {k: v for k, v in with_added_keys(cfg_dict, ADDED_KEYS).items() if k not in RUNTIME_KEYS}


def _first_difference(a: Any, b: Any, where: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{where}.{k}")
    return f"{where}: {a!r} then, {b!r} now"


def load_checkpoint(path: Path, cfg_dict: dict, meta: dict) -> dict:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file
        raise InputError(
            f"{path}: cannot read the checkpoint ({type(err).__name__}); use --no-resume to start over"
        ) from None
    if (
        not isinstance(blob, dict)
        or blob.get("format") != CHECKPOINT_FORMAT
        or blob.get("version") != CHECKPOINT_VERSION
    ):
        raise InputError(f"{path}: not a {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} file; use --no-resume to start over")
    # world size: the sampler's global batch; mined_k: the neighbours the batches and lists are drawn from;
    # pixels: recorded only since students record their pixel recipe
    for key in ("dim", "fingerprint", "train_split", "world_size", "mined_k", "pixels"):
        if (key != "pixels" or "pixels" in blob["meta"]) and blob["meta"].get(key) != meta.get(key):
            raise InputError(
                f"{path}: checkpoint was trained with {key}={blob['meta'].get(key)!r}, the inputs now "
                f"have {meta.get(key)!r}; use --no-resume to start over"
            )
    old, new = comparable(blob["config"]), comparable(cfg_dict)
    if old != new:
        diff = _first_difference(old, new, "distill")
        raise InputError(f"{path}: checkpoint was written with another config ({diff}); use --no-resume to start over")
    return blob


def restore_checkpoint(
    path: Path, cfg_dict: dict, meta: dict, *, model, optimizer, scheduler, balancer, loss=None
) -> TrainState:
    """Load `path` (checked by load_checkpoint) into the model, optimizer, scheduler, balancer and loss module,
    restore the RNG states, and return the position it was written at."""
    blob = load_checkpoint(path, cfg_dict, meta)
    if loss is not None and loss.state_dict():
        if not blob.get("loss"):  # the config matched, so only a damaged or hand-made file lacks it
            raise InputError(f"{path}: the checkpoint has no loss state (a learned temperature); use --no-resume")
        loss.load_state_dict(blob["loss"])
    model.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    balancer.load_state_dict(blob["balancer"])
    state = TrainState(**blob["state"])
    torch.set_rng_state(blob["rng"]["torch"])
    if blob["rng"].get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    return state


def clear_outputs(out_dir: Path) -> None:
    """Start over: remove what a previous run wrote (the directory is the stage's output)."""
    for name in ("checkpoints", "plots", "image_tower", "text_tower"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in (
        "model.safetensors",
        "student_config.json",
        "train_log.csv",
        "val_log.csv",
        "train_summary.json",
        "distill_config.yaml",
    ):
        (out_dir / name).unlink(missing_ok=True)
