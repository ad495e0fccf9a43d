"""What the evaluate stage writes, and what each of those paths may replace (pipeline/store/ownership.py):
metrics.json (or `--out FILE`), the documents written beside it and plots/, each known as evaluate's own by its
contents; run_evaluate claims them all before any work."""

from __future__ import annotations

from pathlib import Path

from pipeline.evaluate.plots import PLOTS, RANKS_FILE
from pipeline.evaluate.tables import RECALL_HEADER
from pipeline.paths import ArtifactPaths
from pipeline.store.ownership import Output, json_with_keys, text_with

TABLE, RANKS = "metrics.md", "ranks.npz"  # beside metrics.json (or --out): the Markdown table, every run's ranks

# the headline (metrics.json) or, with --features, the whole record; metrics_detail.json: the whole record
METRICS_FILE = Output("a metrics file", recognise=json_with_keys("dataset", "split"))
DETAIL_FILE = Output("evaluate's metrics_detail.json", recognise=json_with_keys("dataset", "split", "n_images"))
RUN_INFO_FILE = Output("evaluate's run_info.json", recognise=json_with_keys("tie_rule", "environment"))
TABLE_FILE = Output("evaluate's metrics.md", recognise=text_with("| " + " | ".join(RECALL_HEADER) + " |"))


def evaluate_outputs(paths: ArtifactPaths, write_ranks: bool, metrics_path: Path | None = None) -> dict[Path, Output]:
    """Every path `run_evaluate` writes, with the kind of output each may replace."""
    metrics = Path(metrics_path or paths.metrics)
    outputs = {
        metrics: METRICS_FILE,
        metrics.with_name(paths.metrics_detail.name): DETAIL_FILE,
        metrics.with_name(paths.run_info.name): RUN_INFO_FILE,
        metrics.with_name(TABLE): TABLE_FILE,
        paths.plots: PLOTS,
    }
    if write_ranks:
        outputs[metrics.with_name(RANKS)] = RANKS_FILE
    return outputs


__all__ = ["TABLE", "RANKS", "METRICS_FILE", "DETAIL_FILE", "RUN_INFO_FILE", "TABLE_FILE", "evaluate_outputs"]
