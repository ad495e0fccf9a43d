"""MCAD's distribution distillation: the student's distribution over each anchor's candidate list follows the
fused teacher target (mcad_target.py), both directions.

    P^S_i = softmax(s_i . [r_0 .. r_K] / T_S)          the student's anchor against the main teacher's rows
    L_mcad_kl = ( mean_i KL(P^F_i || P^S_i) over text anchors + the same over image anchors ) / 2

T_S is the student temperature (set or learned, as in the response terms). Padded list entries are masked.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from pipeline.distill.losses._util import masked_kl
from pipeline.distill.losses.candidates import CandidateLists
from pipeline.distill.losses.mcad_target import fused_log_probs


class MCADDistributionLoss(nn.Module):
    def __init__(self, ce_weight: float = 0.5, ce_temperature: float = 1.0):
        super().__init__()
        self.ce_weight, self.ce_temperature = float(ce_weight), float(ce_temperature)

    def forward(self, t2i: CandidateLists, i2t: CandidateLists, scales: Sequence[float], student_scale) -> Tensor:
        total = 0.0
        for lists in (t2i, i2t):
            target = fused_log_probs(lists, scales, self.ce_weight, self.ce_temperature)
            student = lists.student_logits(student_scale).masked_fill(~lists.keep, float("-inf")).log_softmax(1)
            total = total + masked_kl(target, student, lists.keep).mean()
        return total / 2
