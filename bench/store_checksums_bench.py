"""What the feature store's checksums cost: hashing speed per algorithm, the extra time of a chunk commit, and
`kdpipe verify` throughput.

    python bench/store_checksums_bench.py                 # 16,384 x 768 fp16 chunks (24 MiB, BEiT-3 large), 8 of them
    python bench/store_checksums_bench.py --chunks 32 --dim 1024 --dir /fast/disk

Prints, all in one run (so the ratios hold under whatever else the machine is doing; quote `uptime` with them):
- MB/s of sha256, blake2b, md5, sha1 and zlib.crc32 over one chunk's bytes (the choice of algorithm);
- StoreWriter.write_chunk per chunk with the checksum (file read back from the page cache, hashed) and with
  the hashing patched out, fsync off in both: the difference is what a commit pays for its checksum;
- verify_store over the store (read, hash, NaN/inf check per chunk), warm page cache, in MB/s.
Figures only; never fails.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("KDPIPE_FSYNC", "0")  # the checksum's cost, not the disk's

from pipeline.store import features  # noqa: E402
from pipeline.store.verify import verify_store  # noqa: E402


def _best(fn, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _write(path: Path, rows: np.ndarray, n_chunks: int, chunk: int) -> float:
    """Seconds per chunk of StoreWriter.write_chunk (normalize=False: the store dtype's rows copied as they are)."""
    w = features.StoreWriter.create(
        path, layout={"train": (n_chunks * chunk, 1)}, dim=rows.shape[1], chunk_rows=chunk, attrs={}
    )
    t = time.perf_counter()
    for i in range(n_chunks):
        w.write_chunk("train", "image_emb", i, rows, normalize=False)
    seconds = (time.perf_counter() - t) / n_chunks
    w.write_chunk("train", "text_emb", 0, rows[:1], normalize=False)  # the rest of a complete store
    w.write_text_image("train", np.zeros(1, np.int32))
    w.write_image_id("train", [str(i) for i in range(n_chunks * chunk)])
    w.set_attrs(complete=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    rows = features.l2_normalize_rows(np.random.default_rng(0).standard_normal((args.rows, args.dim)))
    rows = rows.astype(np.float16)
    data = rows.tobytes()
    mb = len(data) / 1e6
    print(f"one chunk: {args.rows:,} x {args.dim} fp16 = {mb:.1f} MB; load average {os.getloadavg()}")
    for name, fn in (
        ("sha256", lambda: hashlib.sha256(data).digest()),
        ("blake2b", lambda: hashlib.blake2b(data).digest()),
        ("md5", lambda: hashlib.md5(data).digest()),
        ("sha1", lambda: hashlib.sha1(data).digest()),
        ("crc32", lambda: zlib.crc32(data)),
    ):
        s = _best(fn)
        print(f"  {name:8s} {mb / s:7,.0f} MB/s  {s * 1e3:6.1f} ms per chunk")

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        with_sum = _write(Path(tmp) / "a.zarr", rows, args.chunks, args.rows)
        real = features.sha256_file
        features.sha256_file = lambda path: "0" * 64  # the same commit without hashing
        try:
            without = _write(Path(tmp) / "b.zarr", rows, args.chunks, args.rows)
        finally:
            features.sha256_file = real
        print(
            f"write_chunk: {with_sum * 1e3:.1f} ms with the checksum, {without * 1e3:.1f} ms without "
            f"(+{(with_sum - without) * 1e3:.1f} ms per chunk = {(with_sum - without) * 1000 / mb:.2f} s per GB)"
        )
        report = verify_store(Path(tmp) / "a.zarr")  # page cache warm: just written
        report = verify_store(Path(tmp) / "a.zarr")
        print(
            f"verify_store: {report.nbytes / 1e6:,.0f} MB, {report.chunks} chunks in {report.seconds:.2f} s = "
            f"{report.nbytes / 1e6 / report.seconds:,.0f} MB/s (warm page cache; sha256 + NaN/inf check); "
            f"load average {os.getloadavg()}"
        )


if __name__ == "__main__":
    main()
