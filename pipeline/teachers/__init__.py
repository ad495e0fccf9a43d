"""Teachers: frozen image-text encoders behind one interface (`Teacher`), chosen by `TeacherConfig.kind`, and
cross-encoders that score (image, caption) pairs (`CrossEncoder`, built by pipeline/teachers/cross_encoders.py,
so that extract's code surface never includes them).

Each kind's implementation is imported only when it is built, so the extract stage's code surface (and
its DVC dependencies) stays what it really uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from pipeline.errors import ConfigError
from pipeline.teachers.base import CrossEncoder, Teacher, TokenBatch


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
class HFTeacherConfig:
    """A transformers dual encoder (CLIP, SigLIP, SigLIP2): pipeline/teachers/hf.py."""

    path: str = ""  # a local model directory (save_pretrained's layout) or a hub id in the local HF cache
    max_text_len: int | None = None  # tokens per caption; None: the model's (text max_position_embeddings)

    def __post_init__(self) -> None:
        if self.max_text_len is not None and self.max_text_len < 2:
            raise ValueError(f"max_text_len must be at least 2, got {self.max_text_len}")


@dataclass(frozen=True)
class PluginTeacherConfig:
    """Your own teacher class: pipeline/teachers/plugin.py (the interface is pipeline/teachers/base.py's)."""

    target: str = ""  # "package.module:ClassName", importable by the extract process (PYTHONPATH)
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the class

    def __post_init__(self) -> None:
        if self.target and (self.target.count(":") != 1 or not all(self.target.split(":"))):
            raise ValueError(f"target {self.target!r}: expected 'module:ClassName'")


@dataclass(frozen=True)
class FusionTeacherConfig:
    """The emoji demo's cross-encoder: a fusion head over the LiT teacher's frozen towers (`kdpipe fit-cross-encoder`
    writes it; the file names the backbone and resolution)."""

    head: Path = Path("artifacts/emoji/cross_encoder/cross_encoder.safetensors")


@dataclass(frozen=True)
class TeacherConfig:
    kind: Literal["beit3", "label_bridge", "lit", "hf", "plugin", "fusion"] = "beit3"
    beit3: BEiT3TeacherConfig = field(default_factory=BEiT3TeacherConfig)
    label_bridge: LabelBridgeTeacherConfig = field(default_factory=LabelBridgeTeacherConfig)
    lit: LiTTeacherConfig = field(default_factory=LiTTeacherConfig)
    hf: HFTeacherConfig = field(default_factory=HFTeacherConfig)
    plugin: PluginTeacherConfig = field(default_factory=PluginTeacherConfig)
    fusion: FusionTeacherConfig = field(default_factory=FusionTeacherConfig)


EMBEDDING_KINDS = ("beit3", "label_bridge", "lit", "hf", "plugin")  # embed images and captions: build_teacher
PAIR_KINDS = ("fusion",)  # score (image, caption) pairs: build_cross_encoder


def build_teacher(
    cfg: TeacherConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Teacher:
    """The configured teacher, in eval mode on `device`, computing in `dtype` (bf16/fp16 use autocast)."""
    if cfg.kind not in EMBEDDING_KINDS:
        raise ConfigError(
            f"teacher kind {cfg.kind!r} scores pairs and embeds nothing: use it as mine.cross_encoder; "
            f"the kinds that embed are {', '.join(EMBEDDING_KINDS)}"
        )
    if cfg.kind == "beit3":
        from pipeline.teachers.beit3 import BEiT3Teacher

        return BEiT3Teacher.from_config(cfg.beit3, device=device, dtype=dtype)
    if cfg.kind == "label_bridge":
        from pipeline.teachers.label_bridge import LabelBridgeTeacher

        return LabelBridgeTeacher.from_config(cfg.label_bridge, device=device, dtype=dtype)
    if cfg.kind == "lit":
        from pipeline.teachers.lit import LiTTeacher

        return LiTTeacher.from_config(cfg.lit, device=device, dtype=dtype)
    if cfg.kind == "hf":
        from pipeline.teachers.hf import HFTeacher

        return HFTeacher.from_config(cfg.hf, device=device, dtype=dtype)
    if cfg.kind == "plugin":
        from pipeline.teachers.plugin import load_plugin

        return load_plugin(cfg.plugin, device=device, dtype=dtype)
    raise ValueError(f"unknown teacher kind {cfg.kind!r}")


__all__ = [
    "CrossEncoder",
    "FusionTeacherConfig",
    "EMBEDDING_KINDS",
    "PAIR_KINDS",
    "Teacher",
    "TokenBatch",
    "TeacherConfig",
    "BEiT3TeacherConfig",
    "LabelBridgeTeacherConfig",
    "LiTTeacherConfig",
    "HFTeacherConfig",
    "PluginTeacherConfig",
    "build_teacher",
]
