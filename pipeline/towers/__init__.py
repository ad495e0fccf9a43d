"""The student's towers: one image tower and one text tower, each a backbone that returns pooled features.

A tower knows how to build itself (from a local weights path or a random init), how to pool, and how to
save itself in a form its own library loads without kdpipe (`save_pretrained` for transformers models).
The projections to the teacher's dimension and the normalization live in `pipeline.towers.student`.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import InputError, reading_file


def offline_hub() -> None:
    """Make every transformers / huggingface_hub call in this process local-only: kdpipe never downloads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "org/name", as the Hub spells ids


def require_dir(path: Path | str, key: str, what: str) -> Path:
    """`path` as an existing directory, or a Hub id ("org/name") found in the local Hugging Face cache
    (`HF_HUB_CACHE`, never downloaded), else one InputError naming the parameter and what was expected."""
    p = Path(path).expanduser()
    if not p.is_dir() and _HUB_ID.match(str(path)):
        p = _from_hub_cache(str(path)) or p
    if not p.is_dir():
        raise InputError(
            f"{key}: {path} is neither a directory nor a model in the local Hugging Face cache; expected {what} "
            "(kdpipe never downloads weights: save the model locally once, e.g. with save_pretrained or "
            "`hf download ID` where there is a network, and give its path or id)"
        )
    if what.startswith("a local Hugging Face model") and not (p / "config.json").is_file():
        raise InputError(f"{key}: {p} has no config.json; expected {what}")
    return p


def _from_hub_cache(repo_id: str) -> Path | None:
    """The cached snapshot of `repo_id` (its `main` revision) in the local Hugging Face cache, else None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:  # HF_HUB_CACHE read now, not at huggingface_hub's import
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=os.environ.get("HF_HUB_CACHE")))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None


@contextmanager
def quiet_transformers():
    """transformers without its load reports and progress bars (kdpipe says what matters in one line)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def reading_hf_dir(path: Path, key: str):
    """Around transformers' read of a local model directory: a config.json that is not JSON or lacks a field,
    a truncated model.safetensors, ... is one InputError naming the parameter and the directory."""
    return reading_file(
        f"{key}: {path}", "a Hugging Face model directory", "save the model there again (save_pretrained)"
    )


def load_pretrained_strict(model_cls, path: Path, key: str, *, ignorable_prefixes: tuple[str, ...] = (), **kwargs):
    """`model_cls.from_pretrained(path)` that refuses missing, unexpected or mismatched weights by name.

    transformers only warns about them (and prints a load report and a progress bar for every tower); a
    student that silently starts half of its tower from random weights is worse than an error. Keys under
    `ignorable_prefixes` (e.g. the "pooler." of a checkpoint whose pooler the tower does not build) are the
    one deliberate exception."""
    with quiet_transformers(), reading_hf_dir(path, key):
        model, info = model_cls.from_pretrained(path, local_files_only=True, output_loading_info=True, **kwargs)
    problems = {
        "missing": sorted(info.get("missing_keys", ())),
        "unexpected": sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(ignorable_prefixes)),
        "shape-mismatched": sorted(
            str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys", ())
        ),
    }
    for kind, keys in problems.items():
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise InputError(f"{key}: {path} does not match the tower: {kind} weights {', '.join(keys[:3])}{more}")
    return model
