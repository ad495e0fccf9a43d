"""The loss balancer (config section `distill.balancer`): one weight per loss term, every step.

The trainer calls `weights(raw)` once per optimizer step with the detached values of the raw terms
(`{"contrastive_loss": 17.9, "l1_loss": 0.071, ...}`) and minimizes `sum_i w_i * L_i`. Every value used
here is a plain Python float, so the weights carry no gradient and `state_dict` round-trips exactly.

Notation: n terms, L_i(t) the raw value of term i at step t (t = 0 is the first call), T = `temperature`,
K = `k` (None: n for `dsmd`, 10 for `dsmd_code`), eps = 1e-8.

mode "dsmd" (the paper, Sec. 3.4, made robust; every choice below is one the paper leaves open)
    smoothed losses     Lbar_i(0) = L_i(0);  Lbar_i(t) = b * Lbar_i(t-1) + (1 - b) * L_i(t),  b = `smoothing`
    descent rate        r_i(t) = Lbar_i(t) / Lbar_i(t-1)                normalize = "raw" (DWA's rate, smoothed)
                        r_i(t) = Lbar_i(t) / Lbar_i(0)                  normalize = "initial" (progress since start)
                        r_i(0) = 1 for every i (no history yet: uniform)
                        clipped to [1/c, c], c = `rate_bound`; a denominator <= eps gives c (the term rose
                        from 0) or 1 when the numerator is <= eps too (no information)
    rate weights        s_i(t) = K * exp(r_i / T) / sum_j exp(r_j / T)          (sum_i s_i = K)
    magnitude scaling   a_i(t) = max_j Lbar_j(t) / max(Lbar_i(t), f * P_i(t))
                        P_i(t) = max over t' <= t of Lbar_i(t') (the term's peak), f = `scale_floor`
                        (a_i = 1 where both are <= eps: a term that has been 0 throughout)
    weight              w_i(t) = s_i(t) * a_i(t)
  For a term at or above its floor, w_i * Lbar_i = s_i * max_j Lbar_j: the magnitudes are equalized and each
  term's share follows its descent rate (a term that falls more slowly, larger r_i, gets a larger share).
  Guarantees, whatever the losses do (tests/test_balancer.py):
    - every weight is finite and w_i <= K * max_j Lbar_j / (f * P_i): a term falling towards 0 (a hinge at
      margin 0, the paper's setting) is scaled up at most 1/f times beyond its peak-equalized level, instead
      of max(L)/L_i -> infinity, which multiplied its O(1) hinge gradients by that factor;
    - with every term at or above its floor, the shares w_i Lbar_i / sum_j w_j Lbar_j are s_i / K =
      softmax(r / T)_i, so none exceeds  1 / (1 + (n - 1) * exp(-(c - 1/c) / T))  (0.60 for n = 4, c = 2,
      T = 1); a term below its floor takes less than s_i / K (its magnitude has become negligible, and its
      share with it), leaving the others to share the rest; per raw step a term exceeds its share only by
      its own spike L_i / Lbar_i (the magnitudes demand it).
  T matters here (a lower T sharpens the shares towards the slowest-falling term), unlike in `dsmd_code`.
  With smoothing 0, rate_bound and 1/scale_floor huge, this is the paper's formula on raw per-step losses,
  whose ratio L(t)/L(t-1) is dominated by batch-to-batch noise and explodes for a hinge term near 0 (at
  T = 1 the softmax went nearly one-hot on it for that step).
  What the paper leaves open, and is chosen here: whether t is a step or an epoch (DWA averages over an
  epoch; here every step, on smoothed values), the first step's rates, how "scale to the same magnitude"
  (Eq. 15) combines with the rate weights (product, as its code), K (n here: weights average to the scaling
  alone; its code: 10), and what happens as a loss reaches 0.

mode "dsmd_code" (the public code, `chrisx599/DSMD` module/balancer.py, reproduced operation by operation
  in float32, as its `torch.tensor([...])` of the four losses is)
    first call          w_i = 1                                         (its initial `torch.ones`)
    then                a_i = max_j L_j / (L_i + eps);  Ladj_i = L_i * a_i;  r_i = Ladj_i / (Ladj_i(t-1) + eps)
                        w_i = K * exp(r_i / T) / sum_j exp(r_j / T) * a_i,   K = 10
  Ladj_i is max(L) for every i, so every rate is the same, the softmax is uniform and
  w_i = K/n * max(L)/L_i (2.5 * max(L)/L_i for its four terms): the descent rate has no effect.

mode "fixed"
    w_i = the configured weight of term i (`distill.loss.<name>`), every step.

`last_rates` (the r_i of the latest call; None for `fixed`) and `last_weights` are exposed for logging.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from pipeline.errors import InputError

EPS = 1e-8
STATE_VERSION = 2  # 2: dsmd's smoothed losses and peaks


@dataclass(frozen=True)
class BalancerConfig:
    """Section `distill.balancer`."""

    mode: Literal["dsmd", "dsmd_code", "fixed"] = "dsmd"
    temperature: float = 1.0  # softmax temperature of the rates (DSMD: 1)
    k: float | None = None  # the sum of the rate weights; None: n terms for dsmd, 10 for dsmd_code (its code)
    normalize: Literal["raw", "initial"] = "raw"  # dsmd rate: Lbar(t)/Lbar(t-1), or Lbar(t)/Lbar(0)
    # dsmd only (robustness; the paper leaves these open, see the module docstring):
    smoothing: float = 0.9  # EMA factor of the losses the rates and scales are computed from (0: raw values)
    rate_bound: float = 2.0  # rates are clipped to [1/rate_bound, rate_bound]
    scale_floor: float = 0.01  # a term is scaled up as if it were at least this fraction of its peak

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature: must be a finite number > 0, got {self.temperature!r}")
        if self.k is not None and (not math.isfinite(self.k) or self.k <= 0):
            raise ValueError(f"k: must be a finite number > 0 (or null for the mode's default), got {self.k!r}")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing: must be in [0, 1), got {self.smoothing!r}")
        if not (math.isfinite(self.rate_bound) and self.rate_bound >= 1):
            raise ValueError(f"rate_bound: must be a finite number >= 1, got {self.rate_bound!r}")
        if not 0 < self.scale_floor <= 1:
            raise ValueError(f"scale_floor: must be in (0, 1], got {self.scale_floor!r}")


class LossBalancer:
    def __init__(self, cfg: BalancerConfig, term_names: Sequence[str], fixed_weights: Mapping[str, float]):
        self.cfg = cfg
        self.term_names: tuple[str, ...] = tuple(term_names)
        if not self.term_names:
            raise ValueError("LossBalancer: no loss terms to balance")
        if len(set(self.term_names)) != len(self.term_names):
            raise ValueError(f"LossBalancer: duplicate term names in {self.term_names}")
        missing = [n for n in self.term_names if n not in fixed_weights]
        if missing:
            raise ValueError(f"LossBalancer: no fixed weight for {', '.join(missing)}")
        self.fixed_weights = {n: float(fixed_weights[n]) for n in self.term_names}
        n = len(self.term_names)
        self.k = float(cfg.k) if cfg.k is not None else (10.0 if cfg.mode == "dsmd_code" else float(n))
        self.step = 0  # number of `weights` calls so far
        self.prev: list[float] | None = None  # dsmd: Lbar(t-1); dsmd_code: Ladj(t-1) (float32 values)
        self.initial: list[float] | None = None  # dsmd: Lbar(0) = L(0)
        self.peak: list[float] | None = None  # dsmd: P(t-1), the largest Lbar of each term so far
        self.last_rates: dict[str, float] | None = None
        self.last_weights: dict[str, float] | None = None

    # -- the weights ----------------------------------------------------------------------------------
    def weights(self, raw: Mapping[str, Any]) -> dict[str, float]:
        """Raw term values (floats or 0-dim tensors, taken as detached numbers) -> {term: weight}."""
        values = self._values(raw)
        if self.cfg.mode == "fixed":
            weights, rates = dict(self.fixed_weights), None
        elif self.cfg.mode == "dsmd":
            weights, rates = self._dsmd(values)
        else:
            weights, rates = self._dsmd_code(values)
        self.step += 1
        self.last_rates, self.last_weights = rates, weights
        return dict(weights)

    def _values(self, raw: Mapping[str, Any]) -> list[float]:
        missing = [n for n in self.term_names if n not in raw]
        if missing:
            raise ValueError(f"LossBalancer.weights: no value for {', '.join(missing)}")
        values = []
        for n in self.term_names:
            v = raw[n]
            v = float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
            if not math.isfinite(v):
                raise ValueError(f"LossBalancer.weights: {n} is {v} (not finite)")
            values.append(v)
        return values

    def _dsmd(self, L: list[float]) -> tuple[dict[str, float], dict[str, float]]:
        cfg = self.cfg
        if self.prev is None:
            smooth, rates = list(L), [1.0] * len(L)
            self.initial, self.peak = list(L), list(L)
        else:
            b = cfg.smoothing
            smooth = [b * old + (1 - b) * cur for old, cur in zip(self.prev, L)]
            ref = self.prev if cfg.normalize == "raw" else self.initial
            rates = [self._rate(cur, old) for cur, old in zip(smooth, ref)]
            self.peak = [max(p, v) for p, v in zip(self.peak, smooth)]
        self.prev = smooth
        T = cfg.temperature
        top = max(r / T for r in rates)  # subtract the largest exponent: the softmax cannot overflow
        e = [math.exp(r / T - top) for r in rates]
        total = sum(e)
        biggest = max(smooth)
        w = []
        for ei, li, peak in zip(e, smooth, self.peak):
            level = max(li, cfg.scale_floor * peak)  # a term near 0 is not scaled up without bound
            w.append(self.k * ei / total * (biggest / level if level > EPS else 1.0))
        return dict(zip(self.term_names, w)), dict(zip(self.term_names, rates))

    def _rate(self, cur: float, old: float) -> float:
        """cur / old clipped to [1/c, c]; from (near) 0: c if the term rose, 1 if it stayed at 0."""
        c = self.cfg.rate_bound
        if old <= EPS:
            return c if cur > EPS else 1.0
        return min(c, max(1.0 / c, cur / old))

    def _dsmd_code(self, L: list[float]) -> tuple[dict[str, float], dict[str, float]]:
        cur = torch.tensor(L, dtype=torch.float32)
        max_loss = cur.max()
        a = max_loss / (cur + EPS)
        adjusted = cur * a
        if self.prev is None:
            self.prev = adjusted.tolist()
            n = len(L)
            return dict(zip(self.term_names, [1.0] * n)), dict(zip(self.term_names, [1.0] * n))
        rates = adjusted / (torch.tensor(self.prev, dtype=torch.float32) + EPS)
        numerator = self.k * torch.exp(rates / self.cfg.temperature)
        denominator = torch.sum(torch.exp(rates / self.cfg.temperature))
        w = (numerator / denominator) * a
        self.prev = adjusted.tolist()
        return dict(zip(self.term_names, w.tolist())), dict(zip(self.term_names, rates.tolist()))

    # -- exact resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "mode": self.cfg.mode,
            "normalize": self.cfg.normalize,
            "term_names": list(self.term_names),
            "step": self.step,
            "prev": None if self.prev is None else list(self.prev),
            "initial": None if self.initial is None else list(self.initial),
            "peak": None if self.peak is None else list(self.peak),
            "last_rates": None if self.last_rates is None else dict(self.last_rates),
            "last_weights": None if self.last_weights is None else dict(self.last_weights),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise InputError(f"balancer state: version {state.get('version')!r}, expected {STATE_VERSION}")
        if state.get("mode") != self.cfg.mode or state.get("normalize") != self.cfg.normalize:
            raise InputError(
                f"balancer state: saved with mode={state.get('mode')!r} normalize="
                f"{state.get('normalize')!r}, but the config says mode={self.cfg.mode!r} "
                f"normalize={self.cfg.normalize!r}"
            )
        if tuple(state.get("term_names", ())) != self.term_names:
            raise InputError(
                f"balancer state: saved for the loss terms {state.get('term_names')}, "
                f"but this run has {list(self.term_names)}"
            )
        self.step = int(state["step"])
        self.prev = None if state["prev"] is None else [float(v) for v in state["prev"]]
        self.initial = None if state["initial"] is None else [float(v) for v in state["initial"]]
        self.peak = None if state["peak"] is None else [float(v) for v in state["peak"]]
        self.last_rates = None if state["last_rates"] is None else dict(state["last_rates"])
        self.last_weights = None if state["last_weights"] is None else dict(state["last_weights"])
