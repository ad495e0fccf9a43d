"""Building the configured cross-encoder: a teacher kind that scores (image, caption) pairs (`CrossEncoder`).

Kept apart from `build_teacher` (pipeline/teachers/__init__.py): only `kdpipe mine` runs cross-encoders, and
the extract stage's code (its DVC dependencies) must not grow with them.
"""

from __future__ import annotations

import torch

from pipeline.errors import ConfigError
from pipeline.teachers import PAIR_KINDS, TeacherConfig
from pipeline.teachers.base import CrossEncoder


def build_cross_encoder(
    cfg: TeacherConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> CrossEncoder:
    """The configured cross-encoder, in eval mode on `device`, computing in `dtype`."""
    if cfg.kind == "fusion":
        from pipeline.teachers.fusion import FusionCrossEncoder

        return FusionCrossEncoder.from_config(cfg.fusion, device=device, dtype=dtype)
    raise ConfigError(
        f"mine.cross_encoder.kind: {cfg.kind!r} embeds images and captions but cannot score a pair; "
        f"kinds that can: {', '.join(PAIR_KINDS)}"
    )


__all__ = ["build_cross_encoder"]
