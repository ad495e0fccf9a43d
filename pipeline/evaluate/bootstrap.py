"""Paired bootstrap of a retrieval difference: how sure is "model A beats model B" on this test set?

Both models are ranked on the same queries, so their difference is measured query by query (paired); the
bootstrap redraws the *queries* and recomputes every recall of both models on each redraw.

What is resampled: **images, each with all its captions** (a cluster bootstrap over the split's images). The
protocol's two query sets are not independent: the t2i queries are the captions *of* the i2t query images, and
RSUM adds both directions, so an image the model finds hard tends to fail both ways. Redrawing images with their
captions keeps that dependence (and the captions-per-image structure), where redrawing i2t and t2i queries
independently would treat them as unrelated and understate the spread of RSUM. The gallery (what each query is
ranked against) is held fixed: ranks are computed once, and the interval is over the query population given this
gallery, as in the DSMD / CLIP-KD comparisons that report significance on a fixed test split.

Several seeds per model: on each redraw a model's recall is the mean of its seeds' recalls over the *same*
redrawn queries, so the interval covers the test-set sampling of a seed-averaged model (seed-to-seed spread is
reported beside it, not folded in).

How: the redraws are a count matrix W [B, N] (how often image n is drawn in redraw b); a recall of redraw b is
then an integer matmul, W @ hits, over per-image hit counts, so 2,000 redraws of ~1,000 images cost a few
milliseconds. The arithmetic per redraw is the same as `recall_metrics` on the redrawn ranks (integer counts,
then 100 * count / size, then RSUM summed in the same order), so a naive loop gives identical numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.evaluate.retrieval import RECALL_KS, RetrievalRanks

RECALL_KEYS = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in RECALL_KS)  # the six, in RSUM's summing order
DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Interval:
    """A difference A - B (in recall points) on the full test set and its bootstrap percentile interval."""

    diff: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"diff": self.diff, "low": self.low, "high": self.high}


def resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """W [resamples, n] int64: how many times each of n images is drawn (with replacement, n draws) per redraw.

    Draws come from `np.random.default_rng(seed).integers(0, n, size=(resamples, n))`: redraw b is row b."""
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    offsets = (np.arange(resamples, dtype=np.int64) * n)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=resamples * n).reshape(resamples, n)


def image_hits(ranks: RetrievalRanks, text_image: np.ndarray, n_images: int) -> np.ndarray:
    """[N, 6] int64 per-image hit counts, columns in RECALL_KEYS order: i2t columns are 0/1 (the image's own
    query), t2i columns count the image's captions ranked within K."""
    ti = np.asarray(text_image, dtype=np.int64)
    cols = [(np.asarray(ranks.i2t) <= k).astype(np.int64) for k in RECALL_KS]
    cols += [
        np.bincount(ti, weights=np.asarray(ranks.t2i) <= k, minlength=n_images).astype(np.int64) for k in RECALL_KS
    ]
    return np.stack(cols, axis=1)


def resampled_metrics(seeds: Sequence[RetrievalRanks], text_image: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[B, 7] float64: the six recalls (percent) and RSUM of a model on each redraw, averaged over its seeds."""
    n = counts.shape[1]
    sizes = counts @ np.bincount(np.asarray(text_image, dtype=np.int64), minlength=n)  # [B] captions per redraw
    total = None
    for ranks in seeds:
        hits = counts @ image_hits(ranks, text_image, n)  # [B, 6] integers
        recalls = np.empty((counts.shape[0], 7))
        recalls[:, :3] = 100.0 * hits[:, :3] / n  # every redraw has n image queries
        recalls[:, 3:6] = 100.0 * hits[:, 3:6] / sizes[:, None]
        rsum = np.zeros(counts.shape[0])
        for j in range(6):  # left to right, as recall_metrics sums them
            rsum = rsum + recalls[:, j]
        recalls[:, 6] = rsum
        total = recalls if total is None else total + recalls
    return total / len(seeds)


def paired_bootstrap(
    a: Sequence[RetrievalRanks],
    b: Sequence[RetrievalRanks],
    text_image: np.ndarray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = 0.95,
    counts: np.ndarray | None = None,
) -> dict[str, Interval]:
    """Difference A - B of each recall and of RSUM, with its percentile bootstrap interval.

    a, b: each model's ranks, one per training seed (a single-element list for one run, e.g. the teacher), all on
    the same queries (the same image and caption order). counts: redraws from `resample_counts` (pass the same
    matrix to compare several models on the same redraws); default: drawn from `seed`."""
    if not a or not b:
        raise ValueError("paired_bootstrap: each model needs the ranks of at least one seed")
    n = len(a[0].i2t)
    for r in (*a, *b):
        if len(r.i2t) != n or len(r.t2i) != len(text_image):
            raise ValueError("paired_bootstrap: both models must be ranked on the same images and captions")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if counts is None:
        counts = resample_counts(n, resamples, seed)
    full = np.ones((1, n), dtype=np.int64)  # the test set itself, as a "redraw" that takes every image once
    point = resampled_metrics(a, text_image, full)[0] - resampled_metrics(b, text_image, full)[0]
    diffs = resampled_metrics(a, text_image, counts) - resampled_metrics(b, text_image, counts)
    tail = 100.0 * (1 - confidence) / 2
    low, high = np.percentile(diffs, [tail, 100.0 - tail], axis=0)
    return {
        key: Interval(float(point[j]), float(low[j]), float(high[j])) for j, key in enumerate((*RECALL_KEYS, "rsum"))
    }


__all__ = ["Interval", "RECALL_KEYS", "image_hits", "paired_bootstrap", "resample_counts", "resampled_metrics"]
