r"""Distillation training: the student learns the teacher's feature space from the stored features alone.

    caption pairs (shuffled, by index) --> images (uint8 cache) + tokens --> student --> s_v, s_t
                                       \-> teacher rows t_v, t_t + K negative rows (feature store)
    raw loss terms (pipeline.distill.losses) --> weights (pipeline.distill.balancer) --> sum_i w_i L_i --> AdamW

Unpaired data (`unpaired_images_per_step`, `unpaired_texts_per_step`, default 0 = off): each step also draws
that many images without captions and / or texts without an image per process (`UnpairedSampler`: cyclic
over the pool, a pure function of (seed, epoch, step)); the student encodes them in the same forward as the
pairs, and the intra-modal loss terms use them (pipeline.distill.losses). An epoch is one pass over the pairs;
the unpaired pools are drawn cyclically across epochs. The baseline (`--baseline`, no teacher) never draws them.

Resume is exact. Every random number of a step (dropout, augmentation) comes from a generator seeded with
(seed, epoch, step, rank), the order of pairs and the negatives are functions of (seed, epoch, step)
(`pipeline.distill.sampler`), and a checkpoint holds the model, optimizer, scheduler and balancer states and the
position; so a run killed mid-epoch and resumed from its last checkpoint redoes the same steps on the same
batches and ends with the same weights, bit for bit on the CPU (tests/test_train.py).

Outputs in `out_dir` (`<workdir>/student/`, or `<workdir>/baseline/`):
    model.safetensors, student_config.json, image_tower/, text_tower/   the exported student (best on val)
    checkpoints/last.pt        the training state, rewritten every epoch and every N steps
    train_log.csv              per logged step: lr, pairs/s, weighted loss, raw terms, weights
    val_log.csv                per evaluated epoch: val recalls, RSUM, student-teacher cosine
    plots/training.png         the same, drawn;  train_summary.json   the run in one record
    distill_config.yaml        the resolved config of the run
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import to_dict, write_resolved
from pipeline.data.index import DatasetIndex, SplitView
from pipeline.devices import resolve_device
from pipeline.distill.balancer import BalancerConfig, LossBalancer
from pipeline.distill.data import BatchLoader, TeacherBank, Unpaired, as_tensor, random_resized_crop, tokenize_all
from pipeline.distill.losses import DistillLoss, LossConfig
from pipeline.distill.sampler import EpochSampler, UnpairedSampler
from pipeline.errors import InputError
from pipeline.progress import progress
from pipeline.store.alignment import align_store_split
from pipeline.store.durable import atomic_path, write_text_durably
from pipeline.store.features import FeatureStore, StoreSplit
from pipeline.store.image_cache import ImageCache
from pipeline.store.verify import check_finite
from pipeline.towers.student import DualEncoderStudent, StudentConfig, build_student, save_student

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "kdpipe-distill-checkpoint"
CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------
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
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0 or self.grad_clip < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("lr must be > 0, weight_decay and grad_clip >= 0, min_lr_ratio in [0, 1]")
        self._check_step_schedule()
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
    }
)


# ---------------------------------------------------------------------------------------------------------
# Inputs: one split of the index, the image cache and the feature store, aligned and checked
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairSplit:
    """One split in the feature store's row order: caption texts, image cache rows, teacher rows."""

    name: str
    captions: np.ndarray  # object [M] caption of each store text row
    images: np.ndarray  # uint8 [N_cache, H, W, 3] memory map of the split's image cache
    cache_rows: np.ndarray | None  # int64 [N] cache row of each store image row (None: identity)
    store: StoreSplit | None  # teacher rows (None: a split the store lacks, e.g. val for recall only)
    text_image: np.ndarray  # int64 [M] image row of each caption (store order)
    unpaired_text: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))  # [U] texts, no image


def align_split(view: SplitView, images: np.ndarray, store: StoreSplit | None, where: str) -> PairSplit:
    """Match a split of the index and the image cache with the feature store's rows.

    The store may lack images that extract skipped (`on_bad_image: skip`), with their captions; rows are
    matched by image id and the captions of the kept images must be exactly the store's, in order."""
    if len(images) != view.n_images:
        raise InputError(
            f"{where}: the image cache has {len(images)} images in split {view.name!r}, the dataset "
            f"index {view.n_images}; rerun `kdpipe prepare`"
        )
    if store is not None and store.n_unpaired_texts != len(view.unpaired_text):
        raise InputError(
            f"{where}: the feature store has {store.n_unpaired_texts} texts without an image in split "
            f"{view.name!r}, the dataset index {len(view.unpaired_text)}; rerun `kdpipe extract`"
        )
    split = _align_pairs(view, images, store, where)
    return replace(split, unpaired_text=view.unpaired_text)


def _align_pairs(view: SplitView, images: np.ndarray, store: StoreSplit | None, where: str) -> PairSplit:
    if store is None:
        return PairSplit(view.name, view.caption_text, images, None, None, view.text_image.astype(np.int64))
    rows = align_store_split(view, store, where)
    return PairSplit(view.name, view.caption_text[rows.caption_rows], images, rows.image_rows, store, rows.text_image)


# ---------------------------------------------------------------------------------------------------------
# Small parts of the loop
# ---------------------------------------------------------------------------------------------------------
def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """The seed of one micro-step's random numbers (dropout, augmentation): a hash of the position."""
    return int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def lr_factor(cfg: DistillConfig, total_steps: int) -> Callable[[int], float]:
    """The LambdaLR factor of optimizer step `step` (0-based) of a run of `total_steps` = epochs x steps per epoch.

    `step` is per epoch, as DSMD's StepLR stepped after each epoch: optimizer step s lies in epoch
    s // (total_steps / epochs), and the factor is decay_factor ** (how many decay_epochs that epoch has
    reached), the same for every step of the epoch."""
    if total_steps <= 0 or total_steps % cfg.epochs:
        raise ValueError(f"lr_factor: total_steps {total_steps} is not epochs ({cfg.epochs}) x steps per epoch")
    steps_per_epoch = total_steps // cfg.epochs

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "step":
            done = step // steps_per_epoch  # epochs completed before this step
            return cfg.decay_factor ** sum(done >= e for e in cfg.decay_epochs)
        span = max(1, total_steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1 - t
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return f


class GatherRows(torch.autograd.Function):
    """[B, D] on each rank -> [world x B, D] on every rank (rank order), differentiable.

    Every rank then computes the same loss L on the global batch; the backward sums dL/d(rows of rank r)
    over the ranks (all_reduce) and keeps its own slice, so the gradient of rank r's rows is world x dL/dx_r,
    and DDP's average over the ranks gives exactly dL/dtheta."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def loss_terms(
    model: DualEncoderStudent,
    forward,
    loss_fn: DistillLoss,
    b,
    *,
    augment: AugmentConfig,
    seed: int,
    gen: torch.Generator,
    autocast,
    world: int = 1,
    text_cache: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The forward half of a micro-step: uint8 images -> (augmented) normalized pixels on the device ->
    student (through `forward`: the model, DDP or compiled) -> global batch -> raw, unweighted loss terms.
    Dropout and augmentation draw from `seed` only. `text_cache` [M, F]: the frozen text tower's features of
    every caption row (the tower is then skipped)."""
    torch.manual_seed(seed)  # dropout of this micro-step (every device)
    x = model.to_float(b.images)
    ids, mask = b.input_ids, b.attention_mask
    n_pairs = x.shape[0]
    if b.u_images is not None:  # unpaired rows go through the same forward, after the pairs
        x = torch.cat([x, model.to_float(b.u_images)])
    if b.u_input_ids is not None:
        ids, mask = torch.cat([ids, b.u_input_ids]), torch.cat([mask, b.u_attention_mask])
    if augment.enabled:
        gen.manual_seed(seed)
        x = random_resized_crop(x, model.image_size, gen, scale=augment.scale, ratio=augment.ratio, flip=augment.flip)
    pixels = model.normalize_pixels(x)
    text_features = None
    if text_cache is not None:
        text_features = text_cache[torch.from_numpy(b.rows).to(text_cache.device)]
    with autocast():
        s_v, s_t = forward(pixels, ids, mask, text_features)
    # [B + B_v, D] and [B + B_t, D] -> the pairs' rows and the unpaired rows (empty when none are drawn)
    s_v, u_v, s_t, u_t = s_v[:n_pairs], s_v[n_pairs:], s_t[:n_pairs], s_t[n_pairs:]
    if world > 1:  # the in-batch terms see the global batch; gradients flow back to each rank
        s_v, s_t = GatherRows.apply(s_v), GatherRows.apply(s_t)
        u_v = GatherRows.apply(u_v) if b.u_images is not None else u_v
        u_t = GatherRows.apply(u_t) if b.u_input_ids is not None else u_t
    unpaired = None
    if b.unpaired is not None:
        unpaired = replace(
            b.unpaired,
            s_v=u_v if b.u_images is not None else None,
            s_t=u_t if b.u_input_ids is not None else None,
        )
    return loss_fn(
        s_v, s_t, b.t_v, b.t_t, b.image_ids, b.queue_v, b.queue_t, b.queue_v_ids, b.queue_t_ids, unpaired=unpaired
    )


# Keys added after checkpoints existed, with the value that reproduces the older runs: a checkpoint without
# them compares as if it had them.
ADDED_KEYS = {"unpaired_images_per_step": 0, "unpaired_texts_per_step": 0}


@torch.no_grad()
def frozen_text_features(
    model: DualEncoderStudent, tokens: tuple[torch.Tensor, torch.Tensor], batch_size: int, autocast
) -> torch.Tensor:
    """The frozen text tower's pooled features of every caption [M, F], fp32 on the model's device."""
    out = []
    with autocast():
        for i in range(0, len(tokens[0]), batch_size):
            tok = {
                "input_ids": tokens[0][i : i + batch_size].long(),
                "attention_mask": tokens[1][i : i + batch_size].long(),
            }
            out.append(model.text_features(tok).float())
    return torch.cat(out)


def comparable(cfg_dict: dict) -> dict:
    return {k: v for k, v in {**ADDED_KEYS, **cfg_dict}.items() if k not in RUNTIME_KEYS}


# ---------------------------------------------------------------------------------------------------------
# Evaluation on val
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def embed_split(
    model: DualEncoderStudent,
    split: PairSplit,
    tokens: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
    autocast,
    text_cache: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student embeddings of every image (store/cache order) and caption of a split, fp32 on the CPU
    (`text_cache`: the frozen text tower's features of the split's captions)."""
    was_training = model.training
    model.eval()
    rows = split.cache_rows if split.cache_rows is not None else np.arange(len(split.images))
    img, txt = [], []
    with autocast():
        for i in range(0, len(rows), batch_size):
            batch = as_tensor(np.take(split.images, rows[i : i + batch_size], axis=0))
            img.append(model.encode_images(batch).float().cpu())
        for i in range(0, len(tokens[0]), batch_size):
            if text_cache is not None:
                txt.append(model.project_text(text_cache[i : i + batch_size]).float().cpu())
                continue
            tok = {
                "input_ids": tokens[0][i : i + batch_size].long(),
                "attention_mask": tokens[1][i : i + batch_size].long(),
            }
            txt.append(model.encode_tokens(tok).float().cpu())
    model.train(was_training)
    return torch.cat(img), torch.cat(txt)


def validate(model, split: PairSplit, tokens, batch_size: int, autocast, text_cache=None) -> dict[str, float]:
    from pipeline.evaluate.retrieval import (  # the evaluate stage's protocol and names
        recall_metrics,
        retrieval_ranks,
        teacher_agreement,
    )

    img, txt = embed_split(model, split, tokens, batch_size, autocast, text_cache)
    # images without captions (if the split has any) are not queries of the protocol: the recalls use the
    # captioned images (rows renumbered), the teacher agreement every image
    paired, text_image = np.unique(split.text_image, return_inverse=True)
    metrics = recall_metrics(retrieval_ranks(img[torch.from_numpy(paired)], txt, text_image))
    if split.store is not None:  # how close the student is to the teacher on held-out data
        metrics.update(teacher_agreement(img, txt, split.store.image_emb, split.store.text_emb))
    return metrics


# ---------------------------------------------------------------------------------------------------------
# Logs and plots
# ---------------------------------------------------------------------------------------------------------
class CsvLog:
    """An append-only CSV with a fixed header; on resume, rows past the checkpoint are dropped first."""

    def __init__(self, path: Path, columns: list[str], *, keep_until: float | None, key: str) -> None:
        self.path, self.columns = path, columns
        rows: list[str] = []
        if keep_until is not None and path.is_file():
            lines = path.read_text().splitlines()
            if lines and lines[0].split(",") == columns:
                k = columns.index(key)
                rows = [ln for ln in lines[1:] if ln and float(ln.split(",")[k]) <= keep_until]
        # the cut-back log replaces the old one whole: a failure here leaves the previous log, not half of it
        write_text_durably(path, ",".join(columns) + "\n" + "".join(r + "\n" for r in rows))

    def write(self, values: dict[str, Any]) -> None:
        def fmt(v: Any) -> str:
            return f"{v:.6g}" if isinstance(v, float) else str(v)

        with self.path.open("a") as f:
            f.write(",".join(fmt(values.get(c, "")) for c in self.columns) + "\n")


def read_csv(path: Path) -> dict[str, np.ndarray]:
    lines = path.read_text().splitlines() if path.is_file() else []
    if len(lines) < 2:
        return {}
    cols = lines[0].split(",")
    data = np.array([[float(x) if x else np.nan for x in ln.split(",")] for ln in lines[1:]], dtype=float)
    return {c: data[:, i] for i, c in enumerate(cols)}


def plot_training(out_dir: Path) -> Path | None:
    """plots/training.png: raw loss terms (log), weights (log), lr, val RSUM per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_csv(out_dir / "train_log.csv"), read_csv(out_dir / "val_log.csv")
    if not train:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    step = train["step"]
    for name in [c for c in train if c.endswith("_loss") and not c.startswith("w_")]:
        axes[0, 0].plot(step, train[name], label=name)
    axes[0, 0].set(title="raw loss terms", xlabel="step", yscale="log")
    for name in [c for c in train if c.startswith("w_")]:
        axes[0, 1].plot(step, train[name], label=name[2:])
    axes[0, 1].set(title="balancer weights", xlabel="step", yscale="log")
    axes[1, 0].plot(step, train["lr"], color="k")
    axes[1, 0].set(title="learning rate", xlabel="step")
    if val:
        axes[1, 1].plot(val["epoch"], val["rsum"], "o-", label="val RSUM")
        axes[1, 1].set(title="val RSUM", xlabel="epoch")
    else:
        axes[1, 1].set(title="val RSUM (no evaluation yet)")
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "plots" / "training.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0  # optimizer steps done
    best_rsum: float = -math.inf
    best_epoch: int = -1
    history: list = field(default_factory=list)  # val metrics per evaluated epoch


def save_checkpoint(
    path: Path, *, model, optimizer, scheduler, balancer, state: TrainState, cfg_dict: dict, meta: dict
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "meta": meta,
        "config": cfg_dict,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "balancer": balancer.state_dict(),
        "state": dataclasses.asdict(state),
        # The step seeds make these redundant for the loop itself; kept so that code run between steps
        # (or a future change) continues the same streams.
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
    }
    # Through a Python file object: torch.save(path) writes from C++ and reports a full disk only as
    # "unexpected pos"; this way the OSError (ENOSPC) surfaces and atomic_path names the checkpoint.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(blob, f)


def load_checkpoint(path: Path, cfg_dict: dict, meta: dict) -> dict:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file
        raise InputError(
            f"{path}: cannot read the checkpoint ({type(err).__name__}); use --no-resume to start over"
        ) from None
    if (
        not isinstance(blob, dict)
        or blob.get("format") != CHECKPOINT_FORMAT
        or blob.get("version") != CHECKPOINT_VERSION
    ):
        raise InputError(f"{path}: not a {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} file; use --no-resume to start over")
    for key in ("dim", "fingerprint", "train_split", "world_size", "pixels"):  # world size: the sampler's batch
        if (key != "pixels" or "pixels" in blob["meta"]) and blob["meta"].get(key) != meta[key]:
            raise InputError(
                f"{path}: checkpoint was trained with {key}={blob['meta'].get(key)!r}, the inputs now "
                f"have {meta[key]!r}; use --no-resume to start over"
            )
    old, new = comparable(blob["config"]), comparable(cfg_dict)
    if old != new:
        diff = _first_difference(old, new, "distill")
        raise InputError(f"{path}: checkpoint was written with another config ({diff}); use --no-resume to start over")
    return blob


def _first_difference(a: Any, b: Any, where: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{where}.{k}")
    return f"{where}: {a!r} then, {b!r} now"


def clear_outputs(out_dir: Path) -> None:
    """Start over: remove what a previous run wrote (the directory is the stage's output)."""
    for name in ("checkpoints", "plots", "image_tower", "text_tower"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in (
        "model.safetensors",
        "student_config.json",
        "train_log.csv",
        "val_log.csv",
        "train_summary.json",
        "distill_config.yaml",
    ):
        (out_dir / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------
@dataclass
class DistillResult:
    out_dir: Path
    global_step: int
    epochs_done: int
    best_epoch: int
    best_rsum: float
    history: list
    pairs_per_s: float
    completed: bool  # False when stopped early by `stop_after_steps`


def open_split(index: DatasetIndex, cache: ImageCache, store: FeatureStore | None, name: str, what: str) -> PairSplit:
    if name not in index.splits:
        raise InputError(f"distill.{what}: the dataset has no split {name!r}; it has {', '.join(index.splits)}")
    view = index.split(name)
    if store is not None:
        check_finite(store, name)  # one pass over the teacher rows: a NaN chunk would poison every loss term
    return align_split(
        view,
        cache.split(name),
        store.split(name) if store is not None else None,
        f"{cache.path} / {store.path if store else ''}".rstrip(" /"),
    )


# ---------------------------------------------------------------------------------------------------------
# Setup: inputs, model, loss, balancer, data, optimizer, resume, logs -> one `Run`
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What a run sets up once and the loop reads (and `state`, the position it advances)."""

    cfg: DistillConfig
    out_dir: Path
    baseline: bool
    world: int
    rank: int
    device: torch.device
    meta: dict  # what a checkpoint must share with the inputs to be resumed
    train: PairSplit
    val: PairSplit | None
    model: DualEncoderStudent
    loss_fn: DistillLoss
    balancer: LossBalancer
    use_bf16: bool
    sampler: EpochSampler
    loader: BatchLoader
    val_tokens: tuple[torch.Tensor, torch.Tensor] | None
    text_cache: torch.Tensor | None  # [M, F] a frozen text tower's features of the train captions, else None
    val_text_cache: torch.Tensor | None  # the same for the val captions
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    opt_steps_per_epoch: int
    total_steps: int
    cfg_dict: dict = field(default_factory=dict)
    state: TrainState = field(default_factory=TrainState)
    forward: Any = None  # the training forward: the model, DDP or compiled
    train_log: CsvLog | None = None
    val_log: CsvLog | None = None
    gen: torch.Generator = field(default_factory=torch.Generator)  # augmentation, reseeded every micro-step

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / "checkpoints" / "last.pt"

    @property
    def pairs_per_opt_step(self) -> int:
        return self.sampler.global_batch * self.cfg.grad_accum

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.use_bf16 else nullcontext()


def open_inputs(
    cfg: DistillConfig, index: DatasetIndex, store: FeatureStore, cache: ImageCache
) -> tuple[PairSplit, PairSplit | None]:
    """The training split (with its teacher rows) and the validation split (teacher rows when the store has them)."""
    if cfg.teacher_dim is not None and store.dim != cfg.teacher_dim:
        raise InputError(f"{store.path}: feature dimension {store.dim}, expected distill.teacher_dim={cfg.teacher_dim}")
    train = open_split(index, cache, store, cfg.train_split, "train_split")
    val = None
    if cfg.val_split and cfg.eval_every_epochs:
        val_store = store if cfg.val_split in store.splits else None
        val = open_split(index, cache, val_store, cfg.val_split, "val_split")
    return train, val


def build_data(
    cfg: DistillConfig, train: PairSplit, model: DualEncoderStudent, loss_fn: DistillLoss, world: int, rank: int
) -> tuple[EpochSampler, BatchLoader, int]:
    """The pair sampler, the teacher bank and the batch loader of the training split; optimizer steps per epoch."""
    sampler = EpochSampler(len(train.captions), cfg.batch_size, cfg.seed, world_size=world, rank=rank)
    opt_steps_per_epoch = sampler.steps_per_epoch // cfg.grad_accum
    if opt_steps_per_epoch == 0:
        raise InputError(
            f"split {cfg.train_split!r} has {len(train.captions)} pairs: fewer than one optimizer step "
            f"of {sampler.global_batch * cfg.grad_accum} (batch_size x grad_accum x processes)"
        )
    queue_size = loss_fn.cfg.queue_size
    if loss_fn.needs_queue and queue_size > len(train.captions) - sampler.global_batch:
        raise InputError(
            f"distill.loss.queue_size={queue_size}: the split {cfg.train_split!r} has only "
            f"{len(train.captions)} pairs, so at most {len(train.captions) - sampler.global_batch} "
            "negatives fit beside a batch; lower it, or use 0 for the whole bank"
        )
    st = train.store
    device = next(model.parameters()).device
    unpaired = build_unpaired(cfg, train, model, loss_fn, sampler)
    bank = TeacherBank(
        st.image_emb,
        st.text_emb,
        train.text_image,
        device,
        placement=cfg.bank_placement,
        max_bytes=cfg.bank_max_gib * 2**30,
        unpaired_text_emb=st.unpaired_text_emb if unpaired is not None and unpaired.texts is not None else None,
    )
    if loss_fn.needs_queue and queue_size == 0 and not bank.on_device:
        raise InputError(
            f"distill.loss.queue_size=0 (the whole bank) needs the teacher bank on the device "
            f"({bank.nbytes / 2**30:.2f} GiB; raise distill.bank_max_gib or set a queue_size)"
        )
    tokens = tokenize_all(model.tokenize, train.captions)
    loader = BatchLoader(
        train.images,
        bank,
        tokens,
        sampler,
        queue_size=queue_size,
        use_queue=loss_fn.needs_queue,
        num_workers=cfg.num_workers,
        cache_rows=train.cache_rows,
        unpaired=unpaired,
    )
    return sampler, loader, opt_steps_per_epoch


def build_unpaired(
    cfg: DistillConfig, train: PairSplit, model: DualEncoderStudent, loss_fn: DistillLoss, pairs: EpochSampler
) -> Unpaired | None:
    """The samplers of the unpaired images and texts to draw beside the pairs (None: none are drawn, because
    the counts are 0 or no loss term uses a teacher, as in the baseline)."""
    if not loss_fn.needs_teacher or not (cfg.unpaired_images_per_step or cfg.unpaired_texts_per_step):
        return None
    st, world, rank = train.store, pairs.world_size, pairs.rank

    def sampler(what: str, n: int, per_step: int, stream: int) -> UnpairedSampler:
        if per_step * world > n:
            raise InputError(
                f"distill.unpaired_{what}_per_step={per_step}: the split {cfg.train_split!r} has {n} {what} "
                f"without {'captions' if what == 'images' else 'an image'}, fewer than one step draws "
                f"({per_step} x {world} processes); lower it, or 0 to draw none"
            )
        return UnpairedSampler(n, per_step, cfg.seed, pairs.steps_per_epoch, stream=stream, world_size=world, rank=rank)

    images = image_rows = texts = tokens = None
    if cfg.unpaired_images_per_step:
        image_rows = st.unpaired_image
        images = sampler("images", len(image_rows), cfg.unpaired_images_per_step, stream=1)
    if cfg.unpaired_texts_per_step:
        texts = sampler("texts", st.n_unpaired_texts, cfg.unpaired_texts_per_step, stream=2)
        tokens = tokenize_all(model.tokenize, train.unpaired_text)
    return Unpaired(images=images, image_rows=image_rows, texts=texts, tokens=tokens)


def setup_run(
    cfg: DistillConfig,
    *,
    index: DatasetIndex,
    store: FeatureStore,
    cache: ImageCache,
    out_dir: Path,
    baseline: bool,
    resume: bool,
) -> Run:
    """Inputs -> model, loss, balancer (the init is a function of the seed) -> data -> optimizer -> resume
    or start over -> logs -> the training forward."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = resolve_device(cfg.device, "distill.device")
    train, val = open_inputs(cfg, index, store, cache)
    # an image file replaced since extract (or prepare) ran? The fingerprints checked on opening cannot tell
    index.check_made_from(store.attrs.get("image_content"), str(store.path), "extract", list(store.splits))
    index.check_made_from(cache.attrs.get("content"), str(cache.path), "prepare")
    meta = {
        "dim": store.dim,
        "fingerprint": (store.dataset or {}).get("fingerprint"),
        "train_split": cfg.train_split,
        "baseline": baseline,
        "teacher": store.teacher,
        "world_size": world,
        # how the cache's images were made from files (pipeline/data/pixels.py PixelRecipe), as the cache records
        # it: the student records it too, and search and export make every other image that way
        "pixels": {"resize": cache.attrs.get("resize"), "exif_orientation": cache.attrs.get("exif_orientation")},
    }
    torch.manual_seed(cfg.seed)
    model = build_student(cfg.student, store.dim).to(device)
    loss_fn = DistillLoss(cfg.baseline_loss if baseline else cfg.loss).to(device)
    balancer = LossBalancer(cfg.balancer, loss_fn.term_names, loss_fn.weights)
    use_bf16 = cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    sampler, loader, opt_steps_per_epoch = build_data(cfg, train, model, loss_fn, world, rank)
    val_tokens = tokenize_all(model.tokenize, val.captions) if val is not None else None
    # A frozen text tower gives every caption the same features at every step: computed once here, so a step
    # costs the projection only (MiniLM over every batch would dominate a small student's step on a CPU).
    text_cache = val_text_cache = None
    if cfg.student.text.freeze:
        if cfg.unpaired_texts_per_step:
            raise InputError(
                "distill.unpaired_texts_per_step needs a trainable text tower: the frozen tower's features are "
                "cached for the caption pairs only (set distill.student.text.freeze: false or draw no unpaired texts)"
            )

        def autocast():  # as Run.autocast, before the Run exists
            return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

        text_cache = frozen_text_features(
            model, (loader.input_ids, loader.attention_mask), cfg.eval_batch_size, autocast
        )
        if val is not None:
            val_text_cache = frozen_text_features(model, val_tokens, cfg.eval_batch_size, autocast)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    total_steps = cfg.epochs * opt_steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total_steps))
    run = Run(
        cfg, out_dir, baseline, world, rank, device, meta, train, val, model, loss_fn, balancer, use_bf16,
        sampler, loader, val_tokens, text_cache, val_text_cache, optimizer, scheduler, opt_steps_per_epoch,
        total_steps, cfg_dict=to_dict(cfg),
    )  # fmt: skip
    restore_or_start_over(run, resume)
    open_logs(run)
    run.forward = training_forward(run)
    return run


def restore_or_start_over(run: Run, resume: bool) -> None:
    """Load the last checkpoint (model, optimizer, scheduler, balancer, position, RNG) or clear the outputs."""
    if resume and run.ckpt_path.is_file():
        blob = load_checkpoint(run.ckpt_path, run.cfg_dict, run.meta)
        run.model.load_state_dict(blob["model"])
        run.optimizer.load_state_dict(blob["optimizer"])
        run.scheduler.load_state_dict(blob["scheduler"])
        run.balancer.load_state_dict(blob["balancer"])
        run.state = TrainState(**blob["state"])
        torch.set_rng_state(blob["rng"]["torch"])
        if blob["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
        if run.main:
            log.info(
                f"distill: resuming from {run.ckpt_path} at epoch {run.state.epoch + 1}, step {run.state.global_step}"
            )
    elif run.main:
        clear_outputs(run.out_dir)
    if run.main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        write_resolved(run.cfg, run.out_dir / "distill_config.yaml", "distill")


VAL_COLUMNS = ["epoch", "step", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]
VAL_COLUMNS += ["i2t_medr", "t2i_medr", "teacher_cos_image", "teacher_cos_text"]


def open_logs(run: Run) -> None:
    """train_log.csv and val_log.csv (main process), cut back to the checkpoint's position on resume."""
    if not run.main:
        return
    state = run.state
    resumed = state.global_step > 0 or state.epoch > 0
    term_cols = list(run.loss_fn.term_names)
    run.train_log = CsvLog(
        run.out_dir / "train_log.csv",
        ["step", "epoch", "lr", "pairs_per_s", "loss", *term_cols, *[f"w_{t}" for t in term_cols]],
        keep_until=state.global_step if resumed else None,
        key="step",
    )
    run.val_log = CsvLog(
        run.out_dir / "val_log.csv", VAL_COLUMNS, keep_until=state.epoch if resumed else None, key="epoch"
    )


def training_forward(run: Run):
    """DDP and / or torch.compile around the student (the model itself on one process, uncompiled)."""
    forward = run.model
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        forward = DDP(run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if run.cfg.compile:
        forward = torch.compile(forward)
    return forward


# ---------------------------------------------------------------------------------------------------------
# Step: micro-steps (forward, balancer, backward) -> optimizer step (log, periodic checkpoint)
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Meter:
    """Running sums of the logged values since the last train_log row, and the session's throughput."""

    acc: dict[str, float] = field(default_factory=dict)
    n: int = 0
    pairs: int = 0
    t_log: float = field(default_factory=time.perf_counter)
    t_start: float = field(default_factory=time.perf_counter)
    t_epoch: float = field(default_factory=time.perf_counter)
    pairs_done: int = 0  # pairs trained on in this session (pairs/s of the result)

    def add(self, values: dict[str, float], weights: dict[str, float], pairs: int) -> None:
        for k, v in values.items():
            self.acc[k] = self.acc.get(k, 0.0) + v
        self.acc["loss"] = self.acc.get("loss", 0.0) + sum(weights[k] * values[k] for k in values)
        self.n += 1
        self.pairs += pairs

    def flush(self, row: dict[str, Any]) -> dict[str, Any]:
        """`row` plus pairs/s and the means since the last flush; starts new sums."""
        now = time.perf_counter()
        row = {**row, "pairs_per_s": self.pairs / max(now - self.t_log, 1e-9)}
        row.update({k: v / self.n for k, v in self.acc.items()})
        self.acc, self.n, self.pairs, self.t_log = {}, 0, 0, now
        return row

    def pairs_per_s(self) -> float:
        elapsed = time.perf_counter() - self.t_start
        return self.pairs_done / elapsed if elapsed > 0 else 0.0


def micro_step(run: Run, hb, epoch: int, weights: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Forward and backward of one micro-batch; returns its raw term values and the step's weights (set by the
    balancer from the first micro-batch of each optimizer step)."""
    cfg = run.cfg
    micro = hb.step % cfg.grad_accum  # position inside the optimizer step
    seed = step_seed(cfg.seed, epoch, hb.step, run.rank)
    b = run.loader.to_device(hb)
    skip_sync = run.world > 1 and micro != cfg.grad_accum - 1  # DDP: reduce gradients on the last micro-step only
    with run.forward.no_sync() if skip_sync and hasattr(run.forward, "no_sync") else nullcontext():
        raw = loss_terms(
            run.model,
            run.forward,
            run.loss_fn,
            b,
            augment=cfg.augment,
            seed=seed,
            gen=run.gen,
            autocast=run.autocast,
            world=run.world,
            text_cache=run.text_cache,
        )
        # one device sync per micro-step: the balancer needs the values before the backward
        values = dict(zip(raw, torch.stack([v.detach() for v in raw.values()]).tolist()))
        if micro == 0:
            weights = run.balancer.weights(values)
        total = sum(weights[k] * raw[k] for k in run.loss_fn.term_names) / cfg.grad_accum
        total.backward()
    del b, raw, total
    run.loader.release(hb)
    return values, weights


def optimizer_step(run: Run, epoch: int, meter: Meter, weights: dict[str, float], bar) -> None:
    """Clip, step, advance the position; then the log row and the periodic (mid-epoch) checkpoint."""
    cfg, state = run.cfg, run.state
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.global_step += 1
    state.step_in_epoch += 1
    meter.pairs_done += run.pairs_per_opt_step
    if run.main:
        bar.postfix = f"epoch {epoch + 1}/{cfg.epochs} loss {meter.acc['loss'] / meter.n:.4g}"
        bar.advance(run.pairs_per_opt_step)
    end_of_epoch = state.step_in_epoch == run.opt_steps_per_epoch
    at_checkpoint = bool(cfg.checkpoint_every_steps) and state.global_step % cfg.checkpoint_every_steps == 0
    # A row also at each checkpoint: a resume then never starts inside a row's window, so the rows after a
    # resume average the same steps as an uninterrupted run's (exact resume covers the log).
    if run.main and (state.global_step % cfg.log_every_steps == 0 or end_of_epoch or at_checkpoint):
        row = meter.flush({"step": state.global_step, "epoch": epoch + 1, "lr": lr})
        row.update({f"w_{k}": float(w) for k, w in weights.items()})
        run.train_log.write(row)
    if at_checkpoint and not end_of_epoch:
        checkpoint(run)


def train_epoch(run: Run, epoch: int, meter: Meter, bar, stop_after_steps: int | None) -> bool:
    """The remaining optimizer steps of `epoch`; True when stopped by `stop_after_steps`."""
    cfg = run.cfg
    first = run.state.step_in_epoch * cfg.grad_accum
    last = run.opt_steps_per_epoch * cfg.grad_accum
    weights: dict[str, float] = {}
    for hb in run.loader.iterate(epoch, first, last):
        values, weights = micro_step(run, hb, epoch, weights)
        meter.add(values, weights, run.sampler.global_batch)
        if hb.step % cfg.grad_accum != cfg.grad_accum - 1:
            continue
        optimizer_step(run, epoch, meter, weights, bar)
        if stop_after_steps is not None and run.state.global_step >= stop_after_steps:
            return True
    return False


# ---------------------------------------------------------------------------------------------------------
# End of epoch: validate, keep the best, checkpoint
# ---------------------------------------------------------------------------------------------------------
def checkpoint(run: Run) -> None:
    if run.main:
        save_checkpoint(
            run.ckpt_path,
            model=run.model,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            balancer=run.balancer,
            state=run.state,
            cfg_dict=run.cfg_dict,
            meta=run.meta,
        )
    if run.world > 1:
        dist.barrier()


def export(run: Run, reason: str) -> None:
    save_student(run.model, run.out_dir, pixels=run.meta["pixels"])
    log.info(f"distill: exported the student ({reason})")


def validate_epoch(run: Run) -> None:
    """Val recalls of the current weights (main process), logged; export when they are the best so far."""
    cfg, state = run.cfg, run.state
    if run.main:
        metrics = validate(run.model, run.val, run.val_tokens, cfg.eval_batch_size, run.autocast, run.val_text_cache)
        state.history.append({"epoch": state.epoch, "step": state.global_step, **metrics})
        run.val_log.write(state.history[-1])
        log.info(
            f"distill: epoch {state.epoch}/{cfg.epochs} val RSUM {metrics['rsum']:.2f} "
            f"(i2t R@1 {metrics['i2t_r1']:.1f}, t2i R@1 {metrics['t2i_r1']:.1f})"
        )
        if cfg.select_best_on == "val" and metrics["rsum"] > state.best_rsum:
            state.best_rsum, state.best_epoch = metrics["rsum"], state.epoch
            export(run, f"best val RSUM {metrics['rsum']:.2f} at epoch {state.epoch}")
    if run.world > 1:
        dist.barrier()


def end_epoch(run: Run, epoch: int, meter: Meter) -> None:
    state = run.state
    state.epoch, state.step_in_epoch = epoch + 1, 0
    is_last = state.epoch == run.cfg.epochs
    if run.val is not None and (state.epoch % run.cfg.eval_every_epochs == 0 or is_last):
        validate_epoch(run)
    checkpoint(run)
    if run.main and time.perf_counter() - meter.t_epoch > 60:  # a plot costs ~1 s: after long epochs, and at the end
        plot_training(run.out_dir)
    meter.t_log = meter.t_epoch = time.perf_counter()  # pairs/s measures training, not validation and checkpoints


# ---------------------------------------------------------------------------------------------------------
# Export and the run
# ---------------------------------------------------------------------------------------------------------
def result(run: Run, meter: Meter, completed: bool) -> DistillResult:
    s = run.state
    return DistillResult(
        run.out_dir, s.global_step, s.epoch, s.best_epoch, s.best_rsum, s.history, meter.pairs_per_s(), completed
    )


def finish(run: Run, meter: Meter) -> DistillResult:
    """Export the selected weights (if not yet), the final plot and train_summary.json."""
    cfg, state = run.cfg, run.state
    if run.main:
        if cfg.select_best_on == "last":
            state.best_epoch = state.epoch
            export(run, "last epoch")
        elif not (run.out_dir / "student_config.json").is_file():  # resumed after the last export was lost
            export(run, "last epoch: no exported best found")
        plot_training(run.out_dir)
        summary = {
            "epochs": state.epoch,
            "steps": state.global_step,
            "best_epoch": state.best_epoch,
            "best_val_rsum": state.best_rsum if state.best_epoch > 0 and cfg.select_best_on == "val" else None,
            "baseline": run.baseline,
            "loss_terms": list(run.loss_fn.term_names),
            "world_size": run.world,
            "pairs_per_s_this_session": meter.pairs_per_s() if time.perf_counter() > meter.t_start else None,
            "history": state.history,
        }
        write_text_durably(run.out_dir / "train_summary.json", json.dumps(summary, indent=2) + "\n")
    return result(run, meter, True)


def run_distill(
    cfg: DistillConfig,
    *,
    index: DatasetIndex,
    store: FeatureStore,
    cache: ImageCache,
    out_dir: Path | str,
    baseline: bool = False,
    resume: bool = True,
    stop_after_steps: int | None = None,
) -> DistillResult:
    """Train a student against `store` and export it into `out_dir`.

    `baseline`: train with `cfg.baseline_loss` (pairs only) instead of `cfg.loss`. `resume`: continue from
    `out_dir/checkpoints/last.pt` when it exists (its config must match, runtime keys aside); otherwise start
    over. `stop_after_steps` (tests): return after that many optimizer steps without writing anything more,
    as if the process had been killed there."""
    run = setup_run(cfg, index=index, store=store, cache=cache, out_dir=Path(out_dir), baseline=baseline, resume=resume)
    meter = Meter()
    remaining = (run.total_steps - run.state.global_step) * run.pairs_per_opt_step
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    title = "distill" + (" (baseline)" if baseline else "")
    with progress(title, remaining, unit="pairs") if run.main else nullcontext() as bar:
        for epoch in range(run.state.epoch, cfg.epochs):
            if train_epoch(run, epoch, meter, bar, stop_after_steps):
                return result(run, meter, False)
            end_epoch(run, epoch, meter)
    return finish(run, meter)
