"""Candidate-aware batches: each anchor caption followed by captions of its teacher-mined images, every caption
once per epoch, a pure function of (seed, epoch) (pipeline/distill/sampler.py)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.distill.sampler import CandidateSampler, EpochSampler, candidate_order

# 6 captions of 4 images (0: c0 c1, 1: c2 c3, 2: c4, 3: c5) and each caption's two mined images
TEXT_IMAGE = np.array([0, 0, 1, 1, 2, 3])
NEIGHBOURS = np.array([[1, 2], [2, 3], [0, 3], [0, 2], [1, 0], [2, 1]])
ANCHORS = np.array([4, 0, 5, 2, 1, 3])


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        # c4 brings c2 (img 1); c0 brings c3 (img 1's next caption); c5's images are used up; c1's too
        (1, [4, 2, 0, 3, 5, 1]),
        # c4 brings c2 (img 1) and c0 (img 0); c5 finds img 2 used up and brings c3 (img 1); c1 nothing
        (2, [4, 2, 0, 5, 3, 1]),
    ],
)
def test_candidate_order_by_hand(group, expected):
    assert candidate_order(ANCHORS, np.arange(6), TEXT_IMAGE, NEIGHBOURS, group).tolist() == expected


def test_candidate_order_takes_each_images_captions_in_the_caption_order_and_skips_padding():
    order = np.array([1, 0, 3, 2, 4, 5])  # image 0's captions: c1 first; image 1's: c3 first
    nbrs = np.array([[-1, 1], [-1, -1], [-1, 0], [-1, -1], [-1, 1], [-1, -1]])  # -1: no candidate
    out = candidate_order(np.array([4, 0, 2, 1, 3, 5]), order, TEXT_IMAGE, nbrs, 1)
    assert out.tolist() == [4, 3, 0, 2, 1, 5]  # c4 brings c3 (image 1's first), c0 brings c2, c2 was placed


def synthetic(m=600, n=120, k=8, seed=0):
    rng = np.random.default_rng(seed)
    text_image = rng.integers(0, n, size=m)
    return text_image, rng.integers(-1, n, size=(m, k))


def test_every_caption_once_and_a_function_of_seed_and_epoch():
    text_image, nbrs = synthetic()
    s = CandidateSampler(600, 16, 3, neighbours=nbrs, text_image=text_image, group=3)
    for epoch in (0, 1):
        assert np.array_equal(np.sort(s.permutation(epoch)), np.arange(600))
    assert not np.array_equal(s.permutation(0), s.permutation(1))
    fresh = CandidateSampler(600, 16, 3, neighbours=nbrs, text_image=text_image, group=3)
    assert np.array_equal(fresh.rows(1, 7), s.rows(1, 7))  # any position, any order: no hidden stream
    assert np.array_equal(fresh.global_rows(0, 2), s.global_rows(0, 2))
    other_seed = CandidateSampler(600, 16, 4, neighbours=nbrs, text_image=text_image, group=3)
    assert not np.array_equal(other_seed.permutation(0), s.permutation(0))
    r1 = CandidateSampler(600, 8, 3, neighbours=nbrs, text_image=text_image, group=3, world_size=2, rank=1)
    assert np.array_equal(r1.rows(0, 5), s.global_rows(0, 5)[8:])  # ranks slice the same global batch


def test_batches_hold_the_anchors_mined_images():
    """Images in clusters of 4, each caption's mined images the other 3 of its cluster: with group 3 a batch
    holds whole clusters, so the share of (caption, other caption of the batch) pairs whose image is one of the
    caption's mined images is far above a uniform permutation's (3 x 5 / 2000 ~ 0.8%)."""
    m, n = 2000, 400
    text_image = np.repeat(np.arange(n), 5)
    cluster = np.arange(n) // 4 * 4
    mined = np.array([[c + j for j in range(4) if c + j != i] for i, c in enumerate(cluster)])  # [n, 3]
    nbrs = mined[text_image]

    def share(sampler):
        hits = total = 0
        for step in range(sampler.steps_per_epoch):
            rows = sampler.global_rows(0, step).tolist()
            for c in rows:
                hits += sum(int(text_image[d]) in set(nbrs[c].tolist()) for d in rows if d != c)
                total += len(rows) - 1
        return hits / total

    uniform = share(EpochSampler(m, 32, 0))
    aware = share(CandidateSampler(m, 32, 0, neighbours=nbrs, text_image=text_image, group=3))
    assert aware > 5 * uniform


def test_bad_inputs_are_refused():
    text_image, nbrs = synthetic()
    with pytest.raises(ValueError, match=r"expected neighbours \[600, K\]"):
        CandidateSampler(600, 16, 0, neighbours=nbrs[:10], text_image=text_image, group=1)
    with pytest.raises(ValueError, match="group must be positive"):
        CandidateSampler(600, 16, 0, neighbours=nbrs, text_image=text_image, group=0)
