"""Checkpoint and resume: the training state (`TrainState`), the run's checkpoint directory (last.pt, the best
epoch's weights), whether a checkpoint belongs to this run (`difference`), and starting over.

The checkpoint directory (`<workdir>/checkpoints/<run>/`, pipeline.paths) lies outside every DVC output: DVC
removes a stage's outputs before it runs the stage again, so a `dvc repro` killed mid-training would otherwise
lose them. It holds
    last.pt             model, optimizer, scheduler, balancer, position, RNG and the log rows so far
    best.safetensors    the best validated epoch's weights, exported into the student directory at the end
    speed.csv           pairs/s per logged step (timings differ from run to run: no DVC output holds them)
last.pt and best.safetensors are removed when the run completes (unless `distill.keep_checkpoints`): the run's
outputs then depend only on the config and the inputs, resumed or not.

A checkpoint is taken only when it was written with the same config (runtime keys aside) and the same inputs
(`meta`: the dataset index, the store's and the image cache's contents, the frozen text tower's files, the
validation gallery, the world size) and the same training code (`code_digest`); any other is replaced by a
fresh start, with one line saying why.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
CHECKPOINT_VERSION = 2  # 2: the log rows, the inputs' digests; the model without a referenced frozen tower
LAST, BEST, SPEED = "last.pt", "best.safetensors", "speed.csv"


@dataclass
class TrainState:
    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0  # optimizer steps done
    best_rsum: float = -math.inf
    best_epoch: int = -1
    history: list = field(default_factory=list)  # val metrics per evaluated epoch


def code_digest() -> str:
    """SHA-256 of the training code (every file of pipeline/distill/ and pipeline/towers/: the loop, the data
    path, the losses, the towers): a checkpoint is resumed only by the code that wrote it, as DVC reruns the
    stage when its code changes."""
    from pipeline.hashing import sha256_file

    root = Path(__file__).resolve().parents[1]  # pipeline/
    h = hashlib.sha256()
    for f in sorted([*root.glob("distill/**/*.py"), *root.glob("towers/**/*.py")]):
        h.update(f"{f.relative_to(root).as_posix()} {sha256_file(f)}\n".encode())
    return h.hexdigest()


def model_state(model) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of the model: a student's own state (a referenced frozen tower is not), or a
    plain module's state dict."""
    return model.own_state_dict() if hasattr(model, "own_state_dict") else model.state_dict()


def save_checkpoint(
    path: Path,
    *,
    model,
    optimizer,
    scheduler,
    balancer,
    state: TrainState,
    cfg_dict: dict,
    meta: dict,
    logs: dict[str, list[str]] | None = None,
    loss=None,
) -> None:
    """last.pt; `logs`: {"train": rows, "val": rows} as written so far (a resume rewrites the logs from them);
    `loss`: the loss module, whose parameters (a learned student temperature) the checkpoint holds too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "meta": meta,
        "config": cfg_dict,
        "model": model_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "balancer": balancer.state_dict(),
        "loss": {} if loss is None else loss.state_dict(),
        "state": dataclasses.asdict(state),
        "logs": logs or {},
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


def read_checkpoint(path: Path) -> dict:
    """last.pt as written by save_checkpoint (tensors and plain values only: nothing is executed), of any
    version; a file that is not one is refused, also by --no-resume (kdpipe writes last.pt whole, by rename, so
    such a file is not kdpipe's: it is neither used nor removed)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file
        raise InputError(
            f"{path}: cannot read the checkpoint ({type(err).__name__}); kdpipe writes it whole, so it is damaged or "
            "not kdpipe's: move it away to start over"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a {CHECKPOINT_FORMAT} file; not kdpipe's: move it away to start over")
    return blob


def difference(blob: dict, cfg_dict: dict, meta: dict) -> str | None:
    """Why checkpoint `blob` is not one of this run (another version, other inputs, another config), or None."""
    if blob.get("version") != CHECKPOINT_VERSION:
        return f"it is a v{blob.get('version')} checkpoint, this kdpipe writes v{CHECKPOINT_VERSION}"
    old_meta = blob.get("meta") or {}
    for key, value in meta.items():
        if old_meta.get(key) != value:
            return _first_difference(old_meta.get(key), value, f"inputs {key}")
    old, new = comparable(blob.get("config") or {}), comparable(cfg_dict)
    return None if old == new else _first_difference(old, new, "distill")


def restore(blob: dict, *, model, optimizer, scheduler, balancer, loss=None) -> TrainState:
    """Load a matching checkpoint (see `difference`) into the model, optimizer, scheduler, balancer and loss
    module, restore the RNG states, and return the position it was written at."""
    missing, unexpected = model.load_state_dict(blob["model"], strict=False)
    if unexpected or set(missing) != set(model.state_dict()) - set(model_state(model)):
        raise InputError(f"checkpoint does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if loss is not None and loss.state_dict():
        if not blob.get("loss"):  # the config matched, so only a damaged or hand-made file lacks it
            raise InputError("the checkpoint has no loss state (a learned temperature); use --no-resume")
        loss.load_state_dict(blob["loss"])
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    balancer.load_state_dict(blob["balancer"])
    state = TrainState(**blob["state"])
    torch.set_rng_state(blob["rng"]["torch"])
    if blob["rng"].get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    return state


def save_best(path: Path, model, epoch: int) -> None:
    """The weights of the best validated epoch so far (the student directory gets them when the run ends)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model_state(model).items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "epoch": str(epoch)})


def load_best(path: Path, model, epoch: int) -> None:
    """Put the weights save_best wrote at `epoch` back into the model (InputError when they are not there)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(f"{path}: the weights of the best epoch ({epoch}) are missing; use --no-resume to start over")
    with safe_open(str(path), "pt") as f:
        saved_epoch = (f.metadata() or {}).get("epoch")
    if saved_epoch != str(epoch):
        raise InputError(f"{path}: holds epoch {saved_epoch}'s weights, the best is epoch {epoch}; use --no-resume")
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if unexpected or set(missing) != set(model.state_dict()) - set(model_state(model)):
        raise InputError(f"{path}: does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def remove_checkpoints(directory: Path) -> None:
    """The training state of a finished (or restarted) run: last.pt and best.safetensors, by name (the
    directory and anything else in it stay)."""
    for name in (LAST, BEST):
        (directory / name).unlink(missing_ok=True)


def clear_outputs(out_dir: Path) -> None:
    """Start over: remove what a previous run wrote into the student directory, by name (checkpoints/: where
    kdpipe kept the training state before it moved to the checkpoint directory)."""
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
