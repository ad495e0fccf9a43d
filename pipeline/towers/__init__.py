"""The student's towers: one image tower and one text tower, each a backbone that returns pooled features.

A tower knows how to build itself (from a local weights path or a random init), how to pool, and how to
save itself in a form its own library loads without kdpipe (`save_pretrained` for transformers models).
The projections to the teacher's dimension and the normalization live in `pipeline.student`.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import InputError


def offline_hub() -> None:
    """Make every transformers / huggingface_hub call in this process local-only: kdpipe never downloads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def require_dir(path: Path | str, key: str, what: str) -> Path:
    """`path` as an existing directory, else one InputError naming the parameter and what was expected."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise InputError(f"{key}: {p} is not a directory; expected {what} (kdpipe never downloads weights: "
                         "save the model locally once, e.g. with save_pretrained, and give its path)")
    if what.startswith("a local Hugging Face model") and not (p / "config.json").is_file():
        raise InputError(f"{key}: {p} has no config.json; expected {what}")
    return p
