"""Retrieval metrics against a naive, obviously-correct oracle: the full score matrix, one sort per query.

Most data here is dyadic (multiples of 1/64 in few dimensions), so that every dot product is exact in float32
whatever the summation order: the oracle and the tiled torch path then see identical scores, exact ties
included, and must agree rank for rank. Random float data is used where its positives are provably far from
every negative (checked), which is when ranks are well defined at float32 precision.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pipeline.evaluate.retrieval as rm
from pipeline.errors import InputError
from pipeline.evaluate.retrieval import RetrievalRanks, recall_curve, recall_metrics, retrieval_ranks


# -- the oracle ------------------------------------------------------------------------------------------
def naive_ranks(img: np.ndarray, txt: np.ndarray, ti: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full score matrix; each query sorts its gallery by score, descending, negatives before positives at equal
    score (the pessimistic tie rule); the rank is the 1-based position of the first positive."""
    S = img.astype(np.float64) @ txt.astype(np.float64).T  # exact for dyadic data
    n, m = S.shape

    def first_positive(scores: np.ndarray, positive: np.ndarray) -> int:
        order = np.lexsort((positive, -scores))  # by -score, then negatives (False) first
        return int(np.flatnonzero(positive[order])[0]) + 1

    i2t = np.array([first_positive(S[i], ti == i) for i in range(n)])
    t2i = np.array([first_positive(S[:, j], np.arange(n) == ti[j]) for j in range(m)])
    return i2t, t2i


def dyadic(rng: np.random.Generator, rows: int, dim: int = 12) -> np.ndarray:
    return (rng.integers(-8, 9, size=(rows, dim)) / 8.0).astype(np.float32)


def caption_layout(rng: np.random.Generator, n: int, per_image: list[int], shuffle: bool) -> np.ndarray:
    counts = rng.choice(per_image, size=n)
    ti = np.repeat(np.arange(n), counts)
    if shuffle:
        rng.shuffle(ti)
    return ti


def correlated(rng, n, ti, dim, noise):
    """Image rows and captions near their image (so ranks are spread, not all huge)."""
    img = dyadic(rng, n, dim)
    txt = img[ti] + dyadic(rng, len(ti), dim) * noise
    return img, txt.astype(np.float32)


# -- agreement with the oracle ---------------------------------------------------------------------------
@pytest.mark.parametrize("per_image", [[1], [5], [7], [1, 2, 5, 7]], ids=["1cap", "5cap", "7cap", "mixed"])
@pytest.mark.parametrize("shuffle", [False, True], ids=["grouped", "shuffled"])
def test_matches_naive_oracle(per_image, shuffle):
    rng = np.random.default_rng(len(per_image) * 10 + sum(per_image) + shuffle)
    n = 41
    ti = caption_layout(rng, n, per_image, shuffle)
    img, txt = correlated(rng, n, ti, dim=6, noise=1.0)  # few dims: many exact ties
    want_i2t, want_t2i = naive_ranks(img, txt, ti)
    for chunk in (1, 3, 7, 10, 64, 4096):  # none divides 41 or the caption count except by accident
        for backend in ("torch", "auto"):
            got = retrieval_ranks(img, txt, ti, chunk_size=chunk, backend=backend)
            np.testing.assert_array_equal(got.i2t, want_i2t, err_msg=f"i2t chunk={chunk} {backend}")
            np.testing.assert_array_equal(got.t2i, want_t2i, err_msg=f"t2i chunk={chunk} {backend}")
            assert got.i2t.dtype == np.int64 and got.t2i.dtype == np.int64


def noisy_gallery(rng, n: int, dim: int, noise: float, shuffle: bool):
    """Unit image vectors and unit captions = their image + Gaussian noise (5-7 captions per image)."""
    ti = caption_layout(rng, n, [5, 6, 7], shuffle=shuffle)
    img = rng.standard_normal((n, dim)).astype(np.float32)
    txt = (img[ti] + noise * rng.standard_normal((len(ti), dim))).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, txt, ti


def test_matches_naive_on_random_float_data():
    """Gaussian unit vectors (no ties), fp32 and fp16 stores, each positive farther from every negative than any
    two float32 evaluations of a dot product can differ (2 * D * 2^-24 for unit vectors)."""
    rng = np.random.default_rng(11)
    n, dim = 60, 64
    img, txt, ti = noisy_gallery(rng, n, dim, noise=6.0, shuffle=True)
    for dtype in (np.float32, np.float16):
        a, b = img.astype(dtype), txt.astype(dtype)
        S = a.astype(np.float64) @ b.astype(np.float64).T
        pos_t = S[ti, np.arange(len(ti))]
        gaps = np.abs(S - pos_t[None, :])[np.arange(n)[:, None] != ti[None, :]]
        assert gaps.min() > 2 * dim * 2.0**-24  # the premise: ranks do not depend on float32 rounding
        want = naive_ranks(a, b, ti)
        assert 1 < np.median(want[1]) < n  # neither trivial nor hopeless
        for backend in ("torch", "auto"):
            got = retrieval_ranks(a, b, ti, chunk_size=17, backend=backend)
            np.testing.assert_array_equal(got.i2t, want[0])
            np.testing.assert_array_equal(got.t2i, want[1])


def test_fp16_and_tensor_inputs_are_scored_in_fp32():
    rng = np.random.default_rng(3)
    ti = caption_layout(rng, 30, [5], shuffle=False)
    img, txt = correlated(rng, 30, ti, dim=8, noise=1.0)
    want = retrieval_ranks(img, txt, ti, chunk_size=9)
    for a, b in [
        (img.astype(np.float16), txt.astype(np.float16)),  # dyadic /8 values are exact in fp16
        (torch.from_numpy(img).half(), torch.from_numpy(txt).half()),
        (torch.from_numpy(img), torch.from_numpy(txt)),
    ]:
        got = retrieval_ranks(a, b, torch.from_numpy(ti).numpy(), chunk_size=9)
        np.testing.assert_array_equal(got.i2t, want.i2t)
        np.testing.assert_array_equal(got.t2i, want.t2i)


def test_fp16_store_is_scored_in_fp32():
    """Image 0 scores its own caption 1 + 2^-11 and a negative 1.0: in fp16 arithmetic both round to 1.0, a tie
    that the pessimistic rule would count against it; upcast to fp32 first, the own caption wins."""
    img = np.array([[1, 1], [1, -1]], dtype=np.float16)
    txt = np.array([[1, 2.0**-11], [1, 0]], dtype=np.float16)  # c0 -> image 0, c1 -> image 1
    assert (img @ txt.T)[0].tolist() == [1.0, 1.0]  # what fp16 scoring would see
    got = retrieval_ranks(img, txt, np.array([0, 1]))
    assert got.i2t.tolist() == [1, 1]
    assert got.t2i.tolist() == [1, 2]  # c1 ties exactly (1.0) between both images: pessimistic


@pytest.fixture
def reduced_matmul_precision():
    """The process asks for reduced-precision float32 matmuls (TF32 on CUDA, bf16 in oneDNN on the CPU), as
    training code often does; put back as found."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    yield
    torch.set_float32_matmul_precision(before)


def test_scores_are_full_fp32_matmuls_whatever_the_process_asked_for(reduced_matmul_precision, monkeypatch):
    """While a score tile is computed, both backends' float32 matmuls are IEEE; the process's own setting is
    back afterwards. (Checked on the flags, so it holds on any machine, also one whose kernels ignore them.)"""
    asked = (torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    assert asked != ("ieee", "ieee")  # what the fixture set: the guard has something to undo
    seen = []
    scores = rm._Scratch.scores

    def recording_scores(self, rows, cols):
        seen.append((torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
        return scores(self, rows, cols)

    monkeypatch.setattr(rm._Scratch, "scores", recording_scores)
    rng = np.random.default_rng(0)
    retrieval_ranks(dyadic(rng, 20), dyadic(rng, 20), np.arange(20), chunk_size=8)
    assert len(seen) > 1 and set(seen) == {("ieee", "ieee")}
    assert (torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == asked


def near_twins(rng: np.random.Generator, n: int, dim: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Unit image rows in pairs that differ by ~1e-6, and a noisy caption per image: every caption's two
    closest images are a near tie that a reduced-precision product reorders."""
    img = rng.standard_normal((n, dim)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    img[1::2] = img[0::2] + 1e-6 * rng.standard_normal((n // 2, dim)).astype(np.float32)
    txt = img + 0.05 * rng.standard_normal((n, dim)).astype(np.float32)
    return img, txt / np.linalg.norm(txt, axis=1, keepdims=True)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_ranks_under_reduced_matmul_precision_are_the_full_precision_ranks(reduced_matmul_precision, device):
    """The ranks themselves: computed while the process asks for TF32 / bf16 matmuls, they equal the ranks
    under full precision (where the CPU honours bf16, as oneDNN does on AVX512-BF16 CPUs, dropping the guard
    reorders ~1 in 10 of these near ties; on CUDA, TF32 reorders far more)."""
    img, txt = near_twins(np.random.default_rng(0), 400)
    ti = np.arange(len(img))
    got = retrieval_ranks(img, txt, ti, device=device)
    torch.set_float32_matmul_precision("highest")
    want = retrieval_ranks(img, txt, ti, device=device)
    np.testing.assert_array_equal(got.i2t, want.i2t)
    np.testing.assert_array_equal(got.t2i, want.t2i)


def test_perfect_embeddings_give_100_everywhere():
    rng = np.random.default_rng(0)
    n = 50
    basis = np.linalg.qr(rng.standard_normal((64, n)))[0].T.astype(np.float32)  # orthonormal rows
    ti = caption_layout(rng, n, [1, 5, 7], shuffle=True)
    for backend in ("torch", "auto"):
        ranks = retrieval_ranks(basis, basis[ti], ti, chunk_size=13, backend=backend)
        assert (ranks.i2t == 1).all() and (ranks.t2i == 1).all()
        m = recall_metrics(ranks)
        assert all(m[f"{d}_r{k}"] == 100.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
        assert m["rsum"] == 600.0 and m["i2t_medr"] == m["t2i_medr"] == 1.0 and m["i2t_meanr"] == 1.0


# -- a case worked out by hand, and the tie rule ---------------------------------------------------------
HAND_IMG = np.array([[2, 0, 0], [0, 2, 0], [1, 1, 1]], dtype=np.float32)
HAND_TXT = np.array(
    [
        [1, 0, 0],  # c0, image 0
        [0, 0, 1],  # c1, image 0
        [1, 1, 0],  # c2, image 1
        [0, 1, 1],  # c3, image 2
        [0, 0, 3],
    ],  # c4, image 2
    dtype=np.float32,
)
HAND_TI = np.array([0, 0, 1, 2, 2])
# Scores (images x captions):  I0: 2 0 2 0 0 | I1: 0 0 2 2 0 | I2: 1 1 2 2 3
# i2t: I0 best own 2 (c0), tied by negative c2 -> 2;  I1 own 2 (c2), tied by c3 -> 2;  I2 own 3 (c4) -> 1
# t2i: c0 2 vs 0,1 -> 1;  c1 0 vs I1 0 (tie), I2 1 -> 3;  c2 2 vs I0 2, I2 2 (ties) -> 3;  c3 2 vs I1 2 -> 2;  c4 -> 1
HAND_I2T = [2, 2, 1]
HAND_T2I = [1, 3, 3, 2, 1]


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("chunk", [1, 2, 4096])
def test_hand_made_three_images(backend, chunk):
    ranks = retrieval_ranks(HAND_IMG, HAND_TXT, HAND_TI, chunk_size=chunk, backend=backend)
    assert ranks.i2t.tolist() == HAND_I2T
    assert ranks.t2i.tolist() == HAND_T2I
    m = recall_metrics(ranks)
    assert m["i2t_r1"] == pytest.approx(100 / 3) and m["i2t_r5"] == 100.0 and m["i2t_r10"] == 100.0
    assert m["t2i_r1"] == pytest.approx(40.0) and m["t2i_r5"] == 100.0
    assert m["rsum"] == pytest.approx(100 / 3 + 100 + 100 + 40 + 100 + 100)
    assert m["i2t_medr"] == 2.0 and m["t2i_medr"] == 2.0
    assert m["i2t_meanr"] == pytest.approx(5 / 3) and m["t2i_meanr"] == pytest.approx(2.0)


def test_tie_rule_is_pessimistic_and_order_free():
    """A negative tied with the positive counts against the query; the image's other captions never do; the
    result does not depend on gallery order."""
    img = np.array([[1, 0], [0, 1]], dtype=np.float32)
    txt = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], dtype=np.float32)  # image 0: c0, c1 (tied); image 1: c2, c3
    ti = np.array([0, 0, 1, 1])
    r = retrieval_ranks(img, txt, ti)
    assert r.i2t.tolist() == [2, 1]  # image 0: its two captions tie with image 1's c2 -> placed after c2
    assert r.t2i.tolist() == [1, 1, 2, 1]  # c2 (image 1) scores 1 with image 0, 0 with image 1
    perm = np.array([3, 1, 2, 0])
    r2 = retrieval_ranks(img, txt[perm], ti[perm])
    assert r2.i2t.tolist() == [2, 1] and r2.t2i.tolist() == np.array([1, 1, 2, 1])[perm].tolist()
    assert rm.TIE_RULE == "pessimistic"


# -- bounded memory: streamed (non-resident) inputs -------------------------------------------------------
def test_streamed_memmap_inputs_match_resident(tmp_path, monkeypatch):
    rng = np.random.default_rng(11)
    n = 70
    ti = caption_layout(rng, n, [1, 5, 7], shuffle=True)
    img, txt = correlated(rng, n, ti, dim=8, noise=1.0)
    want = retrieval_ranks(img, txt, ti, chunk_size=16)
    paths = []
    for name, arr in (("img", img), ("txt", txt)):
        mm = np.lib.format.open_memmap(tmp_path / f"{name}.npy", mode="w+", dtype=np.float16, shape=arr.shape)
        mm[:] = arr
        mm.flush()
        paths.append(tmp_path / f"{name}.npy")
    img_mm, txt_mm = (np.load(p, mmap_mode="r") for p in paths)
    monkeypatch.setattr(rm, "_RESIDENT_BYTES", 0)  # nothing converted whole: slice by slice from the maps
    for backend in ("torch", "auto"):
        got = retrieval_ranks(img_mm, txt_mm, ti, chunk_size=16, backend=backend)
        np.testing.assert_array_equal(got.i2t, want.i2t)
        np.testing.assert_array_equal(got.t2i, want.t2i)


def test_tiles_never_exceed_chunk_squared(monkeypatch):
    """Every score tile is at most chunk x chunk (no N x M matrix), except one image with more captions."""
    seen = []
    real = rm._Scratch.scores

    def spy(self, rows, cols):
        seen.append((rows.shape[0], cols.shape[0]))
        return real(self, rows, cols)

    monkeypatch.setattr(rm._Scratch, "scores", spy)
    rng = np.random.default_rng(5)
    ti = caption_layout(rng, 90, [1, 5, 7], shuffle=True)
    img, txt = correlated(rng, 90, ti, dim=6, noise=1.0)
    retrieval_ranks(img, txt, ti, chunk_size=20)
    assert seen and max(r for r, _ in seen) <= 20 and max(c for _, c in seen) <= 20
    assert sum(r * c for r, c in seen) == 90 * len(ti)  # each score computed exactly once


# -- metrics from ranks -------------------------------------------------------------------------------------
def test_recall_metrics_and_curves():
    ranks = RetrievalRanks(i2t=np.array([1, 2, 6, 11, 60]), t2i=np.array([1, 1, 3, 4, 9, 10, 10, 200]))
    m = recall_metrics(ranks)
    assert list(m) == [
        "i2t_r1",
        "i2t_r5",
        "i2t_r10",
        "t2i_r1",
        "t2i_r5",
        "t2i_r10",
        "rsum",
        "i2t_medr",
        "t2i_medr",
        "i2t_meanr",
        "t2i_meanr",
    ]
    assert (m["i2t_r1"], m["i2t_r5"], m["i2t_r10"]) == (20.0, 40.0, 60.0)
    assert (m["t2i_r1"], m["t2i_r5"], m["t2i_r10"]) == (25.0, 50.0, 87.5)
    assert m["rsum"] == pytest.approx(20 + 40 + 60 + 25 + 50 + 87.5)
    assert m["i2t_medr"] == 6.0 and m["t2i_medr"] == 6.0  # floor(median([.., 4, 9, ..]) = 6.5)
    assert m["i2t_meanr"] == pytest.approx(16.0) and m["t2i_meanr"] == pytest.approx(29.75)
    curve = recall_curve(ranks.t2i, max_k=50)
    assert curve.shape == (50,) and (np.diff(curve) >= 0).all()
    assert curve[0] == m["t2i_r1"] and curve[4] == m["t2i_r5"] and curve[9] == m["t2i_r10"]
    assert curve[-1] == 87.5  # rank 200 never counts
    assert rm.recall_curves(ranks, 3)["i2t"].tolist() == [20.0, 40.0, 40.0]


# -- bad inputs ---------------------------------------------------------------------------------------------
def test_bad_inputs():
    img = np.eye(3, dtype=np.float32)
    with pytest.raises(InputError, match="outside the 3 images"):
        retrieval_ranks(img, img, np.array([0, 1, 3]))
    with pytest.raises(InputError, match="image row 2 has no caption"):
        retrieval_ranks(img, img[:2], np.array([0, 1]))
    bad = img.copy()
    bad[1, 1] = np.nan
    for backend in ("torch", "auto"):
        with pytest.raises(InputError, match="non-finite"):
            retrieval_ranks(bad, img, np.array([0, 1, 2]), backend=backend)
    with pytest.raises(ValueError, match="same D"):
        retrieval_ranks(img, np.eye(3, 4, dtype=np.float32), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="backend"):
        retrieval_ranks(img, img, np.array([0, 1, 2]), backend="annoy")
