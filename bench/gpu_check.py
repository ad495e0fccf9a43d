"""The first minutes on a GPU: one command, under 8 minutes on one GPU, every figure kdpipe needs from it.

    bench/gpu_check                    # one CUDA GPU: bench/results/gpu-check-<gpu>.json + docs/performance.md
    bench/gpu_check --only teacher     # one part (repeatable); merges into the same results file
    bench/gpu_check --dry              # every part at toy size on the CPU (tests/test_gpu_check.py runs it)

Parts, in this order (the cheap ones first), each with its own time budget on one GPU:
  evaluate  COCO-5K exact evaluation (5,000 x 25,010 x 1024) on the GPU, and its ranks against the naive
            full-matrix implementation (bench/evaluate_bench.py)
  nccl      a one-process NCCL group: the DSMD student's training step through DDP and GatherRows (the branch a
            multi-GPU run takes) against the plain step: time, and the gradients' difference
  mine      `kdpipe mine` (the teacher's top-K neighbours, exact) at Flickr30K size: 31,783 x 158,915, D = 1024
  teacher   BEiT-3 base / large / giant at 224 px, random weights, bf16: images/s, captions/s, peak memory
            (bench/teacher_gpu.py), and how far bf16 moves the embeddings from float32
  distill   the DSMD student (ViT-B/16 + BERT-base, 224 px) training step, bf16, batch 64 / 128 / 256, eager and
            torch.compile: pairs/s and peak memory (the 4090 budget: <= 20 GB at batch 64; bench/distill_bench.py)

A part that would overrun its budget is stopped there (its figures so far are kept); the whole run stops before
TOTAL_S; the results file is written after every part, so a run cut short keeps what it finished. A part that
fails is reported and the others still run (exit code 1).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from functools import cached_property
from pathlib import Path

START = time.monotonic()  # the budget counts from here: importing torch and starting CUDA are part of the run
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from _report import RESULTS_DIR, Report, device_slug, render_docs, timeit  # noqa: E402

TOTAL_S = 450.0  # 7.5 minutes: under 8 with the interpreter's start and the final write
MIN_START_S = 5.0  # a part is not started with less time than this left (nor than its budget, if smaller)
FLICKR = (31_783, 1024)  # images (x 5 captions: 158,915) and teacher dimension


class PartStopped(BaseException):
    """Raised in a part that ran past its budget (a BaseException: no `except Exception` in the code it runs
    swallows it)."""


@dataclass
class Check:
    """What every part gets: the report, toy or real sizes, the device, a scratch directory, its deadline."""

    rep: Report
    dry: bool
    work: Path
    deadline: float = float("inf")  # time.monotonic() by which the running part must end
    _stores: dict = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def size(self, real, toy):
        """`real` on a GPU, `toy` in a dry run."""
        return toy if self.dry else real

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def bank(self, n_images: int, dim: int):
        """A complete feature store of random unit rows, train split only, 5 captions per image (distill_bench's),
        written once per size: (its path, its train split)."""
        import distill_bench

        if (n_images, dim) not in self._stores:
            root = self.work / f"bank_{n_images}x{dim}"
            root.mkdir()
            self._stores[n_images, dim] = (root / "features.zarr", distill_bench.make_store(root, n_images, dim))
        return self._stores[n_images, dim]

    @cached_property
    def image_cache(self):
        """uint8 images at the student's resolution (prepare's format), fewer than the bank's: rows are reused."""
        import distill_bench

        root = self.work / "images"
        root.mkdir()
        return distill_bench.make_image_cache(root, self.size(2048, 16), size=self.size(224, 32))

    @cached_property
    def student(self):
        """The DSMD student (ViT-B/16 + BERT-base, random init); a dry run's is two tiny towers."""
        import distill_bench

        from pipeline.towers.image import ImageTowerConfig
        from pipeline.towers.student import StudentConfig
        from pipeline.towers.text import TextTowerConfig

        if not self.dry:
            return distill_bench.default_student_config(self.work)
        tiny = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
        return StudentConfig(
            image=ImageTowerConfig(image_size=32, patch_size=8, **tiny),
            text=TextTowerConfig(
                tokenizer=distill_bench.uncased_tokenizer(self.work), max_position_embeddings=32, **tiny
            ),
        )


# ---------------------------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------------------------
def part_evaluate(c: Check) -> None:
    import evaluate_bench

    n = c.size(5000, 200)
    img, txt, ti = evaluate_bench.coco5k(d=c.size(1024, 64), n_images=n)
    what = c.size("COCO-5K", f"{n:,} x {len(ti):,}")
    ref = evaluate_bench.naive_ranks(img, txt, ti, device=c.device)  # the whole score matrix, two full argsorts
    differ = evaluate_bench.bench_device(c.rep, img, txt, ti, ref, c.device, what)
    c.rep.add("evaluate", f"{what}: query ranks that differ from the naive implementation", differ, "queries", target=0)


def part_nccl(c: Check) -> None:
    """One process, one GPU (NCCL cannot put two ranks on one device): every collective of a multi-GPU step runs,
    over a group of one, and its gradients must be the plain step's."""
    import distill_bench
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pipeline.distill.config import AugmentConfig
    from pipeline.distill.distributed import average_gradients
    from pipeline.distill.forward import loss_terms
    from pipeline.distill.losses import DistillLoss, LossConfig
    from pipeline.towers.student import build_student

    cuda = c.device == "cuda"
    backend, device = ("nccl", torch.device("cuda", 0)) if cuda else ("gloo", torch.device("cpu"))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.set_device(device)
    t = time.perf_counter()
    dist.init_process_group(
        backend, init_method=f"file://{c.work / 'group'}", rank=0, world_size=1, timeout=timedelta(seconds=60)
    )
    c.rep.add("nccl", f"init_process_group({backend!r}), one process", time.perf_counter() - t, "s")
    try:
        _, store = c.bank(c.size(4096, 64), c.size(1024, 32))
        batch, queue = c.size(64, 8), c.size(8192, 32)
        loader = distill_bench.make_loader(
            c.image_cache, store, device, batch=batch, workers=0, placement="auto", n_cache=len(c.image_cache),
            queue=queue,
        )  # fmt: skip
        hb = next(iter(loader.iterate(0, 0, 1)))
        b = loader.to_device(hb)
        torch.manual_seed(0)
        model = build_student(c.student, store.text_emb.shape[1]).to(device).train()
        loss_fn = DistillLoss(LossConfig(queue_size=queue)).to(device)
        ddp = DDP(model, device_ids=[device.index] if cuda else None)  # as pipeline/distill/run.py wraps it

        def step(forward, world: int) -> dict:
            """Forward (bf16 autocast) and backward of the batch; the gradients. world > 1: the branches of a
            multi-GPU step (GatherRows for the in-batch terms, the loss module's own gradients averaged), here
            over the group of one."""
            model.zero_grad(set_to_none=True)
            loss_fn.zero_grad(set_to_none=True)
            torch.manual_seed(1)  # the same dropout masks in both steps
            raw = loss_terms(
                model, forward, loss_fn, b, augment=AugmentConfig(), seed=0, gen=torch.Generator(), world=world,
                autocast=lambda: torch.autocast(device.type, dtype=torch.bfloat16),
            )  # fmt: skip
            sum(raw.values()).backward()
            if world > 1:
                average_gradients(loss_fn.parameters(), dist.get_world_size())
            sync()
            params = [*model.named_parameters(), *(("loss." + n, p) for n, p in loss_fn.named_parameters())]
            return {n: p.grad.detach().clone() for n, p in params if p.grad is not None}

        plain, spread = step(model, 1), step(ddp, 2)
        assert plain.keys() == spread.keys(), "the distributed step trained other parameters"
        scale = max(g.abs().max().item() for g in plain.values())
        worst = max((plain[n] - spread[n]).abs().max().item() for n in plain) / scale
        c.rep.add(
            "nccl",
            "gradients of the DDP + GatherRows step vs the plain step",
            worst,
            "of max |grad|",
            target=1e-5,
            better="lower",
            note=f"largest difference over {len(plain)} parameter tensors, relative to the largest gradient",
        )
        for label, forward, world in (("plain step", model, 1), (f"DDP + GatherRows over {backend}", ddp, 2)):
            best, _ = timeit(lambda f=forward, w=world: step(f, w), repeat=c.size(5, 2), warmup=1)
            c.rep.add("nccl", f"forward + backward, batch {batch}, {label}", best * 1e3, "ms")
        dist.barrier(**({"device_ids": [device.index]} if cuda else {}))  # as stages/distill.py ends a run
    finally:
        dist.destroy_process_group()


def mine_neighbours(store: Path, out: Path, *, k: int, device: str):
    """The adapter to `kdpipe mine` (pipeline/mine/, from the knowledge-store branch): its result, or None where
    that stage is not in this checkout yet. The one place to change if its interface does."""
    if importlib.util.find_spec("pipeline.mine") is None:
        return None
    from pipeline.mine.run import MineConfig, run_mine  # present but broken: the part fails, loudly

    return run_mine(store, MineConfig(k=k, device=device), out)


def part_mine(c: Check) -> None:
    n, dim = c.size(FLICKR, (64, 32))
    k = c.size(32, 4)
    t = time.perf_counter()
    path, store = c.bank(n, dim)
    made = time.perf_counter() - t
    what = f"{store.n_images:,} images x {store.n_captions:,} captions, D = {dim}, top-{k}"
    t = time.perf_counter()
    result = mine_neighbours(path, c.work / "mined.zarr", k=k, device=c.device)
    if result is None:
        c.rep.add("mine", f"kdpipe mine, {what}", None, "s", note="not measured: `kdpipe mine` is not in this checkout")
        return
    c.rep.add(
        "mine",
        f"kdpipe mine, {what}",
        time.perf_counter() - t,
        "s",
        target=c.size(60, None),
        note=f"exact, both directions, written to a mined store (the bank took {made:.1f} s to write); "
        "target: shared/reference/performance.md's 60 s on 2 CPU cores, 'seconds on one GPU'",
    )


def toy_dims(dims):
    """A preset's shape in miniature (its patch size kept): the code paths without the cost."""
    return replace(
        dims, embed_dim=32, depth=2, num_heads=2, ffn_dim=64, image_size=2 * dims.patch_size, vocab_size=1000
    )


def part_teacher(c: Check) -> None:
    import teacher_gpu
    import torch

    from pipeline.teachers.beit3_model import BEIT3_PRESETS

    if not c.dry:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ceilings = {"giant": (890, 3760)}  # shared/reference/performance.md, model only, one H100
    for name in ("base", "large", "giant"):
        label = c.size(f"{name}-224", f"{name} (toy)")
        if c.left() < c.size(25, 1):
            c.rep.add("teacher", f"{label}: images/s", None, "images/s", note="not measured: out of the part's budget")
            continue
        dims = BEIT3_PRESETS[name] if not c.dry else toy_dims(BEIT3_PRESETS[name])
        r = teacher_gpu.run(
            label, c.size(256, 4), c.size(1024, 8), c.size(4.0, 0.01), torch.bfloat16, device=c.device, dims=dims
        )
        img_ceiling, cap_ceiling = ceilings.get(name, (None, None))
        c.rep.add(
            "teacher",
            f"{label}: images/s, model only ({r['dtype']}, batch {r['image_batch']})",
            r["images_per_s"],
            "images/s",
            ceiling=c.size(img_ceiling, None),
            note=f"{r['params']:,} parameters, random weights"
            + (f", peak {r['image_peak_gb']:.1f} GB" if r["image_peak_gb"] == r["image_peak_gb"] else ""),
        )
        for n_tok in teacher_gpu.CAPTION_TOKENS:
            c.rep.add(
                "teacher",
                f"{label}: captions/s, model only ({n_tok} tokens, batch {r['text_batch']})",
                r[f"captions_per_s_{n_tok}tok"],
                "captions/s",
                ceiling=c.size(cap_ceiling, None) if n_tok == 64 else None,
            )
        a = teacher_gpu.agreement(dims, torch.bfloat16, c.device, n_images=c.size(32, 4), n_captions=c.size(128, 8))
        for kind, n in (("image", a["n_images"]), ("text", a["n_captions"])):
            c.rep.add(
                "teacher",
                f"{label}: {kind} embeddings, bf16 autocast vs float32, min cosine",
                a[f"{kind}_min_cos"],
                "cosine",
                better="higher",
                note=f"same weights and inputs, {n} rows; mean {a[f'{kind}_mean_cos']:.6f}",
            )


def part_distill(c: Check) -> None:
    import distill_bench
    import torch

    _, store = c.bank(*c.size(FLICKR, (64, 32)))
    if not c.dry:
        torch.set_float32_matmul_precision("high")
    # the figures that matter first: the 4090's memory budget (batch 64), the target (batch 256 compiled)
    configs = c.size(
        [(False, 64), (True, 256), (False, 256), (True, 64), (False, 128), (True, 128)], [(False, 8), (True, 8)]
    )
    distill_bench.bench_train_step(
        c.rep,
        store,
        c.image_cache,
        len(c.image_cache),
        configs,
        c.size(20, 2),
        c.student,
        torch.device(c.device),
        queue=c.size(distill_bench.QUEUE, 32),
        compile_backend=c.size("inductor", "eager"),  # a dry run traces with dynamo but compiles no kernels
        time_left=c.left,
    )


# name -> (seconds it may take on one GPU, function); run in this order
PARTS: dict[str, tuple[float, Callable[[Check], None]]] = {
    "evaluate": (20, part_evaluate),
    "nccl": (40, part_nccl),
    "mine": (60, part_mine),
    "teacher": (100, part_teacher),
    "distill": (220, part_distill),
}


# ---------------------------------------------------------------------------------------------------------------
# Running them within the budgets
# ---------------------------------------------------------------------------------------------------------------
@contextmanager
def stopped_after(seconds: float) -> Iterator[None]:
    """Raise PartStopped in the block once `seconds` have passed (SIGALRM: the main thread, between bytecodes)."""

    def stop(signum, frame):
        raise PartStopped

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_parts(c: Check, names: list[str], deadline: float, out: Path | None) -> list[str]:
    """Run `names` in order, each until its budget or `deadline` (time.monotonic()), whichever comes first; write
    the results after each. Returns the parts that failed."""
    failed = []
    for name in names:
        budget, run = PARTS[name]
        left = deadline - time.monotonic()
        if left < min(budget, MIN_START_S):
            c.rep.skip(name, "not run: the check's time was spent")
            continue
        c.deadline = time.monotonic() + min(budget, left)
        print(f"== {name} (budget {min(budget, left):.0f} s)", flush=True)
        t, cpu = time.perf_counter(), time.process_time()
        try:
            with stopped_after(c.left()):
                run(c)
        except PartStopped:
            c.rep.skip(name, f"stopped at its budget ({time.perf_counter() - t:.0f} s); the figures before it are kept")
        except Exception as err:  # one part failing must not lose the others' figures
            traceback.print_exc()
            c.rep.skip(name, f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
            failed.append(name)
        finally:
            free_memory()
        c.rep.timed(name, time.perf_counter() - t)
        print(f"== {name}: {time.perf_counter() - t:.1f} s, {time.process_time() - cpu:.1f} s of CPU", flush=True)
        if out is not None:
            c.rep.save(out)
    return failed


def free_memory() -> None:
    """What a part leaves behind (models, compiled graphs, cached GPU blocks) before the next one."""
    gc.collect()
    torch = sys.modules.get("torch")
    if "torch._dynamo" in sys.modules:  # only when a part compiled: importing it takes seconds
        torch._dynamo.reset()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="every part at toy size on the CPU (seconds)")
    ap.add_argument("--only", action="append", choices=list(PARTS), help="run only this part (repeatable)")
    ap.add_argument("--out", type=Path, help="results JSON (default: bench/results/gpu-check-<gpu>.json; --dry: none)")
    ap.add_argument("--no-docs", action="store_true", help="do not re-render docs/performance.md")
    ap.add_argument("--total", type=float, default=TOTAL_S, help=f"seconds for the whole run (default {TOTAL_S:.0f})")
    args = ap.parse_args(argv)

    import torch

    if args.dry:  # toy ops: a second thread only waits for its turn on a busy machine (tests/conftest.py)
        torch.set_num_threads(1)
    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine; `bench/gpu_check --dry` runs every part at toy size on the CPU")
        return 0
    rep = Report.for_this_machine()
    rep.info["command"] = "bench/gpu_check" + (" --dry" if args.dry else "")
    out = args.out or (None if args.dry else RESULTS_DIR / f"gpu-check-{device_slug(rep.info)}.json")
    print(f"gpu_check: {rep.info['device']} | torch {rep.info.get('torch')} | kdpipe {rep.info['kdpipe_commit']}")
    with tempfile.TemporaryDirectory(prefix="kdpipe-gpu-check-") as tmp:
        check = Check(rep, args.dry, Path(tmp))
        failed = run_parts(check, args.only or list(PARTS), START + args.total, out)
    if out is not None:
        print(f"results: {out}")
        if not args.dry and not args.no_docs:
            print(f"docs: {render_docs()}")
    print(
        f"gpu_check: {time.monotonic() - START:.0f} s" + (f"; failed parts: {', '.join(failed)}" if failed else ""),
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
