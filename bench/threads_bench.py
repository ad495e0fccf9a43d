"""Distill pairs/s on the CPU, idle and beside one busy process, in the same run (issue 13, item 5).

    python bench/threads_bench.py [--steps 16] [--out bench/results/threads.json]

A small student (ViT 64 px / 4 layers + BERT 4 layers, hidden 128) trains on a synthetic workdir through
`kdpipe distill` in a subprocess, six ways: {before (PyTorch's default: a thread per core, OpenMP's
default waiting), a thread per core with passive waiting, kdpipe's runtime default (threads = CPUs -
loader workers, passive waiting)} x {idle, one other CPU-bound process}. The figure is the median pairs/s of the
training log (the first logged row, with the warm-up, left out) and the busy/idle slowdown of each
setting. Target: kdpipe's default at most 2x slower beside a busy process (issue 13 saw 11-17x).
The machine is usually shared: the script prints the load average before each measurement.

Measured 2026-11-24 on the shared 2-core dev box (Intel Xeon), one run (16 steps per measurement), load
average 4.2 at the start and 7.1-7.9 during it from other engineers' work, so "idle" means "without our
extra busy process"; pairs/s idle / busy (slowdown):
    before (2 threads, OpenMP default waiting)      18.7 /  9.4  (2.0x)
    2 threads, passive waiting                      92.2 / 41.8  (2.2x)
    kdpipe default (1 thread + 2 loader threads)   107.5 / 69.3  (1.55x)
kdpipe's default is 5.7x the old default idle and 7.4x beside a busy process, and within the 2x target.
An earlier run on the reliability branch (load 7-13) gave 5.2 / 2.5, 169 / 190 and 119 / 43: on a box
this busy the figures move a lot between runs; rerun on a quiet machine for the target figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HW, DIM, N_TRAIN, CAPS = 64, 32, 256, 2


def make_workdir(root: Path) -> Path:
    """Index, image cache, feature store and a tiny tokenizer; returns the params file."""
    import yaml
    from transformers import BertTokenizer

    from pipeline.data.index import DatasetIndex
    from pipeline.store.features_writer import write_store
    from pipeline.store.image_cache import write_image_cache

    rng = np.random.default_rng(0)
    words = ["a", "photo", "red", "blue", "dog", "cat", "car", "house"]
    rows, captions, pixels, emb = [], [], {}, {}
    for split, n in (("train", N_TRAIN), ("val", 32)):
        first = len(rows)
        rows += [(f"{split}{i}", f"{split}{i}.jpg", split) for i in range(n)]
        captions += [(" ".join(rng.choice(words, 6)), first + i) for i in range(n) for _ in range(CAPS)]
        pixels[split] = rng.integers(0, 256, (n, HW, HW, 3), dtype=np.uint8)
    index = DatasetIndex.from_lists("bench", root / "data", rows, captions)
    index.save(root / "index")
    write_image_cache(root / "images.zarr", pixels, fingerprint=index.fingerprint)
    for split in pixels:
        v = index.split(split)
        emb[split] = {
            "image_emb": rng.normal(size=(v.n_images, DIM)),
            "text_emb": rng.normal(size=(v.n_captions, DIM)),
            "text_image": v.text_image,
            "image_id": v.image_id,
        }
    write_store(
        root / "features.zarr",
        emb,
        teacher={"name": "synthetic"},
        dataset={"name": "bench", "fingerprint": index.fingerprint},
    )
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(vocab=str(root / "vocab.txt")).save_pretrained(root / "tok")
    tower = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 256}
    params = {
        "workdir": str(root),
        "distill": {
            "student": {
                "image": {"image_size": HW, "patch_size": 8, **tower},
                "text": {"tokenizer": str(root / "tok"), "max_position_embeddings": 32, "max_tokens": 12, **tower},
            },
            "epochs": 1,
            "batch_size": 32,
            "loss": {"queue_size": 64},
            "checkpoint_every_steps": 0,
            "eval_every_epochs": 0,
            "select_best_on": "last",
            "log_every_steps": 2,
        },
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


# `python -m stages`, but with torch (and its OpenMP runtime) loaded first, so that OpenMP keeps its own
# default wait policy: what every stage ran with before stages/__init__.py chose PASSIVE
_TORCH_FIRST = "import sys, runpy, torch; sys.argv[0] = 'kdpipe'; runpy.run_module('stages', run_name='__main__')"


def distill_pairs_per_s(params: Path, env: dict[str, str], sets: list[str], torch_first: bool = False) -> float:
    launcher = ["-c", _TORCH_FIRST] if torch_first else ["-m", "stages"]
    cmd = [sys.executable, *launcher, "distill", "--params", str(params), "--no-resume"]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, env=env, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # timings are not in train_log (a DVC output): speed.csv, beside the run's checkpoints
    lines = (params.parent / "checkpoints" / "student" / "speed.csv").read_text().splitlines()
    col = lines[0].split(",").index("pairs_per_s")
    rates = [float(ln.split(",")[col]) for ln in lines[2:]]  # lines[1]: the first window holds the warm-up
    return float(np.median(rates))


def busy_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps per measurement (batch 32)")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
    base_env.update(KDPIPE_PROGRESS="0", KDPIPE_FSYNC="0", PYTHONPATH=str(REPO))
    cpus = len(os.sched_getaffinity(0))
    settings = {
        # what a stage did before: one OpenMP thread per core, OpenMP's default waiting (spin, then sleep)
        "before: torch default": (base_env, [f"runtime.threads={cpus}"], True),
        "all cores, passive wait": (base_env, [f"runtime.threads={cpus}"], False),
        "kdpipe default": (base_env, [], False),  # threads = CPUs - distill.num_workers, passive wait
    }
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        params = make_workdir(Path(tmp))
        sets = [f"distill.epochs={max(1, args.steps * 32 // (N_TRAIN * CAPS))}"]
        for name, (env, extra, torch_first) in settings.items():
            row = figures[name] = {}
            for state in ("idle", "busy"):
                print(f"{name}, {state}: load average {os.getloadavg()[0]:.2f}", flush=True)
                other = busy_process() if state == "busy" else None
                try:
                    time.sleep(0.5 if other else 0)
                    row[state] = distill_pairs_per_s(params, env, sets + extra, torch_first)
                finally:
                    if other is not None:
                        other.kill()
                        other.wait()
            row["slowdown"] = row["idle"] / row["busy"]
            print(f"  {name}: {row['idle']:.1f} pairs/s idle, {row['busy']:.1f} busy ({row['slowdown']:.2f}x)")
    doc = {"cpus": cpus, "load_average_end": os.getloadavg(), "pairs_per_s": figures}
    print(json.dumps(doc, indent=2))
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
