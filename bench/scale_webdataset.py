"""kdpipe at scale on a CPU box: a generated webdataset through prepare and extract, measured (issue 23 section 5).

    python bench/scale_webdataset.py --samples 1000000            # ~1.5 GB of shards under --dir
    python bench/scale_webdataset.py --samples 20000 --kill       # + a kill during prepare and during extract

What it does, in --dir (default /tmp/kdpipe-scale; nothing here is committed):
1. writes `--samples` small samples (a 64 px JPEG with a caption .txt) as img2dataset-style tar shards of
   `--shard-size`, 1% of them in a test split (their own shards);
2. builds a tiny CLIP (transformers, random weights, 32 px, width 32) as the `hf` teacher: the teacher's cost
   is not what this measures (the GPU parts of docs/performance.md are), the data path is;
3. runs `kdpipe prepare` (dask LocalCluster of `--workers`, or `--scheduler ADDRESS` of a running dask
   scheduler) and `kdpipe extract` as a user would, each a child process timed with its CPU time and peak
   memory (os.wait4), and measures the disk of shards, index, image cache and feature store;
4. with --kill: kills prepare (SIGKILL) half way and reruns it (prepare starts over: its outputs appear whole or
   not at all), kills extract half way and reruns it (extract resumes from its committed chunks), and checks
   that both outputs equal an uninterrupted run's (index and cache bytes; the store's chunk checksums).

It prints every figure with the load average; it is not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
WORDS = "red green blue small large round square happy sad cat dog bird tree house car boat sun moon star".split()


def _shard(args: tuple[Path, int, int, int, str]) -> int:
    """One tar shard of samples [start, stop): `<key>.jpg` (64 px, a colour field with a random rectangle) and
    `<key>.txt` (a caption of four words), keys as img2dataset writes them."""
    from PIL import Image

    path, start, stop, size, split = args
    rng = np.random.default_rng(start)
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        for i in range(start, stop):
            key = f"{i:09d}"
            pixels = np.empty((size, size, 3), np.uint8)
            pixels[:] = rng.integers(0, 256, 3, dtype=np.uint8)
            y, x = rng.integers(0, size // 2, 2)
            pixels[y : y + size // 2, x : x + size // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
            caption = " ".join(rng.choice(WORDS, 4)).encode()
            for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", caption)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    tmp.rename(path)
    return stop - start


def write_shards(root: Path, samples: int, shard_size: int, size: int, workers: int) -> dict[str, str]:
    """The shards under root/{train,test}/ (kept when already complete); {split: glob}."""
    n_test = max(samples // 100, 1)
    jobs = []
    for split, first, count in (("test", 0, n_test), ("train", n_test, samples - n_test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for k, start in enumerate(range(first, first + count, shard_size)):
            path = root / split / f"{k:05d}.tar"
            if not path.exists():
                jobs.append((path, start, min(start + shard_size, first + count), size, split))
    if jobs:
        t0 = time.perf_counter()
        with ProcessPoolExecutor(workers) as pool:
            written = sum(pool.map(_shard, jobs))
        print(f"  wrote {written:,} samples in {len(jobs)} shards in {time.perf_counter() - t0:.0f} s")
    return {"train": str(root / "train" / "*.tar"), "test": str(root / "test" / "*.tar")}


def tiny_clip(directory: Path) -> Path:
    """A small random CLIP saved as save_pretrained writes a hub model (config, weights, tokenizer, processor)."""
    if (directory / "config.json").exists():
        return directory
    sys.path.insert(0, str(REPO / "tests"))
    from hf_models import tiny_clip as build

    return build(directory)


def run(cmd: list[str], kill_after: float | None = None, env: dict | None = None) -> dict:
    """Run a kdpipe command; its wall time, CPU time (children included) and peak RSS, or kill it (SIGKILL) after
    `kill_after` seconds."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if kill_after is None and code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {code})")
    # ru_maxrss: the largest child's peak (kB); dask workers are children of the child: counted when reaped
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "exit": code,
    }


def disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def digest(path: Path, skip: tuple[str, ...] = ()) -> str:
    """One SHA-256 over the relative names and bytes of every file under path (names in `skip` left out)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not any(s in p.parts for s in skip)):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def params(root: Path, workdir: Path, shards: dict[str, str], teacher: Path, a: argparse.Namespace) -> Path:
    import yaml

    prepare = {
        "dataset": {"name": "scale", "format": "webdataset", "annotations": shards, "image_root": str(root)},
        "image": {"mode": "squash", "crop": 32},
        "cache": {"format": a.cache_format},
        "on_bad_image": "error",
    }
    if a.scheduler:
        prepare["scheduler"] = a.scheduler
    else:
        prepare["workers"] = a.workers
    doc = {
        "workdir": str(workdir),
        "prepare": prepare,
        "extract": {
            "teacher": {"kind": "hf", "hf": {"path": str(teacher)}},
            "device": "cpu",
            "store_dtype": "float16",
            "image_batch_size": 1024,
            "text_batch_size": 4096,
        },
    }
    path = root / f"params-{workdir.name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/kdpipe-scale"))
    ap.add_argument("--workers", type=int, default=2, help="prepare's dask LocalCluster workers")
    ap.add_argument("--scheduler", help="address of a running dask scheduler (instead of a LocalCluster)")
    ap.add_argument("--cache-format", default="raw", choices=["raw", "webp", "jpeg"])
    ap.add_argument("--kill", action="store_true", help="also kill prepare and extract half way and rerun them")
    a = ap.parse_args()

    root = a.dir / f"wds-{a.samples}"
    kdpipe = [sys.executable, "-m", "stages"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "KDPIPE_PROGRESS": "0"}
    print(f"scale run: {a.samples:,} samples, shards of {a.shard_size:,}, {os.cpu_count()} CPUs, {load()}")
    shards = write_shards(root, a.samples, a.shard_size, a.image_size, a.workers)
    teacher = tiny_clip(a.dir / "tiny-clip")
    workdir = root / "work"
    shutil.rmtree(workdir, ignore_errors=True)  # this script's own output
    p = params(root, workdir, shards, teacher, a)
    figures = {"samples": a.samples, "shards_bytes": disk(root / "train") + disk(root / "test")}
    for stage in ("prepare", "extract"):
        print(f"== {stage} ({load()})")
        r = run([*kdpipe, stage, "--params", str(p)], env=env)
        r["per_s"] = a.samples / r["wall_s"]
        r["per_cpu_s"] = a.samples / r["cpu_s"]
        figures[stage] = r
        print(
            f"  {stage}: {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} CPU-s, {r['per_s']:,.0f} samples/s "
            f"({r['per_cpu_s']:,.0f} per CPU-s), peak RSS {r['peak_rss_mb']:,.0f} MB ({load()})"
        )
    for name in ("index", "images.zarr", "features.zarr"):
        figures[f"{name}_bytes"] = disk(workdir / name)
    for key, value in figures.items():
        if key.endswith("_bytes"):
            print(f"  {key[:-6]}: {value / 2**20:,.1f} MiB ({value / a.samples:,.1f} B per sample)")

    if a.kill:
        reference = {name: digest(workdir / name, skip=(".kdpipe",)) for name in ("index", "images.zarr")}
        store_ref = digest(workdir / "features.zarr", skip=(".kdpipe",))
        for stage in ("prepare", "extract"):
            killed = root / f"work-killed-{stage}"
            shutil.rmtree(killed, ignore_errors=True)
            pk = params(root, killed, shards, teacher, a)
            if stage == "extract":  # the killed run's prepare ran whole
                run([*kdpipe, "prepare", "--params", str(pk)], env=env)
            first = run([*kdpipe, stage, "--params", str(pk)], kill_after=figures[stage]["wall_s"] / 2, env=env)
            again = run([*kdpipe, stage, "--params", str(pk)], env=env)
            same = (
                all(digest(killed / n, skip=(".kdpipe",)) == reference[n] for n in reference)
                if stage == "prepare"
                else digest(killed / "features.zarr", skip=(".kdpipe",)) == store_ref
            )
            print(
                f"  {stage} killed after {first['wall_s']:.0f} s (exit {first['exit']}), rerun {again['wall_s']:.0f} s "
                f"(uninterrupted {figures[stage]['wall_s']:.0f} s): outputs {'identical' if same else 'DIFFER'}"
            )
            figures[f"{stage}_killed"] = {"killed_after_s": first["wall_s"], "rerun_s": again["wall_s"], "same": same}
    out = a.dir / f"scale-{a.samples}.json"
    out.write_text(json.dumps({**figures, "load_at_end": os.getloadavg()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
