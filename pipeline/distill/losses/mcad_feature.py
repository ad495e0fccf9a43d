"""MCAD's feature distillation: the student's embeddings follow the modified teacher features t~
(mcad_target.py), as the `cosine` term follows the teacher's own rows:

    L_mcad_feature = (1 - mean_i cos(s_t,i, t~_t,i)) / 2 + (1 - mean_i cos(s_v,i, t~_v,i)) / 2

t~_t from the text anchors' lists (captions moved towards the fused image distribution), t~_v from the image
anchors' lists. With mcad_feature_step 0 it equals the `cosine` term on the pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distill.losses.candidates import CandidateLists
from pipeline.distill.losses.mcad_target import fused_log_probs, modified_features


class MCADFeatureLoss(nn.Module):
    def __init__(self, ce_weight: float = 0.5, ce_temperature: float = 1.0, step: float = 1.0):
        super().__init__()
        self.ce_weight, self.ce_temperature, self.step = float(ce_weight), float(ce_temperature), float(step)

    def forward(self, t2i: CandidateLists, i2t: CandidateLists, scales: Sequence[float]) -> Tensor:
        total = 0.0
        for lists in (t2i, i2t):
            target = modified_features(
                lists, fused_log_probs(lists, scales, self.ce_weight, self.ce_temperature), scales[0], self.step
            )
            total = total + (1 - F.cosine_similarity(lists.student, target, dim=-1).mean()) / 2
        return total
