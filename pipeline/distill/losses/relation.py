"""Relation-based distillation (optional fifth term, as LEMKD's relation KD and CLIP-KD's CRD):
the student's in-batch image-text similarity distributions follow the teacher's.

    P^T_i2t = softmax_row(t_v t_t^T / tau)      P^S_i2t = softmax_row(s_v s_t^T / tau)     [B, B]
    P^T_t2i = softmax_row(t_t t_v^T / tau)      P^S_t2i = softmax_row(s_t s_v^T / tau)
    L_rel = ( KL(P^T_i2t || P^S_i2t) + KL(P^T_t2i || P^S_t2i) ) / 2,   KL averaged over the B rows

One temperature `tau` for teacher and student (the stored features carry no logit scale). Two captions of
the same image are not masked here: this term matches distributions, and the teacher gives such columns
the same probability mass, which is exactly what the student should copy.
"""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.distill.losses._util import kl_rows, student_fp32, teacher_fp32


class RelationDistillLoss(nn.Module):
    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, s_v: Tensor, s_t: Tensor, t_v: Tensor, t_t: Tensor) -> Tensor:
        s_v, s_t = student_fp32(s_v), student_fp32(s_t)
        t_v, t_t = teacher_fp32(t_v), teacher_fp32(t_t)
        student = s_v @ s_t.T / self.temperature  # [B, B]: rows images, columns captions
        teacher = t_v @ t_t.T / self.temperature
        return (kl_rows(teacher, student) + kl_rows(teacher.T, student.T)) / 2
