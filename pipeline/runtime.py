"""CPU threads: how many intra-op threads a stage runs, given the loader workers beside them.

PyTorch starts one OpenMP thread per core by default, whatever else runs. Its threads meet at a barrier
after every parallel op, so when one of them shares a core with another busy process every op waits for
that thread's next time slice: on a 2-core box with one other CPU-bound process, distill dropped from
17 to 1-1.6 pairs/s (issue 13). The remedy is not to oversubscribe: intra-op threads + loader workers
<= the CPUs this process may run on (its affinity mask, which taskset, cgroups' cpusets and Slurm set),
and OpenMP threads that sleep instead of spinning while they wait (OMP_WAIT_POLICY=PASSIVE, set by
`stages/__init__.py` before torch loads, unless the user set it).

params.yaml's top-level `runtime:` section is the one source of truth: `threads` set there wins; left
unset, OMP_NUM_THREADS is honoured when the user set it, else the automatic count above.

Memory (`keep_freed_memory`): glibc's malloc hands every block over 32 MB (its largest dynamic threshold) to
mmap and back to the kernel when freed, so each such tensor is page-faulted in afresh, a zeroed page at a time.
A CNN's activations at batch 64 are just over (EfficientNet-Lite2 at 128 px: 34 MB), so fit-teacher and
extract spent more CPU time in the kernel than computing (demo fit-teacher, 512 images, 2 threads: 11.1 s
system + 6.8 s user; with the threshold raised: 0.8 + 6.3, identical features). Where blocks live does not
change a single result.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeConfig:
    """params.yaml section `runtime` (every stage)."""

    # intra-op threads; None: OMP_NUM_THREADS when set, else the CPUs this process may use minus its loader workers
    threads: int | None = None
    # trainings at once under `kdpipe distill --all` (each a process of its own, with `threads` of its own, so a
    # run's numbers do not depend on it); None: as many as the CPUs hold (`plan_jobs`), one on a GPU
    jobs: int | None = None

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1 (or null for automatic), got {self.threads}")
        if self.jobs is not None and self.jobs < 1:
            raise ValueError(f"jobs must be at least 1 (or null for automatic), got {self.jobs}")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; all CPUs where the platform has no such mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def plan_threads(cfg: RuntimeConfig, loader_workers: int = 0, cpus: int | None = None) -> int:
    """Intra-op threads: the configured number, else the available CPUs left by `loader_workers` (>= 1)."""
    if cfg.threads is not None:
        return cfg.threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:  # the user's explicit choice for this shell or job
        return int(env)
    cpus = available_cpus() if cpus is None else cpus
    return max(1, cpus - max(0, loader_workers))


def plan_jobs(cfg: RuntimeConfig, threads_per_run: int, on_gpu: bool, cpus: int | None = None) -> int:
    """Trainings at once: the configured number, else one on a GPU (its memory and compute are one run's), else
    as many runs of `threads_per_run` intra-op threads as the available CPUs hold (their loader threads only copy
    bytes: two runs of one thread each beside their loaders train on 2 cores in about the time of one)."""
    if cfg.jobs is not None:
        return cfg.jobs
    if on_gpu:
        return 1
    cpus = available_cpus() if cpus is None else cpus
    return max(1, cpus // max(1, threads_per_run))


def apply_threads(cfg: RuntimeConfig, loader_workers: int = 0) -> int:
    """Set torch's intra-op threads for this process (loader worker processes use one each, as torch sets),
    and keep freed memory for reuse (`keep_freed_memory`)."""
    import torch

    keep_freed_memory()
    n = plan_threads(cfg, loader_workers)
    torch.set_num_threads(n)
    return n


KEEP_BYTES = 256 << 20  # blocks up to this size come from the heap, and this much freed memory is kept


def keep_freed_memory(keep_bytes: int = KEEP_BYTES) -> bool:
    """Raise glibc malloc's mmap and trim thresholds to `keep_bytes` (module docstring); False where the C
    library has no mallopt (macOS, musl): nothing changes there."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, keep_bytes)) and bool(mallopt(m_trim_threshold, keep_bytes))
