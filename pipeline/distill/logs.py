"""The run's logs and plots: train_log.csv and val_log.csv (`CsvLog`, cut back to the checkpoint on resume),
the running means of a train_log row (`Meter`), and plots/training.png drawn from the two logs."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.distill.checkpoints import TrainState
from pipeline.store.durable import atomic_path, write_text_durably

VAL_COLUMNS = ["epoch", "step", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]
VAL_COLUMNS += ["i2t_medr", "t2i_medr", "teacher_cos_image", "teacher_cos_text"]


class CsvLog:
    """An append-only CSV with a fixed header; on resume, rows past the checkpoint are dropped first."""

    def __init__(self, path: Path, columns: list[str], *, keep_until: float | None, key: str) -> None:
        self.path, self.columns = path, columns
        rows: list[str] = []
        if keep_until is not None and path.is_file():
            lines = path.read_text().splitlines()
            if lines and lines[0].split(",") == columns:
                k = columns.index(key)
                rows = [ln for ln in lines[1:] if ln and float(ln.split(",")[k]) <= keep_until]
        # the cut-back log replaces the old one whole: a failure here leaves the previous log, not half of it
        write_text_durably(path, ",".join(columns) + "\n" + "".join(r + "\n" for r in rows))

    def write(self, values: dict[str, Any]) -> None:
        def fmt(v: Any) -> str:
            return f"{v:.6g}" if isinstance(v, float) else str(v)

        with self.path.open("a") as f:
            f.write(",".join(fmt(values.get(c, "")) for c in self.columns) + "\n")


def open_logs(
    out_dir: Path, term_names: Iterable[str], state: TrainState, extra_columns: Iterable[str] = ()
) -> tuple[CsvLog, CsvLog]:
    """train_log.csv and val_log.csv of a run at `state`, cut back to the checkpoint's position on resume.
    `extra_columns`: more train_log columns (a learned student temperature)."""
    resumed = state.global_step > 0 or state.epoch > 0
    term_cols = list(term_names)
    train_log = CsvLog(
        out_dir / "train_log.csv",
        ["step", "epoch", "lr", "pairs_per_s", "loss", *term_cols, *[f"w_{t}" for t in term_cols], *extra_columns],
        keep_until=state.global_step if resumed else None,
        key="step",
    )
    val_log = CsvLog(out_dir / "val_log.csv", VAL_COLUMNS, keep_until=state.epoch if resumed else None, key="epoch")
    return train_log, val_log


def read_csv(path: Path) -> dict[str, np.ndarray]:
    lines = path.read_text().splitlines() if path.is_file() else []
    if len(lines) < 2:
        return {}
    cols = lines[0].split(",")
    data = np.array([[float(x) if x else np.nan for x in ln.split(",")] for ln in lines[1:]], dtype=float)
    return {c: data[:, i] for i, c in enumerate(cols)}


def plot_training(out_dir: Path) -> Path | None:
    """plots/training.png: raw loss terms (log), weights (log), lr, val RSUM per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_csv(out_dir / "train_log.csv"), read_csv(out_dir / "val_log.csv")
    if not train:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    step = train["step"]
    for name in [c for c in train if c.endswith("_loss") and not c.startswith("w_")]:
        axes[0, 0].plot(step, train[name], label=name)
    axes[0, 0].set(title="raw loss terms", xlabel="step", yscale="log")
    for name in [c for c in train if c.startswith("w_")]:
        axes[0, 1].plot(step, train[name], label=name[2:])
    axes[0, 1].set(title="balancer weights", xlabel="step", yscale="log")
    axes[1, 0].plot(step, train["lr"], color="k")
    axes[1, 0].set(title="learning rate", xlabel="step")
    if val:
        axes[1, 1].plot(val["epoch"], val["rsum"], "o-", label="val RSUM")
        axes[1, 1].set(title="val RSUM", xlabel="epoch")
    else:
        axes[1, 1].set(title="val RSUM (no evaluation yet)")
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "plots" / "training.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


@dataclass
class Meter:
    """Running sums of the logged values since the last train_log row, and the session's throughput."""

    acc: dict[str, float] = field(default_factory=dict)
    n: int = 0
    pairs: int = 0
    t_log: float = field(default_factory=time.perf_counter)
    t_start: float = field(default_factory=time.perf_counter)
    t_epoch: float = field(default_factory=time.perf_counter)
    pairs_done: int = 0  # pairs trained on in this session (pairs/s of the result)

    def add(self, values: dict[str, float], weights: dict[str, float], pairs: int) -> None:
        for k, v in values.items():
            self.acc[k] = self.acc.get(k, 0.0) + v
        self.acc["loss"] = self.acc.get("loss", 0.0) + sum(weights[k] * values[k] for k in values)
        self.n += 1
        self.pairs += pairs

    def flush(self, row: dict[str, Any]) -> dict[str, Any]:
        """`row` plus pairs/s and the means since the last flush; starts new sums."""
        now = time.perf_counter()
        row = {**row, "pairs_per_s": self.pairs / max(now - self.t_log, 1e-9)}
        row.update({k: v / self.n for k, v in self.acc.items()})
        self.acc, self.n, self.pairs, self.t_log = {}, 0, 0, now
        return row

    def pairs_per_s(self) -> float:
        elapsed = time.perf_counter() - self.t_start
        return self.pairs_done / elapsed if elapsed > 0 else 0.0
