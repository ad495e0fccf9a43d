"""What `kdpipe mine` costs: exact top-K of every caption and every image over a Flickr30K-sized bank.

    python bench/mine_bench.py                             # 31,783 images x 158,915 captions, D = 1024, K = 32
    python bench/mine_bench.py --scale 0.25 --coarse float32 --coarse bfloat16

Random unit rows stored as float16 (`--data random`), or rows with a teacher's structure (`--data clustered`:
images around 1,000 topics, each caption near its image), both 5 captions per image. Runs `SplitMiner` (the
stage's compute: coarse GEMM blocks, the window, exact float64 rescoring, the images' pool) over every caption
and image unit and prints, per coarse dtype, in one run (so the ratios hold under whatever else the machine
does; quote the load average with them):
- the whole mine and its two passes (captions: GEMM + caption windows + pool; images: windows + rescoring);
- the floor: the coarse GEMM alone over the same blocks;
- candidates rescored per query (k + the window's extra), and how many queries needed a rescan;
- what COCO (123,287 x 616,767) would take, scaled by M x N from this run.
Figures only; never fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.mine.neighbours import SplitMiner, full_precision_matmul  # noqa: E402
from pipeline.mine.topk import COARSE_DTYPES  # noqa: E402

FLICKR = (31_783, 158_915)
COCO = (123_287, 616_767)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def make_bank(n_images: int, per_image: int, dim: int, data: str, seed: int = 0):
    """(image rows [N, D], caption rows [N * per_image, D], text_image) as float16 unit rows."""
    rng = np.random.default_rng(seed)
    text_image = np.repeat(np.arange(n_images, dtype=np.int32), per_image)
    images = np.empty((n_images, dim), np.float16)
    captions = np.empty((len(text_image), dim), np.float16)
    topics = rng.standard_normal((1000, dim), dtype=np.float32) if data == "clustered" else None
    step = 4096
    for a in range(0, n_images, step):
        b = min(n_images, a + step)
        x = rng.standard_normal((b - a, dim), dtype=np.float32)
        if topics is not None:
            x = x * 0.6 + topics[rng.integers(0, len(topics), b - a)]
        images[a:b] = _unit(x)
        c = np.repeat(images[a:b].astype(np.float32), per_image, axis=0)
        noise = rng.standard_normal(c.shape, dtype=np.float32) / np.sqrt(dim)
        captions[a * per_image : b * per_image] = _unit(c + (1.2 if topics is not None else 3.0) * noise)
    return images, captions, text_image


def run(images, captions, text_image, k: int, coarse: str, chunk: int) -> dict:
    miner = SplitMiner(
        images,
        captions,
        text_image,
        k,
        device=torch.device("cpu"),
        coarse_dtype=COARSE_DTYPES[coarse],
        block_rows=max(64, min(16384, 2**26 // len(images))),
    )
    t0 = time.perf_counter()
    for a in range(0, len(captions), chunk):
        miner.caption_unit(a, min(len(captions), a + chunk))
    t1 = time.perf_counter()
    for a in range(0, len(images), chunk):
        miner.image_unit(a, min(len(images), a + chunk))
    t2 = time.perf_counter()
    return {"captions_s": t1 - t0, "images_s": t2 - t1, "total_s": t2 - t0, **miner.stats}


def gemm_floor(images, captions, coarse: str, block: int) -> float:
    """Seconds of the coarse GEMM alone over every caption block (conversion included, nothing else)."""
    dtype = COARSE_DTYPES[coarse]
    bank = torch.from_numpy(images).to(dtype)
    t = time.perf_counter()
    with full_precision_matmul():
        for a in range(0, len(captions), block):
            q = torch.from_numpy(captions[a : a + block]).to(dtype)
            (q @ bank.T).float()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of Flickr30K's images (captions follow)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--coarse", action="append", choices=sorted(COARSE_DTYPES), default=None)
    ap.add_argument("--data", choices=["random", "clustered"], default="random")
    ap.add_argument("--chunk", type=int, default=16384, help="rows per unit (mine.chunk_rows)")
    args = ap.parse_args()
    n_images = int(FLICKR[0] * args.scale)
    images, captions, text_image = make_bank(n_images, 5, args.dim, args.data)
    m, n = len(captions), len(images)
    print(
        f"mine bench: {n:,} images x {m:,} captions, D = {args.dim}, K = {args.k}, {args.data} float16 rows; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()}"
    )
    block = max(64, min(16384, 2**26 // n))
    coco = (COCO[0] * COCO[1]) / (n * m)
    for coarse in args.coarse or ["float32", "bfloat16"]:
        floor = gemm_floor(images, captions, coarse, block)
        r = run(images, captions, text_image, args.k, coarse, args.chunk)
        flops = 2 * m * n * args.dim
        print(
            f"  coarse {coarse:8s}: {r['total_s']:6.1f} s (captions {r['captions_s']:.1f} s, images {r['images_s']:.1f} s); "
            f"GEMM alone {floor:.1f} s = {flops / floor / 1e9:.0f} GFLOP/s; rescored per query: "
            f"{r['candidates'] / r['queries']:.2f} (k = {args.k}), rescans {r['rescans']}; "
            f"COCO (x{coco:.1f}): ~{r['total_s'] * coco / 60:.1f} min"
        )
    print(f"  load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
