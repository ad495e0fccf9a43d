"""Per-anchor candidate lists of one retrieval direction (the input of the dcd and mcad terms).

Direction text->image: the anchor is caption i, its list is [its image, its K mined images] (the store's
`text_to_image/rows` of the caption). Direction image->text: the anchor is the image of pair i, its list is
[caption i, the K mined captions of that image] (`image_to_text/rows` of the image). Position 0 is always the
positive; the miner excludes the anchor's own image (own captions), so no list holds a second positive.

The candidates are STORED TEACHER ROWS (no student forward for them): the student scores its anchor embedding
against the teacher rows of the list, as the contrastive term scores it against the queue. Each teacher m sees
the same list in its own space (its rows of the anchor, the positive and the candidates).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from pipeline.distill.losses._util import list_logits, student_fp32, teacher_fp32
from pipeline.distill.losses.ensemble import ensemble_log_probs


@dataclass
class CandidateLists:
    """One direction's lists for B anchors; index 0 of the teacher tuples is the store's main teacher."""

    student: Tensor  # [B, D] the student's anchors (s_t for text->image, s_v for image->text)
    anchors: tuple[Tensor, ...]  # per teacher [B, D_m] its rows of the anchors
    positives: tuple[Tensor, ...]  # per teacher [B, D_m] its rows of the positives
    candidates: tuple[Tensor, ...]  # per teacher [B, K, D_m] its rows of the mined candidates
    keep: Tensor  # [B, 1 + K] bool: True for the positive (column 0) and every real candidate (not padding)
    ce: Tensor | None = None  # [B, 1 + K] cross-encoder logits of (anchor, list entry), column 0 the positive

    def __post_init__(self) -> None:
        self.student = student_fp32(self.student)
        self.anchors = tuple(teacher_fp32(x) for x in self.anchors)
        self.positives = tuple(teacher_fp32(x) for x in self.positives)
        self.candidates = tuple(teacher_fp32(x) for x in self.candidates)
        if self.ce is not None:
            self.ce = teacher_fp32(self.ce)

    def student_logits(self, scale) -> Tensor:
        """[B, 1 + K] scale x student anchor . the main teacher's list rows (unmasked)."""
        return scale * list_logits(self.student, self.positives[0], self.candidates[0])

    def teacher_cosines(self) -> Tensor:
        """[B, 1 + K] the main teacher's similarity of each anchor to its list (unmasked)."""
        return list_logits(self.anchors[0], self.positives[0], self.candidates[0])

    def teacher_logits(self, scales) -> list[Tensor]:
        """Per teacher [B, 1 + K]: tau_m x its similarities (unmasked)."""
        return [s * list_logits(a, p, c) for s, a, p, c in zip(scales, self.anchors, self.positives, self.candidates)]

    def teacher_log_probs(self, scales, keep: Tensor | None = None) -> Tensor:
        """[B, 1 + K] the teachers' ensemble distribution over the kept entries (`keep`: default self.keep)."""
        return ensemble_log_probs(self.teacher_logits(scales), self.keep if keep is None else keep)
