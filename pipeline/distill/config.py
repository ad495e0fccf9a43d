"""Section `distill` of params.yaml: `DistillConfig` (with `AugmentConfig`), and which of its keys a checkpoint
may be resumed with a different value of (`RUNTIME_KEYS`) or may lack (`ADDED_KEYS`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import to_dict
from pipeline.distill.balancer import BalancerConfig
from pipeline.distill.losses import KNOWLEDGE_LOSS_KEYS, LIST_TERMS, TEACHER_TERMS, LossConfig
from pipeline.towers.student import StudentConfig


@dataclass(frozen=True)
class AugmentConfig:
    """Section `distill.augment`: random resized crop + horizontal flip, on the device (off by default, as DSMD)."""

    enabled: bool = False
    scale: tuple[float, float] = (0.5, 1.0)  # fraction of the image area kept by the crop
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)  # aspect ratio range of the crop
    flip: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"augment.scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"augment.ratio must satisfy 0 < low <= high, got {self.ratio}")


def baseline_loss_config() -> LossConfig:
    """The undistilled baseline: the student-student CLIP loss on pairs alone, no teacher term."""
    return LossConfig(contrastive=0.0, l1=0.0, cosine=0.0, triplet=0.0, relation=0.0, pair_contrastive=1.0)


@dataclass(frozen=True)
class DistillConfig:
    """Section `distill`."""

    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    baseline_loss: LossConfig = field(default_factory=baseline_loss_config)  # `kdpipe distill --baseline`
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    epochs: int = 20
    batch_size: int = 64  # pairs per micro-batch per process; the optimizer sees batch_size x grad_accum x world
    unpaired_images_per_step: int = 0  # images without captions beside each micro-batch, per process (0: off)
    unpaired_texts_per_step: int = 0  # texts without an image beside each micro-batch, per process (0: off)
    # candidate-aware batches (sampler.CandidateSampler): each anchor caption followed by a caption of each of its
    # first N teacher-mined images (the mined store's text_to_image/rows); 0: a uniform permutation
    batch_neighbours: int = 0
    # view-matched targets (pipeline/distill/views.py): each image seen through one of the views of `kdpipe views`
    # (<workdir>/views.zarr), a different one each epoch, with the teacher's feature of that view as its target
    teacher_views: bool = False
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0
    # After warmup. The DSMD paper and code use `step` (configs/); `constant` stays the default because a
    # step schedule's decay epochs only make sense for a given number of epochs.
    schedule: Literal["constant", "cosine", "linear", "step"] = "constant"
    min_lr_ratio: float = 0.0  # cosine / linear decay to lr x this at the last step
    # step: the rate is multiplied by decay_factor once this many epochs are done, for each listed number
    # (torch's MultiStepLR stepped per epoch; DSMD: (10,) of 20 epochs in the paper, StepLR(20) in the code)
    decay_epochs: tuple[int, ...] = ()
    decay_factor: float = 0.1
    grad_accum: int = 1
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU
    compile: bool = False  # torch.compile the student's training forward
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    num_workers: int = 2  # loader threads that gather images / teacher rows ahead of the GPU (0: inline)
    seed: int = 0
    teacher_dim: int | None = None  # refuse a store of another dimension; None: the store's
    bank_placement: Literal["auto", "device", "memmap"] = "auto"  # teacher bank on the GPU, or gathered per batch
    bank_max_gib: float = 4.0  # auto: the bank goes to the GPU when it is at most this large
    checkpoint_every_steps: int = 2000  # plus one at every epoch end; 0 = epoch ends only (197M: 2.4 GB each)
    keep_checkpoints: bool = False  # keep <workdir>/checkpoints/<run>/last.pt and best.safetensors once complete
    log_every_steps: int = 10
    eval_every_epochs: int = 1  # val recalls every N epochs (and after the last); 0 = never
    eval_batch_size: int = 256
    select_best_on: Literal["val", "last"] = "val"  # export the best-RSUM epoch on val, or the last weights
    train_split: str = "train"
    val_split: str = "val"

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "grad_accum", "log_every_steps", "eval_batch_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in (
            "warmup_steps",
            "checkpoint_every_steps",
            "eval_every_epochs",
            "num_workers",
            "unpaired_images_per_step",
            "unpaired_texts_per_step",
            "batch_neighbours",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0 or self.grad_clip < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("lr must be > 0, weight_decay and grad_clip >= 0, min_lr_ratio in [0, 1]")
        self._check_step_schedule()
        if self.teacher_views and self.augment.enabled:
            raise ValueError(
                "teacher_views and augment.enabled exclude each other: the views are the augmentation, and a crop "
                "on top of a view would no longer be what the teacher saw"
            )
        if self.teacher_views and self.loss.teachers:
            raise ValueError(
                "teacher_views has the main teacher's views only; loss.teachers' other teachers saw whole images"
            )
        if self.select_best_on == "val" and (not self.val_split or self.eval_every_epochs == 0):
            raise ValueError(
                "select_best_on: val needs val_split and eval_every_epochs > 0 (or use select_best_on: last)"
            )

    def _check_step_schedule(self) -> None:
        if self.schedule != "step":
            if self.decay_epochs:
                raise ValueError(f"decay_epochs is used by schedule: step only (schedule is {self.schedule!r})")
            return
        if not self.decay_epochs:
            raise ValueError("schedule: step needs decay_epochs (e.g. [10]: x decay_factor after epoch 10)")
        e = self.decay_epochs
        if any(b <= a for a, b in zip(e, e[1:])) or not 0 < e[0] or e[-1] >= self.epochs:
            # an epoch >= epochs would never apply: almost surely epochs was changed and decay_epochs was not
            raise ValueError(
                f"decay_epochs must increase strictly within 1..{self.epochs - 1} (epochs - 1), got {list(e)}"
            )
        if not (math.isfinite(self.decay_factor) and 0 < self.decay_factor <= 1):
            raise ValueError(f"decay_factor must be in (0, 1], got {self.decay_factor!r}")


def reads_mined(cfg: DistillConfig, baseline: bool) -> bool:
    """Whether a run reads the teacher's mined neighbours (`kdpipe mine`): for the candidate-list terms (dcd,
    mcad_*) or for candidate-aware batches; the baseline (no teacher) reads neither."""
    loss = cfg.baseline_loss if baseline else cfg.loss
    lists = any(getattr(loss, name) > 0 for name in LIST_TERMS)
    teacher = any(getattr(loss, name) > 0 for name in TEACHER_TERMS)
    return lists or (cfg.batch_neighbours > 0 and teacher)


# Keys that change how fast a run goes, not what it computes: a checkpoint may be resumed with other values.
RUNTIME_KEYS = frozenset(
    {
        "num_workers",
        "compile",
        "device",
        "checkpoint_every_steps",
        "log_every_steps",
        "eval_batch_size",
        "bank_placement",
        "bank_max_gib",
        "keep_checkpoints",
    }
)


# Keys added after checkpoints existed, with the value that reproduces the older runs: a checkpoint without
# them compares as if it had them (nested: the keys of a sub-section).
_ADDED_LOSS_KEYS = {k: v for k, v in to_dict(LossConfig()).items() if k in KNOWLEDGE_LOSS_KEYS}
ADDED_KEYS = {
    "unpaired_images_per_step": 0,
    "unpaired_texts_per_step": 0,
    "batch_neighbours": 0,
    "teacher_views": False,
    "loss": _ADDED_LOSS_KEYS,
    "baseline_loss": _ADDED_LOSS_KEYS,
}
