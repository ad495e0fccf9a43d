"""Section `extract` of params.yaml (`ExtractConfig`), and the compute dtype it resolves to."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from pipeline.config import require_at_least
from pipeline.teachers import TeacherConfig

TEACHER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ExtractConfig:
    """params.yaml section `extract`."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda:LOCAL_RANK when a GPU is there, else cpu
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    store_dtype: Literal["float16", "float32"] = "float16"
    image_batch_size: int = 256
    text_batch_size: int = 1024
    num_workers: int | None = None  # image/caption loader processes per rank; None: CPUs per rank - 1 on CUDA, 0 on CPU
    prefetch_factor: int = 4  # batches each loader process prepares ahead
    chunk_rows: int = 16384  # at most this many rows per chunk file (balanced), the unit of work and of resumption
    splits: tuple[str, ...] = ()  # () = every split of the dataset index
    on_bad_image: Literal["error", "skip"] = "error"
    jpeg_draft: bool = False  # let PIL decode JPEGs at a reduced scale (>= image size); faster, not bit-exact
    # more teachers over the same rows, each a store of its own under features.zarr/teachers/<name>/ (MCAD,
    # DataCompDR ensembles); name -> a teacher section like `teacher`
    extra_teachers: dict[str, TeacherConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require_at_least(self, 1, "image_batch_size", "text_batch_size", "prefetch_factor", "chunk_rows")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (or null for automatic), got {self.num_workers}")
        if len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits lists a split twice: {list(self.splits)}")
        for name in self.extra_teachers:
            if not TEACHER_NAME.fullmatch(name):
                raise ValueError(
                    f"extra_teachers: {name!r} is not a usable teacher name (letters, digits, '_' and '-', "
                    "starting with a letter: it names a directory)"
                )


def resolve_compute_dtype(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return name
