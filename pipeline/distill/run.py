r"""Distillation training: the student learns the teacher's feature space from the stored features alone.

    caption pairs (shuffled, by index) --> images (uint8 cache) + tokens --> student --> s_v, s_t
                                       \-> teacher rows t_v, t_t + K negative rows (feature store)
    raw loss terms (pipeline.distill.losses) --> weights (pipeline.distill.balancer) --> sum_i w_i L_i --> AdamW

Unpaired data (`unpaired_images_per_step`, `unpaired_texts_per_step`, default 0 = off): each step also draws
that many images without captions and / or texts without an image per process (`UnpairedSampler`: cyclic
over the pool, a pure function of (seed, epoch, step)); the student encodes them in the same forward as the
pairs, and the intra-modal loss terms use them (pipeline.distill.losses). An epoch is one pass over the pairs;
the unpaired pools are drawn cyclically across epochs. The baseline (`--baseline`, no teacher) never draws them.

Teacher knowledge beyond one row per item (`mined`: the teacher's mined neighbours, `kdpipe mine`): the
candidate-list terms (dcd, mcad_*) read each pair's mined candidates and their cross-encoder scores
(pipeline.distill.knowledge), and `batch_neighbours` draws candidate-aware batches (sampler.CandidateSampler).
A learned student temperature (`loss.learn_student_temperature`) is stepped by the optimizer (in a group
without weight decay) and held by the checkpoint with the model.

Resume is exact. Every random number of a step (dropout, augmentation) comes from a generator seeded with
(seed, epoch, step, rank), the order of pairs and the negatives are functions of (seed, epoch, step)
(`pipeline.distill.sampler`), and a checkpoint holds the model, optimizer, scheduler, balancer and loss states,
the position and the log rows; so a run killed mid-epoch and resumed from its last checkpoint redoes the same
steps on the same batches and ends with the same weights and the same files, bit for bit on the CPU
(tests/test_train.py, test_train_knowledge.py), also under `dvc repro`, which removes `out_dir` first
(tests/test_dvc_resume.py).

Outputs in `out_dir` (`<workdir>/student/`, `<workdir>/baseline/` or `<workdir>/models/<run>/`), all a function
of the config and the inputs (no timing):
    model.safetensors, student_config.json, image_tower/ (text_tower/)   the exported student (best on val)
    train_log.csv              per logged step: lr, weighted loss, raw terms, weights
    val_log.csv                per evaluated epoch: val recalls, RSUM, student-teacher cosine
    plots/training.png         the same, drawn;  train_summary.json   the run in one record
    distill_config.yaml        the resolved config of the run
and in `ckpt_dir` (`<workdir>/checkpoints/<run>/`, outside every DVC output: pipeline/distill/checkpoints.py)
last.pt and best.safetensors while it trains, and speed.csv (pairs/s).

This file is the loop, read top to bottom: setup (`setup_run` -> one `Run`), an epoch of steps (`train_epoch`:
`micro_step`, `optimizer_step`), the end of an epoch (`end_epoch`: validate, export the best, checkpoint) and
the finish (`finish`). Its parts live beside it: config.py (the section), inputs.py (the aligned splits and
the batch loader), forward.py (a micro-step's loss terms), schedule.py (LR factor, step seeds), checkpoints.py
(checkpoint and resume), validation.py (val recalls), logs.py (CSV logs, plots), distributed.py (torchrun).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import to_dict, write_resolved
from pipeline.data.index import DatasetIndex
from pipeline.devices import resolve_device
from pipeline.distill import checkpoints as ckpt
from pipeline.distill.balancer import LossBalancer
from pipeline.distill.checkpoints import TrainState
from pipeline.distill.config import DistillConfig, reads_mined
from pipeline.distill.data import BatchLoader, tokenize_all
from pipeline.distill.distributed import average_gradients, world_and_rank
from pipeline.distill.forward import loss_terms
from pipeline.distill.frozen_cache import cached_text_features
from pipeline.distill.inputs import PairSplit, build_data, input_digests, open_inputs, teacher_scales
from pipeline.distill.logs import CsvLog, Meter, open_logs, open_speed_log, plot_training
from pipeline.distill.losses import DistillLoss
from pipeline.distill.sampler import EpochSampler
from pipeline.distill.schedule import lr_factor, step_seed
from pipeline.distill.validation import validate
from pipeline.errors import InputError
from pipeline.progress import progress
from pipeline.store.durable import write_text_durably
from pipeline.store.features import FeatureStore
from pipeline.store.image_cache import ImageCache
from pipeline.store.ownership import claim
from pipeline.towers.student import STUDENT_DIR, DualEncoderStudent, build_student, save_student

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Setup: inputs, model, loss, balancer, data, optimizer, resume, logs -> one `Run`
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What a run sets up once and the loop reads (and `state`, the position it advances)."""

    cfg: DistillConfig
    out_dir: Path
    ckpt_dir: Path  # last.pt, best.safetensors, speed.csv (outside the DVC outputs)
    val_gallery: str  # evaluate.gallery: how validation ranks (pipeline/evaluate/galleries.py)
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
    speed_log: CsvLog | None = None
    gen: torch.Generator = field(default_factory=torch.Generator)  # augmentation, reseeded every micro-step

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_path(self) -> Path:
        return self.ckpt_dir / ckpt.LAST

    @property
    def pairs_per_opt_step(self) -> int:
        return self.sampler.global_batch * self.cfg.grad_accum

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.use_bf16 else nullcontext()


def setup_run(
    cfg: DistillConfig,
    *,
    index: DatasetIndex,
    store: FeatureStore,
    cache: ImageCache,
    out_dir: Path,
    ckpt_dir: Path,
    baseline: bool,
    resume: bool,
    val_gallery: str = "split",
    cache_dir: Path | None = None,
    mined=None,
    views=None,
) -> Run | DistillResult:
    """Inputs -> model, loss, balancer (the init is a function of the seed) -> data -> optimizer -> resume
    or start over -> logs -> the training forward. A run already complete in `out_dir`: its result."""
    world, rank = world_and_rank()
    device = resolve_device(cfg.device, "distill.device")
    train, val = open_inputs(cfg, index, store, cache)
    # an image file replaced since extract (or prepare) ran? The fingerprints checked on opening cannot tell
    index.check_made_from(store.attrs.get("image_content"), str(store.path), "extract", list(store.splits))
    index.check_made_from(cache.attrs.get("content"), str(cache.path), "prepare")
    torch.manual_seed(cfg.seed)
    model = build_student(cfg.student, store.dim).to(device)
    meta = run_meta(cfg, store, cache, model, baseline=baseline, world=world, val_gallery=val_gallery, mined=mined)
    meta["views"] = views.identity if views is not None else None  # which stored views the targets come from
    if resume and run_complete(out_dir, to_dict(cfg), meta):
        if rank == 0 and not cfg.keep_checkpoints:  # left by a run killed between its summary and this
            ckpt.remove_checkpoints(ckpt_dir)
        return complete_result(out_dir)
    loss_cfg = cfg.baseline_loss if baseline else cfg.loss
    loss_fn = DistillLoss(loss_cfg, teacher_scales(loss_cfg, store)).to(device)
    balancer = LossBalancer(cfg.balancer, loss_fn.term_names, loss_fn.weights)
    use_bf16 = cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    sampler, loader, opt_steps_per_epoch = build_data(
        cfg, train, model, loss_fn, world, rank, store=store, mined=mined, views=views
    )
    val_tokens = tokenize_all(model.tokenize, val.captions) if val is not None else None
    # under torchrun, no shared cache: the other ranks write nothing under the work directory
    text_cache, val_text_cache = frozen_text_caches(
        cfg, model, (loader.input_ids, loader.attention_mask), val_tokens, use_bf16, cache_dir if world == 1 else None
    )
    optimizer = build_optimizer(cfg, model, loss_fn)
    total_steps = cfg.epochs * opt_steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total_steps))
    run = Run(
        cfg, out_dir, ckpt_dir, val_gallery, baseline, world, rank, device, meta, train, val, model, loss_fn,
        balancer, use_bf16, sampler, loader, val_tokens, text_cache, val_text_cache, optimizer, scheduler,
        opt_steps_per_epoch, total_steps, cfg_dict=to_dict(cfg),
    )  # fmt: skip
    log_rows = restore_or_start_over(run, resume)
    if run.main:
        learned = ("student_temperature",) if loss_fn.student_log_scale is not None else ()
        run.train_log, run.val_log = open_logs(run.out_dir, loss_fn.term_names, log_rows, learned)
        run.speed_log = open_speed_log(run.ckpt_dir / ckpt.SPEED, run.state)
    run.forward = training_forward(run)
    return run


def build_optimizer(cfg: DistillConfig, model: DualEncoderStudent, loss_fn: DistillLoss) -> torch.optim.Optimizer:
    """AdamW over the student's trainable weights and, in a group of its own without weight decay (as CLIP's
    logit scale), the loss module's parameters: the learned student temperature, when there is one."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    groups = [{"params": params}, {"params": loss_params, "weight_decay": 0.0}] if loss_params else params
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def run_meta(cfg, store, cache, model, *, baseline: bool, world: int, val_gallery: str, mined=None) -> dict:
    """What a checkpoint (or a complete run) must share with this run besides its config to be taken: its inputs
    (the index, the store's and the cache's contents, the frozen text tower's files, digested now: the files this
    run trains with), how it validates, the process count, the training code."""
    source = model.frozen_text_source()
    return {
        "dim": store.dim,
        "fingerprint": (store.dataset or {}).get("fingerprint"),
        "train_split": cfg.train_split,
        "baseline": baseline,
        "teacher": store.teacher,
        "world_size": world,  # the sampler's global batch
        # how the cache's images were made from files (pipeline/data/pixels.py PixelRecipe), as the cache records
        # it: the student records it too, and search and export make every other image that way
        "pixels": {"resize": cache.attrs.get("resize"), "exif_orientation": cache.attrs.get("exif_orientation")},
        # the mined store's K, when the run reads it (re-mined with another K, the same config reads other
        # neighbours)
        "mined_k": mined.k if reads_mined(cfg, baseline) and mined is not None else None,
        "inputs": input_digests(store, cache, [cfg.train_split, cfg.val_split]),
        "frozen_text_tower": source.files if source is not None else None,
        "val_gallery": val_gallery,
        "code": ckpt.code_digest(),
    }


def frozen_text_caches(cfg, model, tokens, val_tokens, use_bf16: bool, cache_dir: Path | None):
    """A frozen text tower gives every caption the same features at every step: its features of the train and
    val captions ([M, F] each, or None), computed once (per machine, with `cache_dir`: frozen_cache.py), so that
    a step costs the projection only (MiniLM over every batch would dominate a small student's step on a CPU)."""
    if not cfg.student.text.freeze:
        return None, None
    if cfg.unpaired_texts_per_step:
        raise InputError(
            "distill.unpaired_texts_per_step needs a trainable text tower: the frozen tower's features are "
            "cached for the caption pairs only (set distill.student.text.freeze: false or draw no unpaired texts)"
        )
    device_type = model.device.type

    def autocast():  # as Run.autocast, before the Run exists
        return torch.autocast(device_type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    def features(toks):
        return cached_text_features(model, toks, cfg.eval_batch_size, autocast, cache_dir=cache_dir, bf16=use_bf16)

    return features(tokens), features(val_tokens) if val_tokens is not None else None


def restore_or_start_over(run: Run, resume: bool) -> dict[str, list[str]]:
    """Load the last checkpoint when it is this run's (model, optimizer, scheduler, balancer, position, RNG;
    returns the log rows it holds), or start over: clear the outputs and the checkpoint directory."""
    # read (and refused when it is not a checkpoint) before anything is removed, --no-resume included
    blob = ckpt.read_checkpoint(run.ckpt_path) if run.ckpt_path.is_file() else None
    why = ckpt.difference(blob, run.cfg_dict, run.meta) if blob is not None else None
    taken = resume and blob is not None and why is None
    if taken:
        run.state = ckpt.restore(
            blob,
            model=run.model,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            balancer=run.balancer,
            loss=run.loss_fn,
        )
        if run.main:
            log.info(
                f"distill: resuming from {run.ckpt_path} at epoch {run.state.epoch + 1}, step {run.state.global_step}"
            )
    elif run.main:
        if why is not None:
            log.info(f"distill: {run.ckpt_path} is another run's ({why}); starting over")
        ckpt.clear_outputs(run.out_dir)
        ckpt.remove_checkpoints(run.ckpt_dir)
    if run.world > 1:  # every rank past the main one's decision before any writes (its clearing above)
        dist.barrier()
    if run.main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        write_resolved(run.cfg, run.out_dir / "distill_config.yaml", "distill")
    return blob.get("logs", {}) if taken else {}


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
    if run.world > 1:
        average_gradients(run.loss_fn.parameters(), run.world)
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
        row, pairs_per_s = meter.flush({"step": state.global_step, "epoch": epoch + 1, "lr": lr})
        row.update({f"w_{k}": float(w) for k, w in weights.items()})
        if run.loss_fn.student_log_scale is not None:
            row["student_temperature"] = run.loss_fn.student_temperature()
        run.train_log.write(row)
        run.speed_log.write({"step": state.global_step, "epoch": epoch + 1, "pairs_per_s": pairs_per_s})
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
        ckpt.save_checkpoint(
            run.ckpt_path,
            model=run.model,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            balancer=run.balancer,
            state=run.state,
            cfg_dict=run.cfg_dict,
            meta=run.meta,
            logs={"train": run.train_log.rows, "val": run.val_log.rows},
            loss=run.loss_fn,
        )
    if run.world > 1:
        dist.barrier()


def validate_epoch(run: Run) -> None:
    """Val recalls of the current weights (main process), logged; the weights kept when they are the best so
    far (best.safetensors: the student directory gets them at the end)."""
    cfg, state = run.cfg, run.state
    if run.main:
        metrics = validate(
            run.model, run.val, run.val_tokens, cfg.eval_batch_size, run.autocast, run.val_text_cache, run.val_gallery
        )
        state.history.append({"epoch": state.epoch, "step": state.global_step, **metrics})
        run.val_log.write(state.history[-1])
        log.info(
            f"distill: epoch {state.epoch}/{cfg.epochs} val RSUM {metrics['rsum']:.2f} "
            f"(i2t R@1 {metrics['i2t_r1']:.1f}, t2i R@1 {metrics['t2i_r1']:.1f})"
        )
        if cfg.select_best_on == "val" and metrics["rsum"] > state.best_rsum:
            state.best_rsum, state.best_epoch = metrics["rsum"], state.epoch
            ckpt.save_best(run.ckpt_dir / ckpt.BEST, run.model, state.epoch)
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
# Finish: export the selected weights, the summary; the run
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


def result(run: Run, meter: Meter, completed: bool) -> DistillResult:
    s = run.state
    return DistillResult(
        run.out_dir, s.global_step, s.epoch, s.best_epoch, s.best_rsum, s.history, meter.pairs_per_s(), completed
    )


def finish(run: Run, meter: Meter) -> DistillResult:
    """Export the selected weights (the best epoch's, kept in best.safetensors, or the last), the final plot
    and train_summary.json (last: it marks the run complete); then remove the checkpoints unless kept."""
    cfg, state = run.cfg, run.state
    if run.main:
        if cfg.select_best_on == "last":
            state.best_epoch = state.epoch
        elif state.best_epoch != state.epoch:  # the weights in memory are the last epoch's
            ckpt.load_best(run.ckpt_dir / ckpt.BEST, run.model, state.best_epoch)
        save_student(run.model, run.out_dir, pixels=run.meta["pixels"])
        log.info(f"distill: exported the student of epoch {state.best_epoch} into {run.out_dir}")
        plot_training(run.out_dir)
        summary = {
            "epochs": state.epoch,
            "steps": state.global_step,
            "best_epoch": state.best_epoch,
            "best_val_rsum": state.best_rsum if state.best_epoch > 0 and cfg.select_best_on == "val" else None,
            "baseline": run.baseline,
            "loss_terms": list(run.loss_fn.term_names),
            "world_size": run.world,
            "history": state.history,
            # what the run was trained on: a later `kdpipe distill` with the same finds it complete
            "config_sha256": config_digest(run.cfg_dict),
            "inputs": run.meta,
        }
        write_text_durably(run.out_dir / "train_summary.json", json.dumps(summary, indent=2, default=str) + "\n")
        if not cfg.keep_checkpoints:
            ckpt.remove_checkpoints(run.ckpt_dir)
    return result(run, meter, True)


def config_digest(cfg_dict: dict) -> str:
    """SHA-256 of the config's keys that decide the result (runtime keys aside)."""
    text = json.dumps(ckpt.comparable(cfg_dict), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def run_complete(out_dir: Path, cfg_dict: dict, meta: dict) -> bool:
    """Whether `out_dir` holds this very run, complete (train_summary.json, written last by `finish`, with the
    same config and inputs): then there is nothing to train."""
    try:
        summary = json.loads((out_dir / "train_summary.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(summary, dict)
        and (out_dir / "student_config.json").is_file()
        and summary.get("config_sha256") == config_digest(cfg_dict)
        and summary.get("inputs") == json.loads(json.dumps(meta, default=str))
    )


def complete_result(out_dir: Path) -> DistillResult:
    s = json.loads((out_dir / "train_summary.json").read_text())
    best = s["best_val_rsum"] if s["best_val_rsum"] is not None else -math.inf
    return DistillResult(out_dir, s["steps"], s["epochs"], s["best_epoch"], best, s["history"], 0.0, True)


def run_distill(
    cfg: DistillConfig,
    *,
    index: DatasetIndex,
    store: FeatureStore,
    cache: ImageCache,
    out_dir: Path | str,
    ckpt_dir: Path | str,
    baseline: bool = False,
    resume: bool = True,
    val_gallery: str = "split",
    cache_dir: Path | str | None = None,
    stop_after_steps: int | None = None,
    mined=None,
    views=None,
) -> DistillResult:
    """Train a student against `store` and export it into `out_dir`.

    `ckpt_dir`: the run's checkpoint directory (pipeline.paths: `<workdir>/checkpoints/<run>`), outside
    `out_dir`. `mined`: the teacher's mined neighbours of `store` (pipeline/store/mined.py; candidate-aware
    batches, the candidate-list terms). `views`: the training split's stored views (pipeline/store/views.py
    ViewTargets), read when `cfg.teacher_views`. `baseline`: train with `cfg.baseline_loss` (pairs only) instead of `cfg.loss`. `resume`: continue
    from `ckpt_dir/last.pt` when it is this run's (same config, runtime keys aside, and same inputs), or find
    the run already complete in `out_dir`; otherwise start over. `val_gallery`: evaluate.gallery, how validation
    ranks. `cache_dir`: where the frozen text tower's features are kept across runs (None: computed here).
    `stop_after_steps` (tests): return after that many optimizer steps without writing anything more, as if the
    process had been killed there."""
    # before any work: a directory that is not a student's (a folder of the user's) is refused, never cleared
    claim(Path(out_dir), STUDENT_DIR)
    run = setup_run(
        cfg,
        index=index,
        store=store,
        cache=cache,
        out_dir=Path(out_dir),
        ckpt_dir=Path(ckpt_dir),
        baseline=baseline,
        resume=resume,
        val_gallery=val_gallery,
        cache_dir=Path(cache_dir) if cache_dir is not None else None,
        mined=mined,
        views=views,
    )
    if isinstance(run, DistillResult):
        log.info(f"distill: {run.out_dir} holds this run, complete; nothing to train (--no-resume trains it again)")
        return run
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
