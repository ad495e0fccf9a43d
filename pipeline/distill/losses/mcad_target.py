r"""MCAD's fused teacher target (seed 002): the dual-stream teachers' distributions over each anchor's
candidate list, modified by the single-stream (cross-encoder) teacher's scores of the same pairs. MCAD
publishes no formula ("by incorporating the fused single-stream features into the image and text features of
the dual-stream model, we formulate new modified teacher similarity distributions and features"); this is
kdpipe's, and why.

Distribution. For anchor i with list [positive, K mined] (`candidates.py`), dual-stream teachers m with logit
scales tau_m and cross-encoder logits c_i (higher = a better match; column 0 the positive):

    log P^dual_i = log 1/M sum_m softmax(tau_m z^m_i)                      the ensemble (ensemble.py)
    log P^F_i    = log_softmax( (1 - lambda) log P^dual_i + lambda c_i / T_ce )
                   lambda = `mcad_ce_weight` in [0, 1], T_ce = `mcad_ce_temperature`

  - Fused in logit space (a geometric mixture, P^F proportional to (P^dual)^(1-lambda) softmax(c/T_ce)^lambda):
    the abstract modifies the dual-stream model's SIMILARITIES with the single-stream judgment, which is a
    change of logits; and a candidate that the cross-encoder (which sees the image and the caption together)
    rules out loses its mass even where the dual-stream teachers confused it with the positive, which an
    arithmetic mixture would only halve.
  - lambda = 0 is the dual-stream ensemble alone, lambda = 1 the cross-encoder alone: both ends are the
    methods they come from, and lambda is the one number to tune between them.
  - The cross-encoder only scores the list the dual teacher mined (the store holds those scores), so the
    fusion happens over the candidate lists, not over the batch or the queue.

Features. The "modified teacher features" are the main teacher's anchor row moved one gradient step towards the
fused distribution, in its own space:

    p^1_i   = softmax(tau_1 t_i . [r_0 .. r_K])                              the main teacher's own distribution
    t~_i    = normalize( t_i + eta sum_k (P^F_i,k - p^1_i,k) r_k )           eta = `mcad_feature_step`

  sum_k (P^F - p^1) r_k is -1/tau_1 times the gradient of CE(P^F, p^1) with respect to t_i: the feature the
  teacher would have if it agreed a little more with the fused judgment (more similar to the candidates the
  cross-encoder and the other teachers upgrade, less to those they downgrade). eta = 0 gives the teacher's
  own row back (the `cosine` term's target). The step stays in the anchor's modality (t~ of a caption is a
  text feature), so it needs no cross-modal target that would fight the modality gap.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.distill.losses._util import list_logits
from pipeline.distill.losses.candidates import CandidateLists


def fused_log_probs(lists: CandidateLists, scales: Sequence[float], ce_weight: float, ce_temperature: float) -> Tensor:
    """log P^F [B, 1 + K], -inf where the list has no candidate."""
    keep = lists.keep
    log_dual = lists.teacher_log_probs(scales)
    if ce_weight == 0.0:
        return log_dual
    if lists.ce is None:
        raise ValueError("mcad: the cross-encoder scores of the candidate lists are needed (mcad_ce_weight > 0)")
    # masked entries to 0 before the mixture (0 x -inf would be NaN at lambda = 1), then out of the softmax
    mixed = (1 - ce_weight) * log_dual.masked_fill(~keep, 0.0) + ce_weight * lists.ce / ce_temperature
    return mixed.masked_fill(~keep, float("-inf")).log_softmax(1)


def modified_features(lists: CandidateLists, log_fused: Tensor, main_scale: float, step: float) -> Tensor:
    """t~ [B, D]: the main teacher's anchor rows one step towards the fused distribution, L2-normalized."""
    keep, anchor, positive, candidates = lists.keep, lists.anchors[0], lists.positives[0], lists.candidates[0]
    own = (main_scale * list_logits(anchor, positive, candidates)).masked_fill(~keep, float("-inf"))
    shift = (log_fused.exp() - own.softmax(1)).masked_fill(~keep, 0.0)  # [B, 1 + K]
    # sum_k shift_k r_k over [positive, candidates], without copying them into one [B, 1 + K, D] tensor
    delta = shift[:, :1] * positive + torch.einsum("bk,bkd->bd", shift[:, 1:], candidates)
    return F.normalize(anchor + step * delta, dim=-1)
