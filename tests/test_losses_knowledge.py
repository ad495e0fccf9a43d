"""The knowledge terms (LEMKD response / relation, DCD, MCAD, teacher ensembles) against naive references
written here with explicit per-row Python loops (float64 Python math), and the plumbing around them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import from_dict
from pipeline.distill.losses import (
    KNOWLEDGE_TERMS,
    TERMS,
    DistillLoss,
    Knowledge,
    LossConfig,
    TeacherRows,
    resolve_teacher_scales,
)
from pipeline.distill.losses.ensemble import ensemble_log_probs
from pipeline.errors import ConfigError

B, D, D2, K, KQ = 6, 8, 5, 4, 7
IDS = [0, 1, 0, 2, 3, 1]  # pairs 0/2 and 1/5 share an image
Q_IDS = [0, 4, 1, 5, 6, 2, 7]  # queue entries of the batch's images 0, 1, 2 (masked for their anchors)
TAU, TAU2 = 20.0, 8.0  # the teachers' logit scales


def unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def mask(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) > 0.25


@pytest.fixture
def inputs():
    """Pairs, a queue, mined candidates (some padded), cross-encoder logits, a second teacher of dimension D2."""
    ok_v, ok_t = mask(21, B, K), mask(22, B, K)
    ok_v[0] = False  # a caption without any real candidate: its list is the positive alone
    ok_t[1] = True
    extra = TeacherRows(
        t_v=unit(B, D2, seed=31),
        t_t=unit(B, D2, seed=32),
        queue_v=unit(KQ, D2, seed=33),
        queue_t=unit(KQ, D2, seed=34),
        cand_v=unit(B, K, D2, seed=35),
        cand_t=unit(B, K, D2, seed=36),
    )
    g = torch.Generator().manual_seed(41)
    knowledge = Knowledge(
        cand_v=unit(B, K, D, seed=7),
        cand_t=unit(B, K, D, seed=8),
        cand_v_ok=ok_v,
        cand_t_ok=ok_t,
        ce_t2i=3 * torch.randn(B, 1 + K, generator=g),
        ce_i2t=3 * torch.randn(B, 1 + K, generator=g),
        extra=(extra,),
    )
    return {
        "s_v": unit(B, D, seed=1),
        "s_t": unit(B, D, seed=2),
        "t_v": unit(B, D, seed=3),
        "t_t": unit(B, D, seed=4),
        "image_ids": torch.tensor(IDS),
        "queue_v": unit(KQ, D, seed=5),
        "queue_t": unit(KQ, D, seed=6),
        "queue_v_image_ids": torch.tensor(Q_IDS),
        "queue_t_image_ids": torch.tensor(Q_IDS[::-1]),
        "knowledge": knowledge,
    }


def only(**weights):
    base = {name: 0.0 for name in TERMS}
    base.update(weights)
    return base


def build(scales=(TAU,), **cfg):
    weights = {k: v for k, v in cfg.items() if k in TERMS}
    rest = {k: v for k, v in cfg.items() if k not in TERMS}
    return DistillLoss(LossConfig(**only(**weights), **rest), teacher_scales=scales)


def close(value, expected, tol=1e-5):
    assert float(value.detach() if isinstance(value, torch.Tensor) else value) == pytest.approx(
        expected, rel=tol, abs=tol
    )


# -- naive references -----------------------------------------------------------------------------------
def rows(x):
    return [[float(v) for v in r] for r in x]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    return [x / sum(e) for x in e]


def mean_softmax(lists):
    """1/M sum_m softmax(lists[m]): the ensemble target, entry by entry."""
    ps = [softmax(v) for v in lists]
    return [sum(p[j] for p in ps) / len(ps) for j in range(len(lists[0]))]


def kl(p, q):
    return sum(pj * (math.log(pj) - math.log(qj)) for pj, qj in zip(p, q) if pj > 0)


def entropy(p):
    return -sum(pj * math.log(pj) for pj in p if pj > 0)


def naive_response(s_v, s_t, teachers, scales, s_scale):
    """teachers: [(t_v, t_t)] per teacher; KL over the batch rows, both directions, halved."""
    s_v, s_t = rows(s_v), rows(s_t)
    T = [(rows(a), rows(b)) for a, b in teachers]
    n, total = len(s_v), 0.0
    for i in range(n):  # image i against every caption
        p = mean_softmax([[tau * dot(tv[i], tt[j]) for j in range(n)] for (tv, tt), tau in zip(T, scales)])
        total += kl(p, softmax([s_scale * dot(s_v[i], s_t[j]) for j in range(n)])) / n
    for j in range(n):  # caption j against every image
        p = mean_softmax([[tau * dot(tt[j], tv[i]) for i in range(n)] for (tv, tt), tau in zip(T, scales)])
        total += kl(p, softmax([s_scale * dot(s_t[j], s_v[i]) for i in range(n)])) / n
    return total / 2


def naive_response_queue(s_v, s_t, teachers, scales, s_scale, ids, qv_ids, qt_ids):
    """teachers: [(t_v, t_t, queue_v, queue_t)]; the student scores against the first teacher's rows."""
    s_v, s_t = rows(s_v), rows(s_t)
    T = [tuple(rows(x) for x in t) for t in teachers]
    total = 0.0
    # (student anchors, anchor / positive / queue index into a teacher's tuple, queue image ids)
    for s, a, p, q, q_ids in ((s_v, 0, 1, 3, qt_ids), (s_t, 1, 0, 2, qv_ids)):
        for i in range(len(s)):
            kept = [k for k in range(len(T[0][q])) if ids is None or q_ids[k] != ids[i]]
            main = T[0]
            student = [s_scale * dot(s[i], main[p][i])] + [s_scale * dot(s[i], main[q][k]) for k in kept]
            teacher = [
                [tau * dot(t[a][i], t[p][i])] + [tau * dot(t[a][i], t[q][k]) for k in kept] for t, tau in zip(T, scales)
            ]
            total += kl(mean_softmax(teacher), softmax(student)) / len(s)
    return total / 2


def naive_intra(s_v, s_t, t_v, t_t, temp):
    total = 0.0
    for s, t in ((rows(s_v), rows(t_v)), (rows(s_t), rows(t_t))):
        n = len(s)
        for i in range(n):
            others = [j for j in range(n) if j != i]
            p = softmax([dot(t[i], t[j]) / temp for j in others])
            q = softmax([dot(s[i], s[j]) / temp for j in others])
            total += kl(p, q) / n
    return total / 2


def directions(x):
    """The two candidate-list directions of the inputs, as naive lists: (student anchors, per teacher
    (anchors, positives, candidates), ok [B][K], ce [B][1+K]); teacher 0 the main one, teacher 1 the extra."""
    k, e = x["knowledge"], x["knowledge"].extra[0]
    t2i = (x["s_t"], [(x["t_t"], x["t_v"], k.cand_v), (e.t_t, e.t_v, e.cand_v)], k.cand_v_ok, k.ce_t2i)
    i2t = (x["s_v"], [(x["t_v"], x["t_t"], k.cand_t), (e.t_v, e.t_t, e.cand_t)], k.cand_t_ok, k.ce_i2t)
    out = []
    for s, teachers, ok, ce in (t2i, i2t):
        T = [(rows(a), rows(p), [rows(c) for c in cand]) for a, p, cand in teachers]
        out.append((rows(s), T, ok.tolist(), None if ce is None else rows(ce)))
    return out


def naive_dcd(x, scales, temperature, difficulty, margin, n_teachers):
    """(loss, per row: how many real candidates the margin dropped (<= 0), weights per direction)"""
    total, kept_counts, weights = 0.0, [], []
    for s, T, ok, _ in directions(x):
        ces, ents = [], []
        for i in range(len(s)):
            a, p, c = T[0][0][i], T[0][1][i], T[0][2][i]
            pos = dot(a, p)
            kept = [j for j in range(K) if ok[i][j] and (margin is None or dot(a, c[j]) < pos - margin)]
            kept_counts.append(len(kept) - sum(ok[i]))
            logits = [dot(s[i], p) / temperature] + [dot(s[i], c[j]) / temperature for j in kept]
            ces.append(-math.log(softmax(logits)[0]))
            teacher = [
                [tau * dot(ta[i], tp[i])] + [tau * dot(ta[i], tc[i][j]) for j in kept]
                for (ta, tp, tc), tau in zip(T[:n_teachers], scales)
            ]
            ents.append(entropy(mean_softmax(teacher)))
        n = len(s)
        w = [h / sum(ents) for h in ents] if difficulty == "entropy" else [1 / n] * n
        total += sum(wi * ci for wi, ci in zip(w, ces))
        weights.append(w)
    return total, kept_counts, weights


def naive_fused(T, ok_i, ce_i, i, scales, lam, t_ce, n_teachers):
    """(kept entries, fused target P^F over them) for anchor i; entry 0 the positive."""
    kept = [0] + [j + 1 for j in range(K) if ok_i[j]]

    def score(t, j):
        ta, tp, tc = t
        return dot(ta[i], tp[i]) if j == 0 else dot(ta[i], tc[i][j - 1])

    dual = mean_softmax([[tau * score(t, j) for j in kept] for t, tau in zip(T[:n_teachers], scales)])
    z = [(1 - lam) * math.log(dual[m]) + lam * ce_i[j] / t_ce for m, j in enumerate(kept)]
    return kept, softmax(z)


def naive_mcad_kl(x, scales, s_scale, lam, t_ce, n_teachers):
    total = 0.0
    for s, T, ok, ce in directions(x):
        for i in range(len(s)):
            kept, target = naive_fused(T, ok[i], ce[i], i, scales, lam, t_ce, n_teachers)
            rows_i = [T[0][1][i]] + T[0][2][i]
            student = softmax([s_scale * dot(s[i], rows_i[j]) for j in kept])
            total += kl(target, student) / len(s)
    return total / 2


def naive_mcad_feature(x, scales, lam, t_ce, step, n_teachers):
    total = 0.0
    for s, T, ok, ce in directions(x):
        cos_sum = 0.0
        for i in range(len(s)):
            kept, target = naive_fused(T, ok[i], ce[i], i, scales, lam, t_ce, n_teachers)
            a, rows_i = T[0][0][i], [T[0][1][i]] + T[0][2][i]
            own = softmax([scales[0] * dot(a, rows_i[j]) for j in kept])
            moved = [
                a[d] + step * sum((target[m] - own[m]) * rows_i[j][d] for m, j in enumerate(kept)) for d in range(D)
            ]
            norm = math.sqrt(dot(moved, moved))
            cos_sum += dot(s[i], moved) / (norm * math.sqrt(dot(s[i], s[i])))
        total += (1 - cos_sum / len(s)) / 2
    return total


# -- each term against its naive loop ---------------------------------------------------------------------
@pytest.mark.parametrize("teachers", [1, 2])
@pytest.mark.parametrize("s_temp", [0.05, 0.2])
def test_response(inputs, teachers, s_temp):
    names = ("second",) if teachers == 2 else ()
    scales = (TAU, TAU2)[:teachers]
    out = build(scales, response=1.0, teachers=names, student_temperature=s_temp)(**inputs)
    e = inputs["knowledge"].extra[0]
    rows_ = [(inputs["t_v"], inputs["t_t"]), (e.t_v, e.t_t)][:teachers]
    close(out["response_loss"], naive_response(inputs["s_v"], inputs["s_t"], rows_, scales, 1 / s_temp))


def test_response_is_the_relation_term_at_one_temperature(inputs):
    """One teacher, tau = 1 / T_S = 1 / relation_temperature: the existing relation term on the pairs."""
    loss = build((1 / 0.1,), response=1.0, relation=1.0, relation_temperature=0.1, student_temperature=0.1)
    out = loss(**inputs)
    close(out["response_loss"], float(out["relation_loss"]), tol=1e-6)


@pytest.mark.parametrize("teachers", [1, 2])
@pytest.mark.parametrize("masked", [True, False])
def test_response_queue(inputs, teachers, masked):
    names = ("second",) if teachers == 2 else ()
    scales = (TAU, TAU2)[:teachers]
    loss = build(scales, response_queue=1.0, teachers=names, student_temperature=0.1, mask_same_image=masked)
    out = loss(**inputs)
    x, e = inputs, inputs["knowledge"].extra[0]
    t = [(x["t_v"], x["t_t"], x["queue_v"], x["queue_t"]), (e.t_v, e.t_t, e.queue_v, e.queue_t)][:teachers]
    ids = IDS if masked else None
    expected = naive_response_queue(x["s_v"], x["s_t"], t, scales, 10.0, ids, Q_IDS, Q_IDS[::-1])
    close(out["response_queue_loss"], expected)


def test_response_queue_masks_the_positive_in_a_whole_bank(inputs):
    """A whole-bank queue holds each anchor's own rows: masked, they do not count the positive twice."""
    x = dict(inputs)
    x["queue_v"], x["queue_t"] = torch.cat([x["t_v"], x["queue_v"]]), torch.cat([x["t_t"], x["queue_t"]])
    x["queue_v_image_ids"] = torch.cat([torch.tensor(IDS), torch.tensor(Q_IDS)])
    x["queue_t_image_ids"] = torch.cat([torch.tensor(IDS), torch.tensor(Q_IDS[::-1])])
    out = build((TAU,), response_queue=1.0)(**x)["response_queue_loss"]
    t = [(x["t_v"], x["t_t"], x["queue_v"], x["queue_t"])]
    qv, qt = x["queue_v_image_ids"].tolist(), x["queue_t_image_ids"].tolist()
    close(out, naive_response_queue(x["s_v"], x["s_t"], t, (TAU,), 20.0, IDS, qv, qt))
    unmasked = build((TAU,), response_queue=1.0, mask_same_image=False)(**x)["response_queue_loss"]
    assert abs(float(unmasked) - float(out)) > 1e-3


@pytest.mark.parametrize("temp", [0.05, 0.3])
def test_intra_relation(inputs, temp):
    out = build(intra_relation=1.0, intra_relation_temperature=temp)(**inputs)
    x = inputs
    close(out["intra_relation_loss"], naive_intra(x["s_v"], x["s_t"], x["t_v"], x["t_t"], temp))


def test_intra_relation_includes_unpaired_rows(inputs):
    from pipeline.distill.losses import UnpairedRows

    u = UnpairedRows(s_v=unit(3, D, seed=51), t_v=unit(3, D, seed=52), v_ids=torch.tensor([9, 10, 11]))
    out = build(intra_relation=1.0)(**inputs, unpaired=u)["intra_relation_loss"]
    x = inputs
    s_v, t_v = torch.cat([x["s_v"], u.s_v]), torch.cat([x["t_v"], u.t_v])
    close(out, naive_intra(s_v, x["s_t"], t_v, x["t_t"], 0.05))


# the other teachers only join the difficulty weights: without them, a second teacher is refused (config test)
@pytest.mark.parametrize(("difficulty", "teachers"), [("entropy", 1), ("entropy", 2), ("none", 1)])
@pytest.mark.parametrize("margin", [0.0, 0.1, None])
def test_dcd(inputs, difficulty, margin, teachers):
    names = ("second",) if teachers == 2 else ()
    scales = (TAU, TAU2)[:teachers]
    cfg = dict(dcd=1.0, dcd_difficulty=difficulty, dcd_margin=margin, dcd_temperature=0.07, teachers=names)
    out = build(scales, **cfg)(**inputs)
    expected, dropped, _ = naive_dcd(inputs, scales, 0.07, difficulty, margin, teachers)
    close(out["dcd_loss"], expected)
    if margin is not None:  # the data exercise the margin: some candidates dropped, others kept
        assert any(d < 0 for d in dropped) and any(d == 0 for d in dropped)


def test_dcd_difficulty_weights_favour_rows_the_teacher_is_unsure_of(inputs):
    """Caption 3's candidates are all its positive's row: a flat teacher distribution, the largest entropy
    of the batch, so its CE gets the largest weight; and the weighted loss is not the plain mean."""
    k = inputs["knowledge"]
    cand = k.cand_v.clone()
    cand[3] = inputs["t_v"][3]
    x = {
        **inputs,
        "knowledge": Knowledge(**{**vars(k), "cand_v": cand, "cand_v_ok": torch.ones(B, K, dtype=torch.bool)}),
    }
    weighted = build(dcd=1.0, dcd_margin=None)(**x)["dcd_loss"]
    expected, _, (w_t2i, _) = naive_dcd(x, (TAU,), 0.05, "entropy", None, 1)
    close(weighted, expected)
    assert max(range(B), key=lambda i: w_t2i[i]) == 3 and w_t2i[3] > 2 / B
    uniform = build(dcd=1.0, dcd_margin=None, dcd_difficulty="none")(**x)["dcd_loss"]
    assert abs(float(weighted) - float(uniform)) > 1e-3


def test_dcd_without_any_entropy_weighs_rows_uniformly(inputs):
    """Teacher distributions that are all one-hot (H = 0 everywhere): uniform weights, not 0 / 0."""
    scales = (1e4,)  # sharp enough that every softmax is exactly one-hot in float32
    out = build(scales, dcd=1.0, dcd_margin=None)(**inputs)["dcd_loss"]
    uniform = build(scales, dcd=1.0, dcd_margin=None, dcd_difficulty="none")(**inputs)["dcd_loss"]
    assert torch.isfinite(out)
    close(out, float(uniform), tol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("teachers", [1, 2])
def test_mcad_kl(inputs, lam, teachers):
    names = ("second",) if teachers == 2 else ()
    scales = (TAU, TAU2)[:teachers]
    loss = build(
        scales, mcad_kl=1.0, teachers=names, mcad_ce_weight=lam, mcad_ce_temperature=2.0, student_temperature=0.1
    )
    close(loss(**inputs)["mcad_kl_loss"], naive_mcad_kl(inputs, scales, 10.0, lam, 2.0, teachers))


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("step", [0.0, 1.0, 3.0])
def test_mcad_feature(inputs, lam, step):
    scales = (TAU, TAU2)
    loss = build(scales, mcad_feature=1.0, teachers=("second",), mcad_ce_weight=lam, mcad_feature_step=step)
    close(loss(**inputs)["mcad_feature_loss"], naive_mcad_feature(inputs, scales, lam, 1.0, step, 2))


def test_mcad_feature_without_a_step_or_other_judgment_is_the_cosine_term(inputs):
    """eta = 0, or one teacher with lambda = 0 (the fused target is the teacher's own distribution): t~ = t."""
    cosine = build(cosine=1.0)(**inputs)["cosine_loss"]
    for cfg in ({"mcad_feature_step": 0.0}, {"mcad_ce_weight": 0.0}):
        close(build(mcad_feature=1.0, **cfg)(**inputs)["mcad_feature_loss"], float(cosine), tol=1e-6)


def test_ensemble_is_the_mean_after_softmax():
    g = torch.Generator().manual_seed(3)
    z = [torch.randn(3, 5, generator=g) * s for s in (1.0, 10.0, 0.1)]
    keep = torch.tensor([[True] * 5, [True, False, True, False, True], [True, True, False, False, False]])
    out = ensemble_log_probs(z, keep)
    for i in range(3):
        kept = [j for j in range(5) if keep[i, j]]
        p = mean_softmax([[float(zm[i, j]) for j in kept] for zm in z])
        for m, j in enumerate(kept):
            assert float(out[i, j].exp()) == pytest.approx(p[m], rel=1e-6)
        assert all(out[i, j] == float("-inf") for j in range(5) if not keep[i, j])
    assert torch.equal(ensemble_log_probs(z[:1]), z[0].log_softmax(-1))  # one teacher: its own softmax


# -- the learned student temperature ---------------------------------------------------------------------
def test_learned_student_temperature_is_a_parameter_with_a_gradient(inputs):
    fixed = build(response=1.0, mcad_kl=1.0, student_temperature=0.1)
    learned = build(response=1.0, mcad_kl=1.0, student_temperature=0.1, learn_student_temperature=True)
    assert [n for n, _ in learned.named_parameters()] == ["student_log_scale"]
    assert list(fixed.parameters()) == []
    a, b = fixed(**inputs), learned(**inputs)
    for name in a:  # at its initial value, the same loss
        close(b[name], float(a[name]), tol=1e-6)
    (g,) = torch.autograd.grad(sum(b.values()), [learned.student_log_scale])
    assert torch.isfinite(g) and float(g) != 0.0
    assert "student_log_scale" in learned.state_dict()


def test_learned_student_scale_is_clamped_at_100(inputs):
    loss = build(response=1.0, learn_student_temperature=True, student_temperature=0.001)  # 1/T = 1000
    assert float(loss.student_scale().detach()) == 100.0
    out = loss(**inputs)["response_loss"]
    close(out, naive_response(inputs["s_v"], inputs["s_t"], [(inputs["t_v"], inputs["t_t"])], (TAU,), 100.0))
    (g,) = torch.autograd.grad(out, [loss.student_log_scale])
    assert float(g) == 0.0  # beyond the clamp the scale does not move further up


# -- the composite ------------------------------------------------------------------------------------------
def full(**cfg):
    weights = {name: 1.0 for name in TERMS}
    weights.update(cfg)
    return build((TAU, TAU2), teachers=("second",), cross_modal=True, **weights)


def test_gradients_reach_the_student_only_for_every_term(inputs):
    x = {k: (v.clone().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
         for k, v in inputs.items()}  # fmt: skip
    kn = x["knowledge"]
    for obj in (kn, kn.extra[0]):
        for name, v in vars(obj).items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                setattr(obj, name, v.clone().requires_grad_(True))
    loss = full(learn_student_temperature=True)
    out = loss(**x)
    assert tuple(out) == tuple(f"{n}_loss" for n in TERMS)
    for term, value in out.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), term
        g = torch.autograd.grad(value, [x["s_v"], x["s_t"]], allow_unused=True, retain_graph=True)
        assert all(t is None or torch.isfinite(t).all() for t in g), term
        assert any(t is not None and t.abs().sum() > 0 for t in g), term
    sum(out.values()).backward()
    teacher = [x["t_v"], x["t_t"], x["queue_v"], x["queue_t"], kn.cand_v, kn.cand_t, kn.ce_t2i, kn.ce_i2t]
    teacher += [v for v in vars(kn.extra[0]).values()]
    assert all(t.grad is None for t in teacher)
    assert torch.isfinite(loss.student_log_scale.grad)


@pytest.mark.parametrize("zero", KNOWLEDGE_TERMS)
def test_weight_zero_builds_no_knowledge_term(inputs, zero):
    loss = full(**{zero: 0.0})
    assert zero not in loss.terms and f"{zero}_loss" not in loss.weights
    assert tuple(loss(**inputs)) == tuple(f"{n}_loss" for n in TERMS if n != zero)


def test_what_each_configuration_needs():
    dsmd = DistillLoss(LossConfig())
    assert (dsmd.needs_queue, dsmd.needs_candidates, dsmd.needs_cross_encoder, dsmd.extra_rows) == (
        True, False, False, frozenset())  # fmt: skip
    assert dsmd.teacher_scales is None
    q = build(**only(response_queue=1.0))
    assert q.needs_queue and not q.needs_candidates
    d = build(dcd=1.0, dcd_difficulty="none", scales=None)  # no distribution read: no scale needed
    assert d.needs_candidates and not d.needs_cross_encoder and d.teacher_scales is None
    m = build((TAU, TAU2), mcad_kl=1.0, teachers=("b",))
    assert m.needs_cross_encoder and m.extra_rows == {"pairs", "candidates"}
    assert not build(mcad_kl=1.0, mcad_ce_weight=0.0).needs_cross_encoder
    r = build((TAU, TAU2), response=1.0, response_queue=1.0, teachers=("b",))
    assert r.extra_rows == {"pairs", "queue"} and not r.needs_candidates
    assert build(None, response=1.0, teacher_temperature=0.5).teacher_scales == (2.0,)


def test_bf16_inputs_and_autocast_run_in_fp32(inputs):
    loss = full()
    low = {k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in inputs.items()}  # fmt: skip
    upcast = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in low.items()}
    reference = loss(**upcast)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(**low)
    for name, value in out.items():
        assert value.dtype == torch.float32, name
        assert float(value) == pytest.approx(float(reference[name]), rel=1e-6, abs=1e-6), name


# -- refusals ----------------------------------------------------------------------------------------------
def test_missing_or_misshapen_knowledge_is_refused(inputs):
    x = dict(inputs)
    with pytest.raises(ValueError, match="knowledge: dcd need the mined candidates"):
        build(dcd=1.0)(**{**x, "knowledge": None})
    k = x["knowledge"]
    bad = Knowledge(**{**vars(k), "cand_v": k.cand_v[:, :, :3]})
    with pytest.raises(ValueError, match=r"knowledge.cand_v: expected a tensor of shape \(6, '\*', 8\)"):
        build(dcd=1.0)(**{**x, "knowledge": bad})
    with pytest.raises(ValueError, match="knowledge.cand_t_ok: expected a bool mask"):
        build(dcd=1.0)(**{**x, "knowledge": Knowledge(**{**vars(k), "cand_t_ok": k.cand_t_ok.int()})})
    with pytest.raises(ValueError, match=r"knowledge.ce_i2t: expected a tensor of shape \(6, 5\)"):
        build(mcad_kl=1.0)(**{**x, "knowledge": Knowledge(**{**vars(k), "ce_i2t": k.ce_i2t[:, 1:]})})
    with pytest.raises(ValueError, match=r"knowledge.extra: expected the rows of 1 teachers \(second\), got 0"):
        build((TAU, TAU2), response=1.0, teachers=("second",))(
            **{**x, "knowledge": Knowledge(**{**vars(k), "extra": ()})}
        )
    e = TeacherRows(**{**vars(k.extra[0]), "queue_t": None})
    with pytest.raises(ValueError, match=r"knowledge.extra\[0\] \(teacher 'second'\).queue_t"):
        build((TAU, TAU2), response_queue=1.0, teachers=("second",))(
            **{**x, "knowledge": Knowledge(**{**vars(k), "extra": (e,)})}
        )
    with pytest.raises(ValueError, match="response_queue: needs queue_v and queue_t"):
        build(response_queue=1.0)(**{**x, "queue_v": None, "queue_t": None})


def test_teacher_scales_are_required_and_resolved():
    with pytest.raises(ValueError, match="teacher_scales: response need the logit scale"):
        DistillLoss(LossConfig(**only(response=1.0)))
    with pytest.raises(ValueError, match=r"2 in all"):
        DistillLoss(LossConfig(**only(response=1.0), teachers=("b",)), teacher_scales=(TAU,))
    cfg = LossConfig(**only(response=1.0), teachers=("b",))
    assert resolve_teacher_scales(cfg, (100.0, 30), ("main", "b")) == (100.0, 30.0)
    with pytest.raises(ValueError, match="teacher 'b' records no logit scale.*teacher_temperature"):
        resolve_teacher_scales(cfg, (100.0, None), ("main", "b"))
    with pytest.raises(ValueError, match="teacher 'main': logit_scale must be a finite number > 0"):
        resolve_teacher_scales(cfg, (float("nan"), 3.0), ("main", "b"))
    fixed = LossConfig(**only(response=1.0), teachers=("b",), teacher_temperature=0.01)
    assert resolve_teacher_scales(fixed, (None, None), ("main", "b")) == (100.0, 100.0)


def test_knowledge_config_is_checked():
    cfg = from_dict(LossConfig, {"dcd": 1, "dcd_margin": None, "teachers": ["b"]}, "distill.loss")
    assert cfg.dcd == 1.0 and cfg.dcd_margin is None and cfg.teachers == ("b",)
    bad = [
        ({"response": 1, "student_temperature": 0}, "student_temperature"),
        ({"response": 1, "teacher_temperature": -1}, "teacher_temperature"),
        ({"mcad_kl": 1, "mcad_ce_weight": 1.5}, "mcad_ce_weight"),
        ({"mcad_feature": 1, "mcad_feature_step": -1}, "mcad_feature_step"),
        ({"dcd": 1, "dcd_margin": float("inf")}, "dcd_margin"),
        ({"dcd": 1, "dcd_difficulty": "bce"}, "dcd_difficulty"),
        ({"learn_student_temperature": True}, "learn_student_temperature: no term uses"),
        ({"dcd": 1, "learn_student_temperature": True}, "learn_student_temperature: no term uses"),
        ({"teachers": ["b"]}, "teachers: the other teachers join"),
        ({"dcd": 1, "dcd_difficulty": "none", "teachers": ["b"]}, "teachers: the other teachers join"),
        ({"response": 1, "teachers": ["b", "b"]}, "teachers: expected distinct"),
        ({"response": 1, "teachers": [""]}, "teachers: expected distinct"),
    ]
    for values, message in bad:
        with pytest.raises(ConfigError, match=message):
            from_dict(LossConfig, values, "distill.loss")
