"""prepare's decode tasks: blocks of consecutive images of one split, run in-process or on dask.

A task decodes its block into one uint8 buffer and writes it straight into the split's data file at its row
offset (or, for an encoded cache, into a block file), so nothing but a short list of failures travels back to
the client. Below `cluster_min_images` images, or with `workers: 1`, the same block function runs in-process:
a LocalCluster takes ~3 s to start, longer than decoding a small dataset.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pipeline.data.image_source import ImageRef
from pipeline.data.index import SplitView
from pipeline.errors import InputError
from pipeline.progress import progress
from pipeline.runtime import available_cpus


@dataclass(frozen=True)
class Task:
    split: str
    start: int  # first row of the block in the split
    images: list[ImageRef]
    data_file: str


def block_tasks(view: SplitView, runs: list[tuple[int, int]], chunk: int, data_file: str) -> list[Task]:
    """Decode tasks for rows [start, stop) of each run of a split, at most `chunk` images each."""
    refs = [absolute(r) for r in view.image_ref]
    return [
        Task(view.name, s, refs[s : min(stop, s + chunk)], data_file)
        for start, stop in runs
        for s in range(start, stop, chunk)
    ]


def absolute(ref: ImageRef) -> ImageRef:
    """The same image with an absolute path (dask workers may run elsewhere; the hash cache is keyed by it)."""
    return replace(ref, path=os.path.abspath(ref.path))


def failures(results: list[tuple[Task, dict]], views: dict[str, SplitView]) -> list[tuple[int, str]]:
    """(global row, reason) of every image that failed to decode, in row order."""
    bad = []
    for task, result in results:
        rows = views[task.split].image_rows
        bad.extend((int(rows[task.start + i]), reason) for i, reason in result["failures"])
    return sorted(bad)


def run_tasks(
    tasks: list[Task], cfg: Any, n_images: int, decode_block: Callable[..., dict]
) -> tuple[list[tuple[Task, dict]], float]:
    """Run every block, in-process or on dask; returns ((task, decode_block's result) per task, seconds
    from the first task submitted to the last done, i.e. without the cluster's start-up). The progress bar
    starts then too, so that its closing line and the summary report one throughput."""
    workers = cfg.workers or available_cpus()
    exif = cfg.dataset.exif_orientation
    encoding = cfg.cache.describe()
    in_process = cfg.scheduler is None and (workers == 1 or n_images < cfg.cluster_min_images)
    out = []
    if in_process:
        with progress("prepare: decode", total=n_images, unit="img") as bar:
            start = time.perf_counter()
            for task in tasks:
                out.append((task, decode_block(task.images, cfg.image, task.data_file, task.start, exif, encoding)))
                bar.advance(len(task.images))
        return out, time.perf_counter() - start
    import dask
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    if cfg.scheduler is None:
        # distributed starts its workers with MALLOC_TRIM_THRESHOLD_=65536, which switches off glibc's
        # dynamic mmap threshold: every PIL buffer > 128 KB is then mmap'd and page-faulted afresh,
        # measured at 20-25% more CPU per image. Keep the other settings (single-threaded BLAS).
        environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
        environ.pop("MALLOC_TRIM_THRESHOLD_", None)
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            cluster = LocalCluster(
                n_workers=min(workers, len(tasks)),
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
    try:
        with Client(cluster if cluster is not None else cfg.scheduler) as client:
            # the bar starts with the first submit, not before the cluster: its closing line and the
            # summary's images_per_second then time the same decoding
            with progress("prepare: decode", total=n_images, unit="img") as bar:
                start = time.perf_counter()
                futures = {
                    client.submit(
                        decode_block, t.images, cfg.image, t.data_file, t.start, exif, encoding, pure=False
                    ): t
                    for t in tasks
                }
                for fut in as_completed(futures):
                    task = futures[fut]
                    out.append((task, fut.result()))
                    bar.advance(len(task.images))
                seconds = time.perf_counter() - start
    except OSError as err:
        if cfg.scheduler is not None and not out:
            raise InputError(f"prepare.scheduler: cannot use the dask scheduler at {cfg.scheduler} ({err})") from None
        raise
    finally:
        if cluster is not None:
            cluster.close()
    return out, seconds


__all__ = ["Task", "block_tasks", "absolute", "failures", "run_tasks"]
