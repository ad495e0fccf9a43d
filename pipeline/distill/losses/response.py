"""Response-based KD over the in-batch rows (LEMKD's response knowledge; CLIP-KD's CRD; TinyCLIP's affinity
mimicking): the student's image->text and text->image distributions over the batch follow the teacher's,
each model at ITS OWN temperature.

    P^T_i2t = 1/M sum_m softmax_row(tau_m t^m_v t^m_t^T)     (the teachers' ensemble, ensemble.py; M = 1: one)
    P^S_i2t = softmax_row(s_v s_t^T / T_S)                    [B, B]; t2i: the transposes
    L_resp = ( mean_i KL(P^T_i2t,i || P^S_i2t,i) + mean_j KL(P^T_t2i,j || P^S_t2i,j) ) / 2

tau_m is teacher m's logit scale (exp of its learned log scale, as the store records it; or
1 / distill.loss.teacher_temperature for every teacher). T_S is distill.loss.student_temperature, fixed, or
learned (`learn_student_temperature`: the student's logit scale is a parameter the optimizer steps, as CLIP's).
With one teacher and tau = 1/T_S = 1/relation_temperature this is the `relation` term on the pairs. As there,
two captions of one image are not masked: the teacher gives them mass and the student should copy it.
Pairs only: the unpaired rows have no rows of the other teachers.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from pipeline.distill.losses._util import masked_kl, student_fp32, teacher_fp32
from pipeline.distill.losses.ensemble import ensemble_log_probs


class ResponseDistillLoss(nn.Module):
    def forward(
        self,
        s_v: Tensor,
        s_t: Tensor,
        teachers: Sequence[tuple[Tensor, Tensor]],
        scales: Sequence[float],
        student_scale,
    ) -> Tensor:
        """s_v, s_t [B, D]; `teachers`: per teacher (t_v, t_t) [B, D_m] of the same pairs, `scales` their logit
        scales; `student_scale` 1 / T_S (a float, or a 0-d tensor when learned)."""
        student = student_scale * (student_fp32(s_v) @ student_fp32(s_t).T)  # [B, B]: rows images
        teacher = [tau * (teacher_fp32(t_v) @ teacher_fp32(t_t).T) for (t_v, t_t), tau in zip(teachers, scales)]
        i2t = masked_kl(ensemble_log_probs(teacher), student.log_softmax(1), None).mean()
        t2i = masked_kl(ensemble_log_probs([z.T for z in teacher]), student.T.log_softmax(1), None).mean()
        return (i2t + t2i) / 2
