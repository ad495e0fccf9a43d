"""prepare throughput: images/s (and per core) of `run_prepare` on Flickr-sized JPEGs, next to a naive
single-process PIL loop in the same run, for 1 and 2 (or more) workers.

    python bench/prepare_bench.py                      # 600 images, workers 1 and 2
    python bench/prepare_bench.py --n-images 2000 --workers 1 2 4

The JPEGs come from `bench/make_flickr_like.py` (tiles of randomly cropped, flipped, colour-shifted real
photos from scikit-image / scikit-learn / matplotlib, mostly 500x375, quality 92-98), generated once
under bench/data/. Every file is read once before timing so that the disk is out of the comparison.
`workers: 1` runs in-process; more workers run on a dask LocalCluster, whose start-up is reported
separately (end-to-end vs decode-only rate). Prints figures; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))


def naive_loop(paths: list[str], resize: int = 256, crop: int = 224) -> tuple[float, float]:
    """(images/s, images per CPU-second) of the obvious loop: full decode, shorter side to `resize`
    (bilinear), center crop, one process."""
    out = np.empty((crop, crop, 3), dtype=np.uint8)
    start, cpu = time.perf_counter(), time.thread_time()
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            w, h = im.size
            size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
            im = im.resize(size, Image.BILINEAR)
            left, top = round((size[0] - crop) / 2), round((size[1] - crop) / 2)
            out[...] = np.asarray(im.crop((left, top, left + crop, top + crop)))
    return len(paths) / (time.perf_counter() - start), len(paths) / (time.thread_time() - cpu)


def measure(data_dir: Path, workers: list[int], chunk_images: int = 64, repeat: int = 3) -> dict:
    """Figures for one dataset directory (Karpathy json + images/), each the best of `repeat` runs; the
    configurations take turns (naive, 1 worker, 2 workers, naive, ...) so that a shared machine's changing
    load hits them alike."""
    from pipeline.data.prepare import PrepareConfig, run_prepare
    from pipeline.data.readers import DatasetConfig
    from pipeline.paths import ArtifactPaths

    paths = sorted(str(p) for p in (data_dir / "images").glob("*.jpg"))
    for p in paths:  # warm the page cache: decode speed, not disk speed
        Path(p).read_bytes()
    dataset = DatasetConfig(
        name="bench", annotations=data_dir / "dataset_flickr30k.json", image_root=data_dir / "images", restval="train"
    )
    load_before = os.getloadavg()[0]
    naive, runs = [], {n: [] for n in workers}
    for _ in range(repeat):
        naive.append(naive_loop(paths))
        for n in workers:
            work = Path(tempfile.mkdtemp(prefix=f"prepare_bench_w{n}_"))
            try:
                cfg = PrepareConfig(dataset=dataset, workers=n, chunk_images=chunk_images, cluster_min_images=0)
                runs[n].append(run_prepare(cfg, ArtifactPaths(work), force=True))
            finally:
                shutil.rmtree(work, ignore_errors=True)
    results = {
        "n_images": len(paths),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "naive_1_process": max(r for r, _ in naive),
        "naive_per_cpu_second": max(c for _, c in naive),
        "prepare": {},
    }
    for n, rs in runs.items():
        rate = max(s["images_per_second"] for s in rs)
        results["prepare"][n] = {
            "decode_images_per_s": rate,
            "per_core": rate / n,
            "per_cpu_second": max(s["images_per_cpu_second"] for s in rs),
            "end_to_end_images_per_s": len(paths) / min(s["seconds"] for s in rs),
            "seconds": min(s["seconds"] for s in rs),
        }
    return results


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-images", type=int, default=600)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--chunk-images", type=int, default=64, help="images per task (per cache chunk)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (the best is kept)")
    ap.add_argument("--data", type=Path, default=None, help="default bench/data/flickr_like_n<N>/")
    args = ap.parse_args(argv)

    from make_flickr_like import generate

    data_dir = args.data or BENCH / "data" / f"flickr_like_n{args.n_images}"
    if not (data_dir / "dataset_flickr30k.json").is_file():
        generate(data_dir, n_images=args.n_images)
    summary = json.loads((data_dir / "summary.json").read_text())
    res = measure(data_dir, args.workers, args.chunk_images, args.repeat)

    naive, naive_cpu = res["naive_1_process"], res["naive_per_cpu_second"]
    print(
        f"\nprepare benchmark: {res['n_images']:,} Flickr-sized JPEGs (mean {summary['jpeg_mean_kb']} KB), "
        f"shorter side 256 -> center 224, bilinear; {os.cpu_count()} cores, load average "
        f"{res['load_before']:.1f} before, {res['load_after']:.1f} after; best of {args.repeat} runs each"
    )
    header = ("images/s", "per worker", "vs 1 worker", "img/CPU-s", "end to end")
    print(f"  {'':28s} {header[0]:>9s} {header[1]:>10s} {header[2]:>11s} {header[3]:>10s} {header[4]:>11s}")
    print(f"  {'naive PIL loop, 1 process':28s} {naive:9.1f} {naive:10.1f} {'':>11s} {naive_cpu:10.1f}")
    one = None
    for n, r in res["prepare"].items():
        one = one or r["decode_images_per_s"] / n
        print(
            f"  {f'run_prepare, {n} worker(s)':28s} {r['decode_images_per_s']:9.1f} {r['per_core']:10.1f} "
            f"{r['decode_images_per_s'] / one:10.2f}x {r['per_cpu_second']:10.1f} "
            f"{r['end_to_end_images_per_s']:7.1f} ({r['seconds']:.1f} s, with start-up)"
        )
    print(
        "  images/s: wall clock of the decode phase (cluster start-up excluded); img/CPU-s: images per second of "
        "CPU time in the decoding threads, i.e. per fully used core, which a busy machine does not distort"
    )
    return res


if __name__ == "__main__":
    main()
