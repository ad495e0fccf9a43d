"""A synthetic dataset with Flickr30K's shape, for benchmarks: JPEGs of realistic size and entropy, five
captions of realistic length per image, in Karpathy format (`dataset_flickr30k.json`).

    python bench/make_flickr_like.py --scale 0.1            # 3,178 images, ~0.4 GB, < 1 min on 2 cores
    python bench/make_flickr_like.py --scale 1              # 31,783 images (Flickr30K), ~4 GB
    python bench/make_flickr_like.py --scale 4              # 127,132 images (COCO-sized), ~16 GB

Shape at 1x (Flickr30K): 31,783 images, splits train 29,000 / val 1,014 / test 1,000 and the other 769
as `restval` (readers fold restval into train by default, as BEiT-3 counts 29,7xx training images);
every split scales with `--scale`. Images are mostly 500 x 375 (landscape), about a quarter portrait
(375 x 500) and a few other aspect ratios, like Flickr30K's (longest side 500). Content: tiles of random
crops of the real photos that ship in scikit-image, scikit-learn and matplotlib, flipped, color-shifted,
with a gradient and sensor-like noise, saved as baseline JPEG at quality 92-98 (4:2:0), so decoders see
the entropy of real photos (~100-150 KB per image; the summary line prints the measured mean). Captions
are English sentences from a word list, lognormal word counts (mean ~12.5 words, long tail past 60) like
Flickr30K's. Everything is deterministic for a seed (each image from its own `default_rng([seed, i])`)
and generated in parallel; a rerun over an existing directory only writes what is missing.

Layout: `<out>/dataset_flickr30k.json`, `<out>/images/<10-digit id>.jpg`, `<out>/summary.json`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FLICKR30K_IMAGES = 31_783
FLICKR30K_SPLITS = {"train": 29_000, "val": 1_014, "test": 1_000}  # the rest is "restval"
CAPTIONS_PER_IMAGE = 5
GENERATOR_VERSION = 1  # bump when the images or captions change, so that bench/run regenerates
DEFAULT_ROOT = Path(__file__).resolve().parent / "data"
NOISE_SIGMA = (6, 12)  # luma noise, grey levels
QUALITY = (92, 98)  # JPEG quality range


# -- sizes and splits ----------------------------------------------------------------------------------
def split_sizes(scale: float, n_images: int | None = None) -> dict[str, int]:
    """Images per split at `scale` (or for an explicit total `n_images`, used by tests)."""
    total = n_images if n_images is not None else round(FLICKR30K_IMAGES * scale)
    frac = {k: v / FLICKR30K_IMAGES for k, v in FLICKR30K_SPLITS.items()}
    val = max(1, round(total * frac["val"])) if total >= 3 else 0
    test = max(1, round(total * frac["test"])) if total >= 3 else 0
    train = min(total - val - test, round(total * frac["train"]))
    return {"train": train, "val": val, "test": test, "restval": total - train - val - test}


def split_of_each(sizes: dict[str, int], rng: np.random.Generator) -> list[str]:
    """The split of every image, interleaved (shuffled) like the real file rather than in blocks."""
    labels = np.concatenate([np.full(n, name, dtype=object) for name, n in sizes.items()])
    rng.shuffle(labels)
    return labels.tolist()


def image_shape(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) with Flickr30K's mix: longest side 500, mostly 4:3 landscape, ~25% portrait."""
    u = rng.random()
    if u < 0.62:
        return 375, 500
    if u < 0.72:
        return int(rng.choice([281, 333, 340, 400])), 500
    if u < 0.92:
        return 500, 375
    if u < 0.97:
        return 500, int(rng.choice([281, 333, 400]))
    return 500, 500


# -- real photos as raw material -----------------------------------------------------------------------
def load_photos() -> list[np.ndarray]:
    """RGB uint8 photos shipped inside installed packages (whatever of them is installed)."""
    photos: list[np.ndarray] = []
    try:
        import skimage.data as sk

        for name in (
            "astronaut",
            "chelsea",
            "coffee",
            "rocket",
            "hubble_deep_field",
            "retina",
            "immunohistochemistry",
            "camera",
            "coins",
            "moon",
            "brick",
            "grass",
            "gravel",
            "clock",
        ):
            try:
                photos.append(getattr(sk, name)())
            except Exception:  # a loader that needs the network, or missing in this version
                pass
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images

        photos.extend(load_sample_images().images)
    except ImportError:
        pass
    try:
        import matplotlib.cbook as cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            photos.append(np.asarray(Image.open(f).convert("RGB")))
    except Exception:
        pass
    out = []
    for p in photos:
        p = np.asarray(p)
        if p.ndim == 2:
            p = np.repeat(p[:, :, None], 3, axis=2)
        out.append(np.ascontiguousarray(p[:, :, :3].astype(np.uint8)))
    if not out:  # no photo package installed: procedural textures (entropy still realistic with noise)
        rng = np.random.default_rng(0)
        for _ in range(8):
            base = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
            out.append(np.asarray(Image.fromarray(base).resize((640, 480), Image.BICUBIC)))
    return out


_PHOTOS: list[Image.Image] = []
_NOISE: np.ndarray | None = None  # [1024, 1024] int16 unit-variance luma noise, windows taken per image


def _init_worker() -> None:
    global _PHOTOS, _NOISE
    _PHOTOS = [Image.fromarray(p) for p in load_photos()]
    _NOISE = np.round(np.random.default_rng(12345).standard_normal((1024, 1024)) * 16).astype(np.int16)


def _tile(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """A random crop of a random photo resized to w x h (down- or up-scaled), maybe flipped, color-shifted."""
    src = _PHOTOS[rng.integers(len(_PHOTOS))]
    sw, sh = src.size
    # crop with the tile's aspect, 45-100% of what fits: from a detail to the whole (downscaled) scene
    f = min(sh / h, sw / w) * rng.uniform(0.45, 1.0)
    ch, cw = max(8, int(h * f)), max(8, int(w * f))
    y, x = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    tile = src.resize((w, h), Image.BILINEAR, box=(x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.1:
        tile = tile.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    # color shift: per-channel gain and offset as one lookup table (cheap: no float image)
    gain, offset = rng.uniform(0.75, 1.25, 3), rng.uniform(-25, 25, 3)
    lut = np.clip(np.arange(256)[None, :] * gain[:, None] + offset[:, None], 0, 255).astype(np.uint8)
    return tile.point(lut.ravel().tolist())


def render_image(rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One synthetic photo (uint8 [H, W, 3]) and the JPEG quality to save it with."""
    h, w = image_shape(rng)
    canvas = Image.new("RGB", (w, h))
    layout = rng.random()
    if layout < 0.35:  # one scene
        boxes = [(0, 0, w, h)]
    elif layout < 0.65:  # two, side by side or one above the other
        if rng.random() < 0.5:
            cut = int(w * rng.uniform(0.3, 0.7))
            boxes = [(0, 0, cut, h), (cut, 0, w, h)]
        else:
            cut = int(h * rng.uniform(0.3, 0.7))
            boxes = [(0, 0, w, cut), (0, cut, w, h)]
    else:  # 2 x 2 grid with random cut lines
        cy, cx = int(h * rng.uniform(0.3, 0.7)), int(w * rng.uniform(0.3, 0.7))
        boxes = [(x0, y0, x1, y1) for y0, y1 in ((0, cy), (cy, h)) for x0, x1 in ((0, cx), (cx, w))]
    for x0, y0, x1, y1 in boxes:
        canvas.paste(_tile(rng, y1 - y0, x1 - x0), (x0, y0))
    # a smooth lighting gradient in a random direction plus luma noise (the fine detail that resized
    # crops lack; luma, so that 4:2:0 chroma subsampling does not average it away): int16 arithmetic
    angle, amp = rng.uniform(0, 2 * np.pi), rng.uniform(-40, 40)
    grad = (
        amp * (np.cos(angle) * np.linspace(-0.5, 0.5, w)[None, :] + np.sin(angle) * np.linspace(-0.5, 0.5, h)[:, None])
    ).astype(np.int16)
    y, x = int(rng.integers(0, 1024 - h + 1)), int(rng.integers(0, 1024 - w + 1))
    sigma16 = int(rng.integers(NOISE_SIGMA[0] * 16, NOISE_SIGMA[1] * 16 + 1))  # sigma in 1/16 steps
    luma = grad + ((_NOISE[y : y + h, x : x + w].astype(np.int32) * sigma16) >> 8).astype(np.int16)
    out = np.asarray(canvas, dtype=np.int16) + luma[:, :, None]
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8), int(rng.integers(QUALITY[0], QUALITY[1] + 1))


# -- captions ------------------------------------------------------------------------------------------
_SUBJECTS = [
    "man",
    "woman",
    "boy",
    "girl",
    "child",
    "dog",
    "person",
    "young man",
    "older woman",
    "little girl",
    "little boy",
    "group of people",
    "couple",
    "crowd",
    "worker",
    "musician",
    "biker",
    "skier",
    "surfer",
    "football player",
    "brown dog",
    "black dog",
    "white cat",
    "baby",
    "teenager",
    "tourist",
    "police officer",
    "construction worker",
    "dancer",
    "climber",
    "team",
    "family",
    "toddler",
]
_ADJ = [
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "orange",
    "purple",
    "pink",
    "gray",
    "brown",
    "striped",
    "colorful",
    "dark",
    "bright",
    "large",
    "small",
    "old",
    "young",
    "tall",
    "wet",
    "sunny",
    "crowded",
    "busy",
    "quiet",
    "snowy",
    "sandy",
    "grassy",
    "wooden",
    "long",
]
_CLOTHES = [
    "shirt",
    "jacket",
    "hat",
    "dress",
    "helmet",
    "coat",
    "t-shirt",
    "sweater",
    "uniform",
    "skirt",
    "jeans",
    "shorts",
    "cap",
    "scarf",
    "backpack",
    "sunglasses",
    "wetsuit",
    "apron",
    "costume",
]
_VERBS = [
    "is walking",
    "is running",
    "is sitting",
    "is standing",
    "is playing",
    "is riding",
    "is jumping",
    "is climbing",
    "is holding",
    "is looking",
    "is smiling",
    "is talking",
    "is eating",
    "is working",
    "is dancing",
    "is throwing",
    "is catching",
    "is pushing",
    "is carrying",
    "is waiting",
    "is reading",
    "are walking",
    "are playing",
    "are sitting",
    "are standing",
    "is performing",
    "is swimming",
]
_PREP = [
    "on",
    "in",
    "near",
    "next to",
    "behind",
    "in front of",
    "along",
    "across",
    "under",
    "beside",
    "through",
    "down",
    "up",
    "over",
    "at",
    "by",
    "around",
    "inside",
]
_PLACES = [
    "street",
    "beach",
    "park",
    "field",
    "sidewalk",
    "river",
    "mountain",
    "stage",
    "road",
    "city",
    "building",
    "fountain",
    "restaurant",
    "kitchen",
    "playground",
    "snow",
    "water",
    "grass",
    "crowd",
    "market",
    "bridge",
    "store",
    "wall",
    "track",
    "pool",
    "lake",
    "forest",
    "trail",
    "window",
    "car",
]
_OBJECTS = [
    "ball",
    "bike",
    "guitar",
    "skateboard",
    "surfboard",
    "umbrella",
    "camera",
    "phone",
    "flag",
    "frisbee",
    "bag",
    "drink",
    "sign",
    "book",
    "microphone",
    "stick",
    "kite",
    "rope",
    "stroller",
    "bucket",
    "toy",
    "sandwich",
    "newspaper",
    "bench",
    "table",
    "horse",
    "boat",
    "truck",
    "tree",
]
_CONNECT = ["while", "and", "as", "with", "where", "near", "during", "after", "before"]
_COUNT = ["A", "A", "A", "An", "The", "Two", "Three", "Several", "Many", "Four", "Some"]


def _phrase(rng: np.random.Generator) -> list[str]:
    pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
    kind = rng.integers(5)
    if kind == 0:
        return ["wearing", "a", pick(_ADJ), pick(_CLOTHES)]
    if kind == 1:
        return [pick(_PREP), "the", pick(_ADJ), pick(_PLACES)]
    if kind == 2:
        return [pick(_CONNECT), "a", pick(_SUBJECTS), pick(_VERBS)]
    if kind == 3:
        return ["with", "a", pick(_OBJECTS)]
    return [pick(_PREP), "a", pick(_OBJECTS)]


def caption(rng: np.random.Generator) -> str:
    """One Flickr-style caption: lognormal word count (median ~12, mean ~12.5, tail beyond 60 words)."""
    n_words = int(np.clip(round(rng.lognormal(2.43, 0.42)), 2, 90))
    pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
    words = [pick(_COUNT), pick(_ADJ), *pick(_SUBJECTS).split(), *pick(_VERBS).split()]
    while len(words) < n_words:
        words += _phrase(rng)
    words = words[:n_words]
    if words[0] == "An" and len(words) > 1 and words[1][0] not in "aeiou":
        words[0] = "A"
    return " ".join(words) + " ."


# -- generation ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    out_dir: str
    seed: int
    start: int
    stop: int


def filename_of(i: int) -> str:
    return f"{1_000_000_000 + i}.jpg"  # numeric, like Flickr's photo ids


def _generate_range(job: _Job) -> list[tuple[int, int, list[str]]]:
    """Images start..stop-1: writes the missing JPEGs; returns (index, file bytes, captions) for each."""
    if not _PHOTOS:
        _init_worker()
    out = []
    for i in range(job.start, job.stop):
        rng = np.random.default_rng([job.seed, i])
        caps = [caption(rng) for _ in range(CAPTIONS_PER_IMAGE)]
        path = Path(job.out_dir) / "images" / filename_of(i)
        if not path.exists():  # rendering after the captions keeps each image's rng stream fixed
            pixels, quality = render_image(rng)
            tmp = path.with_suffix(".tmp")
            Image.fromarray(pixels).save(tmp, format="JPEG", quality=quality)
            os.replace(tmp, path)
        out.append((i, path.stat().st_size, caps))
    return out


def karpathy_json(splits: list[str], captions: list[list[str]], name: str = "flickr30k") -> dict:
    images, sentid = [], 0
    for i, (split, caps) in enumerate(zip(splits, captions)):
        sents = []
        for raw in caps:
            tokens = [t.lower() for t in raw.rstrip(" .").split()]
            sents.append({"tokens": tokens, "raw": raw, "imgid": i, "sentid": sentid})
            sentid += 1
        images.append(
            {
                "filename": filename_of(i),
                "imgid": i,
                "split": split,
                "sentids": [s["sentid"] for s in sents],
                "sentences": sents,
            }
        )
    return {"images": images, "dataset": name}


def generate(
    out_dir: Path,
    *,
    scale: float = 0.1,
    n_images: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    quiet: bool = False,
) -> dict:
    """Write the dataset to `out_dir`; returns the summary (also written to `out_dir/summary.json`)."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    sizes = split_sizes(scale, n_images)
    total = sum(sizes.values())
    splits = split_of_each(sizes, np.random.default_rng([seed, 2**31]))
    workers = workers or os.cpu_count() or 1
    step = max(1, min(64, -(-total // (workers * 4))))
    jobs = [_Job(str(out_dir), seed, s, min(s + step, total)) for s in range(0, total, step)]
    start = time.perf_counter()
    results: list[tuple[int, int, list[str]]] = []
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            results += _generate_range(job)
    else:
        ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
        with ctx.Pool(workers, initializer=_init_worker) as pool:
            for part in pool.imap_unordered(_generate_range, jobs):
                results += part
                if not quiet:
                    print(f"\r{len(results):,}/{total:,} images", end="", file=sys.stderr, flush=True)
        if not quiet:
            print(file=sys.stderr)
    seconds = time.perf_counter() - start
    results.sort()
    captions = [caps for _, _, caps in results]
    nbytes = np.array([b for _, b, _ in results], dtype=np.int64)
    words = np.array([len(c.split()) - 1 for caps in captions for c in caps])  # minus the final " ."
    index = karpathy_json(splits, captions)
    tmp = out_dir / "dataset_flickr30k.json.tmp"
    tmp.write_text(json.dumps(index))
    os.replace(tmp, out_dir / "dataset_flickr30k.json")
    summary = {
        "version": GENERATOR_VERSION,
        "scale": scale,
        "seed": seed,
        "n_images": total,
        "n_captions": int(words.size),
        "splits": sizes,
        "jpeg_mean_kb": round(float(nbytes.mean()) / 1024, 1),
        "jpeg_median_kb": round(float(np.median(nbytes)) / 1024, 1),
        "total_mb": round(float(nbytes.sum()) / 2**20, 1),
        "caption_words_mean": round(float(words.mean()), 2),
        "caption_words_p99": int(np.percentile(words, 99)),
        "caption_words_max": int(words.max()),
        "seconds": round(seconds, 1),
        "workers": workers,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if not quiet:
        print(
            f"{total:,} images ({', '.join(f'{k} {v:,}' for k, v in sizes.items())}), "
            f"JPEG mean {summary['jpeg_mean_kb']} KB (median {summary['jpeg_median_kb']} KB, "
            f"{summary['total_mb']:,} MB), captions mean {summary['caption_words_mean']} words "
            f"(p99 {summary['caption_words_p99']}, max {summary['caption_words_max']}), "
            f"{seconds:.1f} s with {workers} workers -> {out_dir}",
            file=sys.stderr,
        )
    return summary


def default_dir(scale: float) -> Path:
    return DEFAULT_ROOT / f"flickr_like_{scale:g}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=0.1, help="1 = Flickr30K (31,783 images); 4 = COCO-sized")
    ap.add_argument("--n-images", type=int, default=None, help="explicit image count (overrides --scale)")
    ap.add_argument("--out", type=Path, default=None, help="default bench/data/flickr_like_<scale>/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = ap.parse_args(argv)
    return generate(
        args.out or default_dir(args.scale),
        scale=args.scale,
        n_images=args.n_images,
        seed=args.seed,
        workers=args.workers,
    )


if __name__ == "__main__":
    main()
