"""The evaluate stage's report: recall@K curves (PNG and DVC plots data), the Markdown table, per-query ranks.

<workdir>/
  metrics_detail.json  (written by run.py beside metrics.json: per seed, per group, every recall's interval)
  metrics.md           the table: every model's R@1/5/10 both ways, RSUM, average, RSUM minus the reference's with
                       its paired-bootstrap 95% interval, seeds; per-group RSUM; latency and parameters
  ranks.npz            per-query ranks of every run: <run>_i2t [N] (image order, with image_id), <run>_t2i [M]
                       (caption order, with text_image), so anyone can recompute any figure (or see which queries fail)
  plots/
    recall_at_k.png    recall@K, K = 1..curve_max_k, image-to-text and text-to-image side by side, one line per model
    recall_i2t.csv     DVC plots data: k, then one column per model (seed-averaged recall in percent), then chance
    recall_t2i.csv     the same for text-to-image

plots/ is rewritten as a whole (built beside it, then swapped in).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.store.durable import atomic_dir
from pipeline.store.ownership import Output, text_with

DIRECTIONS = {"i2t": "image-to-text", "t2i": "text-to-image"}
PNG = "recall_at_k.png"
# what replaces plots/: a directory holding nothing but the files write_curves writes
PLOTS = Output(
    "evaluate's plots directory", directory=True, names=frozenset({PNG, *(f"recall_{d}.csv" for d in DIRECTIONS)})
)
TABLE_HEADER = "| model | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | RSUM | average "
TABLE_FILE = Output("evaluate's metrics.md", recognise=text_with(TABLE_HEADER))
RANKS_FILE = Output("evaluate's ranks.npz", recognise=lambda p: _npz_with(p, "image_id", "text_image"))
TABLE_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "average_score")


def write_curves(out_dir: Path | str, curves: dict[str, dict[str, np.ndarray]], title: str = "") -> Path:
    """curves: {model: {"i2t": [K], "t2i": [K]}} (chance included): the CSVs and the PNG, swapped in whole."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, PLOTS) as tmp:
        write_curves_csv(tmp, curves)
        plot_recall_curves(curves, tmp / PNG, title=title)
    return out_dir


def write_ranks(path: Path, results: dict[str, list[Any]], image_id: Any, text_image: Any) -> Path:
    """ranks.npz: <run>_i2t and <run>_t2i of every run of every model (results: {model: [ModelResult]})."""
    from pipeline.store.durable import write_file_durably

    arrays = {f"{r.name}_{d}": getattr(r.ranks, d) for rs in results.values() for r in rs for d in DIRECTIONS}
    buf = io.BytesIO()
    np.savez_compressed(
        buf, image_id=np.asarray(image_id, dtype=str), text_image=np.asarray(text_image, dtype=np.int32), **arrays
    )
    write_file_durably(Path(path), buf.getvalue(), RANKS_FILE)
    return Path(path)


def _npz_with(path: Path, *names: str) -> bool:
    """True for an .npz archive holding these arrays (read from its zip directory only)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        return {f"{n}.npy" for n in names} <= set(z.namelist())


def write_curves_csv(out_dir: Path, curves: dict[str, dict[str, np.ndarray]]) -> None:
    """recall_<direction>.csv: columns k, <model>... (DVC: `x: k`, `y: [the model columns]`)."""
    models = list(curves)
    for d in DIRECTIONS:
        ks = len(next(iter(curves.values()))[d])
        lines = [",".join(["k", *models])]
        for k in range(ks):
            lines.append(",".join([str(k + 1), *(f"{curves[m][d][k]:.4f}" for m in models)]))
        (out_dir / f"recall_{d}.csv").write_text("\n".join(lines) + "\n")


def plot_recall_curves(curves: dict[str, dict[str, np.ndarray]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110, sharey=True)
    for ax, (d, label) in zip(axes, DIRECTIONS.items()):
        for i, (name, c) in enumerate(curves.items()):
            ks = np.arange(1, len(c[d]) + 1)
            style = ":" if name == "chance" else "-" if i < 4 else "--"
            ax.plot(ks, c[d], label=name, lw=1.8 if name == "teacher" else 1.4, drawstyle="steps-post", ls=style)
        for k in (1, 5, 10):
            ax.axvline(k, color="gray", lw=0.5, ls=":")
        ax.set_xscale("log")
        ax.set_xticks([1, 2, 5, 10, 20, 50][: sum(1 for k in (1, 2, 5, 10, 20, 50) if k <= len(c[d]))])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("K")
        ax.set_title(f"{label} recall@K")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall (%)")
    axes[0].set_ylim(0, 100.5)
    axes[1].legend(loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def model_names(doc: dict[str, Any]) -> list[str]:
    """The models of a metrics document, in its order (teacher, the trained ones, chance)."""
    return [k for k, v in doc.items() if isinstance(v, dict) and "rsum" in v]


def markdown_table(doc: dict[str, Any], run_info: dict[str, Any] | None = None, detail: dict | None = None) -> str:
    """Every model of metrics.json `doc`: recalls, RSUM, average, the RSUM difference to the reference with its 95%
    interval, seeds (RSUM sd); per-group RSUM (from metrics_detail.json `detail`) when the galleries are grouped;
    then latency and parameters when measured."""
    run_info, detail = run_info or {}, detail or {}
    models = model_names(doc)
    ref = (run_info.get("bootstrap") or {}).get("reference")
    lines = [
        f"{doc['dataset']}, {doc['split']} split: {doc['n_images']:,} images, {doc['n_captions']:,} captions "
        f"(exact search, float32 scores, {run_info.get('tie_rule', 'pessimistic')} ties"
        + (", per-group galleries" if run_info.get("gallery") == "by_directory" else "")
        + ")",
        "",
        TABLE_HEADER + f"| RSUM - {ref or 'reference'} (95% CI) | seeds (RSUM sd) |",
        "|---|" + "---:|" * 10,
    ]
    for m in models:
        r = doc[m]
        iv = r.get(f"rsum_vs_{ref}")
        diff = f"{iv['diff']:+.1f} ({iv['low']:+.1f} .. {iv['high']:+.1f})" if iv else "-"
        n_runs = len((run_info.get("runs") or {}).get(m, [m]))
        seeds = f"{n_runs} ({r['rsum_sd']:.1f})" if "rsum_sd" in r else ("-" if m == "chance" else str(n_runs))
        cells = [f"{r[k]:.1f}" for k in TABLE_KEYS]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {diff} | {seeds} |")
    lines += _group_table(detail, models) + _cost_table(doc, models, run_info)
    return "\n".join(lines) + "\n"


def _group_table(detail: dict[str, Any], models: list[str]) -> list[str]:
    groups = list(detail.get(models[0], {}).get("groups", {})) if models else []
    if not groups:
        return []
    lines = ["", "| RSUM per gallery | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(f"{detail[m]['groups'][g]['rsum']:.1f}" for g in groups) + " |")
    return lines


def _cost_table(doc: dict[str, Any], models: list[str], run_info: dict[str, Any]) -> list[str]:
    lat, params = doc.get("latency"), doc.get("params") or {}
    if not lat and not any(v is not None for v in params.values()):
        return []
    lines = ["", "| model | parameters | s / image | s / caption |", "|---|---:|---:|---:|"]
    for m in (m for m in models if m != "chance"):
        t = (lat or {}).get(m)
        lines.append(f"| {m} | {_count(params.get(m))} | {_sec(t, 'image_s')} | {_sec(t, 'caption_s')} |")
    method = run_info.get("latency_method") or {}
    if lat and method:
        note = f"latency on {method['device']}, {method['dtype']}, batch {method['batch_size']}"
        if lat.get("teacher") is None and method.get("teacher_reason"):
            note += f"; teacher not timed: {method['teacher_reason']}"
        for m, s in (lat.get("speedup") or {}).items():
            note += f"; {m} speed-up {s['image_s']:.3g}x per image, {s['caption_s']:.3g}x per caption"
        lines += ["", note]
    return lines


def _count(p: int | None) -> str:
    if p is None:
        return "-"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if p >= scale:
            return f"{p / scale:.1f}{suffix}"
    return str(p)


def _sec(t: dict | None, key: str) -> str:
    return "-" if not t else f"{t[key]:.4g}"
