"""Per-group galleries against a naive masked score matrix, and chance recall against enumeration by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.evaluate.galleries import chance_metrics, group_metrics, grouped_ranks, image_groups
from pipeline.evaluate.retrieval import RetrievalRanks, recall_metrics


def naive_grouped_ranks(img, txt, ti, group_of):
    """The full score matrix with every other group's entries set to -inf; pessimistic ranks by sorting."""
    s = img.astype(np.float64) @ txt.astype(np.float64).T
    same = group_of[:, None] == group_of[ti][None, :]
    s = np.where(same, s, -np.inf)

    def rank(scores, positive):
        order = np.lexsort((positive, -scores))  # by score, negatives first among equals
        return int(np.flatnonzero(positive[order])[0]) + 1

    i2t = np.array([rank(s[i][same[i]], (ti == i)[same[i]]) for i in range(len(img))])
    t2i = np.array([rank(s[:, j][same[:, j]], (np.arange(len(img)) == ti[j])[same[:, j]]) for j in range(len(ti))])
    return i2t, t2i


def test_image_groups_by_first_path_component():
    ids = np.array(["twemoji/a.png", "openmoji/a.png", "twemoji/b/c.png", "x.png", "openmoji/z.png"])
    g = image_groups(ids, "by_directory")
    assert list(g) == ["twemoji", "openmoji", ""]
    assert [r.tolist() for r in g.values()] == [[0, 2], [1, 4], [3]]
    assert [r.tolist() for r in image_groups(ids, "split").values()] == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_ranks_match_a_naive_masked_matrix(seed):
    rng = np.random.default_rng(seed)
    n, d = 30, 8
    img = (rng.integers(-8, 9, size=(n, d)) / 8).astype(np.float32)  # dyadic: exact scores, exact ties
    ti = rng.permutation(np.repeat(np.arange(n), rng.integers(1, 4, size=n)))
    txt = (img[ti] + rng.integers(-8, 9, size=(len(ti), d)) / 8).astype(np.float32)
    names = rng.choice(["twemoji", "openmoji", "noto"], size=n)
    ids = np.array([f"{g}/{i}.png" for i, g in enumerate(names)])
    groups = image_groups(ids, "by_directory")
    group_of = np.array([list(groups).index(g) for g in names])
    r = grouped_ranks(img, txt, ti, groups, chunk_size=7)
    i2t, t2i = naive_grouped_ranks(img, txt, ti, group_of)
    assert np.array_equal(r.i2t, i2t) and np.array_equal(r.t2i, t2i)
    # per group: the group's queries alone; pooled (the caller's recall_metrics of r): all of them
    per = group_metrics(r, ti, groups)
    for g, rows in groups.items():
        caps = np.isin(ti, rows)
        assert per[g] == recall_metrics(RetrievalRanks(i2t=i2t[rows], t2i=t2i[caps]))
    # the pooled gallery is the single-group case, and a group never beats it
    pooled = grouped_ranks(img, txt, ti, image_groups(ids, "split"), chunk_size=7)
    assert (r.i2t <= pooled.i2t).all() and (r.t2i <= pooled.t2i).all()
    assert group_metrics(pooled, ti, image_groups(ids, "split")) == {}


def enumerated_chance(ti, groups):
    """Average over every ordering of each group's gallery: exhaustive, for tiny groups."""
    hits = {f"{d}_r{k}": [] for d in ("i2t", "t2i") for k in (1, 5, 10)}
    for rows in groups.values():
        caps = np.flatnonzero(np.isin(ti, rows))
        for k in (1, 5, 10):
            for i in rows:  # i2t: the first K captions of a random order of the group's captions
                mine = ti[caps] == i
                perms = list(itertools.permutations(range(len(caps))))
                hits[f"i2t_r{k}"].append(np.mean([mine[list(p[:k])].any() for p in perms]))
            for j in caps:  # t2i: the first K images of a random order of the group's images
                perms = list(itertools.permutations(rows))
                hits[f"t2i_r{k}"].append(np.mean([ti[j] in p[:k] for p in perms]))
    return {key: 100 * float(np.mean(v)) for key, v in hits.items()}


def test_chance_matches_enumeration():
    ti = np.array([0, 0, 0, 1, 2, 3, 3, 4])  # group a: images 0, 1 (4 captions); group b: images 2, 3, 4
    groups = {"a": np.array([0, 1]), "b": np.array([2, 3, 4])}
    got = chance_metrics(ti, groups)
    for key, value in enumerated_chance(ti, groups).items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    # by hand: i2t R@1 = mean(3/4, 1/4, 1/4, 2/4, 1/4) = 40%; t2i R@1 = (4 x 1/2 + 4 x 1/3) / 8 = 41.67%
    assert got["i2t_r1"] == pytest.approx(40.0) and got["t2i_r1"] == pytest.approx(100 * (2 + 4 / 3) / 8)
    assert got["rsum"] == pytest.approx(sum(v for k, v in got.items() if k != "rsum"))
