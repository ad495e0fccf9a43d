"""L1 feature distillation (DSMD's L_fea): `mean|s_v - t_v| + mean|s_t - t_t|`, mean over batch and dimension."""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.distill.losses._util import student_fp32, teacher_fp32


class FeatureL1Loss(nn.Module):
    def forward(self, s_v: Tensor, s_t: Tensor, t_v: Tensor, t_t: Tensor) -> Tensor:
        return (student_fp32(s_v) - teacher_fp32(t_v)).abs().mean() + (
            student_fp32(s_t) - teacher_fp32(t_t)
        ).abs().mean()
