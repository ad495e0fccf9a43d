"""Response-based KD over the queue (LEMKD's response knowledge, over more negatives than the batch holds):
each student anchor's distribution over [its positive, the queue] follows the teachers' over the same list.

For image anchor i (pair i) and the queue's text rows Q_t (the same K stored rows the contrastive term uses):

    z^S_i = [s_v,i . t_t,i, s_v,i . Q_t] / T_S                    the student's image against the teacher's
                                                                  text rows (no student forward for the queue)
    z^m_i = tau_m [t^m_v,i . t^m_t,i, t^m_v,i . Q^m_t]            teacher m, its own rows and logit scale
    L_i2t = mean_i KL(1/M sum_m softmax(z^m_i) || softmax(z^S_i))
    L_t2i: the same for caption anchors s_t,i against [t_v,i, Q_v]
    L_resp_queue = (L_i2t + L_t2i) / 2

Queue entries of the anchor's own image are masked (when image ids are given), as in the contrastive term:
the whole bank (queue_size 0) holds the positive itself, which would otherwise count twice. Pairs only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline.distill.losses._util import masked_kl, same_image, student_fp32, teacher_fp32
from pipeline.distill.losses.ensemble import ensemble_log_probs


def queue_list_logits(anchor: Tensor, positive: Tensor, queue: Tensor) -> Tensor:
    """[B, 1 + K]: each anchor against its positive (column 0) and the shared queue [K, D]."""
    return torch.cat([(anchor * positive).sum(-1, keepdim=True), anchor @ queue.T], dim=1)


class ResponseQueueDistillLoss(nn.Module):
    def forward(
        self,
        s_v: Tensor,
        s_t: Tensor,
        teachers: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]],
        scales: Sequence[float],
        student_scale,
        image_ids: Tensor | None = None,
        queue_v_image_ids: Tensor | None = None,
        queue_t_image_ids: Tensor | None = None,
    ) -> Tensor:
        """`teachers`: per teacher (t_v [B, D_m], t_t [B, D_m], queue_v [K, D_m], queue_t [K', D_m]), the first
        the main teacher (the student scores against its rows); `image_ids` [B] with the queues' image ids
        (None: nothing masked)."""
        s_v, s_t = student_fp32(s_v), student_fp32(s_t)
        rows = [tuple(teacher_fp32(x) for x in t) for t in teachers]
        total = 0.0
        # (student anchor, which teacher rows are the anchor / the positive / the queue, the queue's image ids)
        for s, a, p, q, q_ids in ((s_v, 0, 1, 3, queue_t_image_ids), (s_t, 1, 0, 2, queue_v_image_ids)):
            keep = None
            if image_ids is not None:
                keep = torch.ones(s.shape[0], 1 + rows[0][q].shape[0], dtype=torch.bool, device=s.device)
                keep[:, 1:] = ~same_image(image_ids, q_ids)
            main = rows[0]
            student = student_scale * queue_list_logits(s, main[p], main[q])
            if keep is not None:
                student = student.masked_fill(~keep, float("-inf"))
            teacher = [tau * queue_list_logits(t[a], t[p], t[q]) for t, tau in zip(rows, scales)]
            total = total + masked_kl(ensemble_log_probs(teacher, keep), student.log_softmax(1), keep).mean()
        return total / 2
