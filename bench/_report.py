"""The benchmarks' shared reporting helper: collect figures, save them as JSON, render the Markdown table.

    rep = Report.for_this_machine()
    rep.add("evaluate", "COCO-5K exact evaluation, 2 CPU threads", 1.21, "s", target=1.5, ceiling=1.27,
            note="torch matmul + top-k, chunked")
    rep.skip("extract", "no CUDA")
    rep.save("bench/results/cpu-xeon-2c.json")        # merges with the parts already in that file

    python bench/_report.py render     # docs/performance.md (+ plots) from every bench/results/*.json

Each figure has a unit and, where the project has one, a target and a reference ceiling (from
`shared/reference/performance.md`, H100 unless the note says otherwise). Whether higher or lower is
better follows from the unit (rates up, times and memory down) unless `better=` says so. A figure is
never a test: the status column only says how it compares.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
DOC = REPO / "docs" / "performance.md"
PLOTS_DIR = REPO / "docs" / "img"
PARTS = ("prepare", "extract", "distill", "feature_store", "evaluate")
# distill step pairs/s of the reference student on one H100 (plain PyTorch, shared/reference/performance.md)
DISTILL_REFERENCE = {"eager": {64: 918, 256: 1720}, "compiled": {64: 1136, 256: 2456}}


# -- machine description -------------------------------------------------------------------------------
def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def machine_info() -> dict:
    """Device name, core count, versions (python, torch, CUDA, numpy, kdpipe commit) and the UTC date."""
    from pipeline.environment import cpu_description  # model name, vendor/family/model, ISA flags

    info = {
        **cpu_description(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(
                gpu=props.name,
                gpu_count=torch.cuda.device_count(),
                gpu_memory_gb=round(props.total_memory / 2**30, 1),
                cuda=torch.version.cuda,
            )
    except ImportError:
        pass
    try:
        import numpy

        info["numpy"] = numpy.__version__
    except ImportError:
        pass
    commit = _git("rev-parse", "--short=12", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", "pipeline", "stages", "bench"))
    info["kdpipe_commit"] = commit + ("+dirty" if dirty and commit else "")
    if hasattr(os, "getloadavg"):  # other work on the machine skews CPU figures: record how busy it was
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    info["date"] = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    info["device"] = info.get("gpu") or f"{info['cpu']} ({info['cpu_cores']} cores)"
    return info


def device_slug(info: dict) -> str:
    """`nvidia-h100-80gb-hbm3` for a GPU, `cpu-<cpu name>-<cores>c` without one."""
    name = info["gpu"] if info.get("gpu") else f"cpu {info['cpu']} {info['cpu_cores']}c"
    name = re.sub(r"\((r|tm)\)|\bprocessor\b", "", name, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# -- the report ----------------------------------------------------------------------------------------
_RATE = re.compile(r"/s$|/s\b|GB/s|TFLOP|x$|%$")


@dataclass
class Figure:
    part: str
    name: str
    value: float | None
    unit: str
    target: float | None = None
    ceiling: float | None = None
    note: str = ""
    better: str = "higher"  # or "lower"

    def status(self) -> str:
        if self.value is None:
            return self.note or "not measured"
        if self.target is None:
            return ""
        ok = self.value >= self.target if self.better == "higher" else self.value <= self.target
        ratio = self.value / self.target if self.target else float("inf")
        if ok:
            return "meets target"
        if self.better == "higher":
            return f"below target ({ratio:.0%} of it)"
        return f"over target (+{ratio - 1:.1%})" if ratio < 2 else f"over target ({ratio:.1f}x)"


@dataclass
class Part:
    date: str
    figures: list[Figure] = field(default_factory=list)
    skipped: str | None = None  # reason the part did not run ("no CUDA", "pipeline.extract not available")
    seconds: float | None = None
    extra: dict = field(default_factory=dict)  # curves and raw data (e.g. distill throughput per batch)


class Report:
    def __init__(self, info: dict | None = None, scale: float | None = None) -> None:
        self.info = info if info is not None else machine_info()
        self.scale = scale
        self.parts: dict[str, Part] = {}

    @classmethod
    def for_this_machine(cls, scale: float | None = None) -> Report:
        return cls(machine_info(), scale)

    def _part(self, part: str) -> Part:
        if part not in self.parts:
            self.parts[part] = Part(date=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"))
        return self.parts[part]

    def add(
        self,
        part: str,
        name: str,
        value: float | None,
        unit: str,
        target: float | None = None,
        ceiling: float | None = None,
        note: str = "",
        better: str | None = None,
    ) -> Figure:
        """Record one figure (value None: listed as not measured, with `note` saying why) and print it."""
        if better is None:
            better = "higher" if _RATE.search(unit) else "lower"
        fig = Figure(part, name, None if value is None else float(value), unit, target, ceiling, note, better)
        self._part(part).figures.append(fig)
        shown = "-" if value is None else f"{_fmt(value)} {unit}"
        tail = "; ".join(x for x in (fig.status(), note if value is not None else "") if x)
        print(f"[{part}] {name}: {shown}" + (f"  ({tail})" if tail else ""), flush=True)
        return fig

    def skip(self, part: str, reason: str) -> None:
        """Say that (some of) a part did not run and why; reasons of several callers accumulate."""
        p = self._part(part)
        p.skipped = f"{p.skipped}; {reason}" if p.skipped and reason not in p.skipped else reason
        print(f"[{part}] skipped: {reason}", flush=True)

    def extra(self, part: str, key: str, value) -> None:
        self._part(part).extra[key] = value

    def timed(self, part: str, seconds: float) -> None:
        self._part(part).seconds = round(seconds, 1)

    # -- files ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"info": self.info, "scale": self.scale, "parts": {k: asdict(v) for k, v in self.parts.items()}}

    def save(self, path: Path | str, merge: bool = True) -> Path:
        """Write JSON; with `merge`, parts already in the file and not run now are kept (for `--only`)."""
        path = Path(path)
        data = self.to_dict()
        if merge and path.exists():
            try:
                old = json.loads(path.read_text())
                kept = {k: v for k, v in old.get("parts", {}).items() if k not in data["parts"]}
                merged = {**kept, **data["parts"]}
                order = [k for k in PARTS if k in merged] + sorted(k for k in merged if k not in PARTS)
                data["parts"] = {k: merged[k] for k in order}
            except (json.JSONDecodeError, OSError):
                pass
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
        return path


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.1:
        return f"{v:.2f}"
    return f"{v:.3g}"


# -- GPU utilisation ----------------------------------------------------------------------------------
class GpuSampler:
    """Samples `nvidia-smi` utilisation and memory every `interval` seconds while the block runs.

    with GpuSampler() as gpu:
        run()
    gpu.mean_util, gpu.max_memory_mb   # None where nvidia-smi is absent
    """

    def __init__(self, interval: float = 0.2, index: int = 0) -> None:
        self.interval, self.index = interval, index
        self.samples: list[tuple[float, float]] = []  # (util %, memory MiB)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _query(self) -> tuple[float, float] | None:
        try:
            out = subprocess.run(
                [
                    "nvidia-smi",
                    f"--id={self.index}",
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
                timeout=5,
            )
            util, mem = out.stdout.strip().splitlines()[0].split(",")
            return float(util), float(mem)
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            s = self._query()
            if s is None:
                return
            self.samples.append(s)
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuSampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def mean_util(self) -> float | None:
        # drop the first and last sample (start-up and tear-down of the measured block)
        s = self.samples[1:-1] or self.samples
        return sum(u for u, _ in s) / len(s) if s else None

    @property
    def max_memory_mb(self) -> float | None:
        return max((m for _, m in self.samples), default=None)


def timeit(fn, *, repeat: int = 5, warmup: int = 1, sync=None) -> tuple[float, float]:
    """(best, median) seconds of `fn()` over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[0], times[len(times) // 2]


# -- rendering ------------------------------------------------------------------------------------------
_PART_TITLES = {
    "prepare": "prepare (JPEG decode + resize into the uint8 image cache)",
    "extract": "extract (teacher over images and captions)",
    "distill": "distill (student training step and its data path)",
    "feature_store": "feature store (memory-mapped teacher rows)",
    "evaluate": "evaluate (exact retrieval scoring)",
}


def run_of(res: dict) -> str:
    """What made a results file: `bench/run --scale S` (the scale) or another command (bench/gpu_check)."""
    return res["info"].get("command") or f"scale {res.get('scale')}x"


def render_markdown(results: list[dict], plots: dict[str, str] | None = None) -> str:
    """The body of docs/performance.md: one section per results file (device), one table per part."""
    plots = plots or {}
    lines = []
    for res in results:
        info = res["info"]
        slug = res.get("_slug") or device_slug(info)
        lines += [f"## {info['device']}", ""]
        versions = ", ".join(f"{k} {info[k]}" for k in ("python", "torch", "cuda", "numpy") if info.get(k))
        lines += [
            f"`bench/results/{slug}.json` - {run_of(res)} - {info['date']} - {versions} - "
            f"kdpipe {info.get('kdpipe_commit') or '?'} - {info.get('cpu_cores')} CPU cores"
            + (f" ({info['cpu']})" if info.get("gpu") else "")
            + (f" - load average {info['load_average_1min']} at the start" if "load_average_1min" in info else ""),
            "",
        ]
        ds = info.get("dataset")
        if ds:
            lines += [
                f"Synthetic dataset: {ds['n_images']:,} JPEGs (mean {ds['jpeg_mean_kb']} KB), {ds['n_captions']:,} "
                f"captions (mean {ds['caption_words_mean']} words).",
                "",
            ]
        lines += ["| part | figure | measured | target | ceiling | status |", "|---|---|---|---|---|---|"]
        notes = []
        for part in [k for k in PARTS if k in res["parts"]] + sorted(k for k in res["parts"] if k not in PARTS):
            p = res["parts"][part]
            if p.get("skipped"):
                lines.append(f"| {part} | - | - | | | skipped: {p['skipped']} |")
            for f in p["figures"]:
                fig = Figure(**f)
                op = ">=" if fig.better == "higher" else "<="
                target = f"{op} {_fmt(fig.target)}" if fig.target is not None else ""
                ceiling = _fmt(fig.ceiling) if fig.ceiling is not None else ""
                measured = f"{_fmt(fig.value)} {fig.unit}" if fig.value is not None else "-"
                status = fig.status() if fig.value is not None else (fig.note or "not measured")
                lines.append(f"| {part} | {fig.name} | {measured} | {target} | {ceiling} | {status} |")
                if fig.note and fig.value is not None:
                    notes.append(f"- {part}, {fig.name}: {fig.note}")
        lines.append("")
        if notes:
            lines += ["Notes:", *notes, ""]
        if slug in plots:
            lines += [f"![distill throughput vs batch size]({plots[slug]})", ""]
    return "\n".join(lines)


KEEP_MARKER = "<!-- kept by bench/_report.py render: hand-run benchmarks below -->"
_DOC_HEAD = """# Performance

What kdpipe measures about itself, next to the targets and the reference ceilings of
`shared/reference/performance.md` (ceilings: plain PyTorch on one H100, bf16, unless a note says
otherwise). Reproduce with one command:

```
bench/run --scale 0.1          # CPU machine: < 10 minutes; GPU parts report "skipped: no CUDA"
bench/run --scale 1            # one H100: Flickr30K-sized, every part
bench/run --only evaluate      # one part; merges into bench/results/<device>.json
bench/gpu_check                # one GPU, < 8 minutes: the GPU figures (section "The GPU check" below)
```

`bench/run` generates the synthetic Flickr30K-shaped dataset first (`bench/make_flickr_like.py`, JPEGs of
realistic size and entropy, 5 captions each of realistic length, Karpathy format), then runs each part
and writes `bench/results/<device>.json`; this page is rendered from those files
(`python bench/_report.py render`). Figures are not tests: nothing fails on speed. A figure marked
"not measured" needs hardware this run did not have.
"""


def plot_distill(res: dict, out: Path) -> bool:
    """Throughput (pairs/s) vs batch size, eager and compiled, from a results file's distill curve."""
    curve = res.get("parts", {}).get("distill", {}).get("extra", {}).get("throughput_vs_batch")
    if not curve:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    batches = set()
    for mode, points in sorted(curve.items()):
        pts = sorted((int(b), v) for b, v in points.items() if v is not None)
        batches |= {b for b, _ in pts}
        if pts:
            ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=f"kdpipe, {mode}")
    for i, pts in enumerate(DISTILL_REFERENCE.values()):  # plain PyTorch on one H100 (performance.md)
        ax.plot(
            list(pts),
            list(pts.values()),
            ls=":",
            marker="x",
            color="gray",
            lw=1,
            label="reference, H100 (eager, compiled)" if i == 0 else None,
        )
    ax.axhline(2400, color="tab:red", ls="--", lw=1, label="target (bs 256, compiled)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(batches | {64, 256}))
    ax.set_xticklabels([str(b) for b in sorted(batches | {64, 256})])
    ax.minorticks_off()
    ax.set_xlabel("batch size (pairs)")
    ax.set_ylabel("pairs / s")
    ax.set_title(f"distill step, {res['info']['device']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return True


def render_docs(results_dir: Path = RESULTS_DIR, doc: Path = DOC) -> Path:
    """Rewrite docs/performance.md (and the plots) from every results file, GPU devices first."""
    results = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            res = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        res["_slug"] = path.stem
        results.append(res)
    results.sort(key=lambda r: (not r["info"].get("gpu"), r["_slug"]))
    plots = {}
    for res in results:
        png = PLOTS_DIR / f"distill_throughput_{res['_slug']}.png"
        if plot_distill(res, png):
            plots[res["_slug"]] = os.path.relpath(png, doc.parent)
    body = render_markdown(results, plots) if results else "No results yet: run `bench/run`.\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    # sections measured by hand-run benchmarks (e.g. bench/deploy_bench.py) sit below the marker and survive
    old = doc.read_text() if doc.is_file() else ""
    kept = old[old.index(KEEP_MARKER) :] if KEEP_MARKER in old else ""
    doc.write_text(_DOC_HEAD + "\n" + body + ("\n" + kept if kept else ""))
    return doc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="render docs/performance.md from bench/results/*.json")
    ap.add_argument("command", choices=["render", "info"])
    args = ap.parse_args(argv)
    if args.command == "info":
        info = machine_info()
        print(json.dumps({**info, "slug": device_slug(info)}, indent=1))
    else:
        print(render_docs())


if __name__ == "__main__":
    sys.exit(main())
