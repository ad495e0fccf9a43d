"""`run_extract`: the extract stage from the dataset index to a complete feature store (the design: the
package docstring, pipeline/extract/__init__.py)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
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
from pipeline.extract.reuse import copy_units, reusable
from pipeline.extract.texts import extract_texts
from pipeline.extract.units import WORK_DIR, Unit, plan_units, target_dir
from pipeline.locks import lock_path
from pipeline.store.durable import naming
from pipeline.store.features import FEATURE_STORE, TEACHERS, FeatureStore, read_attrs
from pipeline.store.features_writer import StoreWriter, clear_store_dir, jsonable
from pipeline.store.ownership import claim
from pipeline.teachers import Teacher, build_teacher
from pipeline.teachers.base import teacher_record

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
    extra_teachers: dict[str, Teacher] | None = None,
    source: FeatureStore | None = None,
) -> ExtractResult:
    """Compute the teacher features of every image and caption of `cfg.splits` and write the store; then those
    of each of `cfg.extra_teachers` into its own store under `<out>/teachers/<name>/`.

    `teacher` / `extra_teachers`: already built teachers (tests, tools); by default each is built from its
    config on the configured device (an extra teacher just before its passes, and freed after them).
    `fresh`: start over even when a matching partial store could be resumed. `source`: an opened complete
    FeatureStore whose rows are copied where they are what this run computes (pipeline/extract/reuse.py: a views
    store's captions, an ablation store's main teacher)."""
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
    extra = dict(extra_teachers or {})
    unknown = sorted(set(extra) - set(cfg.extra_teachers))
    if unknown:
        raise ValueError(f"extra_teachers given for {unknown}, which extract.extra_teachers does not name")
    if teacher is None:  # built after the cheap checks: loading a checkpoint can take a while
        teacher = build_teacher(cfg.teacher, device=device, dtype=COMPUTE_DTYPES[compute_dtype])

    def build(name: str) -> Teacher:
        if name in extra:
            return extra[name]
        return build_teacher(cfg.extra_teachers[name], device=device, dtype=COMPUTE_DTYPES[compute_dtype])

    dist = init_ranks(device)
    try:
        with naming(out):  # zarr's writes of the small arrays and metadata: a full disk names the store
            job = _Job(index, cfg, views, dist, device, compute_dtype, fresh)
            main = job.start(out, teacher, reopen_complete=bool(cfg.extra_teachers) or (out / TEACHERS).is_dir())
            if main.complete:  # finalization of an earlier run had only cleanup left
                return _result(out, main.units, len(main.units), 0, t0, main.restart_reason)
            job.compute(main, teacher, reusable(source, teacher, cfg, views, index.fingerprint))
            # each a store of its own inside the main one being written (`out`, or its rewrite beside it, swapped
            # in whole with them), complete before the main one is
            for name in cfg.extra_teachers:
                other = build(name)
                sub = job.start(main.path / TEACHERS / name, other, keep_complete=True)
                if not sub.complete:
                    job.compute(sub, other)
                    job.finish(sub)
                del other
            if dist.rank == 0:
                _drop_other_teachers(main.path, list(cfg.extra_teachers))
            job.finish(main, teachers=list(cfg.extra_teachers))
            return _result(out, main.units, len(main.done), len(main.mine), t0, main.restart_reason)
    finally:
        dist.close()


@dataclass
class _Store:
    """One store being written (the main one, or an extra teacher's under teachers/<name>/): its units go to
    `path`, which is `out`, or the rewrite beside a complete store at `out` that is swapped in once complete."""

    out: Path
    path: Path
    units: list[Unit]
    complete: bool = False  # nothing to do: complete already (kept, or only cleanup was left)
    done: set[Unit] = field(default_factory=set)
    mine: list[Unit] = field(default_factory=list)  # this rank's pending units
    restart_reason: str | None = None


@dataclass
class _Job:
    """What every store of one extract run shares; `start`, `compute` and `finish` one store."""

    index: DatasetIndex
    cfg: ExtractConfig
    views: dict[str, SplitView]
    dist: Ranks
    device: torch.device
    compute_dtype: str
    fresh: bool

    def start(
        self, out: Path, teacher: Teacher, *, keep_complete: bool = False, reopen_complete: bool = False
    ) -> _Store:
        """Rank 0 resumes, reopens, keeps or creates the store (prepare_store); every rank then reads the markers."""
        identity = jsonable(
            {
                "dim": int(teacher.dim),
                "dtype": self.cfg.store_dtype,
                "splits": list(self.views),
                "teacher": teacher_record(teacher),
                "dataset": {"name": self.index.name, "fingerprint": self.index.fingerprint},
                "extract": {
                    "compute_dtype": self.compute_dtype,
                    "device_type": self.device.type,
                    "chunk_rows": self.cfg.chunk_rows,
                    "jpeg_draft": self.cfg.jpeg_draft,
                },
            }
        )
        # from the index, not the store (a compacted split has fewer rows)
        row_bytes = teacher.dim * np.dtype(self.cfg.store_dtype).itemsize
        store = _Store(out, out, plan_units(self.index, self.views, self.cfg.chunk_rows, row_bytes))
        if self.dist.rank == 0:
            message, store.restart_reason = prepare_store(
                out, identity, self.views, store.units, self.cfg, self.fresh, keep_complete, reopen_complete
            )
            if message:
                log.info(f"{out}: {message}")
        self.dist.barrier()  # the store exists (fresh or resumable) before anyone reads it
        store.path = target_dir(out)  # `out`, or beside it while a complete store there is being rewritten
        if read_attrs(store.path).get("complete") is True:  # kept as it is, or its last run had only cleanup left
            store.complete, store.done = True, set(store.units)
            return store
        work = store.path / WORK_DIR
        store.done = {u for u in store.units if is_done(work / "done" / u.marker, u)}
        self.dist.barrier()  # every rank has read the markers before any rank writes new ones
        pending = [u for u in store.units if u not in store.done]
        store.mine = pending[self.dist.rank :: self.dist.world]
        return store

    def compute(self, store: _Store, teacher: Teacher, sources: tuple[Any, Any] = (None, None)) -> None:
        """This rank's pending units of `store`, image chunks first, then captions and unpaired texts; those the
        (texts, images) `sources` hold are copied from there instead (pipeline/extract/reuse.py)."""
        cfg, dist = self.cfg, self.dist
        workers = cfg.num_workers if cfg.num_workers is not None else auto_workers(self.device, dist.local_world)
        show = dist.rank == 0
        tag = f" (rank 0 of {dist.world})" if dist.world > 1 else ""
        if store.out.parent.name == TEACHERS:
            tag = f" [{store.out.name}]{tag}"
        writer, work = StoreWriter(store.path), store.path / WORK_DIR
        with torch.inference_mode():
            image_units = [u for u in store.mine if u.array == "image_emb"]
            text_units = [u for u in store.mine if u.array != "image_emb"]  # captions, then unpaired texts
            texts_from, images_from = sources
            if images_from is not None:
                image_units = copy_units(image_units, images_from, writer, work)
            if texts_from is not None:
                text_units = copy_units(text_units, texts_from, writer, work)
            if image_units:
                exif = self.index.exif_orientation
                extract_images(
                    image_units, self.views, teacher, cfg, writer, work, workers, self.device, show, tag, exif
                )
            if text_units:
                extract_texts(text_units, self.views, teacher, cfg, writer, work, workers, self.device, show, tag)

    def finish(self, store: _Store, teachers: list[str] | None = None) -> None:
        """Rank 0 finalizes once every rank committed its units; nobody returns before the store is complete."""
        self.dist.barrier()
        if self.dist.rank == 0:
            finalize(store.path, self.index, self.views, store.units, self.cfg, teachers)
            if store.path != store.out:
                publish(store.out, store.path)
        self.dist.barrier()


def _drop_other_teachers(out: Path, names: list[str]) -> None:
    """Remove the store of a teacher that extract.extra_teachers no longer names (ours: inside our store), with
    the lock file a reader may have left beside it; teachers/ itself once nothing else is in it."""
    root = out / TEACHERS
    if not root.is_dir():
        return
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and entry.name not in names:
            log.info(
                f"{out}: removing the store of teacher {entry.name!r}, which extract.extra_teachers no longer names"
            )
            clear_store_dir(entry)
            entry.rmdir()
            lock_path(entry).unlink(missing_ok=True)
    if not names and not any(root.iterdir()):
        root.rmdir()


def _result(
    out: Path, units: list[Unit], reused: int, computed: int, t0: float, restart_reason: str | None
) -> ExtractResult:
    writer = StoreWriter(out)
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
