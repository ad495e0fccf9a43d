"""The mine stage: the teacher's K nearest images of every caption and K nearest captions of every image, over
the whole bank of each split, exactly (pipeline/mine/topk.py); optionally a cross-encoder's scores on them.
Output: the mined store (format: pipeline/store/mined.py), beside the feature store it was mined from.

Work is cut into units, one chunk (`chunk_rows` rows) of one output array each:
    text_to_image.<i>      captions of chunk i: their K images (and their coarse scores into each image's pool)
    image_to_text.<j>      images of chunk j: their K captions, from the pool, once every caption unit is in
    text_to_image_ce.<i>   the cross-encoder on caption chunk i's positive image and K images
    image_to_text_ce.<j>   the cross-encoder on image chunk j's K captions
A unit writes its chunk files durably (temp file, fsync, rename), then a marker `.mine/done/<split>/<unit>.json`
holding their sha256. Caption units run in order, and after unit i the images' pool is saved to
`.mine/pool/<split>.<i>.npz` before the marker: a run killed at any moment loses at most the unit it was
computing, and the rerun continues from the last marker with that unit's pool. Everything a unit computes
is exact or a function of the unit alone (the cross-encoder's batches: pipeline/mine/pair_scores.py), so the
finished store is bitwise the one an uninterrupted run writes.

Identity: the attrs hold the source (the feature store's dataset, teacher and the checksums of its rows), k,
the splits, the chunk layout and the cross-encoder (its identity, device type and compute dtype: its scores
depend on them; the top-K, being exact, on nothing else). A partial store of another identity is never
resumed (one line says what differs, and the run starts over); a complete one is rewritten, as a stage
rewrites its output, beside it (`.NAME.next`, resumed there after a kill) while it stays whole and readable, and
swapped in once the rewrite is complete: a failed rewrite never costs the complete store. Finalization records every chunk's checksum, sets complete=true and deletes `.mine/`.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline.config import require_at_least
from pipeline.data.index import DatasetIndex
from pipeline.devices import resolve_device
from pipeline.errors import InputError
from pipeline.mine.neighbours import SplitMiner, check_k
from pipeline.mine.pair_scores import PairScorer, ScoringConfig, load_rgb
from pipeline.mine.topk import COARSE_DTYPES
from pipeline.progress import progress
from pipeline.store.alignment import align_store_split
from pipeline.store.durable import (
    atomic_path,
    fsync_dir,
    naming,
    remove_partial_files,
    replace_dir,
    write_file_durably,
)
from pipeline.store.features import FeatureStore, open_store, read_attrs
from pipeline.store.features_writer import chunk_len, jsonable
from pipeline.store.mined import (
    IMAGE_TO_TEXT,
    MINED_STORE,
    TEXT_TO_IMAGE,
    WORK_DIR,
    MinedWriter,
    is_mined_dir,
    store_source,
)
from pipeline.store.ownership import claim
from pipeline.teachers import TeacherConfig
from pipeline.teachers.base import CrossEncoder
from pipeline.teachers.cross_encoders import build_cross_encoder

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SCORE_BLOCK = 2**26  # coarse scores per GEMM block when block_rows is automatic (256 MiB of float32)


@dataclass(frozen=True)
class MineConfig:
    """params.yaml section `mine`."""

    k: int = 32  # neighbours per caption and per image
    splits: tuple[str, ...] = ("train",)  # distill reads the training split's; evaluation needs none
    chunk_rows: int = 16384  # rows per chunk file: the unit of work and of resumption
    block_rows: int | None = None  # captions per coarse GEMM block; None: a 256 MiB block of scores
    # speed and memory only: the result is exact either way; auto: bfloat16 on CUDA, float32 on the CPU
    coarse_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cross_encoder: TeacherConfig | None = None  # a teacher kind that scores pairs (fusion, blip_itm); None: none
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # the cross-encoder's; auto: bf16 on CUDA
    pair_batch_size: int = 256  # pairs per cross-encoder forward
    image_batch_size: int = 64  # images per cross-encoder image pass
    text_batch_size: int = 256  # captions per cross-encoder text pass
    state_cache_mib: int = 1024  # keep a split's image / caption states for the run when they fit in this
    num_workers: int | None = None  # image loader processes; None: 0 on the CPU, CPUs - 1 on CUDA

    def __post_init__(self) -> None:
        require_at_least(self, 1, "k", "chunk_rows", "pair_batch_size", "image_batch_size", "text_batch_size")
        require_at_least(self, 0, "state_cache_mib")
        if self.block_rows is not None and self.block_rows < 1:
            raise ValueError(f"block_rows must be at least 1 (or null for automatic), got {self.block_rows}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (or null for automatic), got {self.num_workers}")
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits must name at least one split, each once: {list(self.splits)}")


@dataclass
class MineResult:
    path: Path
    sizes: dict[str, tuple[int, int]]  # split -> (images, captions)
    k: int
    units_total: int
    units_reused: int
    scored: bool
    seconds: float
    restart_reason: str | None

    def summary(self) -> str:
        sizes = ", ".join(f"{s} {n:,} images / {m:,} captions" for s, (n, m) in self.sizes.items())
        what = f"top-{self.k} neighbours" + (" + cross-encoder scores" if self.scored else "")
        reused = f", {self.units_reused} of {self.units_total} chunks reused" if self.units_reused else ""
        return f"mine: {what} of {sizes} -> {self.path} in {self.seconds:.1f} s{reused}"


@dataclass(frozen=True)
class _Unit:
    split: str
    kind: str  # text_to_image | image_to_text | text_to_image_ce | image_to_text_ce
    index: int
    start: int
    stop: int

    @property
    def marker(self) -> str:
        return f"{self.split}/{self.kind}.{self.index}.json"

    @property
    def direction(self) -> str:
        return self.kind.removesuffix("_ce")


def resolve_coarse_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on a CUDA GPU, float32 on the CPU. Never changes the result, only how many candidates are
    rescored. On the CPU bfloat16 does not pay even where the cores have bfloat16 dot products: on 2 cores of an
    AMD EPYC with AVX512-BF16 (bench/mine_bench.py, 2026-12-06) a quarter of Flickr30K took 23.8 s against 27.7 s
    in float32 but peaked at 3.0 GB against 1.3 GB, and the whole of Flickr30K went past 23 GB and was killed
    (float32: 173 s). `mine.coarse_dtype: bfloat16` still asks for it."""
    if name != "auto":
        return COARSE_DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def run_mine(
    store_path: Path | str,
    cfg: MineConfig,
    out_path: Path | str,
    *,
    index: DatasetIndex | None = None,
    cross_encoder: CrossEncoder | None = None,
    fresh: bool = False,
) -> MineResult:
    """Mine `cfg.splits` of the feature store at `store_path` into `out_path`. `index`: the dataset index the
    store was computed from (checked by fingerprint; needed by a cross-encoder for the images and captions).
    `cross_encoder`: an already built one (tests); by default built from `cfg.cross_encoder`."""
    t0 = time.perf_counter()
    out = Path(out_path)
    store = open_store(store_path, expect_fingerprint=index.fingerprint if index is not None else None)
    for s in cfg.splits:
        sp = store.split(s)  # one line when missing
        check_k(cfg.k, sp.n_images, sp.n_captions, np.asarray(sp.text_image), f"{store.path}: split {s!r}")
    scoring = cfg.cross_encoder is not None or cross_encoder is not None
    if scoring and index is None:
        raise InputError("mine.cross_encoder needs the dataset index (the images and captions it scores)")
    device = resolve_device(cfg.device, "mine.device") if cross_encoder is None else cross_encoder.device
    device = torch.device(device)
    compute = cfg.compute_dtype if cfg.compute_dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if cross_encoder is None and cfg.cross_encoder is not None:  # after the cheap checks: loading takes a while
        cross_encoder = build_cross_encoder(cfg.cross_encoder, device=device, dtype=_DTYPES[compute])
    identity = jsonable(
        {
            "source": store_source(store, cfg.splits),
            "k": cfg.k,
            "splits": list(cfg.splits),
            "mine": {"chunk_rows": cfg.chunk_rows, "score": "exact inner product of the stored teacher rows"},
            "cross_encoder": None
            if cross_encoder is None
            else {"identity": cross_encoder.identity(), "device_type": device.type, "compute_dtype": compute},
        }
    )
    units = _units(store, cfg, scored=cross_encoder is not None)
    with naming(out):
        claim(out, MINED_STORE)  # nothing but a mined store (or a mine's beginnings) is written over
        target = _target(out)  # a complete store stays whole, readable, until its rewrite beside it is complete
        work = target / WORK_DIR
        message, reason = _prepare(target, identity, store, cfg, fresh)
        if target != out and message is None:
            message = "replacing the complete mined store of an earlier run"
        if message:
            log.info(f"{out}: {message}" + (f" (rewritten beside it in {target.name})" if target != out else ""))
        done = (
            set(units) if message == _ALREADY_COMPLETE else {u for u in units if (work / "done" / u.marker).is_file()}
        )
        if message != _ALREADY_COMPLETE:
            writer = MinedWriter(target)
            for split in cfg.splits:
                mine_units = [u for u in units if u.split == split and not u.kind.endswith("_ce")]
                _mine_split(store, split, cfg, writer, work, mine_units, done, device)
                if cross_encoder is not None:
                    ce_units = [u for u in units if u.split == split and u.kind.endswith("_ce") and u not in done]
                    _score_split(store, index, split, cross_encoder, cfg, writer, work, ce_units)
            _finalize(target, writer, units)
        if target != out:  # swap the complete rewrite in: at no moment is there no complete store at `out`
            replace_dir(target, out, MINED_STORE)
    sizes = {s: (store.split(s).n_images, store.split(s).n_captions) for s in cfg.splits}
    return MineResult(
        out, sizes, cfg.k, len(units), len(done), cross_encoder is not None, time.perf_counter() - t0, reason
    )


def _units(store: FeatureStore, cfg: MineConfig, scored: bool) -> list[_Unit]:
    """Every unit in run order: per split, caption units, image units, then the scoring units."""
    units = []
    for s in cfg.splits:
        sp = store.split(s)
        kinds = [(TEXT_TO_IMAGE, sp.n_captions), (IMAGE_TO_TEXT, sp.n_images)]
        if scored:
            kinds += [(f"{TEXT_TO_IMAGE}_ce", sp.n_captions), (f"{IMAGE_TO_TEXT}_ce", sp.n_images)]
        for kind, n in kinds:
            cr = chunk_len(n, cfg.chunk_rows)  # the layout MinedWriter.create gives the arrays
            units += [_Unit(s, kind, i, a, min(n, a + cr)) for i, a in enumerate(range(0, n, cr))]
    return units


# ---------------------------------------------------------------------------------------------------------
# Mining (exact top-K)
# ---------------------------------------------------------------------------------------------------------
def _mine_split(
    store: FeatureStore,
    split: str,
    cfg: MineConfig,
    writer: MinedWriter,
    work: Path,
    units: list[_Unit],
    done: set[_Unit],
    device: torch.device,
) -> None:
    captions = [u for u in units if u.kind == TEXT_TO_IMAGE]
    images = [u for u in units if u.kind == IMAGE_TO_TEXT]
    n_done = 0  # caption units run in order: the done ones are a prefix (anything after a gap is redone)
    while n_done < len(captions) and captions[n_done] in done:
        n_done += 1
    pool_file = _pool_file(work, split, n_done - 1)
    if n_done and not pool_file.is_file():  # a pool lost by hand: the captions must be seen again
        n_done = 0
    pending_images = [u for u in images if u not in done or n_done < len(captions)]
    if n_done == len(captions) and not pending_images:
        return
    sp = store.split(split)
    block = cfg.block_rows or max(64, min(16384, _SCORE_BLOCK // max(1, sp.n_images)))
    miner = SplitMiner(
        sp.image_emb,
        sp.text_emb,
        np.asarray(sp.text_image),
        cfg.k,
        device=device,
        coarse_dtype=resolve_coarse_dtype(cfg.coarse_dtype, device),
        block_rows=block,
    )
    if n_done:
        with np.load(pool_file) as state:
            miner.pool.load({"values": state["values"], "rows": state["rows"].astype(np.int64)})
    with progress(f"mine {split}: captions", total=sp.n_captions, unit="captions") as bar:
        bar.advance(captions[n_done - 1].stop if n_done else 0)
        for u in captions[n_done:]:
            rows, sims = miner.caption_unit(u.start, u.stop)
            digests = _write(writer, u, {"rows": rows, "sims": sims})
            state = miner.pool.state()
            with atomic_path(_pool_file(work, split, u.index)) as tmp, open(tmp, "wb") as f:
                np.savez(f, values=state["values"], rows=state["rows"].astype(np.int32))
            write_file_durably(work / "done" / u.marker, json.dumps({"sha256": digests}).encode())
            _pool_file(work, split, u.index - 1).unlink(missing_ok=True)  # the pool before this unit
            bar.advance(u.stop - u.start)
    with progress(f"mine {split}: images", total=sum(u.stop - u.start for u in pending_images), unit="images") as bar:
        for u in pending_images:
            rows, sims = miner.image_unit(u.start, u.stop)
            digests = _write(writer, u, {"rows": rows, "sims": sims})
            write_file_durably(work / "done" / u.marker, json.dumps({"sha256": digests}).encode())
            bar.advance(u.stop - u.start)
    st = miner.stats
    if st["queries"]:
        log.info(
            f"mine {split}: {st['candidates'] / st['queries']:.2f} candidates rescored exactly per query "
            f"(k = {cfg.k}), {st['rescans']} windows read again in full"
        )


def _pool_file(work: Path, split: str, unit: int) -> Path:
    return work / "pool" / f"{split}.{unit}.npz"


def _write(writer: MinedWriter, u: _Unit, arrays: dict[str, np.ndarray]) -> dict[str, str]:
    return {name: writer.write_chunk(u.split, u.direction, name, u.index, values) for name, values in arrays.items()}


# ---------------------------------------------------------------------------------------------------------
# Cross-encoder scores
# ---------------------------------------------------------------------------------------------------------
def _score_split(
    store: FeatureStore,
    index: DatasetIndex,
    split: str,
    ce: CrossEncoder,
    cfg: MineConfig,
    writer: MinedWriter,
    work: Path,
    units: list[_Unit],
) -> None:
    if not units:
        return
    sp = store.split(split)
    view = index.split(split)
    aligned = align_store_split(view, sp, f"{store.path}")
    image_rows = aligned.image_rows if aligned.image_rows is not None else np.arange(view.n_images)
    workers = cfg.num_workers if cfg.num_workers is not None else (0 if ce.device.type == "cpu" else 8)
    scorer = PairScorer(
        ce,
        [str(p) for p in view.image_path[image_rows].tolist()],
        [str(c) for c in view.caption_text[aligned.caption_rows].tolist()],
        functools.partial(load_rgb, exif=index.exif_orientation),
        ScoringConfig(cfg.pair_batch_size, cfg.image_batch_size, cfg.text_batch_size, cfg.state_cache_mib, workers),
    )
    text_image = np.asarray(sp.text_image, np.int64)
    total = sum((u.stop - u.start) * (cfg.k + (u.kind == f"{TEXT_TO_IMAGE}_ce")) for u in units)
    with progress(f"mine {split}: cross-encoder", total=total, unit="pairs") as bar:
        for u in units:
            mined = writer.read(u.split, u.direction, "rows", u.start, u.stop).astype(np.int64)  # [n, K]
            queries = np.arange(u.start, u.stop, dtype=np.int64)[:, None]
            if u.direction == TEXT_TO_IMAGE:  # column 0: the caption's own image
                images = np.concatenate([text_image[u.start : u.stop, None], mined], axis=1)
                captions = np.broadcast_to(queries, images.shape)
            else:
                captions, images = mined, np.broadcast_to(queries, mined.shape)
            scores = scorer.score(images, captions).reshape(images.shape)
            digests = {"ce_scores": writer.write_chunk(u.split, u.direction, "ce_scores", u.index, scores)}
            write_file_durably(work / "done" / u.marker, json.dumps({"sha256": digests}).encode())
            bar.advance(images.size)


# ---------------------------------------------------------------------------------------------------------
# Starting, resuming, finishing
# ---------------------------------------------------------------------------------------------------------
_ALREADY_COMPLETE = "already complete (an earlier run was stopped while cleaning up)"
_IDENTITY_KEYS = {
    "source": "feature store (teacher, dataset or rows)",
    "k": "k",
    "splits": "list of splits",
    "mine": "chunk layout",
    "cross_encoder": "cross-encoder",
}


def _staging(out: Path) -> Path:
    """Where a complete mined store at `out` is rewritten while it stays in place: `.NAME.next` beside it."""
    return out.parent / f".{out.name}.next"


def _target(out: Path) -> Path:
    """The directory this run writes: `out` itself unless `out` holds a complete mined store (whose rewrite goes
    to its staging directory, resumed there after a kill, and is swapped in once complete). A staging directory
    left beside an `out` that is no longer complete (removed, or replaced by hand) is kdpipe's own: removed."""
    stage = _staging(out)
    attrs = (read_attrs(out) or {}) if is_mined_dir(out) else {}
    if attrs.get("complete") is True and not (out / WORK_DIR / "created").is_file():
        claim(stage, MINED_STORE)
        return stage
    if stage.exists() and is_mined_dir(stage):
        shutil.rmtree(stage)
    return out


def _prepare(
    out: Path, identity: dict[str, Any], store: FeatureStore, cfg: MineConfig, fresh: bool
) -> tuple[str | None, str | None]:
    """Resume a matching partial store, or create a new one, at `out` (the run's target: the mined store or its
    staging directory). Returns (a line to print, why a partial store was not resumed)."""
    work = out / WORK_DIR
    claim(out, MINED_STORE)  # nothing but a mined store (or a mine's beginnings) is written over
    ours = is_mined_dir(out)
    attrs = read_attrs(out) or {}
    message = reason = None
    if ours and (work / "created").is_file():
        diff = next((name for key, name in _IDENTITY_KEYS.items() if attrs.get(key) != identity[key]), None)
        if fresh:
            reason = "--fresh given"
        elif diff:
            reason = f"the partial mined store was computed with a different {diff}"
        elif attrs.get("complete") is True:  # killed after complete=true: only the cleanup was left
            shutil.rmtree(work)
            return _ALREADY_COMPLETE, None
        else:
            remove_partial_files(out)
            n = sum(1 for _ in (work / "done").rglob("*.json")) if (work / "done").is_dir() else 0
            return f"resuming an interrupted mine ({n} chunks already done)", None
    elif ours and attrs.get("complete") is True:
        message = "replacing the complete mined store of an earlier run"
    elif ours or work.is_dir():
        reason = "the partial store was killed while it was being set up"
    if reason:
        message = f"{reason}; starting over"
    _clear(out)
    layout = {s: (store.split(s).n_images, store.split(s).n_captions) for s in cfg.splits}
    MinedWriter.create(
        out,
        layout=layout,
        k=cfg.k,
        scores=identity["cross_encoder"] is not None,
        chunk_rows=cfg.chunk_rows,
        attrs={key: identity[key] for key in _IDENTITY_KEYS},
    )
    write_file_durably(work / "created", b"")
    return message, reason


def _clear(out: Path) -> None:
    """Empty `out` (a mined store of ours, partial or complete, or an empty directory): complete=false first,
    so that a reader without the lock never takes a half-deleted store for a finished one."""
    if not out.is_dir():
        return
    if (read_attrs(out) or {}).get("complete") is True:
        import zarr

        zarr.open_group(str(out), mode="r+").attrs["complete"] = False
        fsync_dir(out)
    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _finalize(out: Path, writer: MinedWriter, units: list[_Unit]) -> None:
    work = out / WORK_DIR
    digests: dict[tuple[str, str, str], dict[int, str]] = {}
    for u in units:
        record = json.loads((work / "done" / u.marker).read_text())
        for name, digest in record["sha256"].items():
            digests.setdefault((u.split, u.direction, name), {})[u.index] = digest
    remove_partial_files(out)
    writer.finish(digests)
    shutil.rmtree(work)
    fsync_dir(out)


__all__ = ["MineConfig", "MineResult", "run_mine", "resolve_coarse_dtype", "WORK_DIR"]
