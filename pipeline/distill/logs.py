"""The run's logs and plots: train_log.csv and val_log.csv in the student directory (`CsvLog`; a resume rewrites
them from the rows its checkpoint holds), speed.csv (pairs/s) in the checkpoint directory, the running means of
a train_log row (`Meter`), and plots/training.png drawn from the two logs.

No file of the student directory holds a timing: it is a DVC output, which a resumed run must leave exactly as
an uninterrupted one does, and which must not change when a run is redone on the same inputs.
"""

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
SPEED_COLUMNS = ["step", "epoch", "pairs_per_s"]


class CsvLog:
    """An append-only CSV with a fixed header, started over with `rows` (the lines written before a resume)."""

    def __init__(self, path: Path, columns: list[str], rows: Iterable[str] = ()) -> None:
        self.path, self.columns, self.rows = path, columns, list(rows)
        # written whole: a failure here leaves the previous log, not half of it
        write_text_durably(path, "".join(line + "\n" for line in [",".join(columns), *self.rows]))

    def write(self, values: dict[str, Any]) -> None:
        def fmt(v: Any) -> str:
            return f"{v:.6g}" if isinstance(v, float) else str(v)

        line = ",".join(fmt(values.get(c, "")) for c in self.columns)
        self.rows.append(line)
        with self.path.open("a") as f:
            f.write(line + "\n")


def train_columns(term_names: Iterable[str], extra_columns: Iterable[str] = ()) -> list[str]:
    terms = list(term_names)
    return ["step", "epoch", "lr", "loss", *terms, *[f"w_{t}" for t in terms], *extra_columns]


def open_logs(
    out_dir: Path,
    term_names: Iterable[str],
    rows: dict[str, list[str]] | None = None,
    extra_columns: Iterable[str] = (),
) -> tuple[CsvLog, CsvLog]:
    """train_log.csv and val_log.csv of a run, holding `rows` ({"train": [...], "val": [...]}: a checkpoint's).
    `extra_columns`: more train_log columns (a learned student temperature)."""
    rows = rows or {}
    return (
        CsvLog(out_dir / "train_log.csv", train_columns(term_names, extra_columns), rows.get("train", ())),
        CsvLog(out_dir / "val_log.csv", VAL_COLUMNS, rows.get("val", ())),
    )


def open_speed_log(path: Path, state: TrainState) -> CsvLog:
    """speed.csv: pairs/s of each train_log row; on resume its rows up to the checkpoint's step are kept."""
    kept: list[str] = []
    if state.global_step > 0 and path.is_file():
        lines = path.read_text().splitlines()
        if lines and lines[0].split(",") == SPEED_COLUMNS:
            kept = [ln for ln in lines[1:] if ln and float(ln.split(",")[0]) <= state.global_step]
    return CsvLog(path, SPEED_COLUMNS, kept)


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

    def flush(self, row: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """(`row` plus the means since the last flush, the pairs/s since then); starts new sums."""
        now = time.perf_counter()
        rate = self.pairs / max(now - self.t_log, 1e-9)
        row = {**row, **{k: v / self.n for k, v in self.acc.items()}}
        self.acc, self.n, self.pairs, self.t_log = {}, 0, 0, now
        return row, rate

    def pairs_per_s(self) -> float:
        elapsed = time.perf_counter() - self.t_start
        return self.pairs_done / elapsed if elapsed > 0 else 0.0
