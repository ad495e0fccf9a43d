"""The learning-rate schedule (a LambdaLR factor per optimizer step) and the seed of each micro-step's random
numbers: both functions of the position alone, so a resumed run continues exactly."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from pipeline.distill.config import DistillConfig


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
