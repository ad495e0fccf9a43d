"""The evaluate stage's plots: recall@K curves (PNG and DVC plots data), the Markdown table, per-query ranks.

plots/
  recall_at_k.png      recall@K, K = 1..curve_max_k, image-to-text and text-to-image side by side, one line per model
  recall_i2t.csv       DVC plots data: k, then one column per model (recall in percent)
  recall_t2i.csv       the same for text-to-image
  metrics.md           the table: R@1/5/10 both ways, RSUM, RSUM relative to the teacher; latency and parameters
  ranks.npz            per-query ranks: <model>_i2t [N] (image order, with image_id), <model>_t2i [M] (caption
                       order, with text_image), so a user can see which queries fail

The directory is rewritten as a whole (built beside it, then swapped in).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.store.durable import fsync_tree, replace_dir

DIRECTIONS = {"i2t": "image-to-text", "t2i": "text-to-image"}


def write_plots(
    out_dir: Path | str,
    results: dict[str, Any],
    doc: dict[str, Any],
    table: str,
    *,
    image_id: np.ndarray | None = None,
    text_image: np.ndarray | None = None,
) -> Path:
    """results: {model: ModelResult} (curves, ranks). image_id None: no ranks.npz."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    curves = {name: r.curves for name, r in results.items()}
    write_curves_csv(tmp, curves)
    plot_recall_curves(
        curves,
        tmp / "recall_at_k.png",
        title=f"{doc['dataset']} {doc['split']}: {doc['n_images']:,} images, {doc['n_captions']:,} captions",
    )
    (tmp / "metrics.md").write_text(table)
    if image_id is not None:
        arrays = {f"{name}_{d}": getattr(r.ranks, d) for name, r in results.items() for d in DIRECTIONS}
        np.savez_compressed(
            tmp / "ranks.npz", image_id=np.asarray(image_id, dtype=str), text_image=np.asarray(text_image), **arrays
        )
    fsync_tree(tmp)
    replace_dir(tmp, out_dir)
    return out_dir


def write_curves_csv(out_dir: Path, curves: dict[str, dict[str, np.ndarray]]) -> None:
    """recall_<direction>.csv: columns k, <model>... (DVC: `x: k`, one line per model column)."""
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
            ax.plot(
                ks,
                c[d],
                label=name,
                lw=1.8 if name == "teacher" else 1.4,
                drawstyle="steps-post",
                ls="-" if i < 4 else "--",
            )
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


def markdown_table(doc: dict[str, Any]) -> str:
    """The metrics of every model in `doc` (teacher first), RSUM relative to the teacher's, then latency and
    parameter counts when measured."""
    models = [k for k, v in doc.items() if isinstance(v, dict) and "rsum" in v]
    teacher_rsum = doc["teacher"]["rsum"] if "teacher" in doc else None
    head = "| model | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | RSUM | RSUM / teacher |"
    lines = [
        f"{doc['dataset']}, {doc['split']} split: {doc['n_images']:,} images, {doc['n_captions']:,} captions "
        f"(exact search, float32 scores, {doc.get('tie_rule', 'pessimistic')} ties)",
        "",
        head,
        "|---|" + "---:|" * 8,
    ]
    for m in models:
        r = doc[m]
        ratio = f"{100 * r['rsum'] / teacher_rsum:.1f}%" if teacher_rsum else "-"
        cells = [f"{r[k]:.1f}" for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {ratio} |")
    lat, params = doc.get("latency"), doc.get("params") or {}
    if lat or any(v is not None for v in params.values()):
        lines += ["", "| model | parameters | s / image | s / caption |", "|---|---:|---:|---:|"]
        for m in models:
            p = params.get(m)
            t = (lat or {}).get(m)
            lines.append(f"| {m} | {_count(p)} | {_sec(t, 'image_s')} | {_sec(t, 'caption_s')} |")
        if lat:
            note = f"latency on {lat['device']}, {lat['dtype']}, batch {lat['batch_size']}"
            if lat.get("teacher") is None and lat.get("teacher_reason"):
                note += f"; teacher not timed: {lat['teacher_reason']}"
            if lat.get("speedup"):
                s = lat["speedup"]
                note += f"; student speed-up {s['image_s']:.3g}x per image, {s['caption_s']:.3g}x per caption"
            lines += ["", note]
    return "\n".join(lines) + "\n"


def _count(p: int | None) -> str:
    if p is None:
        return "-"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if p >= scale:
            return f"{p / scale:.1f}{suffix}"
    return str(p)


def _sec(t: dict | None, key: str) -> str:
    return "-" if not t else f"{t[key]:.4g}"
