"""Contrastive distillation against stored teacher features (DSMD's L_con, momentum-free).

For an anchor batch `a` [B, D] (student), its positives `p` [B, D] (the teacher rows of the same pairs)
and a queue `Q` [K, D] of teacher rows:

    logits_i = [<a_i, p_i>, a_i . Q_1, ..., a_i . Q_K] / T          # [B, 1 + K]
    L(a; p, Q) = mean_i CE(logits_i, target 0)

    L_con = L(s_v; t_v, Q_v) + L(s_t; t_t, Q_t)                      # intra-modal (the paper)
          [ + L(s_v; t_t, Q_t) + L(s_t; t_v, Q_v) ]                  # cross-modal (`cross_modal`, the
                                                                      #  code's first version)

Unpaired rows (images without captions, texts without images; `unpaired_v` / `unpaired_t`) join the
anchors of their modality's intra-modal part only: L(s_v ++ u_v; t_v ++ t(u_v), Q_v) is one mean over
B + U_v anchors (every row weighs the same, paired or not), and in the in-batch form they are also
negatives of the other rows. The cross-modal parts need a partner in the other modality: pairs only.

`Q_v` holds teacher IMAGE rows, `Q_t` teacher TEXT rows. The queue is whatever rows the trainer reads from
the feature store (for example the rows of the previous K/B batches of the epoch order, or the whole bank):
there is no enqueue state, so resume is exact. A queue entry that belongs to the anchor's own image is a
false negative (5 captions per image; the whole bank even holds the positive itself): when image ids are
given, such entries are masked out (logit -inf). Without a queue, the other in-batch teacher rows are the
negatives (`logits = a p^T / T`, target the diagonal), off-diagonal rows of the same image masked.
The math runs in float32; teacher rows and queues carry no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distill.losses._util import (
    off_diagonal_same_image,
    same_image,
    student_fp32,
    teacher_fp32,
    with_rows,
)


def queue_info_nce(
    anchor: Tensor,
    positive: Tensor,
    queue: Tensor,
    anchor_ids: Tensor | None,
    queue_ids: Tensor | None,
    temperature: float,
) -> Tensor:
    """mean_i CE([<a_i, p_i>, a_i . Q] / T, 0); queue entries of the anchor's own image masked."""
    pos = (anchor * positive).sum(-1, keepdim=True)  # [B, 1]
    neg = anchor @ queue.T  # [B, K]
    if anchor_ids is not None:
        neg = neg.masked_fill(same_image(anchor_ids, queue_ids), float("-inf"))
    logits = torch.cat([pos, neg], dim=1) / temperature  # [B, 1 + K]
    target = torch.zeros(anchor.shape[0], dtype=torch.long, device=anchor.device)
    return F.cross_entropy(logits, target)


def in_batch_info_nce(anchor: Tensor, keys: Tensor, ids: Tensor | None, temperature: float) -> Tensor:
    """mean_i CE(a_i keys^T / T, i): the other in-batch rows are the negatives, same-image rows masked."""
    logits = anchor @ keys.T  # [B, B], positives on the diagonal
    mask = off_diagonal_same_image(ids)
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    target = torch.arange(anchor.shape[0], device=anchor.device)
    return F.cross_entropy(logits / temperature, target)


class ContrastiveDistillLoss(nn.Module):
    def __init__(self, temperature: float = 0.05, cross_modal: bool = False):
        super().__init__()
        self.temperature = float(temperature)
        self.cross_modal = bool(cross_modal)

    def forward(
        self,
        s_v: Tensor,
        s_t: Tensor,
        t_v: Tensor,
        t_t: Tensor,
        image_ids: Tensor | None = None,
        queue_v: Tensor | None = None,
        queue_t: Tensor | None = None,
        queue_v_image_ids: Tensor | None = None,
        queue_t_image_ids: Tensor | None = None,
        unpaired_v: tuple[Tensor, Tensor, Tensor | None] | None = None,
        unpaired_t: tuple[Tensor, Tensor, Tensor | None] | None = None,
    ) -> Tensor:
        """`image_ids` [B] int64 (None: every pair its own image, nothing masked but the positive);
        `queue_v` [K, D] / `queue_t` [K', D] with the image row of each entry (needed when image_ids is
        given). Give both queues or neither (None: in-batch negatives). `unpaired_v` / `unpaired_t`:
        (student [U, D], teacher [U, D], ids [U]) of unpaired images / texts (intra-modal anchors only)."""
        if (queue_v is None) != (queue_t is None):
            raise ValueError("contrastive loss: give both queue_v and queue_t, or neither (in-batch negatives)")
        s_v, s_t = student_fp32(s_v), student_fp32(s_t)
        t_v, t_t = teacher_fp32(t_v), teacher_fp32(t_t)
        T = self.temperature
        # (anchor, positive, anchor ids, negatives): the intra-modal parts first (pairs + unpaired rows of
        # the modality), then the cross-modal ones (pairs only)
        parts = [(*with_rows(s_v, t_v, image_ids, unpaired_v), "v"), (*with_rows(s_t, t_t, image_ids, unpaired_t), "t")]
        if self.cross_modal:
            parts += [(s_v, t_t, image_ids, "t"), (s_t, t_v, image_ids, "v")]
        if queue_v is None:
            return sum(in_batch_info_nce(a, p, ids, T) for a, p, ids, _ in parts)
        if image_ids is not None and (queue_v_image_ids is None or queue_t_image_ids is None):
            raise ValueError(
                "contrastive loss: masking same-image negatives needs queue_v_image_ids and "
                "queue_t_image_ids (the image row of every queue entry)"
            )
        queues = {"v": (teacher_fp32(queue_v), queue_v_image_ids), "t": (teacher_fp32(queue_t), queue_t_image_ids)}
        return sum(queue_info_nce(a, p, queues[m][0], ids, queues[m][1], T) for a, p, ids, m in parts)
