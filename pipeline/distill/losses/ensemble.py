"""Teacher ensembles (DataCompDR / MobileCLIP): the teachers' distributions averaged AFTER the softmax, each
teacher at its own temperature (its logit scale tau_m):

    P_T = 1/M sum_m softmax(tau_m a_m b_m^T)                     (DataCompDR's target; M = 1: one teacher)

computed in log space, log P_T = logsumexp_m log_softmax(tau_m z_m) - log M, so a teacher that puts ~0 on an
entry does not underflow the others. Averaging the probabilities (not the logits) is what DataCompDR does and
what lets teachers of different sharpness vote: a logit average would let the sharpest teacher dictate.

Every distribution term uses this target (response, response_queue, dcd's difficulty weights, mcad): with
`distill.loss.teachers` empty it is the main teacher's softmax at its own temperature.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def ensemble_log_probs(logits: Sequence[Tensor], keep: Tensor | None = None) -> Tensor:
    """log P_T [R, C] from each teacher's already scaled logits tau_m z_m [R, C]; -inf where `keep` [R, C]
    is False (those entries get no mass from any teacher). Every row must keep at least one entry."""
    if not logits:
        raise ValueError("ensemble_log_probs: no teacher logits")
    shape = logits[0].shape
    if any(z.shape != shape for z in logits):
        raise ValueError(
            f"ensemble_log_probs: every teacher must score the same entries, got {[tuple(z.shape) for z in logits]}"
        )
    log_p = []
    for z in logits:
        if keep is not None:
            z = z.masked_fill(~keep, float("-inf"))
        log_p.append(torch.log_softmax(z, dim=-1))
    if len(log_p) == 1:
        return log_p[0]
    return torch.logsumexp(torch.stack(log_p), dim=0) - math.log(len(log_p))
