"""Each loss against a naive reference written here with explicit Python loops (float64 Python math)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import from_dict
from pipeline.distill.losses import DSMD_TERMS, TERMS, DistillLoss, LossConfig
from pipeline.distill.losses.triplet import hardest_negative_triplet
from pipeline.errors import ConfigError

B, D, K = 6, 8, 10
IDS = [0, 1, 0, 2, 3, 1]  # pairs 0/2 and 1/5 share an image
Q_IDS = [0, 4, 1, 5, 0, 6, 2, 7, 3, 8]  # queue entries of the batch's images: 0, 2, 4, 6, 8


def unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


@pytest.fixture
def batch():
    return {
        "s_v": unit(B, D, seed=1),
        "s_t": unit(B, D, seed=2),
        "t_v": unit(B, D, seed=3),
        "t_t": unit(B, D, seed=4),
        "image_ids": torch.tensor(IDS),
        "queue_v": unit(K, D, seed=5),
        "queue_t": unit(K, D, seed=6),
        "queue_v_image_ids": torch.tensor(Q_IDS),
        "queue_t_image_ids": torch.tensor(Q_IDS[::-1]),
    }


# -- naive references -----------------------------------------------------------------------------------
def rows(x):
    return [[float(v) for v in r] for r in x]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def ce(logits, target):
    m = max(logits)
    return -(logits[target] - m - math.log(sum(math.exp(z - m) for z in logits)))


def naive_queue_nce(a, p, q, a_ids, q_ids, T):
    a, p, q = rows(a), rows(p), rows(q)
    total = 0.0
    for i in range(len(a)):
        logits = [dot(a[i], p[i]) / T]
        for k in range(len(q)):
            if a_ids is None or q_ids[k] != a_ids[i]:
                logits.append(dot(a[i], q[k]) / T)
        total += ce(logits, 0)
    return total / len(a)


def naive_in_batch_nce(a, keys, ids, T):
    a, keys = rows(a), rows(keys)
    total = 0.0
    for i in range(len(a)):
        logits = [dot(a[i], keys[i]) / T]
        for j in range(len(keys)):
            if j != i and (ids is None or ids[j] != ids[i]):
                logits.append(dot(a[i], keys[j]) / T)
        total += ce(logits, 0)
    return total / len(a)


def naive_triplet(a, b, ids, margin):
    """VSE++ hardest negative; returns (loss, hardest j of each row i, hardest i of each column j)."""
    a, b = rows(a), rows(b)
    n = len(a)
    S = [[dot(a[i], b[j]) for j in range(n)] for i in range(n)]
    neg = lambda i, j: i != j and (ids is None or ids[i] != ids[j])  # noqa: E731
    total, pick_s, pick_im = 0.0, [], []
    for i in range(n):  # a_i against the b_j
        best, best_j = 0.0, None
        for j in range(n):
            if neg(i, j) and (best_j is None or S[i][j] > S[i][best_j]):
                best_j = j
        if best_j is not None:
            best = max(0.0, margin + S[i][best_j] - S[i][i])
        total += best
        pick_s.append(best_j)
    for j in range(n):  # b_j against the a_i
        best, best_i = 0.0, None
        for i in range(n):
            if neg(i, j) and (best_i is None or S[i][j] > S[best_i][j]):
                best_i = i
        if best_i is not None:
            best = max(0.0, margin + S[best_i][j] - S[j][j])
        total += best
        pick_im.append(best_i)
    return total, pick_s, pick_im


def softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    return [x / sum(e) for x in e]


def naive_relation(s_v, s_t, t_v, t_t, tau):
    s_v, s_t, t_v, t_t = rows(s_v), rows(s_t), rows(t_v), rows(t_t)
    n = len(s_v)

    def kl_dir(ta, tb, sa, sb):
        total = 0.0
        for i in range(n):
            p = softmax([dot(ta[i], tb[j]) / tau for j in range(n)])
            q = softmax([dot(sa[i], sb[j]) / tau for j in range(n)])
            total += sum(p[j] * (math.log(p[j]) - math.log(q[j])) for j in range(n))
        return total / n

    return (kl_dir(t_v, t_t, s_v, s_t) + kl_dir(t_t, t_v, s_t, s_v)) / 2


def naive_pair(s_v, s_t, ids, tau):
    return (naive_in_batch_nce(s_v, s_t, ids, tau) + naive_in_batch_nce(s_t, s_v, ids, tau)) / 2


def close(value, expected, tol=1e-5):
    assert float(value) == pytest.approx(expected, rel=tol, abs=tol)


def only(**weights):
    base = {name: 0.0 for name in TERMS}
    base.update(weights)
    return base


# -- each term --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cross_modal", [False, True])
@pytest.mark.parametrize("mask", [True, False])
def test_contrastive_with_queue(batch, cross_modal, mask):
    loss = DistillLoss(LossConfig(**only(contrastive=1.0), cross_modal=cross_modal, mask_same_image=mask))
    out = loss(**batch)
    b, T = batch, 0.05
    ids = IDS if mask else None
    qv, qt = b["queue_v_image_ids"].tolist(), b["queue_t_image_ids"].tolist()
    expected = naive_queue_nce(b["s_v"], b["t_v"], b["queue_v"], ids, qv, T) + naive_queue_nce(
        b["s_t"], b["t_t"], b["queue_t"], ids, qt, T
    )
    if cross_modal:
        expected += naive_queue_nce(b["s_v"], b["t_t"], b["queue_t"], ids, qt, T) + naive_queue_nce(
            b["s_t"], b["t_v"], b["queue_v"], ids, qv, T
        )
    assert set(out) == {"contrastive_loss"}
    close(out["contrastive_loss"], expected)


def test_contrastive_masks_queue_entries_of_the_anchors_image(batch):
    """The whole-bank case: the queue holds the positive itself; masking must drop it (and its siblings)."""
    b = dict(batch)
    b["queue_v"] = torch.cat([b["t_v"], b["queue_v"]])  # rows of the batch's own images
    b["queue_v_image_ids"] = torch.cat([torch.tensor(IDS), b["queue_v_image_ids"]])
    loss = DistillLoss(LossConfig(**only(contrastive=1.0)))
    masked = loss(**b)["contrastive_loss"]
    expected = naive_queue_nce(
        b["s_v"], b["t_v"], b["queue_v"], IDS, b["queue_v_image_ids"].tolist(), 0.05
    ) + naive_queue_nce(b["s_t"], b["t_t"], b["queue_t"], IDS, b["queue_t_image_ids"].tolist(), 0.05)
    close(masked, expected)
    assert all(i in b["queue_v_image_ids"].tolist() for i in IDS)  # every anchor has entries to mask
    unmasked = DistillLoss(LossConfig(**only(contrastive=1.0), mask_same_image=False))(**b)["contrastive_loss"]
    assert float(unmasked) > float(masked)


@pytest.mark.parametrize("cross_modal", [False, True])
@pytest.mark.parametrize("mask", [True, False])
def test_contrastive_in_batch_without_queue(batch, cross_modal, mask):
    loss = DistillLoss(LossConfig(**only(contrastive=1.0), cross_modal=cross_modal, mask_same_image=mask))
    b = {k: batch[k] for k in ("s_v", "s_t", "t_v", "t_t", "image_ids")}
    out = loss(**b)
    ids, T = (IDS if mask else None), 0.05
    expected = naive_in_batch_nce(b["s_v"], b["t_v"], ids, T) + naive_in_batch_nce(b["s_t"], b["t_t"], ids, T)
    if cross_modal:
        expected += naive_in_batch_nce(b["s_v"], b["t_t"], ids, T) + naive_in_batch_nce(b["s_t"], b["t_v"], ids, T)
    close(out["contrastive_loss"], expected)


def test_feature_l1(batch):
    out = DistillLoss(LossConfig(**only(l1=1.0)))(**batch)
    b = batch
    expected = 0.0
    for s, t in (("s_v", "t_v"), ("s_t", "t_t")):
        S, T = rows(b[s]), rows(b[t])
        expected += sum(abs(S[i][d] - T[i][d]) for i in range(B) for d in range(D)) / (B * D)
    close(out["l1_loss"], expected)


def test_cosine(batch):
    b = dict(batch)
    b["s_v"] = b["s_v"] * 3.0  # not unit-norm: the term is a cosine, not a dot product
    out = DistillLoss(LossConfig(**only(cosine=1.0)))(**b)
    expected = 0.0
    for s, t in (("s_v", "t_v"), ("s_t", "t_t")):
        S, T = rows(b[s]), rows(b[t])
        cos = [dot(S[i], T[i]) / math.sqrt(dot(S[i], S[i]) * dot(T[i], T[i])) for i in range(B)]
        expected += (1 - sum(cos) / B) / 2
    close(out["cosine_loss"], expected)


@pytest.mark.parametrize("margin", [0.2, 0.05, 0.0])
@pytest.mark.parametrize("mask", [True, False])
def test_triplet_four_pairings(batch, margin, mask):
    loss = DistillLoss(LossConfig(**only(triplet=1.0), margin=margin, mask_same_image=mask))
    out = loss(**batch)
    b, ids = batch, (IDS if mask else None)
    expected = sum(
        naive_triplet(b[x], b[y], ids, margin)[0]
        for x, y in (("s_v", "t_v"), ("s_t", "t_t"), ("s_v", "t_t"), ("s_t", "t_v"))
    )
    close(out["triplet_loss"], expected)


def test_triplet_skips_a_same_image_hardest_negative():
    """Pairs 0 and 2 share image 0, so their teacher image rows are the same vector: for anchor 0, row 2
    is the most similar "negative" of all, and must be skipped for the hardest OTHER-image row."""
    t = unit(B, D, seed=11)
    t[2] = t[0]  # the image row of both captions of image 0
    s = F.normalize(t + 0.3 * unit(B, D, seed=12), dim=-1)
    ids = torch.tensor(IDS)
    S = s @ t.T
    unmasked_pick = int(S[0].masked_fill(torch.eye(B, dtype=torch.bool)[0], -2).argmax())
    assert unmasked_pick == 2  # without image ids, the hardest "negative" of anchor 0 is its own image
    value, pick_s, pick_im = naive_triplet(s, t, IDS, margin=0.2)
    assert IDS[pick_s[0]] != 0 and IDS[pick_im[0]] != 0
    assert all(IDS[j] != IDS[i] for i, j in enumerate(pick_s))
    close(hardest_negative_triplet(s, t, ids, 0.2), value)
    # what the diagonal-only version would pick costs more here: same-image rows sit at the top
    diag_only, pick_s_diag, _ = naive_triplet(s, t, None, margin=0.2)
    assert pick_s_diag[0] == 2
    close(hardest_negative_triplet(s, t, None, 0.2), diag_only)
    assert diag_only > value


def test_triplet_row_without_negatives_is_zero():
    ids = torch.zeros(4, dtype=torch.long)  # one image only: no negatives anywhere
    a, b = unit(4, D, seed=13), unit(4, D, seed=14)
    assert float(hardest_negative_triplet(a, b, ids, 0.2)) == 0.0


@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_relation(batch, tau):
    out = DistillLoss(LossConfig(**only(relation=1.0), relation_temperature=tau))(**batch)
    b = batch
    close(out["relation_loss"], naive_relation(b["s_v"], b["s_t"], b["t_v"], b["t_t"], tau))


def test_relation_is_zero_when_student_copies_teacher(batch):
    b = dict(batch, s_v=batch["t_v"].clone(), s_t=batch["t_t"].clone())
    out = DistillLoss(LossConfig(**only(relation=1.0)))(**b)
    assert abs(float(out["relation_loss"])) < 1e-6


@pytest.mark.parametrize("mask", [True, False])
def test_pair_contrastive_needs_no_teacher(batch, mask):
    loss = DistillLoss(LossConfig(**only(pair_contrastive=1.0), pair_temperature=0.07, mask_same_image=mask))
    assert not loss.needs_teacher and not loss.needs_queue
    out = loss(batch["s_v"], batch["s_t"], None, None, batch["image_ids"])
    close(out["pair_contrastive_loss"], naive_pair(batch["s_v"], batch["s_t"], IDS if mask else None, 0.07))


# -- the composite -------------------------------------------------------------------------------------------
def test_identical_student_and_teacher_give_zero_l1_and_cosine(batch):
    x_v, x_t = batch["t_v"], batch["t_t"]
    out = DistillLoss(LossConfig())(x_v.clone(), x_t.clone(), x_v, x_t, batch["image_ids"])
    assert float(out["l1_loss"]) == 0.0
    assert abs(float(out["cosine_loss"])) < 1e-6


def test_gradients_reach_the_student_only(batch):
    cfg = LossConfig(relation=1.0, pair_contrastive=1.0, cross_modal=True)
    b = {k: (v.clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in batch.items()}
    out = DistillLoss(cfg)(**b)
    assert set(out) == {f"{n}_loss" for n in DSMD_TERMS}  # the knowledge terms: tests/test_losses_knowledge.py
    sum(out.values()).backward()
    for name in ("s_v", "s_t"):
        assert b[name].grad is not None and torch.isfinite(b[name].grad).all() and b[name].grad.abs().sum() > 0
    for name in ("t_v", "t_t", "queue_v", "queue_t"):
        assert b[name].grad is None
    # and per term: every term sends a gradient to the student
    for term, value in DistillLoss(cfg)(**b).items():
        g = torch.autograd.grad(value, [b["s_v"], b["s_t"]], allow_unused=True)
        assert any(x is not None and x.abs().sum() > 0 for x in g), term


@pytest.mark.parametrize("zero", DSMD_TERMS)
def test_weight_zero_builds_no_term(zero):
    weights = {name: 1.0 for name in DSMD_TERMS}
    weights[zero] = 0.0
    loss = DistillLoss(LossConfig(**weights))
    assert f"{zero}_loss" not in loss.term_names
    assert f"{zero}_loss" not in loss.weights
    assert zero not in loss.terms
    assert loss.term_names == tuple(f"{n}_loss" for n in DSMD_TERMS if n != zero)
    assert loss.needs_queue == (zero != "contrastive")
    b = {
        "s_v": unit(B, D, seed=1),
        "s_t": unit(B, D, seed=2),
        "t_v": unit(B, D, seed=3),
        "t_t": unit(B, D, seed=4),
        "image_ids": torch.tensor(IDS),
    }
    assert tuple(loss(**b)) == loss.term_names


def test_weights_come_from_the_config():
    loss = DistillLoss(LossConfig(contrastive=2.0, l1=0.5, cosine=0.0, triplet=1.0))
    assert loss.weights == {"contrastive_loss": 2.0, "l1_loss": 0.5, "triplet_loss": 1.0}
    assert loss.term_names == ("contrastive_loss", "l1_loss", "triplet_loss")


def test_bf16_inputs_and_autocast_run_in_fp32(batch):
    loss = DistillLoss(LossConfig(relation=1.0, pair_contrastive=1.0, cross_modal=True))
    low = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in batch.items()}
    upcast = {k: (v.float() if v.is_floating_point() else v) for k, v in low.items()}
    reference = loss(**upcast)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(**low)
    for name, value in out.items():
        assert value.dtype == torch.float32, name
        assert float(value) == pytest.approx(float(reference[name]), rel=1e-6, abs=1e-6), name


def test_missing_ids_are_refused(batch):
    loss = DistillLoss(LossConfig())
    with pytest.raises(ValueError, match="image_ids"):
        loss(batch["s_v"], batch["s_t"], batch["t_v"], batch["t_t"], None)
    with pytest.raises(ValueError, match="queue_v_image_ids"):
        loss(
            batch["s_v"],
            batch["s_t"],
            batch["t_v"],
            batch["t_t"],
            batch["image_ids"],
            batch["queue_v"],
            batch["queue_t"],
        )
    with pytest.raises(ValueError, match="both queue_v and queue_t"):
        loss(
            batch["s_v"],
            batch["s_t"],
            batch["t_v"],
            batch["t_t"],
            batch["image_ids"],
            batch["queue_v"],
            None,
            batch["queue_v_image_ids"],
            None,
        )
    with pytest.raises(ValueError, match="t_v"):
        loss(batch["s_v"], batch["s_t"], None, batch["t_t"], batch["image_ids"])


def test_config_is_checked():
    cfg = from_dict(LossConfig, {"margin": 0.05, "triplet": 2}, "distill.loss")
    assert cfg.margin == 0.05 and cfg.triplet == 2.0
    with pytest.raises(ConfigError, match="distill.loss.bogus"):
        from_dict(LossConfig, {"bogus": 1}, "distill.loss")
    with pytest.raises(ConfigError, match="l1"):
        from_dict(LossConfig, {"l1": -1}, "distill.loss")
    with pytest.raises(ConfigError, match="every loss weight is 0"):
        from_dict(LossConfig, only(), "distill.loss")
    with pytest.raises(ConfigError, match="temperature"):
        from_dict(LossConfig, {"temperature": 0}, "distill.loss")
    with pytest.raises(ConfigError, match="queue_size"):
        from_dict(LossConfig, {"queue_size": -1}, "distill.loss")


def test_ids_may_be_read_only_numpy_arrays(batch):
    import numpy as np

    as_numpy = {}
    for key in ("image_ids", "queue_v_image_ids", "queue_t_image_ids"):
        a = batch[key].numpy().astype(np.int32)
        a.setflags(write=False)  # as a memory-mapped store's text_image is
        as_numpy[key] = a
    loss = DistillLoss(LossConfig())
    expected = loss(**batch)
    out = loss(**{**batch, **as_numpy})
    assert {k: float(v) for k, v in out.items()} == {k: float(v) for k, v in expected.items()}


# -- unpaired rows: images without captions and texts without images join the intra-modal terms -----------
UV, UT = 3, 4
U_V_IDS = [9, 10, 4]  # image rows of the unpaired images (4 is also a queue entry's image: masked there)
U_T_IDS = [-1, -2, -3, -4]  # texts of no image: ids no image has, distinct per text


@pytest.fixture
def unpaired():
    from pipeline.distill.losses import UnpairedRows

    return UnpairedRows(
        s_v=unit(UV, D, seed=11),
        t_v=unit(UV, D, seed=12),
        v_ids=torch.tensor(U_V_IDS),
        s_t=unit(UT, D, seed=13),
        t_t=unit(UT, D, seed=14),
        t_ids=torch.tensor(U_T_IDS),
    )


def cat(a, b):
    return torch.cat([a, b])


def naive_relation_rect(s_v, s_t, t_v, t_t, tau):
    """naive_relation for n_v images against n_t texts (rows: images for i2t, texts for t2i)."""
    s_v, s_t, t_v, t_t = rows(s_v), rows(s_t), rows(t_v), rows(t_t)

    def kl_dir(ta, tb, sa, sb):
        total = 0.0
        for i in range(len(ta)):
            p = softmax([dot(ta[i], tb[j]) / tau for j in range(len(tb))])
            q = softmax([dot(sa[i], sb[j]) / tau for j in range(len(sb))])
            total += sum(p[j] * (math.log(p[j]) - math.log(q[j])) for j in range(len(tb)))
        return total / len(ta)

    return (kl_dir(t_v, t_t, s_v, s_t) + kl_dir(t_t, t_v, s_t, s_v)) / 2


@pytest.mark.parametrize("cross_modal", [False, True])
@pytest.mark.parametrize("mask", [True, False])
def test_contrastive_with_unpaired_rows_and_queue(batch, unpaired, cross_modal, mask):
    b, u, T = dict(batch), unpaired, 0.05
    b["queue_v"] = cat(u.t_v, b["queue_v"])  # a whole-bank-like queue: the unpaired images' own rows are in it
    b["queue_v_image_ids"] = cat(torch.tensor(U_V_IDS), b["queue_v_image_ids"])
    loss = DistillLoss(LossConfig(**only(contrastive=1.0), cross_modal=cross_modal, mask_same_image=mask))
    out = loss(**b, unpaired=u)["contrastive_loss"]
    qv, qt = b["queue_v_image_ids"].tolist(), b["queue_t_image_ids"].tolist()
    ids_v, ids_t, ids = (IDS + U_V_IDS, IDS + U_T_IDS, IDS) if mask else (None, None, None)
    expected = naive_queue_nce(cat(b["s_v"], u.s_v), cat(b["t_v"], u.t_v), b["queue_v"], ids_v, qv, T)
    expected += naive_queue_nce(cat(b["s_t"], u.s_t), cat(b["t_t"], u.t_t), b["queue_t"], ids_t, qt, T)
    if cross_modal:  # pairs only
        expected += naive_queue_nce(b["s_v"], b["t_t"], b["queue_t"], ids, qt, T)
        expected += naive_queue_nce(b["s_t"], b["t_v"], b["queue_v"], ids, qv, T)
    close(out, expected)


@pytest.mark.parametrize("mask", [True, False])
def test_contrastive_in_batch_with_unpaired_rows(batch, unpaired, mask):
    b, u, T = {k: batch[k] for k in ("s_v", "s_t", "t_v", "t_t", "image_ids")}, unpaired, 0.05
    out = DistillLoss(LossConfig(**only(contrastive=1.0), mask_same_image=mask))(**b, unpaired=u)
    ids_v, ids_t = (IDS + U_V_IDS, IDS + U_T_IDS) if mask else (None, None)
    expected = naive_in_batch_nce(cat(b["s_v"], u.s_v), cat(b["t_v"], u.t_v), ids_v, T)
    expected += naive_in_batch_nce(cat(b["s_t"], u.s_t), cat(b["t_t"], u.t_t), ids_t, T)
    close(out["contrastive_loss"], expected)


def test_l1_cosine_relation_with_unpaired_rows(batch, unpaired):
    b, u = batch, unpaired
    cfg = LossConfig(**only(l1=1.0, cosine=1.0, relation=1.0), relation_temperature=0.1)
    out = DistillLoss(cfg)(**b, unpaired=u)
    l1 = cos = 0.0
    for s, t, n in (
        (cat(b["s_v"], u.s_v), cat(b["t_v"], u.t_v), B + UV),
        (cat(b["s_t"], u.s_t), cat(b["t_t"], u.t_t), B + UT),
    ):
        S, T = rows(s), rows(t)
        l1 += sum(abs(S[i][d] - T[i][d]) for i in range(n) for d in range(D)) / (n * D)
        cos += (1 - sum(dot(S[i], T[i]) / math.sqrt(dot(S[i], S[i]) * dot(T[i], T[i])) for i in range(n)) / n) / 2
    close(out["l1_loss"], l1)
    close(out["cosine_loss"], cos)
    rel = naive_relation_rect(
        cat(b["s_v"], u.s_v), cat(b["s_t"], u.s_t), cat(b["t_v"], u.t_v), cat(b["t_t"], u.t_t), 0.1
    )
    close(out["relation_loss"], rel)
    # only one side drawn: the other modality sees its pairs alone
    only_v = type(u)(s_v=u.s_v, t_v=u.t_v, v_ids=u.v_ids)
    l1_v = DistillLoss(LossConfig(**only(l1=1.0)))(**b, unpaired=only_v)["l1_loss"]
    S, T = rows(b["s_t"]), rows(b["t_t"])
    text_part = sum(abs(S[i][d] - T[i][d]) for i in range(B) for d in range(D)) / (B * D)
    S, T = rows(cat(b["s_v"], u.s_v)), rows(cat(b["t_v"], u.t_v))
    close(l1_v, text_part + sum(abs(S[i][d] - T[i][d]) for i in range(B + UV) for d in range(D)) / ((B + UV) * D))


def test_pair_terms_ignore_unpaired_rows_and_gradients_reach_them(batch, unpaired):
    cfg = LossConfig(relation=1.0, pair_contrastive=1.0, cross_modal=True)
    pair_only = DistillLoss(LossConfig(**only(triplet=1.0, pair_contrastive=1.0)))
    a, b = pair_only(**batch), pair_only(**batch, unpaired=unpaired)
    assert all(torch.equal(a[k], b[k]) for k in a)
    u = type(unpaired)(
        **{k: (v.clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in vars(unpaired).items()}
    )
    out = DistillLoss(cfg)(**batch, unpaired=u)
    for term in ("contrastive_loss", "l1_loss", "cosine_loss", "relation_loss"):
        g = torch.autograd.grad(out[term], [u.s_v, u.s_t], retain_graph=True)
        assert all(x.abs().sum() > 0 for x in g), term
    for term in ("triplet_loss", "pair_contrastive_loss"):
        assert not out[term].requires_grad or all(
            x is None for x in torch.autograd.grad(out[term], [u.s_v, u.s_t], allow_unused=True, retain_graph=True)
        ), term
    sum(out.values()).backward()
    assert u.t_v.grad is None and u.t_t.grad is None


def test_unpaired_rows_are_checked(batch, unpaired):
    loss = DistillLoss(LossConfig(**only(l1=1.0)))
    with pytest.raises(ValueError, match=r"unpaired t_v: expected teacher rows of shape \(3, 8\)"):
        loss(**batch, unpaired=type(unpaired)(s_v=unpaired.s_v, t_v=unpaired.t_v[:2], v_ids=unpaired.v_ids))
    with pytest.raises(ValueError, match="unpaired t_ids: needed to mask"):
        loss(**batch, unpaired=type(unpaired)(s_t=unpaired.s_t, t_t=unpaired.t_t))
