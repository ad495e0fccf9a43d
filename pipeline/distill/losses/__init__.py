"""The distillation losses (config section `distill.loss`).

One loss per file, each a module that takes embeddings (never models) and returns one scalar:

    contrastive       contrastive.py       contrastive distillation against stored teacher rows (queue or bank)
    l1                feature_l1.py        mean|s - t| per modality
    cosine            cosine.py            (1 - mean cos(s, t)) / 2 per modality
    triplet           triplet.py           VSE++ hardest-negative bidirectional triplet, four pairings
    relation          relation.py          KL between teacher and student in-batch similarity distributions
    pair_contrastive  pair_contrastive.py  student-student CLIP loss, no teacher (the undistilled baseline)

Unpaired rows (`UnpairedRows`: images without captions, texts without an image, with their teacher rows)
extend the intra-modal terms only: contrastive (its intra-modal part), l1 and cosine see pairs + unpaired
rows of each modality, relation sees the similarity matrix of all the step's images against all its texts
(it needs no pairing: it matches the teacher's distributions); the pair terms (triplet, the cross-modal
contrastive part, pair_contrastive) see the pairs alone.

`DistillLoss` builds only the terms whose weight is > 0 (a weight of 0: the term is not built, not even
named) and returns their raw, UNWEIGHTED values as `{"<name>_loss": scalar}`; weighting is the balancer's
job (`pipeline.distill.balancer`), which receives `DistillLoss.weights` as the fixed weights. The loss math runs in
float32 with autocast disabled, whatever precision the student produced; teacher rows carry no gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.distill.losses._util import as_ids, with_rows
from pipeline.distill.losses.contrastive import ContrastiveDistillLoss
from pipeline.distill.losses.cosine import CosineDistillLoss
from pipeline.distill.losses.feature_l1 import FeatureL1Loss
from pipeline.distill.losses.pair_contrastive import PairContrastiveLoss
from pipeline.distill.losses.relation import RelationDistillLoss
from pipeline.distill.losses.triplet import HardNegativeTripletLoss

__all__ = [
    "LossConfig",
    "DistillLoss",
    "UnpairedRows",
    "TERMS",
    "ContrastiveDistillLoss",
    "FeatureL1Loss",
    "CosineDistillLoss",
    "HardNegativeTripletLoss",
    "RelationDistillLoss",
    "PairContrastiveLoss",
]

TERMS = ("contrastive", "l1", "cosine", "triplet", "relation", "pair_contrastive")  # build and output order
TEACHER_TERMS = frozenset(TERMS) - {"pair_contrastive"}


@dataclass(frozen=True)
class LossConfig:
    """Section `distill.loss`. The first six fields are the weights of the terms (0 = not built); with a
    `dsmd*` balancer they only switch terms on and off, with the `fixed` balancer they are the weights."""

    contrastive: float = 1.0
    l1: float = 1.0
    cosine: float = 1.0
    triplet: float = 1.0
    relation: float = 0.0  # optional relation-based KD (LEMKD / CLIP-KD)
    pair_contrastive: float = 0.0  # student-student CLIP loss: the undistilled baseline, no teacher
    temperature: float = 0.05  # contrastive distillation temperature (DSMD: 0.05)
    cross_modal: bool = False  # add s_v vs (t_t, Q_t) and s_t vs (t_v, Q_v) to the contrastive term
    mask_same_image: bool = True  # drop negatives that belong to the anchor's own image (false negatives)
    margin: float = 0.2  # triplet margin: VSE++ / DSMD code default; DSMD's script 0.05; paper's text: 0
    relation_temperature: float = 0.05
    pair_temperature: float = 0.05
    queue_size: int = 8192  # teacher rows used as contrastive negatives; 0 = the whole bank of the split

    def __post_init__(self) -> None:
        for name in TERMS:
            w = getattr(self, name)
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"{name}: a loss weight must be a finite number >= 0, got {w!r}")
        if not any(getattr(self, name) > 0 for name in TERMS):
            raise ValueError(f"every loss weight is 0; set at least one of {', '.join(TERMS)} above 0")
        for name in ("temperature", "relation_temperature", "pair_temperature"):
            t = getattr(self, name)
            if not math.isfinite(t) or t <= 0:
                raise ValueError(f"{name}: must be a finite number > 0, got {t!r}")
        if not math.isfinite(self.margin) or self.margin < 0:
            raise ValueError(f"margin: must be a finite number >= 0, got {self.margin!r}")
        if self.queue_size < 0:
            raise ValueError(f"queue_size: must be >= 0 (0 = the whole teacher bank), got {self.queue_size!r}")


@dataclass
class UnpairedRows:
    """The step's unpaired rows. Images: student `s_v` [U_v, D], teacher `t_v` [U_v, D], `v_ids` [U_v] their
    image rows (so that a whole-bank queue masks the image itself). Texts: `s_t`, `t_t` [U_t, D], `t_ids` [U_t]
    ids that no image has and no two texts share (e.g. -1 - text row). A side may be None (not drawn)."""

    s_v: Tensor | None = None
    t_v: Tensor | None = None
    v_ids: Any = None
    s_t: Tensor | None = None
    t_t: Tensor | None = None
    t_ids: Any = None

    def side(self, m: str, mask: bool, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """(student, teacher, ids or None) of modality m ("v" or "t"), checked; None when absent or empty."""
        s, t, ids = getattr(self, f"s_{m}"), getattr(self, f"t_{m}"), getattr(self, f"{m}_ids")
        if s is None or s.shape[0] == 0:
            return None
        if s.dim() != 2 or t is None or t.shape != s.shape:
            got = None if t is None else tuple(t.shape)
            raise ValueError(f"unpaired t_{m}: expected teacher rows of shape {tuple(s.shape)}, got {got}")
        if not mask:
            return s, t, None
        if ids is None:
            raise ValueError(f"unpaired {m}_ids: needed to mask same-image negatives (mask_same_image is on)")
        return s, t, as_ids(ids, s.device, s.shape[0], f"unpaired {m}_ids")


class DistillLoss(nn.Module):
    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        builders = {
            "contrastive": lambda: ContrastiveDistillLoss(cfg.temperature, cfg.cross_modal),
            "l1": FeatureL1Loss,
            "cosine": CosineDistillLoss,
            "triplet": lambda: HardNegativeTripletLoss(cfg.margin),
            "relation": lambda: RelationDistillLoss(cfg.relation_temperature),
            "pair_contrastive": lambda: PairContrastiveLoss(cfg.pair_temperature),
        }
        self.terms = nn.ModuleDict({name: builders[name]() for name in TERMS if getattr(cfg, name) > 0})
        self.term_names: tuple[str, ...] = tuple(f"{name}_loss" for name in self.terms)
        self.weights: dict[str, float] = {f"{name}_loss": float(getattr(cfg, name)) for name in self.terms}
        self.needs_queue: bool = "contrastive" in self.terms
        self.needs_teacher: bool = any(name in TEACHER_TERMS for name in self.terms)

    def forward(
        self,
        s_v: Tensor,
        s_t: Tensor,
        t_v: Tensor | None,
        t_t: Tensor | None,
        image_ids: Any,
        queue_v: Tensor | None = None,
        queue_t: Tensor | None = None,
        queue_v_image_ids: Any = None,
        queue_t_image_ids: Any = None,
        unpaired: UnpairedRows | None = None,
    ) -> dict[str, Tensor]:
        """s_v, s_t [B, D] student rows; t_v, t_t [B, D] teacher rows of the same pairs (None allowed when
        no term needs the teacher); image_ids [B] (the image row of each pair; may be None when
        `mask_same_image` is off); queue_v [K, D] teacher image rows, queue_t [K', D] teacher text rows,
        with their image rows (None: the contrastive term uses in-batch negatives). `unpaired`: the step's
        unpaired image / text rows for the intra-modal terms (module docstring).
        Returns {"<name>_loss": raw unweighted float32 scalar} for the built terms, in `term_names` order."""
        B, D = s_v.shape
        if s_t.shape != (B, D):
            raise ValueError(f"s_t: expected shape {(B, D)} like s_v, got {tuple(s_t.shape)}")
        if self.needs_teacher:
            for name, t in (("t_v", t_v), ("t_t", t_t)):
                if t is None or t.shape != (B, D):
                    got = None if t is None else tuple(t.shape)
                    raise ValueError(f"{name}: expected teacher rows of shape {(B, D)}, got {got}")
        for name, q in (("queue_v", queue_v), ("queue_t", queue_t)):
            if q is not None and (q.dim() != 2 or q.shape[1] != D):
                raise ValueError(f"{name}: expected [K, {D}] teacher rows, got {tuple(q.shape)}")
        ids = qv_ids = qt_ids = None
        if self.cfg.mask_same_image:
            if image_ids is None:
                raise ValueError("image_ids: needed to mask same-image negatives (mask_same_image is on)")
            ids = as_ids(image_ids, s_v.device, B, "image_ids")
            if self.needs_queue and queue_v is not None and queue_t is not None:
                if queue_v_image_ids is None or queue_t_image_ids is None:
                    raise ValueError(
                        "queue_v_image_ids, queue_t_image_ids: needed to mask same-image queue "
                        "entries (mask_same_image is on)"
                    )
                qv_ids = as_ids(queue_v_image_ids, s_v.device, queue_v.shape[0], "queue_v_image_ids")
                qt_ids = as_ids(queue_t_image_ids, s_v.device, queue_t.shape[0], "queue_t_image_ids")

        out: dict[str, Tensor] = {}
        # the loss math in float32 whatever autocast the student ran under
        with torch.autocast(device_type=s_v.device.type, enabled=False):
            u_v = u_t = None
            if unpaired is not None and self.needs_teacher:  # pair-only losses ignore unpaired rows
                u_v = unpaired.side("v", self.cfg.mask_same_image, s_v.device)
                u_t = unpaired.side("t", self.cfg.mask_same_image, s_v.device)
                for name, u in (("s_v", u_v), ("s_t", u_t)):
                    if u is not None and u[0].shape[1] != D:
                        raise ValueError(f"unpaired {name}: expected [U, {D}] rows, got {tuple(u[0].shape)}")
            for name, term in self.terms.items():
                if name == "contrastive":
                    value = term(s_v, s_t, t_v, t_t, ids, queue_v, queue_t, qv_ids, qt_ids, u_v, u_t)
                elif name == "triplet":
                    value = term(s_v, s_t, t_v, t_t, ids)
                elif name == "pair_contrastive":
                    value = term(s_v, s_t, ids)
                else:  # l1, cosine, relation: every image row and every text row of the step
                    iv, tv, _ = with_rows(s_v, t_v, None, u_v)
                    it, tt, _ = with_rows(s_t, t_t, None, u_t)
                    value = term(iv, it, tv, tt)
                out[f"{name}_loss"] = value
        return out
