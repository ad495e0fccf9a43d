"""The paired bootstrap against a naive resampling loop (same draws: identical numbers) and hand cases."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.evaluate.bootstrap import RECALL_KEYS, paired_bootstrap, resample_counts
from pipeline.evaluate.retrieval import RetrievalRanks, recall_metrics


def random_ranks(rng: np.random.Generator, text_image: np.ndarray, n: int, scale: int) -> RetrievalRanks:
    return RetrievalRanks(
        i2t=rng.integers(1, scale, size=n, endpoint=True), t2i=rng.integers(1, scale, size=len(text_image))
    )


def naive_bootstrap(a, b, text_image, resamples, seed, confidence=0.95):
    """One redraw at a time: pick images (the same draws as resample_counts), keep each drawn image's i2t rank and
    all its captions' t2i ranks, and score the redrawn ranks with recall_metrics; seeds averaged per redraw."""
    n = len(a[0].i2t)
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    captions_of = [np.flatnonzero(text_image == i) for i in range(n)]

    def averaged(seeds, images):
        caps = np.concatenate([captions_of[i] for i in images])
        per_seed = [recall_metrics(RetrievalRanks(i2t=r.i2t[images], t2i=r.t2i[caps])) for r in seeds]
        total = None
        for m in per_seed:
            row = np.array([m[k] for k in (*RECALL_KEYS, "rsum")])
            total = row if total is None else total + row
        return total / len(seeds)

    point = averaged(a, np.arange(n)) - averaged(b, np.arange(n))
    diffs = np.array([averaged(a, d) - averaged(b, d) for d in draws])
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(diffs, [tail, 100 - tail], axis=0)
    return {k: (point[j], low[j], high[j]) for j, k in enumerate((*RECALL_KEYS, "rsum"))}


@pytest.mark.parametrize("seeds_a,seeds_b", [(1, 1), (3, 1), (3, 3)])
def test_matches_a_naive_resampling_loop_exactly(seeds_a, seeds_b):
    rng = np.random.default_rng(seeds_a * 7 + seeds_b)
    n = 23
    text_image = rng.permutation(np.repeat(np.arange(n), rng.integers(1, 6, size=n)))  # 1..5 captions, shuffled
    a = [random_ranks(rng, text_image, n, 12) for _ in range(seeds_a)]
    b = [random_ranks(rng, text_image, n, 20) for _ in range(seeds_b)]
    fast = paired_bootstrap(a, b, text_image, resamples=300, seed=5)
    slow = naive_bootstrap(a, b, text_image, resamples=300, seed=5)
    for key, (diff, low, high) in slow.items():
        assert (fast[key].diff, fast[key].low, fast[key].high) == (diff, low, high), key


def test_identical_models_differ_by_exactly_zero():
    rng = np.random.default_rng(0)
    ti = np.repeat(np.arange(10), 3)
    r = random_ranks(rng, ti, 10, 15)
    out = paired_bootstrap([r], [r], ti, resamples=200)
    assert all((iv.diff, iv.low, iv.high) == (0.0, 0.0, 0.0) for iv in out.values())


def test_hand_case_a_uniform_gain_has_a_degenerate_interval():
    # A ranks every query first, B every query beyond 10: on any redraw A - B is 100 points per recall.
    ti = np.array([0, 0, 1, 2, 2, 2])
    a = RetrievalRanks(i2t=np.ones(3, int), t2i=np.ones(6, int))
    b = RetrievalRanks(i2t=np.full(3, 11), t2i=np.full(6, 11))
    out = paired_bootstrap([a], [b], ti, resamples=50)
    assert all((iv.diff, iv.low, iv.high) == (100.0, 100.0, 100.0) for iv in out.values() if iv is not out["rsum"])
    assert (out["rsum"].diff, out["rsum"].low, out["rsum"].high) == (600.0, 600.0, 600.0)


def test_hand_case_point_estimate_and_image_clusters():
    # Two images; image 0 has three captions, image 1 one. A hits everything at R@1; B only image 1 and its caption.
    ti = np.array([0, 0, 0, 1])
    a = RetrievalRanks(i2t=np.array([1, 1]), t2i=np.array([1, 1, 1, 1]))
    b = RetrievalRanks(i2t=np.array([2, 1]), t2i=np.array([2, 2, 2, 1]))
    out = paired_bootstrap([a], [b], ti, resamples=2000, seed=1)
    assert out["i2t_r1"].diff == 50.0  # 2/2 - 1/2
    assert out["t2i_r1"].diff == 75.0  # 4/4 - 1/4
    assert out["i2t_r5"].diff == 0.0 and out["t2i_r5"].diff == 0.0
    # Redraws are {0,0}, {0,1}, {1,1}: i2t_r1 differences 100, 50, 0; t2i_r1: 100, 75, 0 (captions follow images).
    assert out["i2t_r1"].low == 0.0 and out["i2t_r1"].high == 100.0
    assert out["t2i_r1"].low == 0.0 and out["t2i_r1"].high == 100.0


def test_seed_average_is_the_mean_of_seed_differences():
    rng = np.random.default_rng(3)
    ti = np.repeat(np.arange(30), 2)
    a = [random_ranks(rng, ti, 30, 12) for _ in range(3)]
    b = [random_ranks(rng, ti, 30, 12)]
    out = paired_bootstrap(a, b, ti, resamples=10)
    expected = np.mean([recall_metrics(r)["rsum"] for r in a]) - recall_metrics(b[0])["rsum"]
    assert out["rsum"].diff == pytest.approx(expected, abs=1e-9)


def test_resample_counts_draw_n_images_per_redraw_and_are_seeded():
    w = resample_counts(17, 40, seed=2)
    assert w.shape == (40, 17) and (w.sum(1) == 17).all()
    assert np.array_equal(w, resample_counts(17, 40, seed=2)) and not np.array_equal(w, resample_counts(17, 40, 3))


def test_rejects_models_ranked_on_other_queries():
    ti = np.array([0, 1])
    a = RetrievalRanks(i2t=np.array([1, 1]), t2i=np.array([1, 1]))
    b = RetrievalRanks(i2t=np.array([1, 1, 1]), t2i=np.array([1, 1]))
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap([a], [b], ti)


def test_two_thousand_redraws_of_a_coco_sized_split_take_well_under_a_second_per_pair():
    rng = np.random.default_rng(0)
    n = 1000
    ti = np.repeat(np.arange(n), 3)
    a = [random_ranks(rng, ti, n, 30) for _ in range(3)]
    b = [random_ranks(rng, ti, n, 30) for _ in range(3)]
    t = time.perf_counter()
    paired_bootstrap(a, b, ti, resamples=2000)
    assert time.perf_counter() - t < 3.0  # measured ~0.1 s idle; generous for 2 shared cores


def test_every_model_against_every_reference_equals_the_naive_loop():
    """evaluate's intervals against several references (summary.compare_to_references): each (model, reference)
    pair equals the naive resampling loop of that pair alone, on the same draws; a reference not evaluated is
    left out; the interval cell the tables and the README show is that interval."""
    from pipeline.evaluate.summary import compare_to_references, with_intervals
    from pipeline.evaluate.tables import interval_cell

    rng = np.random.default_rng(11)
    n = 17
    text_image = rng.permutation(np.repeat(np.arange(n), rng.integers(1, 4, size=n)))
    models = {
        "head": [random_ranks(rng, text_image, n, 15) for _ in range(3)],
        "plus": [random_ranks(rng, text_image, n, 9) for _ in range(3)],
        "base": [random_ranks(rng, text_image, n, 25) for _ in range(2)],
    }
    got = compare_to_references(models, ["head", "missing", "base"], text_image, 200, 3)
    assert list(got) == ["head", "base"]
    for ref, per_model in got.items():
        assert list(per_model) == [m for m in models if m != ref]
        for m, metrics in per_model.items():
            slow = naive_bootstrap(models[m], models[ref], text_image, resamples=200, seed=3)
            for key, (diff, low, high) in slow.items():
                assert metrics[key] == {"diff": diff, "low": low, "high": high}, (m, ref, key)
    blocks = with_intervals({m: {"rsum": 0.0} for m in models}, got)
    assert blocks["plus"]["rsum_vs_head"] == got["head"]["plus"]["rsum"] and "rsum_vs_head" not in blocks["head"]
    assert blocks["head"]["vs_base"] == got["base"]["head"] and blocks["base"]["rsum_vs_head"]
    iv = got["head"]["plus"]["rsum"]
    assert interval_cell(iv) == f"{iv['diff']:+.1f} ({iv['low']:+.1f} .. {iv['high']:+.1f})"
    assert interval_cell(None) == "-"
    assert compare_to_references(models, ["missing"], text_image, 200, 3) == {}
