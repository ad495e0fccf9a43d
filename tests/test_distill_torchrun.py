"""`kdpipe distill` under torchrun: 2 gloo ranks on the CPU train what ONE process trains with the same global
batch, exit 0, and only rank 0 writes; killed mid-epoch and resumed under 2 ranks, the run still ends there.

The oracle is a single-process run of the same config with batch_size x 2 (and 2 x the unpaired images per
step): the sampler draws the same global batches and negatives, the ranks' rows are gathered into that global
batch (GatherRows), every rank computes the loss of the whole batch, and GatherRows' backward (x world) with
DDP's average (/ world) gives the single process's gradient. Only float summation order differs (a rank's
forward covers 4 rows, not 8; DDP adds two partial gradients), so the runs agree to rounding, not bit for bit:
measured, the weights within 6e-8 and Adam's moments within 4e-7 of their largest magnitude; the tolerance is
1e-5 of it. Adam's moments are compared because the weights cannot see a gradient off by a constant factor
(Adam's step is scale-free): a GatherRows without its all_reduce (half the gradient) moves no weight by more
than the tolerance, but doubles exp_avg. Dropout would break the oracle (its masks are seeded per rank), so
the student is the demo's kind: a ViT without dropout and a frozen text tower.

One torchrun launch costs ~10 s (2 ranks importing torch); so the kill (`stop_after_steps`, as in
tests/test_train.py) and the resume both run inside one launch of the real stage (stages/distill.py: process
group, rank 0's lock, the barrier before teardown) by wrapping `run_distill` in the rank script."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import DIM, make_workdir, tiny_params
from torchrun_helpers import run_ranks

from pipeline.config import from_dict
from pipeline.distill.config import DistillConfig
from pipeline.distill.run import run_distill
from pipeline.store.features import open_store
from pipeline.store.image_cache import open_image_cache
from pipeline.towers.student import build_student

REPO = Path(__file__).parent.parent
WORLD = 2
BATCH, UNPAIRED = 4, 2  # per rank: the single process takes WORLD x these
TIMEOUT_S = 120  # ~15 s on a 2-core machine at load 2
KILL_AFTER = 5  # of 6 optimizer steps (3 an epoch); the last checkpoint before it is step 4, in epoch 2

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # one_thread: tests/conftest.py

# The rank script: the stage itself, with `run_distill` killed after KILL_AFTER steps and then resumed in the same
# process group (rank 0 keeps a copy of the checkpoint it resumes from). An audit hook records every file each
# rank creates, renames or removes under the work directory.
RANK_SCRIPT = """
import json, os, shutil, sys

workdir, out = os.path.abspath(sys.argv[1]), sys.argv[2]
rank = int(os.environ["RANK"])
writes = []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
CHANGES = {"os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "os.truncate", "os.link", "os.symlink"}


def audit(event, args):
    if event == "open":  # builtins.open: (path, mode, 0); os.open: (path, None, flags)
        path, mode, flags = args
        paths = [path] if (mode and set(mode) & set("wax+")) or (flags or 0) & WRITE_FLAGS else []
    elif event in CHANGES:
        paths = args
    else:
        return
    for p in paths:
        if isinstance(p, (str, bytes, os.PathLike)):
            full = os.path.abspath(os.fsdecode(p))
            if full.startswith(workdir + os.sep):
                writes.append(os.path.relpath(full, workdir))


sys.addaudithook(audit)

import pipeline.distill.run as run  # noqa: E402

whole_run = run.run_distill


def killed_then_resumed(cfg, **kw):
    whole_run(cfg, **kw, stop_after_steps=KILL_AFTER)
    if rank == 0:
        shutil.copy(os.path.join(kw["ckpt_dir"], "last.pt"), os.path.join(out, "killed.pt"))
    return whole_run(cfg, **kw)


run.run_distill = killed_then_resumed  # stages/distill.py imports it when it trains
from stages.cli import app  # noqa: E402

try:
    app(sys.argv[3:])
finally:
    with open(os.path.join(out, f"writes{rank}.json"), "w") as f:
        json.dump(sorted(set(writes)), f)
"""


def params(root: Path, world: int) -> dict:
    """The demo's recipe in small: frozen text tower, the whole teacher bank as negatives, the student's own
    pair loss, unpaired images; plus gradient accumulation (DDP's no_sync) and a warmup + cosine schedule."""
    p = tiny_params(
        root,
        epochs=2,
        batch_size=BATCH * WORLD // world,
        unpaired_images_per_step=UNPAIRED * WORLD // world,
        grad_accum=2,
        schedule="cosine",
        warmup_steps=2,
        checkpoint_every_steps=2,
        keep_checkpoints=True,  # the final states are compared
        loss={"queue_size": 0, "cross_modal": True, "pair_contrastive": 1.0},
        device="cpu",  # on a GPU machine too: gloo ranks (stages/distill.py picks the backend from the device)
    )
    p["student"]["text"]["freeze"] = True
    return p


def env() -> dict:
    return dict(os.environ, KDPIPE_PROGRESS="0", KDPIPE_FSYNC="0", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def assert_close_states(one: dict, ranks: dict, trainable: list[str], what: str) -> None:
    """Two training checkpoints: the same position, val history and balancer state (numbers within 1e-5
    relative), the weights and Adam's moments within 1e-5 of their largest magnitude (float summation order).
    `trainable`: the names of the optimizer's parameters, in its order."""
    assert one["meta"]["world_size"] == 1 and ranks["meta"]["world_size"] == WORLD, what
    close_values(one["state"], ranks["state"], f"{what}: state")
    close_values(one["balancer"], ranks["balancer"], f"{what}: balancer")
    close_tensors(one["model"], ranks["model"], what)
    for moment in ("exp_avg", "exp_avg_sq"):
        a, b = ({trainable[i]: v[moment] for i, v in ckpt["optimizer"]["state"].items()} for ckpt in (one, ranks))
        close_tensors(a, b, f"{what}: Adam's {moment}", key_biases=True)
    # the key biases' steps are driven by rounding noise: their gradients are ~1e-10 where the others' are ~1
    for ckpt in (one, ranks):
        noise = [
            v["exp_avg"].abs().max().item() for i, v in ckpt["optimizer"]["state"].items() if is_key_bias(trainable[i])
        ]
        assert len(noise) == 2 and max(noise) < 1e-7, noise  # 2 ViT layers; the text tower is frozen


def close_values(a, b, what: str) -> None:
    """Plain values (dicts, lists, numbers): floats within 1e-5 relative, everything else equal."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), what
        for k in a:
            close_values(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            close_values(x, y, f"{what}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=0), f"{what}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{what}: {a!r} vs {b!r}"


def close_tensors(one: dict, ranks: dict, what: str, key_biases: bool = False) -> None:
    """Every tensor within 1e-5 x the largest magnitude among them; the attention key biases too if `key_biases`.

    A key bias adds the same q . b_k to every logit of a query's softmax, so its true gradient is exactly 0:
    the computed one is rounding noise (~1e-10) that depends on summation order, and Adam (eps 1e-8) turns it
    into steps of up to ~1e-4. So the key biases' weights differ between the two runs by as much as they
    moved (~1e-3), without changing any output: they are compared through their (tiny) moments only."""
    assert one.keys() == ranks.keys(), what
    scale = max(v.abs().max().item() for v in one.values())
    for key, a in one.items():
        if is_key_bias(key) and not key_biases:
            continue
        diff = (a - ranks[key]).abs().max().item()
        assert diff <= 1e-5 * scale, f"{what}: {key} differs by {diff:.3g} (scale {scale:.3g})"


def is_key_bias(name: str) -> bool:
    return name.endswith("attention.k_proj.bias")


def log_rows(path: Path) -> tuple[list[str], np.ndarray]:
    """A training or val log: (header, values)."""
    lines = [ln.split(",") for ln in path.read_text().splitlines()]
    return lines[0], np.array([[float(x) for x in row] for row in lines[1:]])


def test_two_torchrun_ranks_train_what_one_process_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("KDPIPE_FSYNC", "0")
    root = tmp_path / "w"
    index = make_workdir(root, unpaired=(10, 0))  # 48 pairs (8 a global batch), 10 uncaptioned images

    # the oracle: one process, the same global batch; uninterrupted, and stopped where the ranks are killed
    one = from_dict(DistillConfig, params(root, 1), "distill")
    store = open_store(root / "features.zarr", expect_fingerprint=index.fingerprint)
    cache = open_image_cache(root / "images.zarr", expect_fingerprint=index.fingerprint)
    inputs = dict(index=index, store=store, cache=cache)
    done = run_distill(one, **inputs, out_dir=tmp_path / "one", ckpt_dir=tmp_path / "checkpoints/one")
    run_distill(
        one,
        **inputs,
        out_dir=tmp_path / "one_killed",
        ckpt_dir=tmp_path / "checkpoints/one_killed",
        stop_after_steps=KILL_AFTER,
    )
    assert done.global_step == 6
    trainable = [n for n, p in build_student(one.student, DIM).named_parameters() if p.requires_grad]

    (root / "params.yaml").write_text(yaml.safe_dump({"workdir": str(root), "distill": params(root, WORLD)}))
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT.replace("KILL_AFTER", str(KILL_AFTER)))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD)]
    command = [*launch, str(script), str(root), str(tmp_path), "distill", "--params", str(root / "params.yaml")]
    code, out = run_ranks(command, env=env(), cwd=tmp_path, timeout=TIMEOUT_S)
    assert code == 0, out[-6000:]  # exit 0: every rank got through the teardown (gloo aborts a rank otherwise)
    assert "resuming from" in out and "2 epochs, 6 steps" in out

    # killed: the checkpoint it resumed from (step 4) is the single process's at step 4
    killed = torch.load(tmp_path / "killed.pt", weights_only=True)
    assert killed["state"]["global_step"] == 4
    assert_close_states(
        torch.load(tmp_path / "checkpoints/one_killed/last.pt", weights_only=True), killed, trainable, "killed"
    )
    # resumed to the end: the single process's weights, optimizer state, export and logs
    student = root / "student"
    assert_close_states(
        torch.load(tmp_path / "checkpoints/one/last.pt", weights_only=True),
        torch.load(root / "checkpoints/student/last.pt", weights_only=True),
        trainable,
        "final",
    )
    close_tensors(load_file(tmp_path / "one/model.safetensors"), load_file(student / "model.safetensors"), "export")
    # printed with 6 significant digits: one unit in the last is up to 1e-5 relative, 2e-5 with binary rounding
    for log in ("train_log.csv", "val_log.csv"):
        (head_one, one_rows), (head, rows) = log_rows(tmp_path / "one" / log), log_rows(student / log)
        assert head == head_one and rows.shape == one_rows.shape, log  # no row twice: one writer, cut back once
        np.testing.assert_allclose(rows, one_rows, rtol=2e-5, err_msg=log)
    summary = json.loads((student / "train_summary.json").read_text())
    assert summary["world_size"] == WORLD and summary["best_epoch"] == done.best_epoch

    # rank 0 locked and wrote the outputs; rank 1 wrote nothing under the work directory but the lock files
    # of the two inputs it read, which every reader opens with O_CREAT to take them shared (pipeline/locks.py)
    writes = [set(json.loads((tmp_path / f"writes{r}.json").read_text())) for r in range(WORLD)]
    outputs = {
        ".student.kdpipe-lock",
        "checkpoints/student/last.pt",
        "student/model.safetensors",
        "config/distill.yaml",
    }
    assert outputs <= writes[0]
    assert writes[1] == {".features.zarr.kdpipe-lock", ".images.zarr.kdpipe-lock"}
