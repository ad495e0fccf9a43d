"""Symmetric in-batch InfoNCE between the student's own image and text embeddings (the CLIP loss).

No teacher: this term alone trains the UNDISTILLED baseline on the image-caption pairs.

    S = s_v s_t^T / tau                                         [B, B], pairs on the diagonal
    L_pair = ( mean_i CE(S_i, i) + mean_j CE(S^T_j, j) ) / 2

Off-diagonal entries of the same image (two captions of one image in a shuffled caption batch) are
masked out (logit -inf) when image ids are given: they are not negatives. Fixed temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distill.losses._util import off_diagonal_same_image, student_fp32


class PairContrastiveLoss(nn.Module):
    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, s_v: Tensor, s_t: Tensor, image_ids: Tensor | None = None) -> Tensor:
        s_v, s_t = student_fp32(s_v), student_fp32(s_t)
        logits = s_v @ s_t.T / self.temperature  # [B, B]
        mask = off_diagonal_same_image(image_ids)
        if mask is not None:
            logits = logits.masked_fill(mask, float("-inf"))  # symmetric, so it serves both directions
        target = torch.arange(s_v.shape[0], device=s_v.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
