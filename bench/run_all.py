"""Every benchmark part, one command (`bench/run`): figures next to targets and ceilings, as JSON + Markdown.

    bench/run --scale 0.1                 # CPU machine, < 10 minutes; GPU parts: "skipped: no CUDA"
    bench/run --scale 1                   # one H100, Flickr30K-sized
    bench/run --only evaluate --only feature_store
    bench/run --out bench/results/my-box.json --no-docs

Steps: make (or reuse) the synthetic Flickr30K-shaped dataset (`bench/make_flickr_like.py`), then run
prepare, extract, distill, feature_store and evaluate, each through the project's own pipeline API where
it exists. A part that fails is reported as such and the others still run. Results go to
`bench/results/<device-slug>.json` (merged with the parts already there) and `docs/performance.md` is
re-rendered from every results file.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from _report import PARTS, RESULTS_DIR, Report, cuda_available, device_slug, render_docs, timeit  # noqa: E402

FLICKR_CAPTIONS = 155_070  # 31,014 split images x 5 (+ restval) ~ the 159k-row teacher bank of the issue


@dataclass
class Ctx:
    scale: float
    data: Path  # the synthetic dataset directory
    work: Path  # scratch space for this run (caches, stores)
    cuda: bool
    summary: dict  # the generator's summary


# ---------------------------------------------------------------------------------------------------------
# feature store: random-batch gather latency, sequential scan GB/s, size on disk
# ---------------------------------------------------------------------------------------------------------
def random_features(n: int, d: int, rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(dtype, copy=False)


def part_feature_store(rep: Report, ctx: Ctx) -> None:
    from pipeline.feature_store import open_store, write_store

    n_img = max(1000, round(31_783 * ctx.scale))
    n_cap = 5 * n_img
    d = 1024
    rng = np.random.default_rng(0)
    img = random_features(n_img, d, rng)
    txt = random_features(n_cap, d, rng)
    text_image = np.repeat(np.arange(n_img, dtype=np.int32), 5)
    path = ctx.work / "features.zarr"
    t = time.perf_counter()
    write_store(path, {"train": {"image_emb": img, "text_emb": txt, "text_image": text_image,
                                 "image_id": np.array([f"{i}.jpg" for i in range(n_img)], dtype=object)}},
                teacher={"name": "random"}, dataset={"name": "flickr_like", "fingerprint": "bench"})
    write_s = time.perf_counter() - t
    del img, txt
    t = time.perf_counter()
    split = open_store(path).split("train")
    open_ms = (time.perf_counter() - t) * 1e3
    rows = n_img + n_cap
    raw_bytes = rows * d * 2
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    rep.add("feature_store", f"write {rows:,} rows x {d} fp16 (write_store, incl. normalize)", rows / write_s, "rows/s")
    rep.add("feature_store", "open_store + split (validate, map)", open_ms, "ms")
    rep.add("feature_store", "size on disk / (rows x D x 2 bytes)", disk / raw_bytes, "x", target=1.0, better="lower",
            note=f"{disk / 2**20:,.1f} MiB for {rows:,} rows; chunks padded to the full chunk size")

    # a distill batch: 256 random caption rows + the image rows of their images (fancy index = a copy)
    te, ie, ti = split.text_emb, split.image_emb, split.text_image
    idx = rng.integers(0, n_cap, 256)

    def gather():
        t_rows = te[idx]
        i_rows = ie[ti[idx]]
        return t_rows, i_rows

    lat = []
    for _ in range(20):
        gather()
    for _ in range(2000):
        idx = rng.integers(0, n_cap, 256)
        t = time.perf_counter()
        gather()
        lat.append(time.perf_counter() - t)
    lat = np.array(lat) * 1e3
    rep.add("feature_store", "random batch of 256 pairs (256 text + 256 image rows), median", float(np.median(lat)), "ms",
            target=1.0, note=f"p99 {np.percentile(lat, 99):.3f} ms over 2,000 batches; page cache warm")
    one = []
    for _ in range(2000):
        idx = rng.integers(0, n_cap, 256)
        t = time.perf_counter()
        te[idx]
        one.append(time.perf_counter() - t)
    rep.add("feature_store", "random batch of 256 teacher rows, median", float(np.median(one)) * 1e3, "ms", target=1.0)

    # sequential scan: every row once, in chunk-sized slices copied out (what a full-bank pass reads)
    buf = np.empty((16384, d), dtype=te.dtype)

    def scan():
        for arr in (ie, te):
            for s in range(0, arr.shape[0], 16384):
                part = arr[s:s + 16384]
                np.copyto(buf[:len(part)], part)

    best, _ = timeit(scan, repeat=3, warmup=1)
    rep.add("feature_store", "sequential scan (page cache warm)", raw_bytes / best / 1e9, "GB/s",
            note=f"{raw_bytes / 2**20:,.0f} MiB in {best * 1e3:.0f} ms")


# ---------------------------------------------------------------------------------------------------------
# evaluate: COCO-5K-sized exact evaluation (5,000 images, 25,010 captions, D = 1024) on 2 CPU threads
# ---------------------------------------------------------------------------------------------------------
def coco5k_features(rng: np.random.Generator, d: int = 1024):
    """5,000 images x 25,010 captions (10 images with 6 captions), captions = own image + noise."""
    n_img = 5000
    counts = np.full(n_img, 5)
    counts[:10] = 6
    text_image = np.repeat(np.arange(n_img), counts).astype(np.int64)
    img = random_features(n_img, d, rng)
    txt = img[text_image] + 1.2 * random_features(len(text_image), d, rng)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, txt, text_image


def naive_recalls(img, txt, text_image) -> dict:
    """The whole score matrix and a full argsort: the obviously-correct reference."""
    import torch

    s = torch.from_numpy(img) @ torch.from_numpy(txt).T  # [N, M]
    ti = torch.from_numpy(text_image)
    # t2i: rank of each caption's image among all images
    col = s.T  # [M, N]
    pos = col.gather(1, ti[:, None])
    t2i_rank = (col > pos).sum(1)
    # i2t: best rank over the image's captions
    order = s.argsort(dim=1, descending=True)
    owner = ti[order]  # [N, M] image of each ranked caption
    first = (owner == torch.arange(len(img))[:, None]).int().argmax(1)
    out = {}
    for k in (1, 5, 10):
        out[f"i2t_r{k}"] = float((first < k).float().mean() * 100)
        out[f"t2i_r{k}"] = float((t2i_rank < k).float().mean() * 100)
    return out


def find_evaluator():
    """The evaluate stage's metric function, whatever its module calls it (None if absent)."""
    import importlib

    for mod_name in ("pipeline.retrieval", "pipeline.metrics", "pipeline.evaluate"):
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for fn in ("retrieval_metrics", "evaluate_embeddings", "compute_metrics", "recall_at_k"):
            if hasattr(mod, fn):
                return f"{mod_name}.{fn}", getattr(mod, fn)
    return None, None


def part_evaluate(rep: Report, ctx: Ctx) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        img, txt, ti = coco5k_features(np.random.default_rng(0))
        name, fn = find_evaluator()
        flops = 2 * img.shape[0] * txt.shape[0] * img.shape[1]
        if fn is None:
            rep.add("evaluate", "COCO-5K exact evaluation, 2 CPU threads", None, "s", target=1.5, ceiling=1.27,
                    note="not measured: the evaluate stage's metric function is not in pipeline/ yet")
        else:
            best, med = timeit(lambda: fn(img, txt, ti), repeat=3, warmup=1)
            rep.add("evaluate", f"COCO-5K exact evaluation, 2 CPU threads ({name})", best, "s", target=1.5,
                    ceiling=1.27, note=f"5,000 x 25,010 x 1024 ({flops / 1e9:.0f} GFLOP), median {med:.2f} s; "
                    "ceiling = 16 CPU cores")
        best, _ = timeit(lambda: naive_recalls(img, txt, ti), repeat=1, warmup=0)
        rep.add("evaluate", "COCO-5K naive reference (full matrix + argsort), 2 CPU threads", best, "s",
                note="the obviously-correct implementation, same run")
        a, b = torch.from_numpy(img), torch.from_numpy(txt)
        mm, _ = timeit(lambda: a @ b.T, repeat=3, warmup=1)
        rep.add("evaluate", "fp32 score matmul alone (5,000 x 25,010 x 1024), 2 CPU threads", flops / mm / 1e9,
                "GFLOP/s", note=f"{mm:.2f} s: the floor under any exact CPU evaluation here")
        if ctx.cuda:
            ag, bg = a.cuda(), b.cuda()
            g, _ = timeit(lambda: ag @ bg.T, repeat=5, warmup=2, sync=torch.cuda.synchronize)
            rep.add("evaluate", "COCO-5K score matmul on GPU (fp32)", g * 1e3, "ms", ceiling=17.7)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------
# prepare: JPEG decode + resize into the uint8 cache, images/s and per worker
# ---------------------------------------------------------------------------------------------------------
def pil_student_transform(path: str, size: int = 224, short: int = 256, draft: bool = False) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        if draft:
            im.draft("RGB", (short, short))
        im = im.convert("RGB")
        w, h = im.size
        s = short / min(w, h)
        im = im.resize((max(short, round(w * s)), max(short, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size)))


def part_prepare(rep: Report, ctx: Ctx) -> None:
    paths = sorted(str(p) for p in (ctx.data / "images").glob("*.jpg"))
    n = min(len(paths), 300)
    for draft in (False, True):
        t = time.perf_counter()
        for p in paths[:n]:
            pil_student_transform(p, draft=draft)
        rate = n / (time.perf_counter() - t)
        rep.add("prepare", f"naive PIL loop, 1 process{' (draft mode)' if draft else ''}", rate, "images/s",
                ceiling=291 if draft else 167, note=f"{n} images; ceiling: PIL per core on the reference machine")
    rep.add("prepare", "run_prepare", None, "images/s", note="not measured: pipeline.prepare.run_prepare not integrated yet")


# ---------------------------------------------------------------------------------------------------------
# extract and distill: GPU figures
# ---------------------------------------------------------------------------------------------------------
def part_extract(rep: Report, ctx: Ctx) -> None:
    if not ctx.cuda:
        for what, target, ceiling in (("giant 224px images/s, end to end from JPEG", 800, 890),
                                      ("giant 224px captions/s, end to end", 3500, 3760),
                                      ("large 384px images/s, end to end from JPEG", None, None)):
            rep.add("extract", what, None, "images/s" if "images" in what else "captions/s", target=target,
                    ceiling=ceiling, note="not measured: no GPU in this session")
        rep.skip("extract", "no CUDA")
        return


def part_distill(rep: Report, ctx: Ctx) -> None:
    if not ctx.cuda:
        rep.add("distill", "pairs/s at batch 256, compiled", None, "pairs/s", target=2400, ceiling=2456,
                note="not measured: no GPU in this session")
        rep.add("distill", "peak GPU memory at the default batch", None, "GB", target=20, ceiling=None,
                note="not measured: no GPU in this session")
        rep.skip("distill", "no CUDA")
        return


PART_FUNCS = {"prepare": part_prepare, "extract": part_extract, "distill": part_distill,
              "feature_store": part_feature_store, "evaluate": part_evaluate}


# ---------------------------------------------------------------------------------------------------------
def ensure_dataset(scale: float, data: Path | None) -> tuple[Path, dict]:
    import json

    import make_flickr_like as gen

    out = data or gen.default_dir(scale)
    summary_file = out / "summary.json"
    if summary_file.exists() and (out / "dataset_flickr30k.json").exists():
        summary = json.loads(summary_file.read_text())
        if summary.get("n_images") == sum(gen.split_sizes(scale).values()):
            print(f"dataset: reusing {out} ({summary['n_images']:,} images, JPEG mean {summary['jpeg_mean_kb']} KB)")
            return out, summary
    return out, gen.generate(out, scale=scale)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=0.1, help="dataset scale: 0.1, 1 (Flickr30K) or 4 (COCO-sized)")
    ap.add_argument("--only", action="append", choices=PARTS, help="run only this part (repeatable)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/<device>.json)")
    ap.add_argument("--data", type=Path, default=None, help="synthetic dataset dir (default bench/data/flickr_like_<scale>)")
    ap.add_argument("--no-docs", action="store_true", help="do not re-render docs/performance.md")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    rep = Report.for_this_machine(scale=args.scale)
    info = rep.info
    print(f"device: {info['device']} | python {info['python']} | torch {info.get('torch')} | "
          f"kdpipe {info['kdpipe_commit']} | {info['date']}")
    out = args.out or RESULTS_DIR / f"{device_slug(info)}.json"
    parts = args.only or list(PARTS)
    data, summary = ensure_dataset(args.scale, args.data)
    rep.info["dataset"] = {k: summary.get(k) for k in ("n_images", "n_captions", "jpeg_mean_kb", "caption_words_mean")}
    work_root = BENCH / "data" / "work"
    work_root.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(args.scale, data, Path(tempfile.mkdtemp(dir=work_root)), cuda_available(), summary)
    failed = []
    try:
        for part in parts:
            t = time.perf_counter()
            print(f"== {part}", flush=True)
            try:
                PART_FUNCS[part](rep, ctx)
            except Exception as err:  # one part failing must not lose the others' figures
                traceback.print_exc()
                rep.skip(part, f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
                failed.append(part)
            rep.timed(part, time.perf_counter() - t)
    finally:
        import shutil

        shutil.rmtree(ctx.work, ignore_errors=True)
    rep.save(out)
    print(f"results: {out}")
    if not args.no_docs:
        print(f"docs: {render_docs()}")
    print(f"bench/run: {time.perf_counter() - start:.0f} s" + (f"; failed parts: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
