"""The loss balancer (config section `distill.balancer`): one weight per loss term, every step.

The trainer calls `weights(raw)` once per optimizer step with the detached values of the raw terms
(`{"contrastive_loss": 17.9, "l1_loss": 0.071, ...}`) and minimizes `sum_i w_i * L_i`. Every value used
here is a plain Python float, so the weights carry no gradient and `state_dict` round-trips exactly.

Notation: n terms, L_i(t) the raw value of term i at step t (t = 0 is the first call), T = `temperature`,
K = `k` (None: n for `dsmd`, 10 for `dsmd_code`), eps = 1e-8.

mode "dsmd" (the paper, Sec. 3.4, with the descent rate made to matter)
    descent rate        r_i(t) = L_i(t) / L_i(t-1)                      normalize = "raw" (DWA's rate)
                        r_i(t) = L_i(t) / L_i(0)                        normalize = "initial"
                        r_i(0) = 1 for every i (no history yet: uniform)
                        a rate whose numerator or denominator is <= eps is set to 1 (no information;
                        e.g. a hinge term that reached exactly 0)
    rate weights        s_i(t) = K * exp(r_i / T) / sum_j exp(r_j / T)          (sum_i s_i = K)
    magnitude scaling   a_i(t) = max_j L_j(t) / L_i(t)                  (a_i = 1 where L_i <= eps)
    weight              w_i(t) = s_i(t) * a_i(t)
  so every weighted term w_i L_i = s_i * max_j L_j: the magnitudes are equalized AND each term's share
  follows its descent rate (a term that falls more slowly, larger r_i, gets a larger share). With equal
  rates this is K/n * max(L)/L_i. The rate is computed on the raw losses (normalizing by a constant such
  as L_i(0) before taking L(t)/L(t-1) would cancel out, which is why "initial" means the GradNorm-style
  ratio to the first value: how far each term has come since the start, rather than in the last step).

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
STATE_VERSION = 1


@dataclass(frozen=True)
class BalancerConfig:
    """Section `distill.balancer`."""

    mode: Literal["dsmd", "dsmd_code", "fixed"] = "dsmd"
    temperature: float = 1.0  # softmax temperature of the rates (DSMD: 1)
    k: float | None = None  # the sum of the rate weights; None: n terms for dsmd, 10 for dsmd_code (its code)
    normalize: Literal["raw", "initial"] = "raw"  # dsmd rate: L(t)/L(t-1), or L(t)/L(0)

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature: must be a finite number > 0, got {self.temperature!r}")
        if self.k is not None and (not math.isfinite(self.k) or self.k <= 0):
            raise ValueError(f"k: must be a finite number > 0 (or null for the mode's default), got {self.k!r}")


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
        self.prev: list[float] | None = None  # dsmd: L(t-1); dsmd_code: Ladj(t-1) (float32 values)
        self.initial: list[float] | None = None  # dsmd: L(0)
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
        if self.prev is None:
            rates = [1.0] * len(L)
            self.initial = list(L)
        else:
            ref = self.prev if self.cfg.normalize == "raw" else self.initial
            rates = [cur / old if cur > EPS and old > EPS else 1.0 for cur, old in zip(L, ref)]
        self.prev = list(L)
        T = self.cfg.temperature
        top = max(r / T for r in rates)  # subtract the largest exponent: the softmax cannot overflow
        e = [math.exp(r / T - top) for r in rates]
        total = sum(e)
        biggest = max(L)
        w = [self.k * ei / total * (biggest / li if li > EPS else 1.0) for ei, li in zip(e, L)]
        return dict(zip(self.term_names, w)), dict(zip(self.term_names, rates))

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
        self.last_rates = None if state["last_rates"] is None else dict(state["last_rates"])
        self.last_weights = None if state["last_weights"] is None else dict(state["last_weights"])
