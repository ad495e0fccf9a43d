"""The 8-bit scan + exact rerank of flat indexes (pipeline/search/prefilter.py): its error bound holds for every
row, and its top-k equals a brute-force float32 ranking, also on galleries built to strain the bound (near-ties,
one dominant dimension, duplicates, non-unit queries) and when its first list stops inside the candidates."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.search.prefilter import approximate, build_prefilter, encode, exact_top_k, scan_candidates


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def brute_force(rows: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    scores = rows.astype(np.float64) @ q.astype(np.float64)
    return np.lexsort((np.arange(len(rows)), -scores))[:k]


def galleries():
    rng = np.random.default_rng(0)
    near = unit(rng.standard_normal(64))
    peaked = rng.standard_normal((3000, 64)) * 0.05
    peaked[:, 7] = rng.choice([-1.0, 1.0], 3000)  # one dimension near +-1: a coarse scale, a loose bound
    dupes = unit(rng.standard_normal((300, 64)))
    return {
        "random": unit(rng.standard_normal((4000, 64))),
        "near-ties": unit(near + 0.02 * rng.standard_normal((2000, 64))),  # every score within ~0.02
        "peaked": unit(peaked),
        "duplicates": np.concatenate([dupes, dupes, dupes[:50]]),  # equal scores: the lower row first
    }


@pytest.mark.parametrize("name", sorted(galleries()))
@pytest.mark.parametrize("threads", [1, 3])
def test_top_k_is_the_brute_force_ranking(name, threads):
    rows = galleries()[name]
    rng = np.random.default_rng(1)
    pre = build_prefilter(encode(rows), threads)
    queries = np.concatenate(
        [
            rows[rng.choice(len(rows), 10)] + 0.1 * unit(rng.standard_normal((10, 64))),
            3.0 * unit(rng.standard_normal((5, 64))),
        ]
    )  # near a row; and not unit length
    for q in queries.astype(np.float32):
        for k in (1, 10, 300):
            scores, found = exact_top_k(pre, rows, q, k)
            truth = brute_force(rows, q, k)
            exact = rows @ q
            # the same scores in the same order; the rows too, but for scores within float32 rounding
            np.testing.assert_allclose(scores, exact[truth], rtol=0, atol=1e-6)
            swapped = found != truth
            assert np.all(np.abs(exact[found[swapped]] - exact[truth[swapped]]) <= 1e-6), (name, k)
            assert found.dtype == np.int64 and len(found) == k


@pytest.mark.parametrize("name", sorted(galleries()))
def test_every_approximate_score_is_within_the_bound(name):
    rows = galleries()[name]
    pre = build_prefilter(encode(rows), 2)
    for q in (2.0 * unit(np.random.default_rng(2).standard_normal(64)), rows[5]):
        approx, ids, margin = approximate(pre, q[None], len(rows))
        err = np.abs(approx - rows[ids].astype(np.float64) @ q.astype(np.float64))
        assert err.max() <= margin
        assert margin < 0.05 * np.linalg.norm(q)  # tight enough to prune (scores span +-||q||)
        assert sorted(ids.tolist()) == list(range(len(rows)))  # the shards number the rows on from each other


def test_a_list_that_ends_inside_the_candidates_is_scanned_again_up_to_every_row():
    rows = galleries()["near-ties"]
    pre = build_prefilter(encode(rows), 2)
    q = rows[0]
    assert scan_candidates(pre, q[None], 10, fetch=256) is None  # 2,000 rows within the margin of each other
    scores, found = exact_top_k(pre, rows, q, 10)
    np.testing.assert_array_equal(found, brute_force(rows, q, 10))
    spread = galleries()["random"]  # a spread gallery: a short list
    pruned = scan_candidates(build_prefilter(encode(spread), 2), spread[:1], 10, fetch=256)
    assert pruned is not None and 10 <= len(pruned) < 256


def test_small_and_degenerate_galleries():
    rows = unit(np.random.default_rng(3).standard_normal((2, 8)))
    pre = build_prefilter(encode(rows), 4)  # more threads than rows: one shard per row
    scores, found = exact_top_k(pre, rows, rows[1], 5)
    assert found.tolist() == [1, 0]
    assert exact_top_k(pre, rows, rows[1], 0)[1].shape == (0,)
    zeros = np.zeros((4, 8), np.float32)
    scores, found = exact_top_k(build_prefilter(encode(zeros), 2), zeros, rows[0], 2)
    assert found.tolist() == [0, 1] and scores.tolist() == [0.0, 0.0]
