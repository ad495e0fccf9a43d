"""Relation-based KD within each modality (LEMKD's relation knowledge, RKD-style): how the teacher relates
each image to the step's other images (each caption to the other captions), the student copies.

    P^T_v,i = softmax_{j != i}(t_v,i . t_v,j / T)      P^S_v,i = softmax_{j != i}(s_v,i . s_v,j / T)
    L_intra = ( mean_i KL(P^T_v,i || P^S_v,i) + mean_i KL(P^T_t,i || P^S_t,i) ) / 2

One temperature T (`intra_relation_temperature`) for teacher and student: a teacher's logit scale is learned
for image-text similarities, not for image-image ones. The diagonal (a row against itself) is left out; two
captions of one image are kept (the teacher makes them close, the student should too). Every image row and
every text row of the step, unpaired ones included (main teacher only). A modality with fewer than two rows
contributes 0 (no "other" row to relate to).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.distill.losses._util import masked_kl, student_fp32, teacher_fp32


def intra_kl(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    """mean_i KL over the off-diagonal entries of row i of t t^T / T (teacher) vs s s^T / T (student)."""
    n = s.shape[0]
    if n < 2:
        return s.sum() * 0.0  # keeps the graph (and the dtype) of the other terms
    keep = ~torch.eye(n, dtype=torch.bool, device=s.device)
    student = (s @ s.T / temperature).masked_fill(~keep, float("-inf"))
    teacher = (t @ t.T / temperature).masked_fill(~keep, float("-inf"))
    return masked_kl(teacher.log_softmax(1), student.log_softmax(1), keep).mean()


class IntraRelationDistillLoss(nn.Module):
    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, s_v: Tensor, s_t: Tensor, t_v: Tensor, t_t: Tensor) -> Tensor:
        v = intra_kl(student_fp32(s_v), teacher_fp32(t_v), self.temperature)
        t = intra_kl(student_fp32(s_t), teacher_fp32(t_t), self.temperature)
        return (v + t) / 2
