"""Cosine similarity distillation (DSMD's L_sim):

    (1 - mean_b cos(s_v, t_v)) / 2 + (1 - mean_b cos(s_t, t_t)) / 2          in [0, 2]

The cosine is computed (not just the dot product), so the term stays right if a caller passes rows that
are not exactly unit-norm.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distill.losses._util import student_fp32, teacher_fp32


class CosineDistillLoss(nn.Module):
    def forward(self, s_v: Tensor, s_t: Tensor, t_v: Tensor, t_t: Tensor) -> Tensor:
        cos_v = F.cosine_similarity(student_fp32(s_v), teacher_fp32(t_v), dim=-1).mean()
        cos_t = F.cosine_similarity(student_fp32(s_t), teacher_fp32(t_t), dim=-1).mean()
        return (1 - cos_v) / 2 + (1 - cos_t) / 2
