"""The extract stage: run the teacher once over every image and caption and write the feature store.

Work is cut into *units*: one chunk of one array (`<split>/image_emb` or `<split>/text_emb`, `chunk_rows`
rows each, exactly the store's chunk files). A unit is computed, written durably (temp file, fsync,
rename), and only then marked done by a small marker file `.extract/done/<split>/<array>.<i>.json`. So:

- **Resume**: a run killed at any moment (SIGKILL included) loses at most the unit each rank was computing;
  the rerun skips every unit with a marker. Batches never straddle units and always start at a unit's
  first row, so a unit's rows do not depend on which run, rank or neighbour computed it: the finished
  store is bitwise identical to an uninterrupted run's (same device, same settings).
- **Identity**: the store attrs hold the teacher's identity, the dataset {name, fingerprint} and the
  extract settings that shape the rows (`extract`: compute dtype, device type, chunk rows, JPEG draft);
  the store dtype and splits are attrs of their own. A partial store whose identity differs is never
  resumed: one line says what differs and the run starts over. Batch sizes and worker counts are speed
  settings only and may change between a run and its resumption, and so may `on_bad_image` (a run that
  stopped on a bad image resumes with `skip`; a `skip` record met under `error` stops the run).
- **Ranks** (torchrun): rank 0 prepares the store, every rank reads the markers, the *pending* units are
  dealt round-robin (`pending[rank::world]`), each rank writes only its own chunk files and markers (no
  shared file is ever read-modified-written), and rank 0 finalizes after a barrier.
- **Bad images** (`on_bad_image`): `error` stops with one line naming the file; `skip` drops the image
  *and its captions* from that split's arrays at finalization (the rows are compacted, `text_image` is
  renumbered, `image_id` keeps naming the kept images) and lists each skipped image in the store attrs
  `skipped_images` ({split, index_row, image_id, path, reason}). A store with skips therefore has fewer
  rows than the index split: align it with the index (or the image cache) through `image_id`, or drop
  the listed `index_row`s from the index side.
- **Finalization** (rank 0): compaction (only if something was skipped; crash-safe, it builds the new
  split under `.extract/compact/` and swaps it in by renames), then `complete=true`, then `.extract/` is
  deleted, so a finished store holds nothing but the Zarr group.
- **Unpaired items** (pipeline.data.index): an image without captions is an ordinary image_emb row; the
  texts of a split that have no image are embedded like captions into the optional
  `<split>/unpaired_text_emb` array (units of their own), which is created only when there are some.
- A *complete* store found at the start is rewritten from scratch (a stage rewrites its output; DVC
  only reruns the stage when an input changed), except when the only difference is image files replaced
  since (issue 13): each image unit records the index's digest of the files it embedded (`_Unit.content`,
  in its marker, then the store attrs `image_chunks`), and a store whose identity matches and which skipped
  no image is reopened with every unit marked done under its recorded digest, so that exactly the units
  whose digest differs are computed again. A resumed partial store redoes such units the same way.

Speed: images are decoded and preprocessed by `num_workers` DataLoader processes (pinned memory, deep
prefetch, non-blocking copies); the device result of batch k is fetched only after batch k+1 has been
queued; captions are bucketed by token length inside each unit (sorted, batched, scattered back to their
rows), so most batches are far shorter than the maximum length; chunk files are written by a background
thread. Everything runs under `torch.inference_mode()`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from pipeline.config import require_at_least
from pipeline.data.exif import orientation, upright
from pipeline.data.index import DatasetIndex, SplitView
from pipeline.devices import resolve_device
from pipeline.errors import InputError
from pipeline.hashing import sha256_file
from pipeline.progress import progress
from pipeline.runtime import available_cpus
from pipeline.store.durable import fsync_dir, fsync_tree, naming, remove_partial_files, write_file_durably
from pipeline.store.features import (
    FORMAT,
    UNPAIRED_TEXT,
    StoreWriter,
    chunk_len,
    clear_store_dir,
    is_feature_store_dir,
    jsonable,
    read_attrs,
)
from pipeline.teachers import Teacher, TeacherConfig, build_teacher

log = logging.getLogger(__name__)

WORK_DIR = ".extract"  # progress records inside the store while it is being written; deleted at the end
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DIST_TIMEOUT = timedelta(hours=2)  # ranks wait at barriers while rank 0 prepares or finalizes


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

    def __post_init__(self) -> None:
        require_at_least(self, 1, "image_batch_size", "text_batch_size", "prefetch_factor", "chunk_rows")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (or null for automatic), got {self.num_workers}")
        if len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits lists a split twice: {list(self.splits)}")


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


@dataclass(frozen=True)
class _Unit:
    split: str
    array: str  # "image_emb" | "text_emb" | "unpaired_text_emb"
    index: int  # chunk index
    start: int  # first row (in the split)
    stop: int
    # image_emb units: the index's digest of the unit's image files (DatasetIndex.content_digest), recorded in
    # its marker and, at the end, in the store attrs `image_chunks`; None where the index has no hashes
    content: str | None = None

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def marker(self) -> str:
        return f"{self.split}/{self.array}.{self.index}.json"


# ---------------------------------------------------------------------------------------------------------
# Devices and ranks
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    owns_group: bool = False

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_compute_dtype(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return name


def _init_dist(device: torch.device) -> _Dist:
    world = _env_int("WORLD_SIZE", 1)
    d = _Dist(
        rank=_env_int("RANK", 0),
        world=world,
        local_rank=_env_int("LOCAL_RANK", 0),
        local_world=_env_int("LOCAL_WORLD_SIZE", 1),
    )
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
                dist.init_process_group("nccl", timeout=_DIST_TIMEOUT, device_id=device)
            else:
                dist.init_process_group("gloo", timeout=_DIST_TIMEOUT)
            d.owns_group = True
        d.rank, d.world = dist.get_rank(), dist.get_world_size()
    return d


def _auto_workers(device: torch.device, local_world: int) -> int:
    if device.type != "cuda":
        return 0  # the CPU forward already uses every core; decoding in-process avoids fighting over them
    cpus = available_cpus()
    return max(1, min(32, cpus // max(1, local_world) - 1))


# ---------------------------------------------------------------------------------------------------------
# Loading: images and captions (these run inside DataLoader worker processes)
# ---------------------------------------------------------------------------------------------------------
_BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def load_rgb(path: str, draft_size: int | None = None, exif: str = "ignore") -> Image.Image:
    """Decode an image file fully as RGB (raises on a missing, truncated or unreadable file); exif "apply":
    turned upright by its EXIF orientation tag (the dataset index's choice, see pipeline/data/exif.py)."""
    with Image.open(path) as im:
        tag = orientation(im) if exif == "apply" else 1
        if draft_size and im.format == "JPEG":
            # DCT-domain downscale, never below the requested size; square, so the same before or after a rotation
            im.draft("RGB", (draft_size, draft_size))
        return upright(im.convert("RGB"), tag)  # convert() loads all pixel data, so a truncated file fails here


class _ImageItems(torch.utils.data.Dataset):
    """Item i -> (pixels [3, S, S], error message or ""); a bad image gives `blank` and its message."""

    def __init__(
        self,
        paths: list[str],
        preprocess: Callable[[Image.Image], torch.Tensor],
        blank: torch.Tensor,
        draft_size: int | None,
        exif: str,
    ) -> None:
        self.paths, self.preprocess, self.blank, self.draft_size = paths, preprocess, blank, draft_size
        self.exif = exif

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            image = load_rgb(self.paths[i], self.draft_size, self.exif)
        except _BAD_IMAGE_ERRORS as err:
            return self.blank.clone(), f"{type(err).__name__}: {err}"
        return self.preprocess(image), ""


class _CaptionUnits(torch.utils.data.Dataset):
    """Item k -> the batches of caption unit k, bucketed by length: [(positions in the unit, TokenBatch)]."""

    def __init__(self, texts: list[list[str]], teacher: Teacher, batch_size: int) -> None:
        self.texts, self.teacher, self.batch_size = texts, teacher, batch_size

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, k: int) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        texts = self.texts[k]
        lengths = np.asarray(self.teacher.token_lengths(texts), dtype=np.int64)
        order = np.argsort(-lengths, kind="stable")  # longest first: a too-large batch fails at once
        out = []
        for b in range(0, len(texts), self.batch_size):
            pos = order[b : b + self.batch_size]
            out.append((torch.from_numpy(pos), self.teacher.tokenize([texts[j] for j in pos])))
        return out


def _loader(dataset: torch.utils.data.Dataset, workers: int, pin: bool, prefetch: int, **kw: Any):
    extra: dict[str, Any] = {}
    if workers > 0:
        extra["prefetch_factor"] = prefetch
        if sys.platform.startswith("linux"):
            extra["multiprocessing_context"] = "fork"  # workers inherit the teacher; nothing is pickled
    return torch.utils.data.DataLoader(dataset, num_workers=workers, pin_memory=pin, **kw, **extra)


# ---------------------------------------------------------------------------------------------------------
# Writing: a background thread commits finished units (chunk file, then its marker)
# ---------------------------------------------------------------------------------------------------------
class _Committer:
    def __init__(self, writer: StoreWriter, work: Path) -> None:
        self.writer, self.work = writer, work
        self._queue: queue.Queue = queue.Queue(maxsize=2)  # bounds the finished units held in memory
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="extract-commit", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            unit, rows, record = item
            try:
                # the chunk's checksum rides in its marker: rank 0 records them all at finalization
                with naming(self.writer.chunk_path(unit.split, unit.array, unit.index)):
                    digest = self.writer.write_chunk(unit.split, unit.array, unit.index, rows)
                record = {**record, "sha256": digest}
                write_file_durably(self.work / "done" / unit.marker, json.dumps(record).encode())
            except BaseException as err:  # noqa: BLE001 -- re-raised in the main thread
                self._error = err

    def put(self, unit: _Unit, rows: np.ndarray, record: dict[str, Any]) -> None:
        self._check()
        self._queue.put((unit, rows, record))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error


class _Lag:
    """Fetch a batch's result from the device only after the next batch has been queued (keeps the GPU fed)."""

    def __init__(self) -> None:
        self._pending: tuple[torch.Tensor, Callable[[np.ndarray], None]] | None = None

    def push(self, out: torch.Tensor, then: Callable[[np.ndarray], None]) -> None:
        previous, self._pending = self._pending, (out, then)
        if previous is not None:
            previous[1](previous[0].float().cpu().numpy())

    def flush(self) -> None:
        previous, self._pending = self._pending, None
        if previous is not None:
            previous[1](previous[0].float().cpu().numpy())


# ---------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------
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
    local_rank = _env_int("LOCAL_RANK", 0)
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
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory; expected a feature store location")
    if out.is_dir() and any(out.iterdir()) and not is_feature_store_dir(out) and not (out / WORK_DIR).is_dir():
        raise InputError(f"{out}: exists, is not empty and is not a feature store; remove it or choose another path")
    if teacher is None:  # built after the cheap checks: loading a checkpoint can take a while
        teacher = build_teacher(cfg.teacher, device=device, dtype=_DTYPES[compute_dtype])

    dist = _init_dist(device)
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
    dist: _Dist,
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
    work = out / WORK_DIR
    # from the index, not the store (a compacted split has fewer rows)
    units = _units(index, views, cfg.chunk_rows, teacher.dim * np.dtype(cfg.store_dtype).itemsize)
    restart_reason = None
    if dist.rank == 0:
        message, restart_reason = _prepare(out, identity, views, units, cfg, fresh)
        if message:
            log.info(f"{out}: {message}")
    dist.barrier()  # the store exists (fresh or resumable) before anyone reads it

    writer = StoreWriter(out)
    if read_attrs(out).get("complete") is True:  # finalization of an earlier run had only cleanup left
        return _result(out, writer, units, len(units), 0, t0, restart_reason)
    done = {u for u in units if _is_done(work / "done" / u.marker, u)}
    dist.barrier()  # every rank has read the markers before any rank writes new ones
    pending = [u for u in units if u not in done]
    mine = pending[dist.rank :: dist.world]
    workers = cfg.num_workers if cfg.num_workers is not None else _auto_workers(device, dist.local_world)
    show = dist.rank == 0
    tag = f" (rank 0 of {dist.world})" if dist.world > 1 else ""

    with torch.inference_mode():
        image_units = [u for u in mine if u.array == "image_emb"]
        text_units = [u for u in mine if u.array != "image_emb"]  # captions, then unpaired texts
        if image_units:
            _extract_images(
                image_units, views, teacher, cfg, writer, work, workers, device, show, tag, index.exif_orientation
            )
        if text_units:
            _extract_texts(text_units, views, teacher, cfg, writer, work, workers, device, show, tag)

    dist.barrier()  # every unit of every rank is committed
    if dist.rank == 0:
        _finalize(out, index, views, units, cfg)
    dist.barrier()  # nobody returns before the store is complete
    return _result(out, StoreWriter(out), units, len(done), len(mine), t0, restart_reason)


def _result(
    out: Path,
    writer: StoreWriter,
    units: list[_Unit],
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


def _units(index: DatasetIndex, views: dict[str, SplitView], chunk_rows: int, row_bytes: int) -> list[_Unit]:
    """Every chunk of every embedding array, in the layout StoreWriter.create gives the split's arrays."""
    units = []
    for s, v in views.items():
        arrays = (("image_emb", v.n_images), ("text_emb", v.n_captions), (UNPAIRED_TEXT, len(v.unpaired_text)))
        for array, n in arrays:
            cr = chunk_len(n, chunk_rows, row_bytes)
            for i, a in enumerate(range(0, n, cr)):
                b = min(n, a + cr)
                content = index.content_digest(v.image_rows[a:b]) if array == "image_emb" else None
                units.append(_Unit(s, array, i, a, b, content))
    return units


def _is_done(marker: Path, unit: _Unit) -> bool:
    """A unit is done when its marker exists and (image units) was made from the image files the index names
    now: a chunk embedding a file replaced since is computed again. A marker without a record of its images
    (an older kdpipe) or an index without hashes cannot tell, and counts as done, as it did before."""
    if unit.content is None:
        return marker.is_file()
    try:
        recorded = json.loads(marker.read_text()).get("images", unit.content)
    except (OSError, ValueError):
        return False
    return recorded is None or recorded == unit.content


def _prepare(
    out: Path,
    identity: dict[str, Any],
    views: dict[str, SplitView],
    units: list[_Unit],
    cfg: ExtractConfig,
    fresh: bool,
) -> tuple[str | None, str | None]:
    """Rank 0: decide between resuming and starting over, and create the store when starting over.

    Returns (a line to print, the reason an existing partial store was not resumed)."""
    work = out / WORK_DIR
    attrs = read_attrs(out)
    ours = attrs is not None and attrs.get("format") == FORMAT
    message = reason = None
    if ours and (work / "created").is_file():
        diff = _identity_diff(attrs, identity)
        if fresh:
            reason = "--fresh given"
        elif diff:
            reason = f"the partial store was computed with a different {diff}"
        elif attrs.get("complete") is True:
            shutil.rmtree(work)  # an earlier run was killed after complete=true: only cleanup was left
            return "already complete", None
        else:
            remove_partial_files(out)
            _finish_swaps(out)
            n_done = sum(1 for _ in (work / "done").rglob("*.json")) if (work / "done").is_dir() else 0
            return f"resuming an interrupted extraction ({n_done} chunks already done)", None
    elif ours and attrs.get("complete") is True:
        stale = 0 if fresh else _stale_chunks(attrs, identity, units)
        if stale:
            _reopen(out, units, attrs["image_chunks"])
            return f"{stale} image chunk(s) embed image files changed since: computing only those again", None
        # a finished store: a stage rewrites its output (DVC reruns it only when an input changed)
        message = "replacing the complete store of an earlier run"
    elif ours or (work.is_dir() and out.is_dir()):
        reason = "the partial store was killed while it was being set up"
    if reason:
        message = f"{reason}; starting over"
    clear_store_dir(out)
    layout = {s: (v.n_images, v.n_captions, len(v.unpaired_text)) for s, v in views.items()}
    attrs_new = {k: identity[k] for k in ("teacher", "dataset", "extract")}
    attrs_new["skipped_images"] = []
    writer = StoreWriter.create(
        out, layout=layout, dim=identity["dim"], dtype=identity["dtype"], chunk_rows=cfg.chunk_rows, attrs=attrs_new
    )
    for s, v in views.items():
        writer.write_text_image(s, v.text_image)
        writer.write_image_id(s, v.image_id.tolist())
    fsync_tree(out)
    write_file_durably(work / "created", b"")
    return message, reason


def _stale_chunks(attrs: dict[str, Any], identity: dict[str, Any], units: list[_Unit]) -> int:
    """How many image chunks of a complete store embed files that changed since, when ONLY that differs
    (same identity, the index's chunk layout, no skipped images), else 0: the store is then rewritten whole.
    Caveat: a teacher whose code changed without its identity() changing is not seen here; `--fresh` (or a
    store with nothing stale, which is rewritten whole) covers it."""
    recorded = attrs.get("image_chunks")
    if not recorded or attrs.get("skipped_images") or _identity_diff(attrs, identity):
        return 0
    wanted = _image_chunks(units)
    if wanted is None or {s: len(c) for s, c in wanted.items()} != {s: len(c) for s, c in recorded.items()}:
        return 0
    return sum(a != b for s in wanted for a, b in zip(wanted[s], recorded[s]))


def _image_chunks(units: list[_Unit]) -> dict[str, list[str]] | None:
    """The content digest of each image chunk, per split (the store attr `image_chunks`); None if unknown."""
    chunks: dict[str, list[str]] = {}
    for u in units:
        if u.array == "image_emb":
            if u.content is None:
                return None
            chunks.setdefault(u.split, []).append(u.content)
    return chunks


def _reopen(out: Path, units: list[_Unit], recorded: dict[str, list[str]]) -> None:
    """Turn a complete store back into a partial one whose every unit is done, each image unit with the
    digest it was made from: the ordinary resumption then computes exactly the stale ones. complete=false
    goes first, so that a crash in between leaves a store that is never taken as finished."""
    StoreWriter(out).set_attrs(complete=False)
    work = out / WORK_DIR
    shutil.rmtree(work, ignore_errors=True)
    for u in units:
        record = {"bad": [], "images": recorded[u.split][u.index]} if u.array == "image_emb" else {}
        write_file_durably(work / "done" / u.marker, json.dumps(record).encode())
    write_file_durably(work / "created", b"")


def _identity_diff(attrs: dict[str, Any], identity: dict[str, Any]) -> str | None:
    names = {
        "teacher": "teacher",
        "dataset": "dataset index (fingerprint)",
        "dim": "teacher dimension",
        "dtype": "store_dtype",
        "splits": "list of splits",
    }
    for key in ("dataset", "teacher", "dim", "dtype", "splits"):
        if attrs.get(key) != identity[key]:
            return names[key]
    old, new = attrs.get("extract") or {}, identity["extract"]
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        return "extract setting (" + ", ".join(changed) + ")"
    return None


@contextmanager
def _bar(show: bool, description: str, total: int, unit: str) -> Iterator[Any]:
    if show:
        with progress(description, total=total, unit=unit) as bar:
            yield bar
    else:

        class _Quiet:
            def advance(self, n: int = 1) -> None:
                pass

        yield _Quiet()


def _extract_images(
    units: list[_Unit],
    views: dict[str, SplitView],
    teacher: Teacher,
    cfg: ExtractConfig,
    writer: StoreWriter,
    work: Path,
    workers: int,
    device: torch.device,
    show: bool,
    tag: str,
    exif: str,
) -> None:
    # A teacher may offer the resize alone as uint8 (normalized on the device by encode_image_batch):
    # 4x fewer bytes through worker IPC, pinned memory and the host-to-device copy.
    preprocess = getattr(teacher, "preprocess_image_uint8", None) or teacher.preprocess_image
    blank = torch.zeros_like(preprocess(Image.new("RGB", (32, 32))))  # [3, S, S]
    draft = int(blank.shape[-1]) if cfg.jpeg_draft else None
    paths: list[str] = []
    batches: list[list[int]] = []
    batch_of: list[tuple[int, int]] = []  # batch -> (unit number, first row inside the unit)
    for k, u in enumerate(units):
        base = len(paths)
        paths.extend(views[u.split].image_path[u.start : u.stop].tolist())
        for b in range(0, u.rows, cfg.image_batch_size):
            batches.append(list(range(base + b, base + min(u.rows, b + cfg.image_batch_size))))
            batch_of.append((k, b))
    loader = _loader(
        _ImageItems(paths, preprocess, blank, draft, exif),
        workers,
        device.type == "cuda",
        cfg.prefetch_factor,
        batch_sampler=batches,
    )

    buffers: dict[int, np.ndarray] = {}
    filled: dict[int, int] = {}
    bad: dict[int, list[dict[str, Any]]] = {}
    total = sum(u.rows for u in units)
    with _bar(show, f"images{tag}", total, "img") as bar:
        batch_iter = iter(loader)  # worker processes fork here, before the commit thread starts
        committer = _Committer(writer, work)
        lag = _Lag()
        try:
            for n, (pixels, errors) in enumerate(batch_iter):
                k, first = batch_of[n]
                u = units[k]
                for j, message in enumerate(errors):
                    if message:
                        bad.setdefault(k, []).append(_bad_record(views[u.split], u.start + first + j, message))
                        if cfg.on_bad_image == "error":
                            row = u.start + first + j
                            raise InputError(
                                f"{views[u.split].image_path[row]}: cannot read image ({message}); "
                                "set extract.on_bad_image=skip to leave such images out"
                            )
                out = teacher.encode_image_batch(pixels.to(device, non_blocking=True))

                def place(rows: np.ndarray, k: int = k, first: int = first) -> None:
                    unit = units[k]
                    if k not in buffers:
                        buffers[k], filled[k] = np.empty((unit.rows, teacher.dim), np.float32), 0
                    buffers[k][first : first + len(rows)] = rows
                    filled[k] += len(rows)
                    bar.advance(len(rows))
                    if filled[k] == unit.rows:
                        committer.put(unit, buffers.pop(k), {"bad": bad.pop(k, []), "images": unit.content})

                lag.push(out, place)
            lag.flush()
        finally:
            committer.close()


def _bad_record(view: SplitView, row: int, message: str) -> dict[str, Any]:
    return {"row": int(row), "reason": message.replace(str(view.image_path[row]), "<file>")}


def _extract_texts(
    units: list[_Unit],
    views: dict[str, SplitView],
    teacher: Teacher,
    cfg: ExtractConfig,
    writer: StoreWriter,
    work: Path,
    workers: int,
    device: torch.device,
    show: bool,
    tag: str,
) -> None:
    def column(u: _Unit) -> np.ndarray:
        return views[u.split].unpaired_text if u.array == UNPAIRED_TEXT else views[u.split].caption_text

    texts = [column(u)[u.start : u.stop].tolist() for u in units]
    loader = _loader(
        _CaptionUnits(texts, teacher, cfg.text_batch_size),
        workers,
        device.type == "cuda",
        cfg.prefetch_factor,
        batch_size=None,
    )
    total = sum(u.rows for u in units)
    with _bar(show, f"captions{tag}", total, "captions") as bar:
        unit_iter = iter(loader)
        committer = _Committer(writer, work)
        lag = _Lag()
        try:
            for u, batches in zip(units, unit_iter):
                buf = np.empty((u.rows, teacher.dim), np.float32)
                for pos, tokens in batches:
                    tokens = {key: t.to(device, non_blocking=True) for key, t in tokens.items()}
                    out = teacher.encode_text_batch(tokens)

                    def place(rows: np.ndarray, pos: torch.Tensor = pos, buf: np.ndarray = buf) -> None:
                        buf[pos.numpy()] = rows
                        bar.advance(len(rows))

                    lag.push(out, place)
                lag.flush()
                committer.put(u, buf, {})
        finally:
            committer.close()


# ---------------------------------------------------------------------------------------------------------
# Finalization (rank 0)
# ---------------------------------------------------------------------------------------------------------
def _finalize(
    out: Path, index: DatasetIndex, views: dict[str, SplitView], units: list[_Unit], cfg: ExtractConfig
) -> None:
    work = out / WORK_DIR
    bad: dict[str, dict[int, str]] = {s: {} for s in views}
    digests: dict[tuple[str, str], dict[int, str]] = {}
    for u in units:
        marker = work / "done" / u.marker
        try:
            record = json.loads(marker.read_text())
        except (OSError, ValueError):
            raise RuntimeError(f"{out}: chunk {u.marker} was not committed by its rank") from None
        digests.setdefault((u.split, u.array), {})[u.index] = record.get("sha256")
        for entry in record.get("bad", []):
            bad[u.split][int(entry["row"])] = str(entry["reason"])
            if cfg.on_bad_image == "error":  # recorded by an earlier run with on_bad_image=skip
                row = int(entry["row"])
                raise InputError(
                    f"{views[u.split].image_path[row]}: cannot read image ({entry['reason']}); "
                    "set extract.on_bad_image=skip to leave such images out"
                )
    writer = StoreWriter(out)
    # a compacted split gets the checksums of its new chunks from the compaction; a marker written before
    # checksums existed (a run resumed across the upgrade) has none: its chunk is hashed now
    writer.record_checksums(
        {
            (s, a): {i: d or sha256_file(writer.chunk_path(s, a, i)) for i, d in found.items()}
            for (s, a), found in digests.items()
            if not bad[s]
        }
    )
    skipped = []
    for s, rows in bad.items():
        if not rows:
            continue
        _compact_split(out, s, views[s], sorted(rows), cfg.chunk_rows)
        for r in sorted(rows):
            skipped.append(
                {
                    "split": s,
                    "index_row": r,
                    "image_id": str(views[s].image_id[r]),
                    "path": str(index.image_path[views[s].image_rows[r]]),
                    "reason": rows[r],
                }
            )
    remove_partial_files(out)
    # which image files the store embedded (readers compare it with the index), per chunk (a rerun redoes the
    # chunks whose files changed); both absent when the index has no hashes
    content = {"image_content": index.content_digest(splits=list(views)), "image_chunks": _image_chunks(units)}
    if content["image_content"] is None:
        content = {}
    StoreWriter(out).set_attrs(skipped_images=skipped, **content, complete=True)
    shutil.rmtree(work)
    fsync_dir(out)


def _finish_swaps(out: Path) -> None:
    """A finalization killed between the two renames of `_compact_split` left a split only under
    .extract/compact/: put it in place before anything reads the store."""
    work = out / WORK_DIR
    if not (work / "trash").is_dir():
        return
    for old in (work / "trash").iterdir():
        new = work / "compact" / old.name
        if not (out / old.name).exists() and new.is_dir():
            os.replace(new, out / old.name)
            fsync_dir(out)


def _compact_split(out: Path, split: str, view: SplitView, bad_rows: list[int], chunk_rows: int) -> None:
    """Rewrite `split` without the bad images and their captions (unpaired texts are kept as they are).
    Crash-safe: the new split is built
    under .extract/compact/ and swapped in by two renames; each step is redone or skipped on a rerun."""
    work = out / WORK_DIR
    compact, trash = work / "compact", work / "trash"
    built = work / f"compact-{split}.built"
    if (trash / split).exists():  # the old split is already moved away: finish the swap
        if (compact / split).exists():
            os.replace(compact / split, out / split)
        return
    if not built.is_file():
        keep = np.ones(view.n_images, dtype=bool)
        keep[bad_rows] = False
        new_row = np.cumsum(keep) - 1
        cap_keep = keep[view.text_image]
        old = StoreWriter(out)
        new = StoreWriter.create(
            compact,
            layout={split: (int(keep.sum()), int(cap_keep.sum()), len(view.unpaired_text))},
            dim=old.dim,
            dtype=str(old.dtype),
            chunk_rows=chunk_rows,
        )
        masks = (("image_emb", keep), ("text_emb", cap_keep), (UNPAIRED_TEXT, np.ones(len(view.unpaired_text), bool)))
        for array, mask in masks:
            if not mask.any():
                continue  # an empty or absent array: nothing to copy
            rows = old.read_rows(split, array)
            kept = np.flatnonzero(mask)
            for i in range(new.n_chunks(split, array)):
                a, b = new.chunk_range(split, array, i)
                new.write_chunk(split, array, i, rows[kept[a:b]], normalize=False)
        new.record_checksums()
        new.write_text_image(split, new_row[view.text_image[cap_keep]])
        new.write_image_id(split, view.image_id[keep].tolist())
        fsync_tree(compact / split)
        write_file_durably(built, b"")
    trash.mkdir(parents=True, exist_ok=True)
    os.replace(out / split, trash / split)
    fsync_dir(out)
    os.replace(compact / split, out / split)
    fsync_dir(out)


__all__ = ["ExtractConfig", "ExtractResult", "run_extract", "resolve_compute_dtype", "load_rgb"]
