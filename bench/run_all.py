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
import gc
import os
import shutil
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from _report import (  # noqa: E402
    PARTS,
    RESULTS_DIR,
    GpuSampler,
    Report,
    cuda_available,
    device_slug,
    render_docs,
    timeit,
)

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
    from make_flickr_like import split_sizes

    from pipeline.store.features import open_store
    from pipeline.store.features_writer import write_store

    # the splits of the dataset at this scale, at least Flickr30K's (the bank distill reads: restval folded
    # into train, 5 captions per image, D = 1024), so that the store is not a few MiB at 0.1x
    sizes = split_sizes(max(1.0, ctx.scale))
    sizes = {"train": sizes["train"] + sizes["restval"], "val": sizes["val"], "test": sizes["test"]}
    d = 1024
    rng = np.random.default_rng(0)
    splits = {}
    for name, n in sizes.items():
        splits[name] = {
            "image_emb": random_features(n, d, rng),
            "text_emb": random_features(5 * n, d, rng),
            "text_image": np.repeat(np.arange(n, dtype=np.int32), 5),
            "image_id": np.array([f"{name}{i}.jpg" for i in range(n)], dtype=object),
        }
    rows = sum(6 * n for n in sizes.values())
    path = ctx.work / "features.zarr"
    t = time.perf_counter()
    write_store(path, splits, teacher={"name": "random"}, dataset={"name": "flickr_like", "fingerprint": "bench"})
    write_s = time.perf_counter() - t
    del splits
    t = time.perf_counter()
    split = open_store(path).split("train")
    open_ms = (time.perf_counter() - t) * 1e3
    n_img, n_cap = split.n_images, split.n_captions
    raw_bytes = rows * d * 2
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    rep.add("feature_store", f"write {rows:,} rows x {d} fp16 (write_store, incl. normalize)", rows / write_s, "rows/s")
    rep.add("feature_store", "open_store + split (validate, map)", open_ms, "ms")
    rep.add(
        "feature_store",
        "size on disk / (rows x D x 2 bytes)",
        disk / raw_bytes,
        "x",
        target=1.0,
        better="lower",
        note=f"{disk / 2**20:,.1f} MiB for {rows:,} rows in 3 splits ({raw_bytes / 2**20:,.1f} MiB of rows)",
    )

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
    rep.add(
        "feature_store",
        "random batch of 256 pairs (256 text + 256 image rows), median",
        float(np.median(lat)),
        "ms",
        target=1.0,
        note=f"p99 {np.percentile(lat, 99):.3f} ms over 2,000 batches; page cache warm",
    )
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
                part = arr[s : s + 16384]
                np.copyto(buf[: len(part)], part)

    best, _ = timeit(scan, repeat=3, warmup=1)
    scanned = (n_img + n_cap) * d * te.dtype.itemsize
    rep.add(
        "feature_store",
        "sequential scan of the train split (page cache warm)",
        scanned / best / 1e9,
        "GB/s",
        note=f"{scanned / 2**20:,.0f} MiB in {best * 1e3:.0f} ms, 16,384-row slices copied out",
    )

    # cold: unmap, drop the store's own files from the page cache (posix_fadvise DONTNEED), reopen, scan once
    if hasattr(os, "posix_fadvise"):
        del split, te, ie, ti
        gc.collect()
        for f in path.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        split = open_store(path).split("train")
        ie, te = split.image_emb, split.text_emb
        t = time.perf_counter()
        scan()
        cold = time.perf_counter() - t
        rep.add(
            "feature_store",
            "sequential scan of the train split (page cache dropped: from disk)",
            scanned / cold / 1e9,
            "GB/s",
            note="one pass; the disk of this machine, not the store format",
        )


# ---------------------------------------------------------------------------------------------------------
# evaluate: COCO-5K-sized exact evaluation on 2 CPU threads (and the GPU), bounded memory (bench/evaluate_bench.py)
# ---------------------------------------------------------------------------------------------------------
def part_evaluate(rep: Report, ctx: Ctx) -> None:
    import evaluate_bench

    evaluate_bench.bench_evaluate(rep, ctx.cuda, repeat=3)
    evaluate_bench.bench_bounded_memory(rep)


# ---------------------------------------------------------------------------------------------------------
# prepare: run_prepare (JPEG decode + resize into the uint8 cache) with 1..all workers (bench/prepare_bench.py)
# ---------------------------------------------------------------------------------------------------------
def subset(ctx: Ctx, n: int) -> Path:
    """The first `n` images of the synthetic dataset (symlinks + a shortened Karpathy file), so that a
    single-worker run stays short at 1x and 4x; the dataset itself when it is not larger."""
    import json

    full = json.loads((ctx.data / "dataset_flickr30k.json").read_text())
    if len(full["images"]) <= n:
        return ctx.data
    out = ctx.work / f"subset_{n}"
    (out / "images").mkdir(parents=True, exist_ok=True)
    full["images"] = full["images"][:n]
    for im in full["images"]:
        (out / "images" / im["filename"]).symlink_to(ctx.data / "images" / im["filename"])
    (out / "dataset_flickr30k.json").write_text(json.dumps(full))
    return out


def part_prepare(rep: Report, ctx: Ctx) -> None:
    import prepare_bench

    cores = len(os.sched_getaffinity(0))
    workers = sorted({1, 2, max(1, cores // 2), cores}) if cores > 2 else [1, cores]
    res = prepare_bench.measure(subset(ctx, 4000), workers, repeat=1)
    n = res["n_images"]
    rep.add(
        "prepare",
        "naive PIL loop, 1 process (decode, resize 256, crop 224)",
        res["naive_1_process"],
        "images/s",
        ceiling=167,
        note=f"{n:,} JPEGs of the synthetic set, page cache warm; ceiling: PIL per core, reference machine",
    )
    one = None
    for w, r in res["prepare"].items():
        one = one or r["decode_images_per_s"] / w
        rep.add(
            "prepare",
            f"run_prepare, {w} worker{'s' if w > 1 else ''}: images/s",
            r["decode_images_per_s"],
            "images/s",
            note=f"decode phase; {r['end_to_end_images_per_s']:.0f} images/s end to end ({r['seconds']:.1f} s with "
            f"start-up); {r['decode_images_per_s'] / one:.2f}x one worker",
        )
        rep.add(
            "prepare",
            f"run_prepare, {w} worker{'s' if w > 1 else ''}: images/s per worker",
            r["per_core"],
            "images/s",
            ceiling=291,
            note=f"{r['per_cpu_second']:.0f} images per CPU-second of the decoding "
            "threads; ceiling: PIL with draft mode per core, reference machine",
        )
    rep.extra("prepare", "raw", res)


# ---------------------------------------------------------------------------------------------------------
# extract: model only (bench/teacher_gpu.py) and end to end from the JPEG files through run_extract
# ---------------------------------------------------------------------------------------------------------
@contextmanager
def recorded_progress(module):
    """Record (description, items, seconds, unit) of every progress bar `module` opens: a stage's own
    per-phase rates (e.g. extract's "images" and "captions" loops) without changing the stage."""
    records: list[tuple[str, int, float, str]] = []
    original = module.progress

    @contextmanager
    def recording(description, total=None, unit="it"):
        t = time.perf_counter()
        with original(description, total, unit) as bar:
            yield bar
        records.append((description, bar.done, time.perf_counter() - t, unit))

    module.progress = recording
    try:
        yield records
    finally:
        module.progress = original


def dataset_index(ctx: Ctx):
    from pipeline.data.readers import DatasetConfig, read_dataset

    return read_dataset(
        DatasetConfig(
            name="flickr_like", annotations=ctx.data / "dataset_flickr30k.json", image_root=ctx.data / "images"
        )
    )


def caption_tokenizer(ctx: Ctx, index) -> Path:
    """A SentencePiece model trained on the synthetic captions (BEiT-3's beit3.spm is not shipped here):
    about one piece per word, like XLM-R on plain English captions."""
    import sentencepiece as spm

    prefix = ctx.work / "captions_spm"
    if not prefix.with_suffix(".model").exists():
        corpus = ctx.work / "captions.txt"
        corpus.write_text("\n".join(index.caption_text[:20000].tolist()), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(prefix),
            vocab_size=400,
            model_type="unigram",
            hard_vocab_limit=False,
            minloglevel=2,
        )
    return prefix.with_suffix(".model")


def extract_end_to_end(
    rep: Report,
    ctx: Ctx,
    label: str,
    dims,
    cfg_kw: dict,
    *,
    target_img=None,
    target_cap=None,
    ceiling_img=None,
    ceiling_cap=None,
    note: str = "",
) -> None:
    import torch

    import pipeline.extract.passes as extract_passes
    from pipeline.extract.config import ExtractConfig
    from pipeline.extract.run import run_extract
    from pipeline.teachers.beit3 import BEiT3Teacher
    from pipeline.teachers.beit3_model import BEiT3ForRetrieval

    index = dataset_index(ctx)
    device = "cuda" if ctx.cuda else "cpu"
    with torch.device(device):  # default init directly on the device (a 2B-parameter CPU init takes minutes)
        model = BEiT3ForRetrieval(dims)
    teacher = BEiT3Teacher.from_model(
        model, caption_tokenizer(ctx, index), device=device, dtype=torch.bfloat16 if ctx.cuda else torch.float32
    )
    out = ctx.work / f"features_{label}.zarr"
    cfg = ExtractConfig(device=device, **cfg_kw)
    with GpuSampler() as gpu, recorded_progress(extract_passes) as phases:
        result = run_extract(index, cfg, out, teacher=teacher)
    rates = {d.split(" ")[0]: n / sec for d, n, sec, _ in phases if sec > 0}
    shutil.rmtree(out, ignore_errors=True)
    del teacher, model
    if ctx.cuda:
        torch.cuda.empty_cache()
    what = f"{index.n_images:,} JPEGs + {index.n_captions:,} captions, whole run {result.seconds:.1f} s"
    util = f"; GPU busy {gpu.mean_util:.0f}% (nvidia-smi)" if gpu.mean_util is not None else ""
    rep.add(
        "extract",
        f"{label}: images/s, end to end from JPEG (run_extract)",
        rates.get("images"),
        "images/s",
        target=target_img,
        ceiling=ceiling_img,
        note=f"{what}{util}{note}",
    )
    rep.add(
        "extract",
        f"{label}: captions/s, end to end (run_extract)",
        rates.get("captions"),
        "captions/s",
        target=target_cap,
        ceiling=ceiling_cap,
        note="captions bucketed by length, synthetic SentencePiece",
    )
    if gpu.mean_util is not None:
        rep.add(
            "extract",
            f"{label}: GPU utilisation during run_extract",
            gpu.mean_util,
            "%",
            note=f"mean of {len(gpu.samples)} nvidia-smi samples; peak memory {gpu.max_memory_mb or 0:,.0f} MiB",
        )


def part_extract(rep: Report, ctx: Ctx) -> None:
    import torch

    from pipeline.teachers.beit3_model import BEIT3_PRESETS, BEiT3Dims

    if ctx.cuda:
        import teacher_gpu

        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        targets = {"giant-224": (800, 3500, 890, 3760), "large-384": (None, None, None, None)}
        for config, (t_img, t_cap, c_img, c_cap) in targets.items():
            with GpuSampler() as gpu:
                r = teacher_gpu.run(config, 256, 1024, 5.0, torch.bfloat16)
            util = f"; GPU busy {gpu.mean_util:.0f}%" if gpu.mean_util is not None else ""
            rep.add(
                "extract",
                f"{config}: images/s, model only (bf16, batch 256)",
                r["images_per_s"],
                "images/s",
                ceiling=c_img,
                note=f"{r['params'] / 1e6:,.0f}M params, peak {r['image_peak_gb']:.1f} GB{util}",
            )
            for n_tok in teacher_gpu.CAPTION_TOKENS:
                rep.add(
                    "extract",
                    f"{config}: captions/s, model only ({n_tok} tokens, batch 1024)",
                    r[f"captions_per_s_{n_tok}tok"],
                    "captions/s",
                    ceiling=c_cap if n_tok == 64 else None,
                )
            preset, size = teacher_gpu.CONFIGS[config]
            extract_end_to_end(
                rep,
                ctx,
                config,
                BEIT3_PRESETS[preset].with_image_size(size),
                {},
                target_img=t_img,
                target_cap=t_cap,
                ceiling_img=c_img,
                ceiling_cap=c_cap,
            )
    else:
        for what, unit, target, ceiling in (
            ("giant-224: images/s, end to end from JPEG", "images/s", 800, 890),
            ("giant-224: captions/s, end to end", "captions/s", 3500, 3760),
            ("large-384: images/s, end to end from JPEG", "images/s", None, None),
            ("large-384: captions/s, end to end", "captions/s", None, None),
        ):
            rep.add(
                "extract", what, None, unit, target=target, ceiling=ceiling, note="not measured: no GPU in this session"
            )
        rep.skip("extract", "GPU figures: no CUDA")
        # the CPU side of extraction: decode + resize + tokenize + store, with a tiny model at 224 px
        tiny = BEiT3Dims(
            embed_dim=64, depth=2, num_heads=4, ffn_dim=256, patch_size=16, image_size=224, vocab_size=1000
        )
        extract_end_to_end(
            rep,
            ctx,
            "tiny-224 on CPU",
            tiny,
            {},
            note="; a 2-layer 64-wide model: the CPU data path of extract, not the teacher",
        )
    # our teacher forward vs the naive eager reference (CPU, float32, same weights)
    import teacher_cpu

    r = teacher_cpu.run("base", depth=2, repeat=3)
    for kind in ("image", "text"):
        rep.add(
            "extract",
            f"teacher forward vs naive eager reference, base width x 2 layers, {kind}s (CPU fp32)",
            r[f"{kind}_ref_ms"] / r[f"{kind}_ours_ms"],
            "x",
            target=1.3,
            note=f"ours {r[f'{kind}_ours_ms']:.0f} ms vs reference {r[f'{kind}_ref_ms']:.0f} ms per batch, "
            f"max |diff| {r[f'{kind}_max_abs_diff']:.1e}; reference = tests/beit3_reference.py "
            "(torchscale math written out; torchscale itself is not installed)",
        )


def part_distill(rep: Report, ctx: Ctx) -> None:
    import distill_bench
    import losses_bench
    import torch

    with tempfile.TemporaryDirectory(dir=ctx.work) as tmp:
        root = Path(tmp)
        n_cache = 2048
        store = distill_bench.make_store(root, distill_bench.N_IMAGES, distill_bench.DIM)
        images = distill_bench.make_image_cache(root, n_cache)
        distill_bench.bench_data_path(rep, root, store, images, n_cache)
        if ctx.cuda:
            with GpuSampler() as gpu:
                distill_bench.bench_gpu(rep, root, store, images, n_cache, [64, 128, 256], 30, [False, True])
            curve: dict[str, dict[str, float]] = {}
            for label, r in rep.parts["distill"].extra.get("train_step", {}).items():  # "batch 64, eager"
                batch, mode = label.removeprefix("batch ").split(", ")
                curve.setdefault(mode, {})[batch] = r["pairs_per_s"]
            rep.extra("distill", "throughput_vs_batch", curve)
            if gpu.mean_util is not None:
                rep.add(
                    "distill",
                    "GPU utilisation during the training-step runs",
                    gpu.mean_util,
                    "%",
                    target=95,
                    note=f"mean of {len(gpu.samples)} nvidia-smi samples, compile warm-ups included",
                )
        else:
            rep.add(
                "distill",
                "pairs/s at batch 256, compiled",
                None,
                "pairs/s",
                target=2400,
                ceiling=2456,
                note="not measured: no GPU in this session",
            )
            rep.add(
                "distill",
                "peak GPU memory, default config (batch 64)",
                None,
                "GB",
                target=20,
                note="not measured: no GPU in this session",
            )
            rep.skip("distill", "GPU training step: no CUDA")
    # the loss alone, forward + backward at batch 256 (bench/losses_bench.py); the whole bank only on a GPU
    losses_bench.bench_device(rep, torch.device("cpu"), quick=True)
    if ctx.cuda:
        losses_bench.bench_device(rep, torch.device("cuda"), quick=False)


PART_FUNCS = {
    "prepare": part_prepare,
    "extract": part_extract,
    "distill": part_distill,
    "feature_store": part_feature_store,
    "evaluate": part_evaluate,
}


# ---------------------------------------------------------------------------------------------------------
def ensure_dataset(scale: float, data: Path | None) -> tuple[Path, dict]:
    import json

    import make_flickr_like as gen

    out = data or gen.default_dir(scale)
    summary_file = out / "summary.json"
    if summary_file.exists() and (out / "dataset_flickr30k.json").exists():
        summary = json.loads(summary_file.read_text())
        if (summary.get("n_images"), summary.get("version")) == (
            sum(gen.split_sizes(scale).values()),
            gen.GENERATOR_VERSION,
        ):
            print(f"dataset: reusing {out} ({summary['n_images']:,} images, JPEG mean {summary['jpeg_mean_kb']} KB)")
            return out, summary
        shutil.rmtree(out)  # made by another generator version or for another size: rebuild, keep nothing
    return out, gen.generate(out, scale=scale)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=0.1, help="dataset scale: 0.1, 1 (Flickr30K) or 4 (COCO-sized)")
    ap.add_argument("--only", action="append", choices=PARTS, help="run only this part (repeatable)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/<device>.json)")
    ap.add_argument(
        "--data", type=Path, default=None, help="synthetic dataset dir (default bench/data/flickr_like_<scale>)"
    )
    ap.add_argument("--no-docs", action="store_true", help="do not re-render docs/performance.md")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    rep = Report.for_this_machine(scale=args.scale)
    info = rep.info
    print(
        f"device: {info['device']} | python {info['python']} | torch {info.get('torch')} | "
        f"kdpipe {info['kdpipe_commit']} | {info['date']}"
    )
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
        shutil.rmtree(ctx.work, ignore_errors=True)
    rep.save(out)
    print(f"results: {out}")
    if not args.no_docs:
        print(f"docs: {render_docs()}")
    print(
        f"bench/run: {time.perf_counter() - start:.0f} s" + (f"; failed parts: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
