"""`run_extract`: the extract stage from the dataset index to a complete feature store (the design: the
package docstring, pipeline/extract/__init__.py)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.index import DatasetIndex, SplitView
from pipeline.devices import resolve_device
from pipeline.errors import InputError
from pipeline.extract.config import COMPUTE_DTYPES, ExtractConfig, resolve_compute_dtype
from pipeline.extract.distributed import Ranks, auto_workers, env_int, init_ranks
from pipeline.extract.finalize import finalize, publish
from pipeline.extract.images import extract_images
from pipeline.extract.resume import is_done, prepare_store
from pipeline.extract.texts import extract_texts
from pipeline.extract.units import WORK_DIR, Unit, plan_units, target_dir
from pipeline.store.durable import naming
from pipeline.store.features import FEATURE_STORE, read_attrs
from pipeline.store.features_writer import StoreWriter, jsonable
from pipeline.store.ownership import claim
from pipeline.teachers import Teacher, build_teacher

log = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    path: Path
    sizes: dict[str, tuple[int, int]]  # split -> (images, captions) in the finished store
    units_total: int
    units_reused: int  # found done (resumed run)
    units_computed: int  # computed by this rank
    skipped_images: list[dict[str, Any]]
    seconds: float
    restart_reason: str | None  # why an existing partial store was not resumed, if it was not

    def summary(self) -> str:
        sizes = ", ".join(f"{s} {n:,} images / {m:,} captions" for s, (n, m) in self.sizes.items())
        reused = f", {self.units_reused} of {self.units_total} chunks reused" if self.units_reused else ""
        skipped = f", {len(self.skipped_images)} bad images skipped" if self.skipped_images else ""
        return f"extract: wrote {self.path} ({sizes}) in {self.seconds:.1f} s{reused}{skipped}"


def run_extract(
    index: DatasetIndex,
    cfg: ExtractConfig,
    out_path: Path | str,
    teacher: Teacher | None = None,
    *,
    fresh: bool = False,
) -> ExtractResult:
    """Compute the teacher features of every image and caption of `cfg.splits` and write the store.

    `teacher`: an already built teacher (tests, tools); by default it is built from `cfg.teacher` on the
    configured device. `fresh`: start over even when a matching partial store could be resumed."""
    t0 = time.perf_counter()
    out = Path(out_path)
    local_rank = env_int("LOCAL_RANK", 0)
    device = teacher.device if teacher is not None else resolve_device(cfg.device, "extract.device", local_rank)
    device = torch.device(device)
    compute_dtype = resolve_compute_dtype(cfg.compute_dtype, device)
    splits = cfg.splits or index.splits
    for s in splits:
        if s not in index.splits:
            raise InputError(
                f"extract.splits: dataset {index.name} has no split {s!r}; it has {', '.join(index.splits)}"
            )
    views = {s: index.split(s) for s in splits}
    claim(out, FEATURE_STORE)  # nothing but a feature store (or an extraction's beginnings) is written over
    if teacher is None:  # built after the cheap checks: loading a checkpoint can take a while
        teacher = build_teacher(cfg.teacher, device=device, dtype=COMPUTE_DTYPES[compute_dtype])

    dist = init_ranks(device)
    try:
        with naming(out):  # zarr's writes of the small arrays and metadata: a full disk names the store
            return _run(index, cfg, out, teacher, views, dist, device, compute_dtype, fresh, t0)
    finally:
        dist.close()


def _run(
    index: DatasetIndex,
    cfg: ExtractConfig,
    out: Path,
    teacher: Teacher,
    views: dict[str, SplitView],
    dist: Ranks,
    device: torch.device,
    compute_dtype: str,
    fresh: bool,
    t0: float,
) -> ExtractResult:
    identity = jsonable(
        {
            "dim": int(teacher.dim),
            "dtype": cfg.store_dtype,
            "splits": list(views),
            "teacher": teacher.identity(),
            "dataset": {"name": index.name, "fingerprint": index.fingerprint},
            "extract": {
                "compute_dtype": compute_dtype,
                "device_type": device.type,
                "chunk_rows": cfg.chunk_rows,
                "jpeg_draft": cfg.jpeg_draft,
            },
        }
    )
    # from the index, not the store (a compacted split has fewer rows)
    units = plan_units(index, views, cfg.chunk_rows, teacher.dim * np.dtype(cfg.store_dtype).itemsize)
    restart_reason = None
    if dist.rank == 0:
        message, restart_reason = prepare_store(out, identity, views, units, cfg, fresh)
        if message:
            log.info(f"{out}: {message}")
    dist.barrier()  # the store exists (fresh or resumable) before anyone reads it

    target = target_dir(out)  # `out`, or beside it while a complete store there is being rewritten
    work = target / WORK_DIR
    writer = StoreWriter(target)
    if read_attrs(target).get("complete") is True:  # finalization of an earlier run had only cleanup left
        return _result(out, writer, units, len(units), 0, t0, restart_reason)
    done = {u for u in units if is_done(work / "done" / u.marker, u)}
    dist.barrier()  # every rank has read the markers before any rank writes new ones
    pending = [u for u in units if u not in done]
    mine = pending[dist.rank :: dist.world]
    workers = cfg.num_workers if cfg.num_workers is not None else auto_workers(device, dist.local_world)
    show = dist.rank == 0
    tag = f" (rank 0 of {dist.world})" if dist.world > 1 else ""

    with torch.inference_mode():
        image_units = [u for u in mine if u.array == "image_emb"]
        text_units = [u for u in mine if u.array != "image_emb"]  # captions, then unpaired texts
        if image_units:
            extract_images(
                image_units, views, teacher, cfg, writer, work, workers, device, show, tag, index.exif_orientation
            )
        if text_units:
            extract_texts(text_units, views, teacher, cfg, writer, work, workers, device, show, tag)

    dist.barrier()  # every unit of every rank is committed
    if dist.rank == 0:
        finalize(target, index, views, units, cfg)
        if target != out:
            publish(out, target)
    dist.barrier()  # nobody returns before the store is complete
    return _result(out, StoreWriter(out), units, len(done), len(mine), t0, restart_reason)


def _result(
    out: Path,
    writer: StoreWriter,
    units: list[Unit],
    reused: int,
    computed: int,
    t0: float,
    restart_reason: str | None,
) -> ExtractResult:
    attrs = read_attrs(out) or {}
    sizes = {s: (writer.rows(s, "image_emb"), writer.rows(s, "text_emb")) for s in attrs.get("splits", [])}
    return ExtractResult(
        path=out,
        sizes=sizes,
        units_total=len(units),
        units_reused=reused,
        units_computed=computed,
        skipped_images=list(attrs.get("skipped_images") or []),
        seconds=time.perf_counter() - t0,
        restart_reason=restart_reason,
    )
