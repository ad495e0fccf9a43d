"""Section `evaluate` of params.yaml (`EvaluateConfig`), in a module of its own: distill reads `evaluate.gallery`
too (it validates the way evaluate measures) without importing the evaluate stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import require_at_least


@dataclass(frozen=True)
class EvaluateConfig:
    """params.yaml section `evaluate`."""

    split: str = "test"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # encoding, scoring and latency; auto: cuda when there is one
    batch_size: int = 128  # student encoding batch (images and captions)
    backend: Literal["auto", "torch"] = "auto"  # exact search (the tiled torch pass; auto = torch)
    chunk_size: int | None = None  # score tile edge; None: 4096 on CPU, 16384 on CUDA
    # Without distill.runs in the params file: student directories under the workdir, evaluated next to the
    # teacher: `student` is required, the others (e.g. the undistilled `baseline`) when their directory exists.
    models: tuple[str, ...] = ("student", "baseline")
    latency: bool = True  # time encoding per image and per caption, teacher and students, on `device`
    latency_batch_size: int = 32
    latency_batches: int = 3  # timed batches of latency_batch_size (after one warm-up batch)
    latency_dtype: Literal["float32", "bfloat16"] = "float32"  # both models in the same precision
    curve_max_k: int = 50  # recall@K curves for K = 1..curve_max_k
    write_ranks: bool = True  # per-query ranks of every run in ranks.npz (which queries fail; recompute anything)
    # split: one gallery; by_directory: each image_id's first path component is a gallery of its own (galleries.py)
    gallery: Literal["split", "by_directory"] = "split"
    bootstrap_resamples: int = 2000  # paired bootstrap of each model's difference to each reference (compare_to)
    bootstrap_seed: int = 0
    # The columns of plots/recall_*.csv, in order: exactly the evaluated models (teacher, each trained model,
    # chance). dvc.yaml's recall plots read this list (DVC must name its y columns); None: evaluation order.
    plot_models: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        require_at_least(
            self, 1, "batch_size", "latency_batch_size", "latency_batches", "curve_max_k", "bootstrap_resamples"
        )
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be positive (or null for automatic), got {self.chunk_size}")
        if not self.models or self.models[0] != "student":
            raise ValueError(f"models must start with 'student' (the required one), got {list(self.models)}")
        for m in self.models:
            if m == "teacher" or not m or "/" in m or m.startswith(".") or self.models.count(m) > 1:
                raise ValueError(
                    f"models: {m!r} is not a usable student directory name (unique, no '/', not 'teacher')"
                )
        if self.curve_max_k < 10:
            raise ValueError(f"curve_max_k must be at least 10 (R@10 is reported), got {self.curve_max_k}")


__all__ = ["EvaluateConfig"]
