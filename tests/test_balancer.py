"""The loss balancer in its three modes against hand-computed values, its guarantees when a term goes to 0,
the temperature's effect, and exact resume."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch

from pipeline.config import from_dict
from pipeline.distill.balancer import BalancerConfig, LossBalancer
from pipeline.errors import ConfigError, InputError

NAMES = ("contrastive_loss", "l1_loss", "cosine_loss", "triplet_loss")
FIXED = {"contrastive_loss": 1.0, "l1_loss": 2.0, "cosine_loss": 0.5, "triplet_loss": 1.0}
# magnitudes as at DSMD's init: contrastive ~18, L1 ~0.07, cosine <= 1, summed triplet up to 10^3
STEPS = [
    {"contrastive_loss": 18.0, "l1_loss": 0.07, "cosine_loss": 0.5, "triplet_loss": 400.0},
    {"contrastive_loss": 12.0, "l1_loss": 0.063, "cosine_loss": 0.45, "triplet_loss": 100.0},
    {"contrastive_loss": 11.0, "l1_loss": 0.05, "cosine_loss": 0.44, "triplet_loss": 90.0},
    {"contrastive_loss": 10.5, "l1_loss": 0.049, "cosine_loss": 0.30, "triplet_loss": 91.0},
]


def balancer(**cfg):
    return LossBalancer(BalancerConfig(**cfg), NAMES, FIXED)


# dsmd with its robustness switched off: the paper's formula on the raw per-step losses
LITERAL = {"smoothing": 0.0, "rate_bound": 1e6, "scale_floor": 1e-12}


def test_fixed_returns_the_configured_weights():
    b = balancer(mode="fixed")
    for raw in STEPS:
        assert b.weights(raw) == FIXED
        assert b.last_rates is None and b.last_weights == FIXED


# -- dsmd_code: the public code -------------------------------------------------------------------------
class PublicCodeBalancer:
    """chrisx599/DSMD module/balancer.py, transcribed (fed as its trainer does: torch.tensor of the losses)."""

    def __init__(self, num_losses, temperature=1, k=10):
        self.prev_losses = None
        self.weights = torch.ones(num_losses)
        self.t, self.k = temperature, k

    def __call__(self, current_losses):
        max_loss = current_losses.max()
        magnitude_adjustment = max_loss / (current_losses + 1e-8)
        adjusted_losses = current_losses * magnitude_adjustment
        if self.prev_losses is None:
            self.prev_losses = adjusted_losses.detach_()
            return self.weights
        loss_rates = adjusted_losses / (self.prev_losses + 1e-8)
        numerator = self.k * torch.exp(loss_rates / self.t)
        denominator = torch.sum(torch.exp(loss_rates / self.t))
        self.weights = (numerator / denominator) * magnitude_adjustment
        self.prev_losses = adjusted_losses.detach_()
        return self.weights


def test_dsmd_code_reproduces_the_public_code_exactly():
    ours, theirs = balancer(mode="dsmd_code"), PublicCodeBalancer(4)
    for raw in STEPS:
        w = ours.weights(raw)
        ref = theirs(torch.tensor([raw[n] for n in NAMES]))
        assert [w[n] for n in NAMES] == ref.tolist()  # bit for bit


def test_dsmd_code_collapses_to_k_over_n_max_over_l():
    b = balancer(mode="dsmd_code")
    assert b.weights(STEPS[0]) == {n: 1.0 for n in NAMES}  # the code's first call: torch.ones
    for raw in STEPS[1:]:
        w = b.weights(raw)
        biggest = max(raw.values())
        for n in NAMES:
            assert w[n] == pytest.approx(2.5 * biggest / raw[n], rel=1e-5)  # 10 / 4 * max(L) / L_i
            assert w[n] * raw[n] == pytest.approx(2.5 * biggest, rel=1e-5)  # every weighted term equal
        rates = list(b.last_rates.values())
        assert max(rates) == pytest.approx(min(rates), rel=1e-6)  # the rate has no effect


def test_dsmd_code_collapse_holds_for_any_n_and_k():
    names = ("a_loss", "b_loss", "c_loss")
    b = LossBalancer(BalancerConfig(mode="dsmd_code", k=6.0, temperature=0.5), names, {n: 1.0 for n in names})
    b.weights({"a_loss": 5.0, "b_loss": 0.1, "c_loss": 2.0})
    raw = {"a_loss": 1.0, "b_loss": 0.2, "c_loss": 3.0}
    w = b.weights(raw)
    for n in names:
        assert w[n] == pytest.approx(6.0 / 3 * 3.0 / raw[n], rel=1e-5)


# -- dsmd, robustness off: the paper's formula, with the rate on the raw losses ---------------------------
def softmax(v, T):
    e = [math.exp(x / T) for x in v]
    return [x / sum(e) for x in e]


def test_dsmd_literal_by_hand():
    b = balancer(mode="dsmd", **LITERAL)  # K = n = 4, T = 1
    L0, L1 = [STEPS[0][n] for n in NAMES], [STEPS[1][n] for n in NAMES]
    # first step: no history, uniform rates -> K/n * max/L_i = max/L_i
    w0 = b.weights(STEPS[0])
    assert b.last_rates == {n: 1.0 for n in NAMES}
    for n, li in zip(NAMES, L0):
        assert w0[n] == pytest.approx(400.0 / li, rel=1e-12)
    # second step: r_i = L_i(1)/L_i(0), s = K softmax(r), w = s * max/L_i
    w1 = b.weights(STEPS[1])
    r = [12 / 18, 0.063 / 0.07, 0.45 / 0.5, 100 / 400]
    assert [b.last_rates[n] for n in NAMES] == pytest.approx(r, rel=1e-12)
    s = [4 * p for p in softmax(r, 1.0)]
    for n, si, li in zip(NAMES, s, L1):
        assert w1[n] == pytest.approx(si * 100.0 / li, rel=1e-12)
        assert w1[n] * li == pytest.approx(si * 100.0, rel=1e-12)  # equal magnitudes, scaled by the rate share
    assert sum(w1[n] * li for n, li in zip(NAMES, L1)) == pytest.approx(4 * 100.0, rel=1e-12)


def test_dsmd_rates_change_the_weights():
    """Same current losses, different histories: the term that fell least gets the largest share."""
    cur = {"contrastive_loss": 10.0, "l1_loss": 0.05, "cosine_loss": 0.4, "triplet_loss": 80.0}
    prev = {"contrastive_loss": 20.0, "cosine_loss": 0.8, "triplet_loss": 160.0}  # these halved
    slow_l1, fast_l1 = balancer(**LITERAL), balancer(**LITERAL)
    slow_l1.weights({**prev, "l1_loss": 0.05})  # L1 did not move
    fast_l1.weights({**prev, "l1_loss": 0.10})  # L1 halved like the others
    a, b = slow_l1.weights(cur), fast_l1.weights(cur)
    assert a["l1_loss"] > b["l1_loss"]
    shares = {n: a[n] * cur[n] for n in NAMES}
    assert max(shares, key=shares.get) == "l1_loss"
    others = [shares[n] for n in NAMES if n != "l1_loss"]
    assert shares["l1_loss"] / others[0] == pytest.approx(math.exp(1.0 - 0.5))  # softmax of rates 1 vs 0.5
    assert [b[n] * cur[n] for n in NAMES] == pytest.approx([4 * 80.0 / 4] * 4)  # equal rates: equal shares
    # and dsmd_code ignores the history entirely
    c1, c2 = balancer(mode="dsmd_code"), balancer(mode="dsmd_code")
    c1.weights({**cur, "l1_loss": 0.05})
    c2.weights({**cur, "l1_loss": 0.10})
    assert c1.weights(cur) == pytest.approx(c2.weights(cur), rel=1e-6)


def test_dsmd_temperature_and_k():
    b = balancer(temperature=0.5, k=10.0, **LITERAL)
    b.weights(STEPS[0])
    w = b.weights(STEPS[1])
    r = [12 / 18, 0.063 / 0.07, 0.45 / 0.5, 100 / 400]
    s = [10 * p for p in softmax(r, 0.5)]
    for n, si in zip(NAMES, s):
        assert w[n] == pytest.approx(si * 100.0 / STEPS[1][n], rel=1e-12)


def test_dsmd_initial_normalized_rate():
    b = balancer(normalize="initial", **LITERAL)
    for raw in STEPS[:3]:
        w = b.weights(raw)
    r = [STEPS[2][n] / STEPS[0][n] for n in NAMES]  # L(t)/L(0), not L(t)/L(t-1)
    assert [b.last_rates[n] for n in NAMES] == pytest.approx(r, rel=1e-12)
    s = [4 * p for p in softmax(r, 1.0)]
    for n, si in zip(NAMES, s):
        assert w[n] == pytest.approx(si * 90.0 / STEPS[2][n], rel=1e-12)


def test_dsmd_survives_a_term_at_exactly_zero():
    b = balancer(**LITERAL)
    b.weights(STEPS[0])
    zero = {**STEPS[1], "triplet_loss": 0.0}  # a hinge with margin 0 can reach 0
    w = b.weights(zero)
    assert all(math.isfinite(v) for v in w.values())
    assert b.last_rates["triplet_loss"] == 1e-6  # fell to 0: the fastest descent, clipped to 1 / rate_bound
    w = b.weights(STEPS[2])  # back from 0: the largest rate, not an infinite one
    assert all(math.isfinite(v) for v in w.values()) and b.last_rates["triplet_loss"] == 1e6


# -- dsmd, robust (the defaults): smoothed losses, bounded rates, floored scaling --------------------------
def test_dsmd_robust_by_hand():
    b = balancer()  # smoothing 0.9, rate_bound 2, scale_floor 0.01, K = 4, T = 1
    b.weights(STEPS[0])
    w = b.weights(STEPS[1])
    L0, L1 = [STEPS[0][n] for n in NAMES], [STEPS[1][n] for n in NAMES]
    smooth = [0.9 * a + 0.1 * c for a, c in zip(L0, L1)]  # [17.4, 0.0693, 0.495, 370.0]
    assert smooth == pytest.approx([17.4, 0.0693, 0.495, 370.0], rel=1e-12)
    r = [m / a for m, a in zip(smooth, L0)]  # all within [0.5, 2]: no clipping
    assert [b.last_rates[n] for n in NAMES] == pytest.approx(r, rel=1e-12)
    s = [4 * p for p in softmax(r, 1.0)]
    for n, si, li in zip(NAMES, s, smooth):  # every term above 1% of its peak: plain max / Lbar scaling
        assert w[n] == pytest.approx(si * 370.0 / li, rel=1e-12)
    # a rate beyond the bound is clipped: the triplet jumps 50x in one step (smoothing off to see it whole)
    c = balancer(smoothing=0.0)
    c.weights(STEPS[1])
    c.weights({**STEPS[2], "triplet_loss": 5000.0})
    assert c.last_rates["triplet_loss"] == 2.0 and c.last_rates["l1_loss"] == pytest.approx(0.05 / 0.063)
    c.weights({**STEPS[2], "triplet_loss": 1.0})
    assert c.last_rates["triplet_loss"] == 0.5


def share_bound(n: int, c: float, T: float) -> float:
    """The largest softmax share of n rates confined to [1/c, c]: one at c, the others at 1/c."""
    return 1.0 / (1.0 + (n - 1) * math.exp(-(c - 1.0 / c) / T))


def vanishing_triplet(steps: int = 400, seed: int = 0) -> list[dict[str, float]]:
    """The triplet (a hinge at margin 0) falls 400 -> ~1e-9 and then sits at exactly 0, the others stay O(1)
    with batch noise: the case where max(L)/L_i made the paper's weights explode."""
    rng = random.Random(seed)
    out = []
    for t in range(steps):
        noise = [1 + 0.2 * (rng.random() - 0.5) for _ in range(4)]
        triplet = 0.0 if t >= 300 else 400.0 * 0.93**t * noise[3]
        out.append(
            {
                "contrastive_loss": (18.0 - 10.0 * t / steps) * noise[0],
                "l1_loss": 0.07 * noise[1],
                "cosine_loss": 0.5 * noise[2],
                "triplet_loss": triplet,
            }
        )
    return out


@pytest.mark.parametrize("T", [1.0, 0.2])
def test_a_term_going_to_zero_keeps_every_weight_bounded(T):
    cfg = BalancerConfig(temperature=T)  # the defaults: smoothing 0.9, rate_bound 2, scale_floor 0.01
    b = LossBalancer(cfg, NAMES, FIXED)
    smooth = peak = None
    largest = 0.0
    for t, raw in enumerate(vanishing_triplet()):
        w = b.weights(raw)
        L = [raw[n] for n in NAMES]
        # the smoothed losses and peaks, recomputed here by their definitions
        smooth = L if smooth is None else [0.9 * m + 0.1 * x for m, x in zip(smooth, L)]
        peak = smooth if peak is None else [max(p, m) for p, m in zip(peak, smooth)]
        assert all(math.isfinite(v) and v > 0 for v in w.values()), (t, w)
        for n, p in zip(NAMES, peak):  # the stated weight bound: K * max_j Lbar_j / (f * P_i)
            assert w[n] <= 4 * max(smooth) / (0.01 * p) * (1 + 1e-9), (t, n)
        # the stated share bound holds for the vanishing term at every step, on the smoothed losses
        weighted = [w[n] * m for n, m in zip(NAMES, smooth)]
        assert weighted[3] / sum(weighted) <= share_bound(4, 2.0, T) + 1e-12, (t, weighted)
        largest = max(largest, w["triplet_loss"])
    # in numbers: the triplet's weight never passes 4 * 18 / (0.01 * 400) = 18 (its peak is ~400)
    assert largest < 4 * 18 * 1.1 / (0.01 * 360)
    # ... where the paper's formula on raw losses multiplies it by max(L) / L_i: 1e7 and more here
    literal = balancer(temperature=T, **LITERAL)
    worst = max(literal.weights(raw)["triplet_loss"] for raw in vanishing_triplet()[:299])
    assert worst > 1e7


def test_shares_follow_the_rates_and_stay_below_the_bound():
    """Every term above its floor: each weighted (smoothed) term is s_i * max Lbar, its share s_i / K."""
    b = balancer(smoothing=0.5)
    seq = [
        {
            "contrastive_loss": 18.0 * 0.97**t,
            "l1_loss": 0.07,
            "cosine_loss": 0.5 * 0.99**t,
            "triplet_loss": 90.0 * 0.95**t,
        }
        for t in range(40)
    ]
    smooth = None
    for raw in seq:
        w = b.weights(raw)
        L = [raw[n] for n in NAMES]
        smooth = L if smooth is None else [0.5 * m + 0.5 * x for m, x in zip(smooth, L)]
        rates = [b.last_rates[n] for n in NAMES]
        weighted = [w[n] * m for n, m in zip(NAMES, smooth)]
        assert [x / sum(weighted) for x in weighted] == pytest.approx(softmax(rates, 1.0), rel=1e-9)
        assert max(x / sum(weighted) for x in weighted) <= share_bound(4, 2.0, 1.0)
    shares = {n: w[n] * m for n, m in zip(NAMES, smooth)}
    assert max(shares, key=shares.get) == "l1_loss"  # the term that does not fall gets the largest share


def test_temperature_changes_dsmd_weights_but_not_dsmd_code():
    """Table 10 varies T; only the dsmd mode can show it (in the public code every rate is equal)."""
    seq = vanishing_triplet(60)

    rates = {}

    def run(**cfg):
        b = balancer(**cfg)
        out = [b.weights(raw) for raw in seq]
        rates.update(b.last_rates)  # the last step's rates: the same for every T (the losses alone set them)
        return out

    sharp, flat = run(temperature=0.1), run(temperature=1.0)
    assert max(rates.values()) - min(rates.values()) > 0.02  # the terms do fall at different rates
    # rates and scales do not depend on T; the softmax does: log(w_i / w_j) moves by (r_i - r_j)(1/0.1 - 1/1)
    a, b = "cosine_loss", "triplet_loss"
    moved = math.log(sharp[-1][a] / sharp[-1][b]) - math.log(flat[-1][a] / flat[-1][b])
    assert moved == pytest.approx((rates[a] - rates[b]) * (1 / 0.1 - 1 / 1.0), rel=1e-9)
    assert sharp[-1] != pytest.approx(flat[-1], rel=0.05)
    # so a lower T concentrates the weight on the slowest-falling term: a less even split
    last = seq[-1]
    share = {T: [w[n] * last[n] for n in NAMES] for T, w in ((0.1, sharp[-1]), (1.0, flat[-1]))}
    assert max(share[0.1]) / sum(share[0.1]) > max(share[1.0]) / sum(share[1.0])
    code_sharp, code_flat = run(mode="dsmd_code", temperature=0.05), run(mode="dsmd_code", temperature=1.0)
    for a, b in zip(code_sharp, code_flat):
        assert a == pytest.approx(b, rel=1e-5)


def test_tensor_values_and_bad_values():
    b = balancer()
    w = b.weights({n: torch.tensor(v, requires_grad=True) * 1.0 for n, v in STEPS[0].items()})
    assert all(isinstance(v, float) for v in w.values())
    state = copy.deepcopy(b.state_dict())
    with pytest.raises(ValueError, match="l1_loss"):
        b.weights({**STEPS[1], "l1_loss": float("nan")})
    with pytest.raises(ValueError, match="cosine_loss"):
        b.weights({n: v for n, v in STEPS[1].items() if n != "cosine_loss"})
    assert b.state_dict() == state  # a refused call changes nothing


# -- exact resume ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg", [{"mode": "dsmd"}, {"mode": "dsmd", "normalize": "initial"}, {"mode": "dsmd_code"}, {"mode": "fixed"}]
)
def test_resume_gives_identical_next_weights(cfg):
    run = balancer(**cfg)
    for raw in STEPS[:2]:
        run.weights(raw)
    state = json.loads(json.dumps(run.state_dict()))  # as it would travel inside a checkpoint
    resumed = balancer(**cfg)
    resumed.load_state_dict(state)
    assert resumed.step == 2 and resumed.last_weights == run.last_weights
    for raw in STEPS[2:]:
        assert resumed.weights(raw) == run.weights(raw)  # exactly
        assert resumed.last_rates == run.last_rates


def test_resume_refuses_another_setup():
    run = balancer()
    run.weights(STEPS[0])
    with pytest.raises(InputError, match="mode"):
        balancer(mode="dsmd_code").load_state_dict(run.state_dict())
    other = LossBalancer(BalancerConfig(), NAMES[:3], FIXED)
    with pytest.raises(InputError, match="loss terms"):
        other.load_state_dict(run.state_dict())
    with pytest.raises(InputError, match="version 1, expected 2"):  # a checkpoint from before the smoothing
        balancer().load_state_dict({**run.state_dict(), "version": 1})


def test_config_is_checked():
    cfg = from_dict(BalancerConfig, {"mode": "dsmd_code", "k": 10}, "distill.balancer")
    assert cfg.k == 10.0
    with pytest.raises(ConfigError, match="distill.balancer.mode"):
        from_dict(BalancerConfig, {"mode": "dwa"}, "distill.balancer")
    with pytest.raises(ConfigError, match="temperature"):
        from_dict(BalancerConfig, {"temperature": 0}, "distill.balancer")
    with pytest.raises(ConfigError, match="normalize"):
        from_dict(BalancerConfig, {"normalize": "ema"}, "distill.balancer")
    for key, bad in (("smoothing", 1.0), ("smoothing", -0.1), ("rate_bound", 0.5), ("scale_floor", 0.0)):
        with pytest.raises(ConfigError, match=key):
            from_dict(BalancerConfig, {key: bad}, "distill.balancer")
    with pytest.raises(ValueError, match="no fixed weight"):
        LossBalancer(BalancerConfig(), NAMES, {"l1_loss": 1.0})
    assert balancer(mode="dsmd_code").k == 10.0 and balancer().k == 4.0
