r"""Dynamic contrastive distillation over teacher-mined hard negatives (DCD, seed 003, and its public code
raojay7/DCD), offline: the teacher picked the hard samples once (the store's mined top-K), and the student
scores its anchor against the STORED TEACHER ROWS of the list (no student forward for the negatives).

For each direction (text->image and image->text, `candidates.py`) and anchor i with list [positive, K mined]:

    c_i,k  = the main teacher's cosine of anchor i and entry k                  (k = 0: the positive)
    keep_i,k = entry k is a real candidate and c_i,k < c_i,0 - delta           delta = `dcd_margin`
               (a candidate the teacher puts within delta of the positive, or above it, is likely a
               false negative: another image the caption fits, and dropped; delta = None keeps them all)
    CE_i   = -log softmax_k(s_i . r_k / T)[0] over the kept entries           r_k the main teacher's rows
    H_i    = entropy of the teachers' distribution over the kept entries      (ensemble.py, each teacher
                                                                               at its own logit scale)
    w_i    = H_i / sum_j H_j    (`dcd_difficulty: entropy`: the teacher is unsure = the sample is hard =
                                 more weight; uniform 1/B when every H_j is 0;  `none`: w_i = 1/B)
    L_dir  = sum_i w_i CE_i                          and          L_dcd = L_t2i + L_i2t

What DCD's paper and code do, and where kdpipe differs (docs/method.md, "DCD"):
- DCD's loss is  alpha T^2 sum_i r_i MSE(z_T / T, z_S / T) + (1 - alpha) sum_i w_i BCE(z_S,i, e_0)  with
  r_i = softmax_i((1 - H_i / sum H)^2). In the public code `F.mse_loss` reduces to one number BEFORE r_i is
  applied, and the r_i sum to 1, so the r_i cancel: only the BCE part is difficulty-weighted. kdpipe keeps
  that part, the w_i above; the score-matching part is the `mcad_kl` term over the same lists (a KL to the
  teachers' distribution, not an MSE of raw scores: a dual encoder's scores have no common scale with a
  fusion teacher's).
- DCD's students are fusion models that score one pair at a time (a BCE per pair); a dual-encoder student
  scores the whole list, so the list's softmax cross-entropy with the positive as target replaces the BCE.
- DCD asks an online teacher to score the positive + 15 or 63 random negatives each step and keeps the top 8
  (positive forced in); here the teacher ranked the whole bank once, offline.
- DCD's teacher and student score lists align only when the teacher ranks the positive first; here the
  positive is column 0 of every list by construction.
- The false-negative margin is kdpipe's (DCD keeps its top 8 whatever their scores).
The weights are computed from teacher rows only: no gradient flows through them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from pipeline.distill.losses.candidates import CandidateLists


def entropy_rows(log_p: Tensor, keep: Tensor) -> Tensor:
    """[B] entropy of each row's distribution (log-probabilities, -inf where not kept)."""
    p = log_p.exp().masked_fill(~keep, 0.0)
    return -(p * log_p.masked_fill(~keep, 0.0)).sum(-1)


def difficulty_weights(entropy: Tensor) -> Tensor:
    """[B] w_i = H_i / sum_j H_j; uniform when the sum is 0 (every teacher distribution one-hot)."""
    total = entropy.sum()
    uniform = torch.full_like(entropy, 1.0 / entropy.shape[0])
    return torch.where(total > 0, entropy / total.clamp_min(torch.finfo(entropy.dtype).tiny), uniform)  # no sync


class DynamicContrastiveLoss(nn.Module):
    def __init__(
        self, temperature: float = 0.05, difficulty: Literal["entropy", "none"] = "entropy", margin: float | None = 0.0
    ):
        super().__init__()
        self.temperature = float(temperature)
        self.difficulty = difficulty
        self.margin = None if margin is None else float(margin)

    def direction(self, lists: CandidateLists, scales: Sequence[float]) -> Tensor:
        keep = lists.keep
        if self.margin is not None:
            cos = lists.teacher_cosines()  # [B, 1 + K]
            likely_positive = cos[:, 1:] >= cos[:, :1] - self.margin
            keep = keep.clone()
            keep[:, 1:] &= ~likely_positive
        logits = lists.student_logits(1.0 / self.temperature).masked_fill(~keep, float("-inf"))
        ce = -logits.log_softmax(1)[:, 0]  # [B]
        if self.difficulty == "none":
            return ce.mean()
        with torch.no_grad():
            weights = difficulty_weights(entropy_rows(lists.teacher_log_probs(scales, keep), keep))
        return (weights * ce).sum()

    def forward(self, t2i: CandidateLists, i2t: CandidateLists, scales: Sequence[float]) -> Tensor:
        return self.direction(t2i, scales) + self.direction(i2t, scales)
