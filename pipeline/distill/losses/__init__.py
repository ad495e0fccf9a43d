"""The distillation losses (config section `distill.loss`).

One loss per file, each a module that takes embeddings (never models) and returns one scalar:

    contrastive       contrastive.py       contrastive distillation against stored teacher rows (queue or bank)
    l1                feature_l1.py        mean|s - t| per modality
    cosine            cosine.py            (1 - mean cos(s, t)) / 2 per modality
    triplet           triplet.py           VSE++ hardest-negative bidirectional triplet, four pairings
    relation          relation.py          KL between teacher and student in-batch similarity distributions
    pair_contrastive  pair_contrastive.py  student-student CLIP loss, no teacher (the undistilled baseline)
    response          response.py          LEMKD response KD over the batch, each model at its own temperature
    response_queue    response_queue.py    the same over [positive, queue]
    intra_relation    intra_relation.py    LEMKD relation KD within each modality (image-image, text-text)
    dcd               dcd.py               DCD: contrastive over [positive, K teacher-mined negatives],
                                           difficulty-weighted, likely false negatives dropped
    mcad_kl           mcad_kl.py           MCAD: KL to the fused (dual-stream + cross-encoder) target
    mcad_feature      mcad_feature.py      MCAD: cosine to the modified teacher features
and the parts they share: ensemble.py (several teachers averaged after softmax, DataCompDR), candidates.py
(per-anchor candidate lists), mcad_target.py (the fused target: its formula and why).

Unpaired rows (`UnpairedRows`: images without captions, texts without an image, with their teacher rows)
extend the intra-modal terms only: contrastive (its intra-modal part), l1, cosine and intra_relation see
pairs + unpaired rows of each modality, relation sees the similarity matrix of all the step's images against
all its texts (it needs no pairing: it matches the teacher's distributions); the pair terms (triplet, the
cross-modal contrastive part, pair_contrastive) and the terms that need other teachers' rows or mined
candidates (response, response_queue, dcd, mcad_*) see the pairs alone.

What the knowledge terms take (`Knowledge`, built by the data path for the step's B pairs, the global batch
under torchrun; every tensor on the loss's device, teacher rows in any float dtype):
    cand_v     [B, K, D]   the main teacher's image rows of each CAPTION's K mined images
                           (mined store: <split>/text_to_image/rows [M, K] at the caption's row)
    cand_t     [B, K, D]   the main teacher's text rows of the K mined captions of each pair's IMAGE
                           (<split>/image_to_text/rows [N, K] at the image's row)
    cand_v_ok, cand_t_ok   [B, K] bool, False where the store has no candidate (a padded row; give any valid
                           row's features there, they are masked); None: every candidate is real
    ce_t2i     [B, 1 + K]  cross-encoder logits of (caption i, [its image, its K mined images]):
                           <split>/text_to_image/ce_scores [M, 1 + K] at the caption's row
    ce_i2t     [B, 1 + K]  (pair i's image, [caption i, the image's K mined captions]): column 0 is
                           ce_t2i[:, 0] (the same pair), columns 1..K <split>/image_to_text/ce_scores [N, K]
    extra      per teacher of `distill.loss.teachers`, in that order, a `TeacherRows` in its own dimension:
               t_v, t_t [B, D_m] (the pairs), queue_v [K_q, D_m], queue_t [K_q', D_m] (the main queue's
               entries), cand_v, cand_t [B, K, D_m] (the same candidates as above)
The miner excludes the anchor's own image (own captions) from its candidates, so a list holds one positive.
Each teacher's logit scale (tau = exp of its learned log scale; the store's `teacher.logit_scale` and
`teachers/<name>` attrs) is a constant of the run, given once: `DistillLoss(cfg, teacher_scales=...)`
(`resolve_teacher_scales`). What a configuration needs is on the module: `needs_queue`, `needs_candidates`,
`needs_cross_encoder`, `extra_rows` ({"pairs", "queue", "candidates"}: what to gather of the other teachers).

`DistillLoss` builds only the terms whose weight is > 0 (a weight of 0: the term is not built, not even
named) and returns their raw, UNWEIGHTED values as `{"<name>_loss": scalar}`; weighting is the balancer's
job (`pipeline.distill.balancer`), which receives `DistillLoss.weights` as the fixed weights. The loss math runs in
float32 with autocast disabled, whatever precision the student produced; teacher rows carry no gradient.
The student temperature, when learned (`learn_student_temperature`), is the one parameter of the module
(`student_log_scale`: the optimizer steps it, the checkpoint holds it, as the model's weights).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pipeline.distill.losses._util import as_ids, with_positive, with_rows
from pipeline.distill.losses.candidates import CandidateLists
from pipeline.distill.losses.contrastive import ContrastiveDistillLoss
from pipeline.distill.losses.cosine import CosineDistillLoss
from pipeline.distill.losses.dcd import DynamicContrastiveLoss
from pipeline.distill.losses.feature_l1 import FeatureL1Loss
from pipeline.distill.losses.intra_relation import IntraRelationDistillLoss
from pipeline.distill.losses.mcad_feature import MCADFeatureLoss
from pipeline.distill.losses.mcad_kl import MCADDistributionLoss
from pipeline.distill.losses.pair_contrastive import PairContrastiveLoss
from pipeline.distill.losses.relation import RelationDistillLoss
from pipeline.distill.losses.response import ResponseDistillLoss
from pipeline.distill.losses.response_queue import ResponseQueueDistillLoss
from pipeline.distill.losses.triplet import HardNegativeTripletLoss

__all__ = [
    "LossConfig",
    "DistillLoss",
    "UnpairedRows",
    "Knowledge",
    "TeacherRows",
    "TERMS",
    "DSMD_TERMS",
    "KNOWLEDGE_TERMS",
    "KNOWLEDGE_LOSS_KEYS",
    "TEACHER_TERMS",
    "LIST_TERMS",
    "resolve_teacher_scales",
    "ContrastiveDistillLoss",
    "FeatureL1Loss",
    "CosineDistillLoss",
    "HardNegativeTripletLoss",
    "RelationDistillLoss",
    "PairContrastiveLoss",
    "ResponseDistillLoss",
    "ResponseQueueDistillLoss",
    "IntraRelationDistillLoss",
    "DynamicContrastiveLoss",
    "MCADDistributionLoss",
    "MCADFeatureLoss",
]

DSMD_TERMS = ("contrastive", "l1", "cosine", "triplet", "relation", "pair_contrastive")
KNOWLEDGE_TERMS = ("response", "response_queue", "intra_relation", "dcd", "mcad_kl", "mcad_feature")
TERMS = DSMD_TERMS + KNOWLEDGE_TERMS  # build and output order
# the keys that came with the knowledge terms: their defaults switch them off (older checkpoints lack them)
KNOWLEDGE_LOSS_KEYS = KNOWLEDGE_TERMS + (
    "teachers",
    "teacher_temperature",
    "student_temperature",
    "learn_student_temperature",
    "intra_relation_temperature",
    "dcd_temperature",
    "dcd_difficulty",
    "dcd_margin",
    "mcad_ce_weight",
    "mcad_ce_temperature",
    "mcad_feature_step",
)
TEACHER_TERMS = frozenset(TERMS) - {"pair_contrastive"}
LIST_TERMS = frozenset({"dcd", "mcad_kl", "mcad_feature"})  # over the mined candidate lists
STUDENT_SCALE_TERMS = frozenset({"response", "response_queue", "mcad_kl"})  # use the student temperature
MAX_STUDENT_SCALE = 100.0  # CLIP's clamp of a learned logit scale (1 / T_S >= 0.01)


@dataclass(frozen=True)
class LossConfig:
    """Section `distill.loss`. The fields named in TERMS are the weights of the terms (0 = not built); with a
    `dsmd*` balancer they only switch terms on and off, with the `fixed` balancer they are the weights."""

    contrastive: float = 1.0
    l1: float = 1.0
    cosine: float = 1.0
    triplet: float = 1.0
    relation: float = 0.0  # optional relation-based KD (LEMKD / CLIP-KD)
    pair_contrastive: float = 0.0  # student-student CLIP loss: the undistilled baseline, no teacher
    response: float = 0.0  # LEMKD response KD over the batch (response.py)
    response_queue: float = 0.0  # LEMKD response KD over [positive, queue] (response_queue.py)
    intra_relation: float = 0.0  # LEMKD relation KD within each modality (intra_relation.py)
    dcd: float = 0.0  # DCD over the mined candidates (dcd.py)
    mcad_kl: float = 0.0  # MCAD distribution distillation to the fused target (mcad_kl.py)
    mcad_feature: float = 0.0  # MCAD feature distillation to the modified features (mcad_feature.py)
    temperature: float = 0.05  # contrastive distillation temperature (DSMD: 0.05)
    cross_modal: bool = False  # add s_v vs (t_t, Q_t) and s_t vs (t_v, Q_v) to the contrastive term
    mask_same_image: bool = True  # drop negatives that belong to the anchor's own image (false negatives)
    margin: float = 0.2  # triplet margin: VSE++ / DSMD code default; DSMD's script 0.05; paper's text: 0
    relation_temperature: float = 0.05
    pair_temperature: float = 0.05
    queue_size: int = 8192  # teacher rows used as contrastive negatives; 0 = the whole bank of the split
    # the teachers' distributions (response*, dcd's weights, mcad): the store's main teacher plus these
    # (names under the store's teachers/), averaged after softmax at each one's logit scale (ensemble.py)
    teachers: tuple[str, ...] = ()
    teacher_temperature: float | None = None  # None: each teacher's recorded logit scale; else 1/T for all
    student_temperature: float = 0.05  # T_S of response, response_queue, mcad_kl (its initial value if learned)
    learn_student_temperature: bool = False  # T_S a parameter the optimizer steps (clamped at 1/T_S <= 100)
    intra_relation_temperature: float = 0.05  # one T for teacher and student (intra_relation.py)
    dcd_temperature: float = 0.05  # the student's temperature in DCD's contrastive term
    dcd_difficulty: Literal["entropy", "none"] = "entropy"  # DCD's teacher-entropy weights, or uniform
    dcd_margin: float | None = 0.0  # drop candidates the teacher puts within this of the positive; None: none
    mcad_ce_weight: float = 0.5  # lambda: 0 = the dual-stream ensemble alone, 1 = the cross-encoder alone
    mcad_ce_temperature: float = 1.0  # T_ce of the cross-encoder's logits
    mcad_feature_step: float = 1.0  # eta of the modified features (0: the teacher's own rows)

    def __post_init__(self) -> None:
        for name in TERMS:
            w = getattr(self, name)
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"{name}: a loss weight must be a finite number >= 0, got {w!r}")
        if not any(getattr(self, name) > 0 for name in TERMS):
            raise ValueError(f"every loss weight is 0; set at least one of {', '.join(TERMS)} above 0")
        positive = ["temperature", "relation_temperature", "pair_temperature", "student_temperature"]
        positive += ["intra_relation_temperature", "dcd_temperature", "mcad_ce_temperature"]
        if self.teacher_temperature is not None:
            positive.append("teacher_temperature")
        for name in positive:
            t = getattr(self, name)
            if not math.isfinite(t) or t <= 0:
                raise ValueError(f"{name}: must be a finite number > 0, got {t!r}")
        if not math.isfinite(self.margin) or self.margin < 0:
            raise ValueError(f"margin: must be a finite number >= 0, got {self.margin!r}")
        if self.queue_size < 0:
            raise ValueError(f"queue_size: must be >= 0 (0 = the whole teacher bank), got {self.queue_size!r}")
        if self.dcd_margin is not None and not math.isfinite(self.dcd_margin):
            raise ValueError(
                f"dcd_margin: must be a finite number or null (keep every candidate), got {self.dcd_margin!r}"
            )
        if not 0 <= self.mcad_ce_weight <= 1:
            raise ValueError(f"mcad_ce_weight: must be in [0, 1], got {self.mcad_ce_weight!r}")
        if not math.isfinite(self.mcad_feature_step) or self.mcad_feature_step < 0:
            raise ValueError(f"mcad_feature_step: must be a finite number >= 0, got {self.mcad_feature_step!r}")
        self._check_knowledge_switches()

    def _check_knowledge_switches(self) -> None:
        """Settings that nothing would read are refused: they would look like they change the run."""
        on = {name for name in TERMS if getattr(self, name) > 0}
        if self.learn_student_temperature and not on & STUDENT_SCALE_TERMS:
            raise ValueError(
                "learn_student_temperature: no term uses the student temperature; it is learned for "
                f"{', '.join(sorted(STUDENT_SCALE_TERMS))} (set one of them above 0)"
            )
        if any(not isinstance(n, str) or not n for n in self.teachers) or len(set(self.teachers)) != len(self.teachers):
            raise ValueError(f"teachers: expected distinct teacher names, got {list(self.teachers)!r}")
        if self.teachers and not on & uses_teacher_distributions(self):
            raise ValueError(
                "teachers: the other teachers join the teachers' distributions of response, response_queue, "
                "dcd (dcd_difficulty: entropy), mcad_kl and mcad_feature; none of them is on"
            )

    @property
    def uses_teacher_scale(self) -> bool:
        return bool({name for name in TERMS if getattr(self, name) > 0} & uses_teacher_distributions(self))


def uses_teacher_distributions(cfg: LossConfig) -> frozenset[str]:
    """The terms that read the teachers' distributions (and so their logit scales)."""
    terms = {"response", "response_queue", "mcad_kl", "mcad_feature"}
    if cfg.dcd_difficulty == "entropy":
        terms.add("dcd")
    return frozenset(terms)


def resolve_teacher_scales(
    cfg: LossConfig, recorded: Sequence[float | None], names: Sequence[str]
) -> tuple[float, ...]:
    """The logit scale of each teacher (main first, then cfg.teachers): 1 / teacher_temperature when set,
    else the recorded one. ValueError naming the teacher that records none or a bad one."""
    if len(recorded) != 1 + len(cfg.teachers) or len(names) != len(recorded):
        raise ValueError(f"resolve_teacher_scales: {len(recorded)} scales for {1 + len(cfg.teachers)} teachers")
    if cfg.teacher_temperature is not None:
        return tuple(1.0 / cfg.teacher_temperature for _ in recorded)
    out = []
    for name, scale in zip(names, recorded):
        if scale is None:
            raise ValueError(
                f"teacher {name!r} records no logit scale (its logit_scale attribute is null): set "
                "distill.loss.teacher_temperature"
            )
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"teacher {name!r}: logit_scale must be a finite number > 0, got {scale!r}")
        out.append(float(scale))
    return tuple(out)


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


@dataclass
class TeacherRows:
    """Another dual-stream teacher's rows for the step, in its own dimension D_m (module docstring)."""

    t_v: Tensor | None = None  # [B, D_m] image rows of the pairs
    t_t: Tensor | None = None  # [B, D_m] text rows of the pairs
    queue_v: Tensor | None = None  # [K_q, D_m] the rows of the main queue's entries
    queue_t: Tensor | None = None  # [K_q', D_m]
    cand_v: Tensor | None = None  # [B, K, D_m] rows of each caption's mined images
    cand_t: Tensor | None = None  # [B, K, D_m] rows of the mined captions of each pair's image


@dataclass
class Knowledge:
    """Teacher knowledge beyond one row per item, for the step's B pairs (module docstring)."""

    cand_v: Tensor | None = None  # [B, K, D] the main teacher's rows of each caption's mined images
    cand_t: Tensor | None = None  # [B, K, D] its rows of the mined captions of each pair's image
    cand_v_ok: Tensor | None = None  # [B, K] bool (None: all real)
    cand_t_ok: Tensor | None = None  # [B, K] bool
    ce_t2i: Tensor | None = None  # [B, 1 + K] cross-encoder logits, column 0 the positive
    ce_i2t: Tensor | None = None  # [B, 1 + K]
    extra: tuple[TeacherRows, ...] = ()  # one per distill.loss.teachers entry, in that order


def _check_rows(name: str, x: Tensor | None, shape: tuple) -> Tensor:
    """x must have `shape` (None in it: any size there)."""
    if x is None or x.dim() != len(shape) or any(want is not None and got != want for got, want in zip(x.shape, shape)):
        got = None if x is None else tuple(x.shape)
        want = tuple("*" if n is None else n for n in shape)
        raise ValueError(f"{name}: expected a tensor of shape {want}, got {got}")
    return x


class DistillLoss(nn.Module):
    def __init__(self, cfg: LossConfig, teacher_scales: Sequence[float] | None = None):
        """`teacher_scales`: the logit scale of the main teacher and of each of `cfg.teachers`
        (`resolve_teacher_scales`); needed by the terms that use the teachers' distributions, unless
        `cfg.teacher_temperature` sets them all."""
        super().__init__()
        self.cfg = cfg
        ce = (cfg.mcad_ce_weight, cfg.mcad_ce_temperature)
        builders = {
            "contrastive": lambda: ContrastiveDistillLoss(cfg.temperature, cfg.cross_modal),
            "l1": FeatureL1Loss,
            "cosine": CosineDistillLoss,
            "triplet": lambda: HardNegativeTripletLoss(cfg.margin),
            "relation": lambda: RelationDistillLoss(cfg.relation_temperature),
            "pair_contrastive": lambda: PairContrastiveLoss(cfg.pair_temperature),
            "response": ResponseDistillLoss,
            "response_queue": ResponseQueueDistillLoss,
            "intra_relation": lambda: IntraRelationDistillLoss(cfg.intra_relation_temperature),
            "dcd": lambda: DynamicContrastiveLoss(cfg.dcd_temperature, cfg.dcd_difficulty, cfg.dcd_margin),
            "mcad_kl": lambda: MCADDistributionLoss(*ce),
            "mcad_feature": lambda: MCADFeatureLoss(*ce, cfg.mcad_feature_step),
        }
        self.terms = nn.ModuleDict({name: builders[name]() for name in TERMS if getattr(cfg, name) > 0})
        self.term_names: tuple[str, ...] = tuple(f"{name}_loss" for name in self.terms)
        self.weights: dict[str, float] = {f"{name}_loss": float(getattr(cfg, name)) for name in self.terms}
        on = set(self.terms)
        self.needs_queue: bool = bool(on & {"contrastive", "response_queue"})
        self.needs_teacher: bool = bool(on & TEACHER_TERMS)
        self.needs_candidates: bool = bool(on & LIST_TERMS)
        self.needs_cross_encoder: bool = bool(on & {"mcad_kl", "mcad_feature"}) and cfg.mcad_ce_weight > 0
        distribution_terms = on & uses_teacher_distributions(cfg)
        extra: set[str] = set()
        if cfg.teachers and distribution_terms:
            extra.add("pairs")
            extra |= {"queue"} if "response_queue" in on else set()
            extra |= {"candidates"} if distribution_terms & LIST_TERMS else set()
        self.extra_rows: frozenset[str] = frozenset(extra)
        self.teacher_scales: tuple[float, ...] | None = None
        if distribution_terms:
            n = 1 + len(cfg.teachers)
            if cfg.teacher_temperature is not None:
                teacher_scales = [1.0 / cfg.teacher_temperature] * n
            if teacher_scales is None or len(teacher_scales) != n:
                raise ValueError(
                    f"teacher_scales: {', '.join(sorted(distribution_terms))} need the logit scale of the main "
                    f"teacher and of each of distill.loss.teachers ({n} in all), got {teacher_scales!r}"
                )
            self.teacher_scales = tuple(float(s) for s in teacher_scales)
        # the student's logit scale 1 / T_S, as CLIP's: a log-parameterized scalar when learned
        self.student_log_scale: nn.Parameter | None = None
        if cfg.learn_student_temperature:
            self.student_log_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.student_temperature)))

    def student_scale(self) -> Tensor | float:
        """1 / T_S: the learned scale (clamped at MAX_STUDENT_SCALE, as CLIP's) or the configured constant."""
        if self.student_log_scale is None:
            return 1.0 / self.cfg.student_temperature
        return self.student_log_scale.float().exp().clamp(max=MAX_STUDENT_SCALE)

    @torch.no_grad()
    def student_temperature(self) -> float:
        """T_S now (for the logs)."""
        return 1.0 / float(self.student_scale())

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
        knowledge: Knowledge | None = None,
    ) -> dict[str, Tensor]:
        """s_v, s_t [B, D] student rows; t_v, t_t [B, D] teacher rows of the same pairs (None allowed when
        no term needs the teacher); image_ids [B] (the image row of each pair; may be None when
        `mask_same_image` is off); queue_v [K, D] teacher image rows, queue_t [K', D] teacher text rows,
        with their image rows (None: the contrastive term uses in-batch negatives). `unpaired`: the step's
        unpaired image / text rows for the intra-modal terms; `knowledge`: mined candidates, cross-encoder
        scores and the other teachers' rows (module docstring).
        Returns {"<name>_loss": raw unweighted float32 scalar} for the built terms, in `term_names` order."""
        B, D = s_v.shape
        ids, qv_ids, qt_ids = self._checked_ids(s_v, s_t, t_v, t_t, image_ids, queue_v, queue_t, queue_v_image_ids,
                                                queue_t_image_ids)  # fmt: skip
        extra = self._extra_teachers(knowledge, B, queue_v, queue_t)

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
            lists = self._candidate_lists(s_v, s_t, t_v, t_t, knowledge, extra) if self.needs_candidates else None
            scales, s_scale = self.teacher_scales, self.student_scale()
            for name, term in self.terms.items():
                if name == "contrastive":
                    value = term(s_v, s_t, t_v, t_t, ids, queue_v, queue_t, qv_ids, qt_ids, u_v, u_t)
                elif name == "triplet":
                    value = term(s_v, s_t, t_v, t_t, ids)
                elif name == "pair_contrastive":
                    value = term(s_v, s_t, ids)
                elif name == "response":
                    value = term(s_v, s_t, [(t_v, t_t), *((e.t_v, e.t_t) for e in extra)], scales, s_scale)
                elif name == "response_queue":
                    rows = [(t_v, t_t, queue_v, queue_t), *((e.t_v, e.t_t, e.queue_v, e.queue_t) for e in extra)]
                    value = term(s_v, s_t, rows, scales, s_scale, ids, qv_ids, qt_ids)
                elif name in ("dcd", "mcad_feature"):
                    value = term(*lists, scales)
                elif name == "mcad_kl":
                    value = term(*lists, scales, s_scale)
                else:  # l1, cosine, relation, intra_relation: every image row and every text row of the step
                    iv, tv, _ = with_rows(s_v, t_v, None, u_v)
                    it, tt, _ = with_rows(s_t, t_t, None, u_t)
                    value = term(iv, it, tv, tt)
                out[f"{name}_loss"] = value
        return out

    def _checked_ids(self, s_v, s_t, t_v, t_t, image_ids, queue_v, queue_t, queue_v_image_ids, queue_t_image_ids):
        """The shapes of the pair and queue rows checked; (image ids [B], queue_v ids, queue_t ids) as int64
        tensors, or None where nothing is masked."""
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
        if "response_queue" in self.terms and (queue_v is None or queue_t is None):
            raise ValueError("response_queue: needs queue_v and queue_t (the queue's teacher rows)")
        if not self.cfg.mask_same_image:
            return None, None, None
        if image_ids is None:
            raise ValueError("image_ids: needed to mask same-image negatives (mask_same_image is on)")
        ids, qv_ids, qt_ids = as_ids(image_ids, s_v.device, B, "image_ids"), None, None
        if self.needs_queue and queue_v is not None and queue_t is not None:
            if queue_v_image_ids is None or queue_t_image_ids is None:
                raise ValueError(
                    "queue_v_image_ids, queue_t_image_ids: needed to mask same-image queue entries (mask_same_image is on)"
                )
            qv_ids = as_ids(queue_v_image_ids, s_v.device, queue_v.shape[0], "queue_v_image_ids")
            qt_ids = as_ids(queue_t_image_ids, s_v.device, queue_t.shape[0], "queue_t_image_ids")
        return ids, qv_ids, qt_ids

    def _extra_teachers(self, k: Knowledge | None, B: int, queue_v, queue_t) -> tuple[TeacherRows, ...]:
        """The other teachers' rows, checked against what the built terms read (() when none are used)."""
        if not self.extra_rows:
            return ()
        if k is None or len(k.extra) != len(self.cfg.teachers):
            got = 0 if k is None else len(k.extra)
            raise ValueError(f"knowledge.extra: expected the rows of {len(self.cfg.teachers)} teachers "
                             f"({', '.join(self.cfg.teachers)}), got {got}")  # fmt: skip
        for i, (name, e) in enumerate(zip(self.cfg.teachers, k.extra)):
            where = f"knowledge.extra[{i}] (teacher {name!r})"
            d = _check_rows(f"{where}.t_v", e.t_v, (B, None)).shape[1]
            _check_rows(f"{where}.t_t", e.t_t, (B, d))
            if "queue" in self.extra_rows:
                _check_rows(f"{where}.queue_v", e.queue_v, (queue_v.shape[0], d))
                _check_rows(f"{where}.queue_t", e.queue_t, (queue_t.shape[0], d))
            if "candidates" in self.extra_rows:
                _check_rows(f"{where}.cand_v", e.cand_v, (B, k.cand_v.shape[1], d))
                _check_rows(f"{where}.cand_t", e.cand_t, (B, k.cand_t.shape[1], d))
        return tuple(k.extra)

    def _candidate_lists(self, s_v, s_t, t_v, t_t, k: Knowledge | None, extra) -> tuple[CandidateLists, CandidateLists]:
        """(text->image, image->text) lists of the B pairs (candidates.py), checked."""
        if k is None:
            raise ValueError(
                f"knowledge: {', '.join(n for n in self.terms if n in LIST_TERMS)} need the mined candidates"
            )
        B, D = s_v.shape
        kv = _check_rows("knowledge.cand_v", k.cand_v, (B, None, D)).shape[1]
        kt = _check_rows("knowledge.cand_t", k.cand_t, (B, None, D)).shape[1]
        for name, ok, n in (("cand_v_ok", k.cand_v_ok, kv), ("cand_t_ok", k.cand_t_ok, kt)):
            if ok is not None and (_check_rows(f"knowledge.{name}", ok, (B, n)).dtype != torch.bool):
                raise ValueError(f"knowledge.{name}: expected a bool mask, got dtype {ok.dtype}")
        ce_v = ce_t = None
        if self.needs_cross_encoder:
            ce_v = _check_rows("knowledge.ce_t2i", k.ce_t2i, (B, 1 + kv))
            ce_t = _check_rows("knowledge.ce_i2t", k.ce_i2t, (B, 1 + kt))
        use = extra if "candidates" in self.extra_rows else ()
        t2i = CandidateLists(
            s_t,
            (t_t, *(e.t_t for e in use)),
            (t_v, *(e.t_v for e in use)),
            (k.cand_v, *(e.cand_v for e in use)),
            with_positive(k.cand_v_ok, B, kv, s_v.device),
            ce_v,
        )
        i2t = CandidateLists(
            s_v,
            (t_v, *(e.t_v for e in use)),
            (t_t, *(e.t_t for e in use)),
            (k.cand_t, *(e.cand_t for e in use)),
            with_positive(k.cand_t_ok, B, kt, s_v.device),
            ce_t,
        )
        return t2i, i2t
