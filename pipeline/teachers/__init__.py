"""Teachers: frozen image-text encoders behind one interface (`Teacher`), chosen by `TeacherConfig.kind`.

Each kind's implementation is imported only when it is built, so the extract stage's code surface (and
its DVC dependencies) stays what it really uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from pipeline.teachers.base import Teacher, TokenBatch


@dataclass(frozen=True)
class BEiT3TeacherConfig:
    """An official BEiT-3 checkpoint (`.pth`, weights under "model" or "module") and its `beit3.spm`."""

    checkpoint: Path | None = None
    tokenizer: Path | None = None
    preset: Literal["auto", "base", "large", "giant"] = "auto"  # auto: dimensions read from the checkpoint
    num_heads: int | None = None  # only needed when the width matches no preset
    image_size: int | None = None  # None: the checkpoint's own (position table size)
    max_text_len: int = 64


@dataclass(frozen=True)
class LabelBridgeTeacherConfig:
    """The offline demo teacher built from two package-shipped models (MiniLM + EfficientNet-Lite0)."""

    class_names: Path = Path("data/demo/imagenet_classes.tsv")
    prompt: str = "a photo of a {}."


@dataclass(frozen=True)
class LiTTeacherConfig:
    """The emoji demo's teacher: frozen EfficientNet-Lite + MiniLM with linear heads from `kdpipe fit-teacher`
    (the heads file also names the backbone and resolution they were fitted for)."""

    heads: Path = Path("artifacts/emoji/teacher/heads.safetensors")


@dataclass(frozen=True)
class TeacherConfig:
    kind: Literal["beit3", "label_bridge", "lit"] = "beit3"
    beit3: BEiT3TeacherConfig = field(default_factory=BEiT3TeacherConfig)
    label_bridge: LabelBridgeTeacherConfig = field(default_factory=LabelBridgeTeacherConfig)
    lit: LiTTeacherConfig = field(default_factory=LiTTeacherConfig)


def build_teacher(
    cfg: TeacherConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Teacher:
    """The configured teacher, in eval mode on `device`, computing in `dtype` (bf16/fp16 use autocast)."""
    if cfg.kind == "beit3":
        from pipeline.teachers.beit3 import BEiT3Teacher

        return BEiT3Teacher.from_config(cfg.beit3, device=device, dtype=dtype)
    if cfg.kind == "label_bridge":
        from pipeline.teachers.label_bridge import LabelBridgeTeacher

        return LabelBridgeTeacher.from_config(cfg.label_bridge, device=device, dtype=dtype)
    if cfg.kind == "lit":
        from pipeline.teachers.lit import LiTTeacher

        return LiTTeacher.from_config(cfg.lit, device=device, dtype=dtype)
    raise ValueError(f"unknown teacher kind {cfg.kind!r}")


__all__ = [
    "Teacher",
    "TokenBatch",
    "TeacherConfig",
    "BEiT3TeacherConfig",
    "LabelBridgeTeacherConfig",
    "LiTTeacherConfig",
    "build_teacher",
]
