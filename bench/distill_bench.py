"""Distill throughput: the training step of the default student on a GPU, and the data path alone on the CPU.

    python bench/distill_bench.py                          # data path (CPU); GPU figures when CUDA is there
    python bench/distill_bench.py --batches 64,256 --steps 40 --no-compile
    python bench/distill_bench.py --only data              # the CPU data path only

GPU part: the default student (ViT-B/16 + BERT-base, random init from their configs, 30 tokens) and the
default loss (contrastive vs a K = 8192 queue + L1 + cosine + hardest-negative triplet, dsmd balancer),
bf16 autocast, AdamW, with a Flickr30K-sized teacher bank (31,783 image rows + 158,915 caption rows,
D = 1024, fp16) on the GPU. Each step is the trainer's own code: BatchLoader (loader threads gathering
uint8 images from a memory-mapped cache into pinned memory), `pipeline.distill.forward.loss_terms`, the balancer
(one sync), backward, optimizer step. Batch 64 / 128 / 256, eager and torch.compile: pairs/s and peak
GPU memory (targets: >= 2,400 pairs/s at 256 compiled on one H100; the default batch 64 within 20 GB).

Data path part (CPU): batches of 256 pairs with their K = 8192 negatives, built by BatchLoader from the
memory-mapped image cache and feature store with 0 / 2 / 4 loader threads; with the teacher bank on the
device (only images cross) and streamed from the memory map (images + teacher rows + negatives). Target:
at least 3x what the GPU consumes (3 x 2,456 pairs/s, the reference compiled step at batch 256).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import DISTILL_REFERENCE, Report, cuda_available  # noqa: E402

N_IMAGES, CAPTIONS_PER_IMAGE, DIM = 31_783, 5, 1024  # Flickr30K-sized bank: 158,915 caption rows
QUEUE = 8192
GPU_REFERENCE_PAIRS_PER_S = 2456  # the reference compiled step at batch 256 on one H100 (performance.md)


# -- inputs: a memory-mapped feature store and image cache, as the trainer reads them ----------------------
def make_store(root: Path, n_images: int, dim: int, seed: int = 0):
    """A complete format-v1 store of random unit rows (fp16), written with the project's writer."""
    from pipeline.store.features import open_store
    from pipeline.store.features_writer import write_store

    rng = np.random.default_rng(seed)
    n_captions = n_images * CAPTIONS_PER_IMAGE
    text_image = (np.arange(n_captions) // CAPTIONS_PER_IMAGE).astype(np.int32)
    rows = lambda n: rng.standard_normal((n, dim), dtype=np.float32)  # noqa: E731 - normalized by the writer
    write_store(
        root / "features.zarr",
        {
            "train": {
                "image_emb": rows(n_images),
                "text_emb": rows(n_captions),
                "text_image": text_image,
                "image_id": np.array([f"{i:010d}" for i in range(n_images)], dtype=object),
            }
        },
        teacher={"name": "random"},
        dataset={"name": "bench", "fingerprint": "bench"},
    )
    return open_store(root / "features.zarr").split("train")


def make_image_cache(root: Path, n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """n random uint8 images [n, size, size, 3] in prepare's format (memory-mapped on read)."""
    from pipeline.store.image_cache import open_image_cache, write_image_cache

    rng = np.random.default_rng(seed)
    write_image_cache(
        root / "images.zarr", {"train": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)}, fingerprint="bench"
    )
    return open_image_cache(root / "images.zarr").split("train")


def random_tokens(n: int, length: int = 30, vocab: int = 30522, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids as the trainer keeps them (int32 [M, L]): [CLS] words [SEP] and padding, ~14 tokens a caption."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(min(1000, vocab - 1), vocab, (n, length)).astype(np.int32)
    lengths = np.clip(rng.lognormal(np.log(14), 0.35, n).astype(int), 4, length)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    ids[:, 0] = 101
    ids[np.arange(n), lengths - 1] = 102
    ids[mask == 0] = 0
    return torch.from_numpy(ids), torch.from_numpy(mask)


def make_loader(images, store, device, *, batch: int, workers: int, placement: str, n_cache: int, queue: int = QUEUE):
    from pipeline.distill.data import BatchLoader, TeacherBank
    from pipeline.distill.sampler import EpochSampler

    bank = TeacherBank(store.image_emb, store.text_emb, store.text_image, device, placement=placement)
    sampler = EpochSampler(store.n_captions, batch, seed=0)
    cache_rows = np.arange(store.n_images) % n_cache  # more teacher images than cached ones: reuse them
    return BatchLoader(
        images,
        bank,
        random_tokens(store.n_captions),
        sampler,
        queue_size=queue,
        use_queue=True,
        num_workers=workers,
        cache_rows=cache_rows,
    )


# -- the data path alone (CPU) -------------------------------------------------------------------------------
def bench_data_path(rep: Report, root: Path, store, images, n_cache: int, batches: int = 40) -> None:
    for placement, what in (
        ("device", "bank on the device: images only"),
        ("memmap", "bank streamed: images + teacher rows + 8,192 negatives"),
    ):
        for workers in (0, 2, 4):
            loader = make_loader(
                images, store, torch.device("cpu"), batch=256, workers=workers, placement=placement, n_cache=n_cache
            )
            for hb in loader.iterate(0, 0, 4):  # warm the page cache and the buffers
                loader.release(hb)
            t = time.perf_counter()
            n = 0
            for hb in loader.iterate(1, 0, batches):
                loader.release(hb)  # as the training loop does once the step is done with it
                n += 1
            rate = n * 256 / (time.perf_counter() - t)
            rep.add(
                "distill",
                f"data path, batch 256, {workers} loader threads, {what}",
                rate,
                "pairs/s",
                target=3 * GPU_REFERENCE_PAIRS_PER_S,
                note=f"{rate / GPU_REFERENCE_PAIRS_PER_S:.1f}x the reference GPU step (2,456 pairs/s)",
            )


# -- the training step on the GPU ---------------------------------------------------------------------------
def default_student_config(root: Path):
    """The default StudentConfig (ViT-B/16 + BERT-base, random init), with a 30,522-token uncased vocabulary
    (`uncased_tokenizer`)."""
    from pipeline.towers.student import StudentConfig
    from pipeline.towers.text import TextTowerConfig

    return StudentConfig(text=TextTowerConfig(tokenizer=uncased_tokenizer(root)))


def uncased_tokenizer(root: Path) -> Path:
    """A 30,522-token uncased vocabulary ([CLS] 101, [SEP] 102, as `random_tokens` writes them): the MiniLM
    package's (BERT-base uncased's) when installed, else a synthetic one of the same size under `root`."""
    try:
        from pipeline.pretrained_assets import minilm_dir

        return minilm_dir()
    except Exception:  # noqa: BLE001 - any missing asset: build a vocabulary of the same size
        from transformers import BertTokenizer

        vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        vocab += [f"w{i}" for i in range(30522 - len(vocab))]
        (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
        BertTokenizer(vocab=str(root / "vocab.txt")).save_pretrained(root / "tok")
        return root / "tok"


def bench_gpu(
    rep: Report, root: Path, store, images, n_cache: int, batches: list[int], steps: int, compile_modes: list[bool]
) -> None:
    """The default student's training step on the GPU, for every compile mode and batch size."""
    torch.set_float32_matmul_precision("high")
    configs = [(compiled, batch) for compiled in compile_modes for batch in batches]
    bench_train_step(rep, store, images, n_cache, configs, steps, default_student_config(root), torch.device("cuda"))


def bench_train_step(
    rep: Report,
    store,
    images,
    n_cache: int,
    configs: list[tuple[bool, int]],
    steps: int,
    student_cfg,
    device: torch.device,
    *,
    queue: int = QUEUE,
    compile_backend: str = "inductor",
    part: str = "distill",
    time_left=None,
) -> dict[str, dict[str, float | None]]:
    """pairs/s (and peak GPU memory) of the trainer's step for each (compiled, batch) of `configs`, in that order:
    BatchLoader -> loss_terms -> balancer -> backward -> AdamW, bf16 autocast. `time_left`: a function giving the
    seconds left; a configuration that may not finish in them (compiling takes about a minute) is not started."""
    from pipeline.distill.balancer import BalancerConfig, LossBalancer
    from pipeline.distill.config import AugmentConfig
    from pipeline.distill.forward import loss_terms
    from pipeline.distill.losses import DistillLoss, LossConfig
    from pipeline.towers.student import build_student

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731

    def one_config(compiled: bool, batch: int) -> tuple[float, float | None, int]:
        """pairs/s and peak GB of `steps` training steps after a warmup; everything is freed on return."""
        torch.manual_seed(0)
        model = build_student(student_cfg, store.text_emb.shape[1]).to(device).train()
        forward = torch.compile(model, backend=compile_backend) if compiled else model
        loss_fn = DistillLoss(LossConfig(queue_size=queue)).to(device)
        balancer = LossBalancer(BalancerConfig(), loss_fn.term_names, loss_fn.weights)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
        workers = 4 if cuda else 0
        loader = make_loader(
            images, store, device, batch=batch, workers=workers, placement="auto", n_cache=n_cache, queue=queue
        )
        gen = torch.Generator()
        warmup = 8 if compiled else 3
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for i, hb in enumerate(loader.iterate(0, 0, warmup + steps)):  # the trainer's step, minus logging
            if i == warmup:
                sync()
                t0 = time.perf_counter()
            b = loader.to_device(hb)
            raw = loss_terms(model, forward, loss_fn, b, augment=AugmentConfig(), seed=i, gen=gen, autocast=autocast)
            values = dict(zip(raw, torch.stack([v.detach() for v in raw.values()]).tolist()))
            w = balancer.weights(values)
            sum(w[k] * raw[k] for k in raw).backward()
            del b, raw
            loader.release(hb)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        rate = steps * batch / (time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
        return rate, peak, sum(p.numel() for p in model.parameters())

    results: dict[str, dict[str, float | None]] = {}
    for compiled, batch in configs:
        label = f"batch {batch}, {'compiled' if compiled else 'eager'}"
        if time_left is not None and time_left() < (60 if compiled and cuda else 10):
            rep.add(part, f"pairs/s, {label}", None, "pairs/s", note="not measured: out of this part's time budget")
            continue
        torch._dynamo.reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        try:
            rate, peak, params = one_config(compiled, batch)
        except torch.cuda.OutOfMemoryError:
            rep.add(part, f"pairs/s, {label}", None, "pairs/s", note="out of GPU memory")
            continue
        ref = DISTILL_REFERENCE["compiled" if compiled else "eager"] if cuda else {}
        rep.add(
            part,
            f"pairs/s, {label}",
            rate,
            "pairs/s",
            target=2400 if (cuda and compiled and batch == 256) else None,
            ceiling=ref.get(batch),
            note=f"{params / 1e6:.0f}M parameters, bank on the {device.type}, K = {queue}",
        )
        if peak is not None:
            rep.add(part, f"peak GPU memory, {label}", peak, "GB", target=20 if batch == 64 else None)
        results[label] = {"pairs_per_s": rate, "peak_gb": peak}
    rep.extra(part, "train_step", results)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("data", "gpu"), default=None)
    ap.add_argument("--batches", default="64,128,256")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per configuration (after warmup)")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--cache-images", type=int, default=2048, help="images in the synthetic uint8 cache (224 px)")
    ap.add_argument("--out", type=Path, default=None, help="also save the figures as JSON (bench/_report format)")
    args = ap.parse_args(argv)

    rep = Report.for_this_machine()
    print(f"device: {rep.info['device']} | torch {rep.info.get('torch')}")
    gpu = args.only in (None, "gpu") and cuda_available()
    if args.only in (None, "gpu") and not gpu:
        rep.add(
            "distill",
            "pairs/s at batch 256, compiled",
            None,
            "pairs/s",
            target=2400,
            ceiling=2456,
            note="not measured: no CUDA here",
        )
        rep.skip("distill", "GPU training step: no CUDA")
        if args.only == "gpu":
            return 0
    with tempfile.TemporaryDirectory(prefix="kdpipe-distill-bench-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        store = make_store(root, N_IMAGES, DIM)
        images = make_image_cache(root, args.cache_images)
        print(
            f"inputs: teacher bank {store.n_images:,} + {store.n_captions:,} rows x {DIM} fp16, "
            f"{args.cache_images:,} cached images, written in {time.perf_counter() - t:.1f} s"
        )
        if args.only in (None, "data"):
            bench_data_path(rep, root, store, images, args.cache_images)
        if gpu:
            modes = [False] if args.no_compile else [False, True]
            bench_gpu(
                rep,
                root,
                store,
                images,
                args.cache_images,
                [int(b) for b in args.batches.split(",")],
                args.steps,
                modes,
            )
    if args.out:
        rep.save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
