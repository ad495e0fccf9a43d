"""The prepare stage: read the dataset, decode every image once (in parallel with dask), write the index
and the student-resolution image cache `images.zarr`.

Work is split into blocks of `chunk_images` consecutive images of one split (one inner chunk of the cache);
a task decodes its block into one uint8 buffer and writes it straight into the split's data file at its
row offset (`image_cache.write_rows`), so nothing but a short list of failures travels back to the
client; tasks run in-process or on dask (pipeline/data/decode_tasks.py). Images are read through
pipeline/data/image_source.py: files, webdataset shard members and parquet cells alike. `prepare.cache`
chooses raw pixels (the default) or an encoded cache (pipeline/store/encoded_cache.py: WebP lossless or JPEG).

Each image is decoded by `pipeline/data/pixels.py`, the one function that makes the student's pixels
(search queries and folder galleries use it too); its geometry is the method's preprocessing (torchvision
`Resize(256)` + `CenterCrop(224)`) or `mode: squash`. With `draft: true`, a JPEG at least twice the resize
target in both sides is decoded at a DCT scale by libjpeg. On real photos (1000-1900 px JPEGs, scales 1/2
and 1/4) this differs from a full decode by a mean absolute error of 0.3-1.4 grey levels (of 255), PSNR
40-53 dB, at most ~25 on single pixels at sharp edges; the tolerance held by the tests is mean < 2 and
PSNR > 35 dB (tests/test_prepare.py). Smaller images (Flickr30K's 500x375, COCO's 640x480 at the default
256) are decoded in full and equal the naive reference pixel for pixel. EXIF orientation is not applied
unless `prepare.dataset.exif_orientation: apply` (as in the method and torchvision's loaders).

Bad images (missing, empty, truncated, not an image) are detected by a full `load()` with PIL's
LOAD_TRUNCATED_IMAGES off. `on_bad_image: error` fails with one line naming the first bad file and how
many others failed; `skip` leaves them out of both the cache and the index and lists them, with their
captions, in `<index>/bad_images.json`.

Idempotent: a rerun whose dataset index fingerprint, image files and image recipe match the finished
outputs does nothing and says so; one where only some image files changed (their sha256, recorded in the
index: pipeline/data/file_hashes.py, pipeline/data/index.py) decodes only those and says how many. Atomic:
the cache is built (or, for an update, copied) in a temp directory next to `images.zarr` and renamed into
place after `complete` is set; the index is written before that rename, and a rerun only trusts a cache and
an index whose fingerprints and content digests agree.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from pipeline.data.decode_tasks import Task, absolute, block_tasks, failures, run_tasks
from pipeline.data.file_hashes import content_hashes
from pipeline.data.image_file import BadImage
from pipeline.data.image_source import ImageFiles, ImageRef
from pipeline.data.index import BAD_IMAGES_FILE, INDEX_DIR, DatasetIndex, read_fingerprint
from pipeline.data.pixels import ResizeConfig, read_pixels
from pipeline.data.readers import DatasetConfig, read_dataset
from pipeline.errors import InputError
from pipeline.paths import ArtifactPaths
from pipeline.runtime import available_cpus
from pipeline.store.durable import remove_stale_dirs, write_text_durably
from pipeline.store.encoded_cache import CacheFormat, write_block
from pipeline.store.image_cache import (
    DEFAULT_CHUNK_IMAGES,
    IMAGE_CACHE,
    CacheBuilder,
    CacheUpdate,
    ImageCache,
    consecutive_runs,
    open_image_cache,
    write_rows,
)
from pipeline.store.ownership import claim

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareConfig:
    """Section `prepare`."""

    dataset: DatasetConfig
    image: ResizeConfig = field(default_factory=ResizeConfig)
    cache: CacheFormat = field(default_factory=CacheFormat)  # raw pixels (default) or encoded (encoded_cache.py)
    on_bad_image: Literal["error", "skip"] = "error"
    workers: int | None = None  # decode processes; None = every core this process may use
    # address of a running dask.distributed scheduler (its workers must see the same files and have kdpipe
    # installed; `workers` is then ignored); None = a LocalCluster of `workers` processes, started and closed here
    scheduler: str | None = None
    chunk_images: int = DEFAULT_CHUNK_IMAGES  # images per cache chunk = per decode task
    cluster_min_images: int = 2000  # fewer images than this decode in-process (no LocalCluster start-up)

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1 or null (all cores), got {self.workers}")
        if self.chunk_images < 1:
            raise ValueError(f"chunk_images must be >= 1, got {self.chunk_images}")
        if self.cluster_min_images < 0:
            raise ValueError(f"cluster_min_images must be >= 0, got {self.cluster_min_images}")


# -- decoding one block ------------------------------------------------------------------------------
def decode_block(
    images: list[ImageRef],
    rc: ResizeConfig,
    data_file: str,
    start_row: int,
    exif: str = "ignore",
    encoding: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Decode consecutive images (files, shard members, parquet cells: pipeline/data/image_source.py) and
    write them at `start_row` of a split's data file (one inner chunk).

    Returns {"failures": [(position in `images`, reason), ...], "exif_tagged": images with an EXIF
    orientation other than 1, "cpu_seconds": CPU time of this call's thread}; a failed image's row stays zero
    and is removed by the caller under `skip`. Runs in dask workers and in-process alike. With `encoding` (an
    encoded cache) `data_file` is the split's block directory, and the rows are encoded into a block there."""
    cpu_start = time.thread_time()
    h, w = rc.image_size
    block = np.zeros((len(images), h, w, 3), dtype=np.uint8)
    failures: list[tuple[int, str]] = []
    tagged = 0  # images whose EXIF orientation asks for a rotation or mirror
    with ImageFiles() as files:  # a block's members come from one shard (or a few): each is opened once
        for i, ref in enumerate(images):
            try:
                block[i], tag = read_pixels(ref, rc, exif, files)
                tagged += tag != 1
            except BadImage as err:  # pipeline/data/image_file.py: the reason alone, for the report
                failures.append((i, err.reason))
    if encoding is None:
        write_rows(data_file, start_row, block)
    else:
        write_block(data_file, start_row, block, encoding)
    return {"failures": failures, "exif_tagged": tagged, "cpu_seconds": time.thread_time() - cpu_start}


# -- the stage ---------------------------------------------------------------------------------------
def run_prepare(
    cfg: PrepareConfig, paths: ArtifactPaths, *, force: bool = False, verify: bool = False
) -> dict[str, Any]:
    """Build `paths.index_dir` and `paths.images` from the dataset; returns a summary (also printed).

    Only what changed is redone: outputs made with this recipe from the same index rows and the same image
    bytes are kept (status "unchanged"); when some image files changed, only they are decoded again into a
    copy of the cache ("updated"); anything else is built whole ("written"), and so is everything with
    `force`. `verify`: hash every image file instead of trusting unchanged sizes and mtimes."""
    start = time.perf_counter()
    # before the work: nothing of the user's under these names is replaced (paths.file_stats lies in kdpipe's own
    # hidden <workdir>/.kdpipe/)
    claim(paths.index_dir, INDEX_DIR)
    claim(paths.images, IMAGE_CACHE)
    index = _read_with_hashes(cfg, paths, verify)
    summary = None if force else _reuse(cfg, paths, index)
    if summary is None:
        summary = _build(cfg, paths, index)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary


def _read_with_hashes(cfg: PrepareConfig, paths: ArtifactPaths, verify: bool) -> DatasetIndex:
    """The dataset's index with each image file's content hash (pipeline/data/file_hashes.py)."""
    index = read_dataset(cfg.dataset)
    log.info(_describe(index))
    refs = [absolute(index.image_ref(r)) for r in range(index.n_images)]
    hashes, n_read = content_hashes(refs, paths.file_stats, verify=verify, threads=min(4, available_cpus()))
    if n_read:
        why = "--verify" if verify else "new files, or their size or mtime changed"
        log.info(f"prepare: hashed {n_read:,} of {len(refs):,} image(s) ({why})")
    return index.with_hashes(hashes)


# -- reusing the outputs of an earlier run -------------------------------------------------------------
def _reuse(cfg: PrepareConfig, paths: ArtifactPaths, index: DatasetIndex) -> dict[str, Any] | None:
    """Keep the existing outputs, or update the rows of changed images in them; None: build everything."""
    found = _previous(cfg, paths, index)
    if found is None:
        return None
    cache, saved, report = found
    if saved.image_sha256 is None:
        log.info(
            "prepare: the existing index records no image content hashes (written by an older kdpipe): "
            "decoding every image once to record them"
        )
        return None
    changed = _changed_rows(index, saved, report)
    if not changed:
        return _keep(paths, index, saved, report)
    if cache.encoding is not None:  # encoded rows change length: the split's bytes are laid out again
        log.info(f"prepare: {len(changed):,} image file(s) changed; an encoded cache is rebuilt whole")
        return None
    if cache.attrs.get("n_bad"):  # rows were dropped: the cache's rows are not the index's, rebuild it
        log.info(f"prepare: {len(changed):,} image file(s) changed; the cache leaves bad images out: rebuilding it")
        return None
    return _update(cfg, paths, index, changed)


def _previous(
    cfg: PrepareConfig, paths: ArtifactPaths, index: DatasetIndex
) -> tuple[ImageCache, DatasetIndex, list[dict]] | None:
    """(cache, saved index, bad-image report) if the outputs were made with this config from these index
    rows (the image bytes aside) and agree with each other, else None."""
    try:
        cache = open_image_cache(paths.images)
        recorded = read_fingerprint(paths.index_dir)
        report = json.loads((paths.index_dir / BAD_IMAGES_FILE).read_text())
    except (InputError, OSError, ValueError):
        return None
    a = cache.attrs
    same = (
        a.get("source_fingerprint") == index.fingerprint
        and a.get("fingerprint") == recorded
        and a.get("resize") == cfg.image.describe()
        and a.get("exif_orientation", "ignore") == index.exif_orientation
        and a.get("chunk_images") == cfg.chunk_images
        and a.get("encoding") == cfg.cache.describe()
        and (a.get("n_bad") == 0 or a.get("on_bad_image") == cfg.on_bad_image)
    )
    if not same:
        return None
    saved = DatasetIndex.load(paths.index_dir)
    if a.get("content") != saved.content_digest():  # an update killed between the index and the cache
        return None
    return cache, saved, report


def _changed_rows(index: DatasetIndex, saved: DatasetIndex, report: list[dict]) -> list[int]:
    """Rows of `index` whose file content differs from what the outputs were made from (bad images included:
    one that was fixed, or broke differently, counts as changed)."""
    before = dict(zip(saved.image_id.tolist(), saved.image_sha256.tolist()))
    before.update((entry["image_id"], entry.get("sha256")) for entry in report)
    now = zip(index.image_id.tolist(), index.image_sha256.tolist())
    return [r for r, (image_id, digest) in enumerate(now) if before.get(image_id, "?") != digest]


def _keep(paths: ArtifactPaths, index: DatasetIndex, saved: DatasetIndex, report: list[dict]) -> dict[str, Any]:
    moved = _relocated(saved, index)
    if moved is not saved:  # same content, new location for later stages (the dataset moved, a shard was rewritten)
        moved.save(paths.index_dir)
    log.info(
        f"prepare: nothing to do: {paths.images} and {paths.index_dir} are up to date "
        f"(index {saved.fingerprint[:12]}, same image files, same image recipe)"
    )
    return {
        "status": "unchanged",
        "fingerprint": saved.fingerprint,
        "images": {s: int((saved.image_split == s).sum()) for s in saved.splits},
        "captions": saved.n_captions,
        "bad_images": len(report),
        "changed_images": 0,
        "decode_seconds": 0.0,
        "images_per_second": None,
        "images_per_cpu_second": None,
        "exif_tagged": None,
    }


def _relocated(saved: DatasetIndex, index: DatasetIndex) -> DatasetIndex:
    """`saved` (whose rows may lack bad images) with `index`'s image root and tar members' byte ranges, which the
    fingerprint leaves out; `saved` itself when neither changed."""
    out = saved
    if saved.image_root != index.image_root:
        out = replace(out, image_root=index.image_root)
    if saved.image_member is not None and index.image_member is not None:
        row_of = {image_id: r for r, image_id in enumerate(index.image_id.tolist())}
        now = index.image_member.take(np.array([row_of[i] for i in saved.image_id.tolist()], dtype=np.int64))
        old = saved.image_member
        if not (np.array_equal(now.offset, old.offset) and np.array_equal(now.length, old.length)):
            out = replace(out, image_member=now)
    return out


def _update(cfg: PrepareConfig, paths: ArtifactPaths, index: DatasetIndex, changed: list[int]) -> dict[str, Any] | None:
    """Decode the changed images into a copy of the cache and swap it in (image_cache.CacheUpdate); None if
    one of them no longer decodes under `skip` (rows must then be dropped: the caller rebuilds)."""
    log.info(f"prepare: {len(changed):,} of {index.n_images:,} image file(s) changed: decoding only those")
    remove_stale_dirs(paths.images)
    update = CacheUpdate(paths.images)
    try:
        views = {s: index.split(s) for s in index.splits}
        tasks = []
        for split, view in views.items():
            local = np.flatnonzero(np.isin(view.image_rows, changed))
            if len(local):
                tasks += block_tasks(view, consecutive_runs(local), cfg.chunk_images, str(update.data_file(split)))
        results, decode_s = run_tasks(tasks, cfg, len(changed), decode_block)
        bad = failures(results, views)
        if bad and cfg.on_bad_image == "error":
            raise InputError(_error_line(index, bad))
        if bad:
            update.abort()
            log.info(f"prepare: {len(bad):,} changed image(s) no longer decode: rebuilding the cache to leave them out")
            return None
        index.save(paths.index_dir)  # first: a crash before the swap below leaves index and cache disagreeing
        update.publish({"content": index.content_digest()})
    except BaseException:
        update.abort()
        raise
    log.info(f"prepare: updated {len(changed):,} image(s) in {paths.images}; the rest were kept")
    return {**_summary("updated", index, 0, results, decode_s), "changed_images": len(changed)}


# -- building everything -------------------------------------------------------------------------------
def _build(cfg: PrepareConfig, paths: ArtifactPaths, index: DatasetIndex) -> dict[str, Any]:
    remove_stale_dirs(paths.images)
    builder = CacheBuilder(paths.images, cfg.image.image_size, cfg.chunk_images, encoding=cfg.cache.describe())
    try:
        views = {s: index.split(s) for s in index.splits}
        tasks = []
        for split, view in views.items():
            data_file = str(builder.allocate(split, view.n_images).resolve())
            tasks += block_tasks(view, [(0, view.n_images)], cfg.chunk_images, data_file)
        results, decode_s = run_tasks(tasks, cfg, index.n_images, decode_block)
        bad = failures(results, views)
        if bad and cfg.on_bad_image == "error":
            raise InputError(_error_line(index, bad))
        report = _bad_report(index, bad)
        source_fingerprint = index.fingerprint
        if bad:
            bad_rows = np.array([r for r, _ in bad])
            for split, view in views.items():
                builder.compact(split, np.flatnonzero(np.isin(view.image_rows, bad_rows)))
            if len(bad) == index.n_images:
                raise InputError(f"every image failed to decode (first: {report[0]['file']}: {report[0]['reason']})")
            index = index.drop_images(bad_rows)
            for split in [s for s in views if s not in index.splits]:  # a whole split gone is worth a line
                log.warning(
                    f"prepare: split {split!r} is left out: all its {views[split].n_images:,} images failed to "
                    f"decode (prepare.on_bad_image: skip; listed in {paths.index_dir / BAD_IMAGES_FILE})"
                )
        paths.index_dir.mkdir(parents=True, exist_ok=True)
        (paths.index_dir / "index.json").unlink(missing_ok=True)  # the index is incomplete until save() ends
        _write_json(paths.index_dir / BAD_IMAGES_FILE, report)
        index.save(paths.index_dir)
        builder.publish(_cache_attrs(cfg, index, source_fingerprint, len(bad)))
    except BaseException:
        builder.abort()
        raise
    skipped = f", {len(bad)} bad image(s) skipped (listed in {paths.index_dir / BAD_IMAGES_FILE})" if bad else ""
    log.info(
        f"prepare: wrote {paths.images} ({index.n_images:,} images at {cfg.image.crop}x{cfg.image.crop}) "
        f"and {paths.index_dir}{skipped}"
    )
    return _summary("written", index, len(bad), results, decode_s)


def _bad_report(index: DatasetIndex, bad: list[tuple[int, str]]) -> list[dict[str, Any]]:
    """bad_images.json: each bad image with its captions, and its content hash (so that a fixed file is seen)."""
    captions_of: dict[int, list[str]] = {r: [] for r, _ in bad}
    for text, r in zip(index.caption_text.tolist(), index.caption_image.tolist()):
        if r in captions_of:
            captions_of[r].append(text)
    return [
        {
            "file": str(index.image_abspath(r)),
            **({"member": index.image_ref(r).key} if index.image_ref(r).container else {}),
            "image_id": str(index.image_id[r]),
            "split": str(index.image_split[r]),
            "reason": reason,
            "captions": captions_of[r],
            "sha256": index.image_sha256[r] if index.image_sha256 is not None else None,
        }
        for r, reason in bad
    ]


def _cache_attrs(cfg: PrepareConfig, index: DatasetIndex, source_fingerprint: str, n_bad: int) -> dict[str, Any]:
    return {
        "fingerprint": index.fingerprint,
        "source_fingerprint": source_fingerprint,
        # the index's digest of the image files' hashes: which bytes the rows were decoded from
        "content": index.content_digest(),
        "dataset": index.name,
        "resize": cfg.image.describe(),
        "exif_orientation": index.exif_orientation,
        "on_bad_image": cfg.on_bad_image,
        "n_bad": n_bad,
        "pillow": Image.__version__,
    }


def _summary(
    status: str, index: DatasetIndex, n_bad: int, results: list[tuple[Task, dict]], decode_s: float
) -> dict[str, Any]:
    """The summary of a run that decoded images (all of them, or the changed ones), with the EXIF line."""
    n = sum(len(task.images) for task, _ in results)
    cpu_s = sum(result["cpu_seconds"] for _, result in results)
    tagged = sum(result["exif_tagged"] for _, result in results)
    if tagged:
        how = (
            "turned upright (prepare.dataset.exif_orientation: apply)"
            if index.exif_orientation == "apply"
            else "used as stored, like the reference loaders; set prepare.dataset.exif_orientation: apply for "
            "phone photos"
        )
        log.info(f"prepare: {tagged:,} image(s) carry an EXIF orientation tag (rotated or mirrored): {how}")
    return {
        "status": status,
        "fingerprint": index.fingerprint,
        "images": {s: int((index.image_split == s).sum()) for s in index.splits},
        "captions": index.n_captions,
        "bad_images": n_bad,
        "decode_seconds": round(decode_s, 3),
        "images_per_second": round(n / decode_s, 1) if decode_s > 0 else None,
        # decode CPU time summed over the decoding threads: images per second per fully used core
        "images_per_cpu_second": round(n / cpu_s, 1) if cpu_s > 0 else None,
        "exif_tagged": tagged,
    }


def _describe(index: DatasetIndex) -> str:
    n_unpaired = index.n_images - len(np.unique(index.caption_image))
    unpaired = f" ({n_unpaired:,} without captions)" if n_unpaired else ""
    texts = f", {index.n_unpaired_texts:,} texts without images" if index.n_unpaired_texts else ""
    return (
        f"prepare: dataset {index.name}: {index.n_images:,} images{unpaired}, {index.n_captions:,} captions"
        f"{texts}, splits " + ", ".join(f"{s} {int((index.image_split == s).sum()):,}" for s in index.splits)
    )


def _error_line(index: DatasetIndex, bad: list[tuple[int, str]]) -> str:
    row, reason = bad[0]
    line = f"{index.describe_image(row)}: {reason}"
    if len(bad) > 1:
        others = ", ".join(_short_name(index, r) for r, _ in bad[1:4]) + (", ..." if len(bad) > 4 else "")
        line += f"; {len(bad) - 1} other image(s) failed too ({others})"
    return line + "; set prepare.on_bad_image: skip to leave bad images out (they are then listed in bad_images.json)"


def _short_name(index: DatasetIndex, row: int) -> str:
    """An image as the list of other failures names it: its path as the annotations give it, or its id (a member)."""
    return str(index.image_id[row] if index.image_member is not None else index.image_path[row])


def _write_json(path: Path, data: Any) -> None:
    write_text_durably(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
