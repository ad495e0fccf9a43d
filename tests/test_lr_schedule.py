"""The learning-rate schedules of `distill`, `step` above all: DSMD's rate x0.1 after epoch 10 of 20 (paper) or
StepLR(step_size=20) of 30 epochs (code), per epoch, checked against torch's own schedulers stepped per epoch."""

from __future__ import annotations

import csv

import pytest
import torch
from test_train import run, tiny_cfg, work  # noqa: F401  (`work`: the tiny dataset fixture)

from pipeline.config import from_dict
from pipeline.distill.config import DistillConfig
from pipeline.distill.schedule import lr_factor
from pipeline.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def per_epoch_reference(scheduler_cls, epochs: int, steps_per_epoch: int, **kwargs) -> list[float]:
    """The lr of every optimizer step when `scheduler_cls` is stepped once per epoch, as DSMD's code does."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    scheduler = scheduler_cls(opt, **kwargs)
    lrs = []
    for _ in range(epochs):
        lrs += [opt.param_groups[0]["lr"]] * steps_per_epoch
        opt.step()
        scheduler.step()
    return lrs


def our_lrs(cfg: DistillConfig, steps_per_epoch: int) -> list[float]:
    f = lr_factor(cfg, cfg.epochs * steps_per_epoch)
    return [cfg.lr * f(s) for s in range(cfg.epochs * steps_per_epoch)]


def test_paper_step_schedule_equals_multisteplr_per_epoch():
    cfg = DistillConfig(epochs=20, lr=1e-4, schedule="step", decay_epochs=(10,), decay_factor=0.1)
    ref = per_epoch_reference(torch.optim.lr_scheduler.MultiStepLR, 20, 7, milestones=[10], gamma=0.1)
    assert our_lrs(cfg, 7) == pytest.approx(ref, rel=1e-12)
    # by hand: epochs 1-10 (steps 0..69) at 1e-4, epochs 11-20 at 1e-5
    assert our_lrs(cfg, 7)[69] == 1e-4 and our_lrs(cfg, 7)[70] == pytest.approx(1e-5, rel=1e-12)


def test_code_step_schedule_equals_steplr_per_epoch():
    cfg = DistillConfig(epochs=30, lr=1e-4, schedule="step", decay_epochs=(20,), decay_factor=0.1)
    ref = per_epoch_reference(torch.optim.lr_scheduler.StepLR, 30, 5, step_size=20, gamma=0.1)
    assert our_lrs(cfg, 5) == pytest.approx(ref, rel=1e-12)


def test_several_decays_and_warmup():
    cfg = DistillConfig(epochs=6, schedule="step", decay_epochs=(2, 4), decay_factor=0.5, warmup_steps=3)
    f = lr_factor(cfg, 6 * 4)
    assert [f(s) for s in range(24)] == pytest.approx(
        [1 / 3, 2 / 3, 1.0, 1.0] + [1.0] * 4 + [0.5] * 8 + [0.25] * 8, rel=1e-12
    )
    with pytest.raises(ValueError, match="total_steps"):
        lr_factor(cfg, 25)  # not a whole number of epochs: a caller bug, not a silent mis-schedule


@pytest.mark.parametrize(
    "params,match",
    [
        ({"schedule": "step"}, "needs decay_epochs"),
        ({"schedule": "step", "decay_epochs": [20]}, "within 1..19"),  # epochs: 20; would never apply
        ({"schedule": "step", "decay_epochs": [0]}, "within 1..19"),
        ({"schedule": "step", "decay_epochs": [10, 5]}, "increase strictly"),
        ({"schedule": "step", "decay_epochs": [10], "decay_factor": 0}, "decay_factor"),
        ({"schedule": "step", "decay_epochs": [10], "decay_factor": 2}, "decay_factor"),
        ({"schedule": "cosine", "decay_epochs": [10]}, "schedule: step only"),
    ],
)
def test_step_config_is_checked(params, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(DistillConfig, params, "distill")


def test_the_training_loop_uses_the_step_schedule(work):  # noqa: F811
    """End to end: the lr column of train_log.csv is the rate each optimizer step used."""
    root = work[0]
    cfg = tiny_cfg(root, epochs=3, schedule="step", decay_epochs=[1, 2], decay_factor=0.1, lr=1e-3)
    result = run(work, "step_lr", cfg)
    with open(root / "step_lr" / "train_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == result.global_step == 3 * 6
    for row in rows:
        assert float(row["lr"]) == pytest.approx(1e-3 * 0.1 ** (int(row["epoch"]) - 1), rel=1e-9), row
