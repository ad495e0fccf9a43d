"""The student image cache, raw vs encoded (prepare.cache.format): bytes per image and decode rate per core.

    python bench/image_cache_bench.py                 # 224 px rows of the package photos, 256-row gathers
    python bench/image_cache_bench.py --size 256 --rows 512

Rows are real photos (scikit-image, scikit-learn) resized and centre-cropped by prepare's own recipe, tiled
to `--rows` rows; each format's cache is written with write_image_cache and read back through the reader
distill uses (`open_image_cache(...).split(...)`), gathering random rows as distill's loader does
(np.take(rows, out=...)). Rates are images per CPU-second of the reading thread (time.thread_time), so a busy
machine slows them less than wall time; the load average is printed with them. Prints figures; not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.data.pixels import ResizeConfig, image_pixels  # noqa: E402
from pipeline.store.image_cache import open_image_cache, write_image_cache  # noqa: E402

FORMATS = [
    ("raw", None),
    ("webp", {"format": "webp"}),
    ("jpeg q95", {"format": "jpeg", "quality": 95}),
    ("jpeg q90", {"format": "jpeg", "quality": 90}),
]


def photos(size: int, n: int) -> np.ndarray:
    import skimage.data as data
    from sklearn.datasets import load_sample_images

    sources = [
        data.astronaut(),
        data.chelsea(),
        data.coffee(),
        data.rocket(),
        data.immunohistochemistry(),
        *load_sample_images().images,
    ]
    rc = ResizeConfig(resize=round(size * 256 / 224), crop=size)
    rows = [image_pixels(Image.fromarray(a), rc, 1) for a in sources]
    rng = np.random.default_rng(0)
    out = np.stack([rows[i % len(rows)] for i in range(n)])
    flips = rng.random(n) < 0.5  # not n copies of 9 images: flipped and shifted ones encode differently
    out[flips] = out[flips, :, ::-1]
    return np.stack([np.roll(img, int(s), axis=0) for img, s in zip(out, rng.integers(0, size, n))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    pixels = photos(args.size, args.rows)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {args.rows} rows of {args.size} px")
    print(
        f"  {'format':9s} {'bytes/image':>12s} {'of raw':>7s} {'read img/s/core':>16s} {'write ms/img':>13s} {'PSNR dB':>8s}"
    )
    rng = np.random.default_rng(1)
    raw_bytes = pixels[0].nbytes
    with tempfile.TemporaryDirectory() as tmp:
        for name, encoding in FORMATS:
            path = Path(tmp) / name.replace(" ", "-")
            start = time.thread_time()
            write_image_cache(path, {"train": pixels}, fingerprint="bench", encoding=encoding)
            write_ms = (time.thread_time() - start) / args.rows * 1000
            images = open_image_cache(path).split("train")
            per_image = getattr(images, "nbytes_encoded", raw_bytes * args.rows) / args.rows
            out = np.empty((args.batch, args.size, args.size, 3), np.uint8)
            best = float("inf")
            for _ in range(args.repeats):
                rows = rng.integers(0, args.rows, args.batch)
                start = time.thread_time()
                if encoding is None:
                    for i, r in enumerate(rows.tolist()):  # distill's loader: one memcpy per large row
                        out[i] = images[r]
                else:
                    np.take(images, rows, axis=0, out=out)
                best = min(best, time.thread_time() - start)
            mse = np.mean((np.asarray(images).astype(np.float64) - pixels) ** 2)
            psnr = "exact" if mse == 0 else f"{10 * np.log10(255**2 / mse):.1f}"
            print(
                f"  {name:9s} {per_image:12,.0f} {per_image / raw_bytes:7.1%} {args.batch / best:16,.0f} {write_ms:13.2f} {psnr:>8s}"
            )
    print(f"load average {os.getloadavg()[0]:.2f} after the run")


if __name__ == "__main__":
    main()
