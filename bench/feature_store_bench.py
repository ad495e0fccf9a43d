"""Feature-store read speed: random 256-row batches and sequential scans of a Flickr30K-sized store.

    python bench/feature_store_bench.py                       # 31,783 images + 158,915 captions x 1024 fp16
    python bench/feature_store_bench.py --images 5000 --dim 768 --dtype float32 --dir /fast/disk

Writes the store once (write_store; reused by later runs with the same shape under --dir), opens it with
`open_store` (validation + memory maps) and prints:
- the time to open it, its size on disk against rows x D x itemsize;
- the latency of gathering 256 random rows (`text_emb[idx]`: on a store of several chunk files a
  `ChunkedRows` gather, one fancy-indexing copy per chunk map) and of a distill-style batch (256 caption
  rows + the rows of their images), median and p99 over many batches, with the page cache warm, and cold
  (store unmapped, its files dropped from the page cache with posix_fadvise DONTNEED, reopened: every batch
  then reads from the disk);
- for comparison, the same gather from ONE contiguous memory map of the same rows (what the removed
  MAP_FIXED stitching of the chunk files gave), so the cost of gathering chunk by chunk is in view;
- the sequential scan rate (every row once, 16,384-row slices copied out) warm and cold, in GB/s,
  and zarr's own full read of the same array for comparison.
Target (shared/reference/performance.md): a random batch of 256 rows < 1 ms. Figures only; never fails.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.store.features import open_store  # noqa: E402
from pipeline.store.features_writer import write_store  # noqa: E402


def _make(path: Path, n_images: int, captions_per_image: int, dim: int, dtype: str) -> None:
    rng = np.random.default_rng(0)
    n_caps = n_images * captions_per_image
    print(f"writing {n_images:,} + {n_caps:,} rows x {dim} {dtype} to {path} ...", flush=True)
    t = time.perf_counter()
    write_store(
        path,
        {
            "train": {
                "image_emb": rng.standard_normal((n_images, dim), dtype=np.float32),
                "text_emb": rng.standard_normal((n_caps, dim), dtype=np.float32),
                "text_image": np.repeat(np.arange(n_images, dtype=np.int32), captions_per_image),
                "image_id": [f"{i:010d}.jpg" for i in range(n_images)],
            }
        },
        teacher={"name": "random"},
        dataset={"name": "flickr-like", "fingerprint": f"bench-{n_images}-{dim}"},
        dtype=dtype,
    )
    secs = time.perf_counter() - t
    print(f"  write_store: {secs:.1f} s ({(n_images + n_caps) / secs:,.0f} rows/s, incl. normalization + fsync)")


def _evict(path: Path) -> bool:
    """Drop the store's chunk files from the page cache (POSIX_FADV_DONTNEED); False where unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


def zarr_chunks(path: Path) -> int:
    import zarr

    return zarr.open_array(str(path / "train" / "text_emb"), mode="r").chunks[0]


def _latency(fn, trials: int, rng: np.random.Generator, n: int) -> tuple[float, float]:
    for _ in range(20):
        fn(rng.integers(0, n, 256))
    times = []
    for _ in range(trials):
        idx = rng.integers(0, n, 256)
        t = time.perf_counter()
        fn(idx)
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1e3
    return float(np.median(ms)), float(np.percentile(ms, 99))


def _scan(arrays) -> tuple[float, int]:
    buf = np.empty((16384, arrays[0].shape[1]), dtype=arrays[0].dtype)
    nbytes = 0
    t = time.perf_counter()
    for arr in arrays:
        for s in range(0, arr.shape[0], 16384):
            part = arr[s : s + 16384]
            np.copyto(buf[: len(part)], part)
            nbytes += part.nbytes
    return time.perf_counter() - t, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=31_783)
    ap.add_argument("--captions-per-image", type=int, default=5)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    ap.add_argument("--dir", type=Path, default=None, help="Where to keep the store (default: a temp dir).")
    ap.add_argument("--trials", type=int, default=2000)
    a = ap.parse_args()

    tmp = None
    if a.dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="kdpipe-fs-bench-")
        a.dir = Path(tmp.name)
    path = a.dir / f"bench-{a.images}x{a.captions_per_image}-{a.dim}-{a.dtype}.zarr"
    try:
        open_store(path)
    except Exception:  # noqa: BLE001 -- not there yet (or broken): write it
        _make(path, a.images, a.captions_per_image, a.dim, a.dtype)

    t = time.perf_counter()
    store = open_store(path)
    sp = store.split("train")
    open_ms = (time.perf_counter() - t) * 1e3
    item = np.dtype(a.dtype).itemsize
    rows = sp.n_images + sp.n_captions
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(
        f"store: {sp.n_images:,} image rows + {sp.n_captions:,} caption rows x {store.dim} {a.dtype}; "
        f"{disk / 2**20:,.1f} MiB on disk = {disk / (rows * store.dim * item):.4f} x rows*D*{item} bytes"
    )
    print(
        f"open_store + split: {open_ms:.2f} ms  (text_emb is a {type(sp.text_emb).__name__} "
        f"over {-(-sp.n_captions // int(zarr_chunks(path)))} chunk file(s))"
    )

    rng = np.random.default_rng(1)
    te, ie, ti = sp.text_emb, sp.image_emb, sp.text_image

    def rows256(idx):
        return te[idx]

    def pairs256(idx):
        return te[idx], ie[ti[idx]]

    # the same rows as one contiguous memory map (a copy in one file), for the comparison figure
    flat = np.lib.format.open_memmap(a.dir / "contiguous-text_emb.npy", mode="w+", dtype=te.dtype, shape=te.shape)
    flat[:] = np.asarray(te)
    flat.flush()
    flat = np.load(a.dir / "contiguous-text_emb.npy", mmap_mode="r")

    def rows256_contiguous(idx):
        return flat[idx]

    for label, fn in (
        ("random 256 caption rows", rows256),
        ("random 256 caption rows from one contiguous map (stitched-map equivalent)", rows256_contiguous),
        ("random 256 pairs (caption + its image row)", pairs256),
    ):
        med, p99 = _latency(fn, a.trials, rng, sp.n_captions)
        print(f"{label}, warm: median {med * 1e3:.1f} us, p99 {p99 * 1e3:.1f} us (target < 1000 us)")
    del flat
    (a.dir / "contiguous-text_emb.npy").unlink()
    secs, nbytes = _scan([ie, te])
    secs, nbytes = _scan([ie, te])  # warm
    print(f"sequential scan, warm: {nbytes / secs / 1e9:.2f} GB/s ({nbytes / 2**20:,.0f} MiB in {secs * 1e3:.0f} ms)")

    # cold: unmap everything (mapped pages cannot be dropped), drop the files from the page cache, reopen
    del store, sp, te, ie, ti
    gc.collect()
    if _evict(path):
        te = open_store(path).split("train").text_emb
        times = []
        for _ in range(200):
            idx = rng.integers(0, te.shape[0], 256)
            t = time.perf_counter()
            te[idx]
            times.append(time.perf_counter() - t)
        ms = np.array(times) * 1e3
        print(
            f"random 256 caption rows, cold (page cache dropped; first 200 batches, each a disk read): median "
            f"{np.median(ms) * 1e3:.0f} us, p99 {np.percentile(ms, 99) * 1e3:.0f} us"
        )
        del te
        gc.collect()
        _evict(path)
        sp = open_store(path).split("train")
        secs, nbytes = _scan([sp.image_emb, sp.text_emb])
        print(f"sequential scan, cold (from disk): {nbytes / secs / 1e9:.2f} GB/s")
        del sp
        gc.collect()
    else:
        print("cold figures skipped: posix_fadvise is not available here")

    import zarr

    t = time.perf_counter()
    full = zarr.open_array(str(path / "train" / "text_emb"), mode="r")[...]
    secs = time.perf_counter() - t
    print(f"zarr full read of train/text_emb (for comparison): {full.nbytes / secs / 1e9:.2f} GB/s")
    assert np.array_equal(full[:1000], open_store(path).split("train").text_emb[:1000])
    if tmp is not None:
        del full
        gc.collect()
        tmp.cleanup()


if __name__ == "__main__":
    main()
