"""What the evaluate stage writes, and what each of those paths may replace (pipeline/store/ownership.py):
metrics.json (or `--out FILE`), the documents written beside it and plots/, each known as evaluate's own by its
contents; run_evaluate claims them all before any work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.evaluate.plots import PLOTS, RANKS_FILE, TABLE_FILE
from pipeline.evaluate.summary import DETAIL_KEYS
from pipeline.paths import ArtifactPaths
from pipeline.store.ownership import Output, json_with_keys, read_small

# beside metrics.json (or --out): the breakdowns, the Markdown table, every run's per-query ranks
DETAIL, TABLE, RANKS = "metrics_detail.json", "metrics.md", "ranks.npz"


def _is_detail(doc: Any) -> bool:
    """metrics_detail.json: {model: {breakdown or vs_<reference>: ...}} (empty when no model has a breakdown)."""
    return isinstance(doc, dict) and all(
        isinstance(v, dict) and all(k in DETAIL_KEYS or k.startswith("vs_") for k in v) for v in doc.values()
    )


METRICS_FILE = Output("a metrics file", recognise=json_with_keys("split", "n_images", "n_captions"))
DETAIL_FILE = Output("evaluate's metrics_detail.json", recognise=lambda p: _is_detail(json.loads(read_small(p))))
RUN_INFO_FILE = Output("evaluate's run_info.json", recognise=json_with_keys("tie_rule", "environment"))


def evaluate_outputs(paths: ArtifactPaths, write_ranks: bool, metrics_path: Path | None = None) -> dict[Path, Output]:
    """Every path `run_evaluate` writes, with the kind of output each may replace."""
    metrics = Path(metrics_path or paths.metrics)
    outputs = {
        metrics: METRICS_FILE,
        metrics.with_name(DETAIL): DETAIL_FILE,
        metrics.with_name(paths.run_info.name): RUN_INFO_FILE,
        metrics.with_name(TABLE): TABLE_FILE,
        paths.plots: PLOTS,
    }
    if write_ranks:
        outputs[metrics.with_name(RANKS)] = RANKS_FILE
    return outputs


__all__ = ["DETAIL", "TABLE", "RANKS", "METRICS_FILE", "DETAIL_FILE", "RUN_INFO_FILE", "evaluate_outputs"]
