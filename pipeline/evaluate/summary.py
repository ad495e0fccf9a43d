"""From per-run results to what evaluate reports per model: seeds averaged, their spread, per-group figures,
chance, and each model's paired-bootstrap difference to each reference model (distill.runs.compare_to).

A model is a list of runs (one per training seed; the teacher is one run). Its block holds the seed means of every
metric, `average_score` (the mean of the six recalls, what BEiT-3's code prints) next to `rsum`, and, with several
seeds, `rsum_sd` (sample standard deviation over seeds), `seeds: {run: {recalls, rsum}}` and, with grouped
galleries, `groups: {group: {recalls, rsum}}`; `with_intervals` adds, per reference, `rsum_vs_<reference>`
{diff, low, high} and `vs_<reference>` (the interval of every recall). Those blocks make metrics_detail.json, the
whole record; `headline` keeps of it what metrics.json shows (`dvc metrics show`: one row a terminal holds, each
model's RSUM).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.evaluate.bootstrap import RECALL_KEYS, paired_bootstrap, resample_counts
from pipeline.evaluate.galleries import chance_metrics, group_metrics
from pipeline.evaluate.retrieval import RetrievalRanks
from pipeline.evaluate.tables import model_names

SUMMARY_KEYS = (*RECALL_KEYS, "rsum", "average_score")  # what per-seed and per-group entries keep
HEADLINE_KEYS = ("dataset", "split")  # metrics.json: these, then each model's HEADLINE_MODEL_KEYS (not chance's)
HEADLINE_MODEL_KEYS = ("rsum",)


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


def compare_to_references(
    models: dict[str, list[RetrievalRanks]],
    references: Sequence[str],
    text_image: np.ndarray,
    resamples: int,
    seed: int,
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """{reference: {model: {metric: {diff, low, high}}}}: each model minus each reference that was evaluated,
    seed-averaged, 95% paired-bootstrap interval; every model against every reference on the *same* image
    redraws (one count matrix), so two rows' intervals against one reference are comparable draw by draw."""
    present = [r for r in references if r in models]
    if not present:
        return {}
    counts = resample_counts(len(models[present[0]][0].i2t), resamples, seed)
    return {
        ref: {
            m: {k: iv.as_dict() for k, iv in paired_bootstrap(ranks, models[ref], text_image, counts=counts).items()}
            for m, ranks in models.items()
            if m != ref
        }
        for ref in present
    }


def with_intervals(
    blocks: dict[str, dict[str, Any]], intervals: dict[str, dict[str, dict[str, Any]]]
) -> dict[str, dict[str, Any]]:
    """The blocks, each compared model's with, per reference (in `intervals`' order), `rsum_vs_<reference>`
    {diff, low, high} and `vs_<reference>` (the interval of every recall)."""
    out = {}
    for m, block in blocks.items():
        out[m] = dict(block)
        for ref, per_model in intervals.items():
            if m in per_model:
                out[m][f"rsum_vs_{ref}"] = per_model[m]["rsum"]
                out[m][f"vs_{ref}"] = per_model[m]
    return out


def headline(doc: dict[str, Any]) -> dict[str, Any]:
    """metrics.json from the whole record `doc` (metrics_detail.json): the dataset, the split and each model's RSUM
    (chance, recalls, spreads, intervals, sizes, latency and parameters stay in the record)."""
    return {
        **{k: doc[k] for k in HEADLINE_KEYS},
        **{m: {k: doc[m][k] for k in HEADLINE_MODEL_KEYS} for m in model_names(doc) if m != "chance"},
    }


__all__ = [
    "SUMMARY_KEYS",
    "HEADLINE_KEYS",
    "HEADLINE_MODEL_KEYS",
    "with_intervals",
    "headline",
    "with_average",
    "model_block",
    "chance_block",
    "compare_to_references",
]
