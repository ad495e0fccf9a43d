"""The evaluate stage's plots and ranks: recall@K curves (PNG and DVC plots data), per-query ranks.

<workdir>/
  metrics.md           the tables of metrics_detail.json (pipeline/evaluate/tables.py)
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
from pipeline.store.ownership import Output

DIRECTIONS = {"i2t": "image-to-text", "t2i": "text-to-image"}
PNG = "recall_at_k.png"
# what replaces plots/: a directory holding nothing but the files write_curves writes
PLOTS = Output(
    "evaluate's plots directory", directory=True, names=frozenset({PNG, *(f"recall_{d}.csv" for d in DIRECTIONS)})
)
RANKS_FILE = Output("evaluate's ranks.npz", recognise=lambda p: _npz_with(p, "image_id", "text_image"))


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


def recall_axis_top(curves: dict[str, dict[str, np.ndarray]]) -> float:
    """The recall axis' upper end: the highest value drawn and 5% more, up to the next multiple of 10 (at most 100),
    so curves that all stay low are spread over the plot instead of lying on top of each other near its floor."""
    peak = max(float(np.max(c[d])) for c in curves.values() for d in DIRECTIONS)
    return float(min(100.0, 10.0 * np.ceil(max(peak, 1e-9) * 1.05 / 10.0))) + 0.5


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
    axes[0].set_ylim(0, recall_axis_top(curves))
    # below the axes, not over them: inside, it covered the students' curves
    handles, labels = axes[0].get_legend_handles_labels()
    ncol = min(len(labels), 5)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    rows = -(-len(labels) // ncol)  # legend rows
    fig.tight_layout(rect=(0, 0.06 * rows + 0.02, 1, 1))
    fig.savefig(path)
    plt.close(fig)
