"""From per-run results to what evaluate reports per model: seeds averaged, their spread, per-group figures,
chance, and each model's paired-bootstrap difference to the reference model (the baseline).

A model is a list of runs (one per training seed; the teacher is one run). Its block holds the seed means of every
metric, `average_score` (the mean of the six recalls, what BEiT-3's code prints) next to `rsum`, and, with several
seeds, `rsum_sd` (sample standard deviation over seeds), `seeds: {run: {recalls, rsum}}` and, with grouped
galleries, `groups: {group: {recalls, rsum}}`. `split_detail` keeps the headline in metrics.json (one row of
`dvc metrics show` that a person can read: recalls, RSUM, spread, RSUM difference to the reference with its
interval) and moves the breakdowns (per seed, per group, the interval of every recall) to metrics_detail.json.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.evaluate.bootstrap import RECALL_KEYS, paired_bootstrap, resample_counts
from pipeline.evaluate.galleries import chance_metrics, group_metrics
from pipeline.evaluate.retrieval import RetrievalRanks

SUMMARY_KEYS = (*RECALL_KEYS, "rsum", "average_score")  # what per-seed and per-group entries keep
DETAIL_KEYS = ("seeds", "groups")  # breakdowns: metrics_detail.json


def with_average(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics with `average_score` = rsum / 6 inserted right after `rsum`."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        out[k] = v
        if k == "rsum":
            out["average_score"] = v / 6
    return out


def _mean(dicts: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([d[k] for d in dicts])) for k in dicts[0]}


def model_block(runs: list[Any], text_image: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, Any]:
    """A model's metrics.json entry from its runs (each with .name, .ranks, .metrics, e.g. a ModelResult): seed
    means, spread and per-seed figures, per-group figures (seed means)."""
    block = with_average(_mean([r.metrics for r in runs]))
    if len(runs) > 1:
        block["rsum_sd"] = float(np.std([r.metrics["rsum"] for r in runs], ddof=1))
        block["seeds"] = {r.name: {k: with_average(r.metrics)[k] for k in SUMMARY_KEYS} for r in runs}
    per_run = [group_metrics(r.ranks, text_image, groups) for r in runs]
    if per_run[0]:
        block["groups"] = {
            g: {k: v for k, v in with_average(_mean([p[g] for p in per_run])).items() if k in SUMMARY_KEYS}
            for g in per_run[0]
        }
    return block


def chance_block(text_image: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, Any]:
    """The expected figures of a random ranking, per group too (no ranks: no interval)."""
    block = with_average(chance_metrics(text_image, groups))
    if len(groups) > 1:
        ti = np.asarray(text_image)
        block["groups"] = {}
        for g, rows in groups.items():
            local = np.full(int(ti.max()) + 1, -1)
            local[rows] = np.arange(len(rows))
            caps = local[ti] >= 0
            block["groups"][g] = with_average(chance_metrics(local[ti[caps]], {g: np.arange(len(rows))}))
    return block


def compare_to_reference(
    models: dict[str, list[RetrievalRanks]], reference: str, text_image: np.ndarray, resamples: int, seed: int
) -> dict[str, dict[str, dict[str, float]]]:
    """{model: {metric: {diff, low, high}}}: each model minus the reference, seed-averaged, 95% paired-bootstrap
    interval; every model is redrawn on the *same* image redraws. Empty when the reference was not evaluated."""
    if reference not in models:
        return {}
    counts = resample_counts(len(models[reference][0].i2t), resamples, seed)
    return {
        m: {k: iv.as_dict() for k, iv in paired_bootstrap(ranks, models[reference], text_image, counts=counts).items()}
        for m, ranks in models.items()
        if m != reference
    }


def split_detail(
    blocks: dict[str, dict[str, Any]], intervals: dict[str, dict[str, Any]], reference: str
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(headline, detail): the blocks without their breakdowns plus `rsum_vs_<reference>` {diff, low, high}, and
    the breakdowns plus `vs_<reference>` (the interval of every recall) of the models that have any."""
    head, detail = {}, {}
    for m, block in blocks.items():
        head[m] = {k: v for k, v in block.items() if k not in DETAIL_KEYS}
        detail[m] = {k: block[k] for k in DETAIL_KEYS if k in block}
        if m in intervals:
            head[m][f"rsum_vs_{reference}"] = intervals[m]["rsum"]
            detail[m][f"vs_{reference}"] = intervals[m]
    return head, {m: d for m, d in detail.items() if d}


__all__ = ["SUMMARY_KEYS", "split_detail", "with_average", "model_block", "chance_block", "compare_to_reference"]
