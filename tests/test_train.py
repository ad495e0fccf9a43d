"""Distill training on a tiny synthetic dataset, on the CPU: teacher rows by index, the negatives, a run
that learns, exact kill-and-resume, refused inputs, and the `kdpipe distill` command."""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.config import from_dict
from pipeline.data.index import DatasetIndex
from pipeline.distill.config import DistillConfig
from pipeline.distill.data import BatchLoader, TeacherBank, random_resized_crop, tokenize_all
from pipeline.distill.losses import DistillLoss
from pipeline.distill.run import run_distill
from pipeline.distill.sampler import EpochSampler
from pipeline.distill.schedule import step_seed
from pipeline.errors import ConfigError, InputError
from pipeline.store.features import open_store
from pipeline.store.features_writer import write_store
from pipeline.store.image_cache import open_image_cache, write_image_cache
from pipeline.towers.student import build_student, load_student

DIM, HW = 16, 32
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
NOUNS = ("dog", "cat", "car", "house")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# -- a tiny dataset: colored images with a grey square, captions naming both, teacher = class prototypes ----
def make_workdir(
    root: Path, sizes=(16, 4), caps: int = 3, dim: int = DIM, seed: int = 0, name: str = "tiny", unpaired=(0, 0)
) -> DatasetIndex:
    """`unpaired` = (images without captions, texts without an image) added to train (none: the same data)."""
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    protos = rng.normal(size=(len(COLORS) * len(NOUNS), dim))
    img_rows, captions, pixels, classes = [], [], {}, []
    for split, count in zip(("train", "val"), sizes):
        arr = []
        for i in range(count + (unpaired[0] if split == "train" else 0)):
            c, o = int(rng.integers(len(COLORS))), int(rng.integers(len(NOUNS)))
            row = len(img_rows)
            img_rows.append((f"{split}{i}", f"{split}{i}.jpg", split))
            img = np.clip(np.array(COLORS[names[c]]) + rng.normal(0, 20, (HW, HW, 3)), 0, 255).astype(np.uint8)
            img[HW // 4 : 3 * HW // 4, HW // 4 : 3 * HW // 4] = o * 60
            arr.append(img)
            classes.append(c * len(NOUNS) + o)
            captions += [(f"a {names[c]} {NOUNS[o]} photo {k}", row) for k in range(caps if i < count else 0)]
        pixels[split] = np.stack(arr)
    text_classes = rng.integers(len(COLORS) * len(NOUNS), size=unpaired[1])
    texts = [(f"a {names[c // len(NOUNS)]} {NOUNS[c % len(NOUNS)]} photo", "train") for c in text_classes.tolist()]
    index = DatasetIndex.from_lists(name, root / "data", img_rows, captions, unpaired_texts=texts)
    index.save(root / "index")
    write_image_cache(root / "images.zarr", pixels, fingerprint=index.fingerprint)
    splits = {}
    for split in ("train", "val"):
        v = index.split(split)
        c = np.array(classes)[v.image_rows]
        splits[split] = {
            "image_emb": protos[c] + 0.1 * rng.normal(size=(len(c), dim)),
            "text_emb": protos[c[v.text_image]] + 0.1 * rng.normal(size=(v.n_captions, dim)),
            "text_image": v.text_image,
            "image_id": v.image_id,
        }
    if unpaired[1]:
        splits["train"]["unpaired_text_emb"] = protos[text_classes] + 0.1 * rng.normal(size=(unpaired[1], dim))
    write_store(
        root / "features.zarr",
        splits,
        teacher={"name": "synthetic"},
        dataset={"name": name, "fingerprint": index.fingerprint},
        chunk_rows=64,
    )
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", *names, *NOUNS, *map(str, range(10))]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab=str(root / "vocab.txt")).save_pretrained(root / "tok")
    return index


def tiny_params(root: Path, **overrides) -> dict:
    student = {
        "image": {
            "image_size": HW,
            "patch_size": 8,
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "intermediate_size": 64,
        },
        "text": {
            "tokenizer": str(root / "tok"),
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 32,
            "max_tokens": 12,
        },
    }
    return {
        "student": student,
        "epochs": 2,
        "batch_size": 8,
        "lr": 1e-3,
        "loss": {"queue_size": 16},
        "checkpoint_every_steps": 0,
        "log_every_steps": 1,
        "num_workers": 0,
        **overrides,
    }


def tiny_cfg(root: Path, **overrides) -> DistillConfig:
    return from_dict(DistillConfig, tiny_params(root, **overrides), "distill")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    index = make_workdir(root)
    store = open_store(root / "features.zarr", expect_fingerprint=index.fingerprint)
    cache = open_image_cache(root / "images.zarr", expect_fingerprint=index.fingerprint)
    return root, index, store, cache


def run(work, out: str, cfg: DistillConfig, **kw):
    root, index, store, cache = work
    return run_distill(cfg, index=index, store=store, cache=cache, out_dir=root / out, **kw)


# -- sampling and the data path ----------------------------------------------------------------------------
def test_sampler_is_a_function_of_the_position():
    s = EpochSampler(50, 8, seed=3)
    assert s.steps_per_epoch == 6
    epoch0 = np.concatenate([s.rows(0, k) for k in range(6)])
    assert len(set(epoch0.tolist())) == 48 and not np.array_equal(epoch0, np.sort(epoch0))  # shuffled, no repeats
    assert not np.array_equal(s.permutation(0), s.permutation(1))
    fresh = EpochSampler(50, 8, seed=3)
    assert np.array_equal(fresh.rows(1, 4), s.rows(1, 4))  # no hidden stream: any position, any order
    q = s.queue_rows(0, 2, 20)  # the 20 pairs before step 2: 16 of steps 0-1, 4 from the end (cyclic)
    perm = s.permutation(0)
    assert np.array_equal(q, np.concatenate([perm[-4:], perm[:16]]))
    assert not set(q.tolist()) & set(s.rows(0, 2).tolist())
    # two ranks split each global batch
    r0, r1 = EpochSampler(50, 4, 3, world_size=2, rank=0), EpochSampler(50, 4, 3, world_size=2, rank=1)
    assert np.array_equal(np.concatenate([r0.rows(0, 1), r1.rows(0, 1)]), s.global_rows(0, 1))


@pytest.mark.parametrize("placement", ["device", "memmap"])
def test_teacher_rows_images_and_tokens_are_looked_up_by_index(work, placement):
    root, index, store, cache = work
    st, view = store.split("train"), index.split("train")
    torch.manual_seed(0)
    model = build_student(tiny_cfg(root).student, DIM)
    bank = TeacherBank(st.image_emb, st.text_emb, st.text_image, torch.device("cpu"), placement=placement)
    assert bank.on_device == (placement == "device")
    tokens = tokenize_all(model.tokenize, view.caption_text)
    sampler = EpochSampler(view.n_captions, 8, seed=1)
    loader = BatchLoader(cache.split("train"), bank, tokens, sampler, queue_size=16, use_queue=True, num_workers=2)
    seen = []
    for hb in loader.iterate(1, 0, sampler.steps_per_epoch):
        b = loader.to_device(hb)
        rows = hb.rows
        seen.append(rows)
        img_rows = view.text_image[rows]
        assert torch.equal(b.t_t.float(), torch.from_numpy(np.asarray(st.text_emb[rows], np.float32)))
        assert torch.equal(b.t_v.float(), torch.from_numpy(np.asarray(st.image_emb[img_rows], np.float32)))
        assert torch.equal(b.images, torch.from_numpy(cache.split("train")[img_rows]))
        assert torch.equal(b.image_ids, torch.from_numpy(img_rows.astype(np.int64)))
        expect = model.tokenize(list(view.caption_text[rows]))
        assert torch.equal(b.input_ids, expect["input_ids"]) and torch.equal(b.attention_mask, expect["attention_mask"])
        q = sampler.queue_rows(1, hb.step, 16)
        assert torch.equal(b.queue_t.float(), torch.from_numpy(np.asarray(st.text_emb[q], np.float32)))
        assert torch.equal(
            b.queue_v.float(), torch.from_numpy(np.asarray(st.image_emb[view.text_image[q]], np.float32))
        )
        assert torch.equal(b.queue_t_ids, torch.from_numpy(view.text_image[q].astype(np.int64)))
    order = np.concatenate(seen)
    assert not np.array_equal(order, np.arange(len(order)))  # shuffled, not aligned by position


def test_whole_bank_negatives(work):
    root, index, store, cache = work
    st, view = store.split("train"), index.split("train")
    bank = TeacherBank(st.image_emb, st.text_emb, st.text_image, torch.device("cpu"))
    tokens = (torch.zeros(view.n_captions, 4, dtype=torch.int32),) * 2
    loader = BatchLoader(
        cache.split("train"),
        bank,
        tokens,
        EpochSampler(view.n_captions, 8, 0),
        queue_size=0,
        use_queue=True,
        num_workers=0,
    )
    b = loader.to_device(loader.host_batch(0, 0))
    assert b.queue_v.shape == (st.n_images, DIM) and b.queue_t.shape == (st.n_captions, DIM)
    assert torch.equal(b.queue_t_ids, torch.from_numpy(st.text_image.astype(np.int64)))


def test_random_resized_crop_depends_on_the_seed_only():
    x = torch.rand(3, 3, 40, 40)
    a = random_resized_crop(x, 32, torch.Generator().manual_seed(5))
    b = random_resized_crop(x, 32, torch.Generator().manual_seed(5))
    c = random_resized_crop(x, 32, torch.Generator().manual_seed(6))
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    full = random_resized_crop(x, 40, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1), flip=False)
    torch.testing.assert_close(full, x, rtol=0, atol=1e-5)  # the whole image, unflipped: the identity


def test_step_seed_is_its_own_for_every_position():
    """Every (seed, epoch, micro-step, rank) gets its own seed, the same each time it is asked for, and one
    torch.manual_seed accepts (0 <= s < 2**63)."""
    positions = [(s, e, k, r) for s in (0, 1) for e in range(3) for k in range(6) for r in range(2)]
    seeds = [step_seed(*p) for p in positions]
    assert len(set(seeds)) == len(positions)
    assert seeds == [step_seed(*p) for p in positions]
    assert all(0 <= s < 2**63 for s in seeds)


def test_every_micro_step_draws_its_own_dropout_and_augmentation(work, monkeypatch):
    """A run's random streams at each micro-step: the dropout stream (torch's default generator, as the
    student's forward starts) and the augmentation generator (as the crop starts) are each in the state that
    micro-step's seed gives, step_seed(seed, epoch, micro-step, rank), and so in a state no other micro-step of
    the run sees (a seed that ignored the epoch would replay epoch 1's dropout masks and crops in epoch 2; a
    stream that was not reseeded would depend on everything drawn before, and not on the position alone)."""
    from pipeline.distill import forward as forward_module
    from pipeline.towers.student import DualEncoderStudent

    dropout_states, crop_states = [], []
    student_forward, crop = DualEncoderStudent.forward, forward_module.random_resized_crop

    def recording_forward(self, *args, **kwargs):
        dropout_states.append(torch.get_rng_state().numpy().tobytes())
        return student_forward(self, *args, **kwargs)

    def recording_crop(x, size, generator, **kwargs):
        crop_states.append(generator.get_state().numpy().tobytes())
        return crop(x, size, generator, **kwargs)

    monkeypatch.setattr(DualEncoderStudent, "forward", recording_forward)
    monkeypatch.setattr(forward_module, "random_resized_crop", recording_crop)
    cfg = tiny_cfg(work[0], epochs=2, batch_size=8, grad_accum=2, augment={"enabled": True})
    result = run(work, "streams", cfg)
    per_epoch = result.global_step * cfg.grad_accum // cfg.epochs  # micro-steps of an epoch (3 steps x 2)
    seeded = [
        torch.Generator().manual_seed(step_seed(cfg.seed, epoch, step, 0)).get_state().numpy().tobytes()
        for epoch in range(cfg.epochs)
        for step in range(per_epoch)
    ]
    assert len(seeded) == 12 and len(set(seeded)) == 12
    assert dropout_states == seeded and crop_states == seeded


# -- training ------------------------------------------------------------------------------------------------
def distill_loss_and_agreement(model, work) -> tuple[float, float]:
    """Sum of the raw distillation terms and the mean student-teacher cosine over the whole train split."""
    root, index, store, cache = work
    st, view = store.split("train"), index.split("train")
    model.eval()
    with torch.no_grad():
        v = model.encode_images(cache.split("train")[view.text_image])
        t = model.encode_texts(list(view.caption_text))
        t_v = torch.from_numpy(np.asarray(st.image_emb, np.float32))[view.text_image]
        t_t = torch.from_numpy(np.asarray(st.text_emb, np.float32))
        ids = torch.from_numpy(view.text_image.astype(np.int64))
        loss_fn = DistillLoss(tiny_cfg(root).loss)
        raw = loss_fn(v, t, t_v, t_t, ids, t_v, t_t, ids, ids)
    agreement = float(((v * t_v).sum(1).mean() + (t * t_t).sum(1).mean()) / 2)
    return float(sum(raw.values())), agreement


def test_a_tiny_run_lowers_the_distillation_loss_and_raises_agreement(work):
    root = work[0]
    cfg = tiny_cfg(root, epochs=4)
    torch.manual_seed(cfg.seed)
    before = distill_loss_and_agreement(build_student(cfg.student, DIM), work)
    result = run(work, "learn", cfg)
    assert result.completed and result.epochs_done == 4 and result.global_step == 4 * (48 // 8)
    after = distill_loss_and_agreement(load_student(root / "learn"), work)
    assert after[0] < 0.8 * before[0], (before, after)
    assert after[1] > before[1] + 0.1, (before, after)
    out = root / "learn"
    for name in (
        "model.safetensors",
        "student_config.json",
        "image_tower/config.json",
        "text_tower/config.json",
        "checkpoints/last.pt",
        "train_log.csv",
        "val_log.csv",
        "plots/training.png",
        "distill_config.yaml",
        "train_summary.json",
    ):
        assert (out / name).is_file(), name
    header = (out / "train_log.csv").read_text().splitlines()[0].split(",")
    assert {"step", "lr", "pairs_per_s", "contrastive_loss", "w_triplet_loss"} <= set(header)
    assert len((out / "val_log.csv").read_text().splitlines()) == 1 + 4
    assert result.best_epoch == int(np.argmax([h["rsum"] for h in result.history])) + 1


def test_kill_and_resume_ends_with_bitwise_equal_weights(work):
    """Killed after step 9 (last checkpoint at step 8, mid epoch 2), resumed: the same weights, bit for bit.

    Bitwise, not allclose: every random number is a function of (seed, epoch, step), every state is saved
    exactly, and the CPU kernels are deterministic for the same shapes, so any difference is a bug. Dropout
    (BERT's 0.1) and the on-device augmentation are on, so the random streams are exercised too."""
    root = work[0]
    cfg = tiny_cfg(
        root,
        epochs=2,
        checkpoint_every_steps=4,
        augment={"enabled": True},
        schedule="cosine",
        warmup_steps=2,
        grad_accum=2,
        batch_size=4,
        grad_clip=1.0,
    )
    kill_resume_and_compare(work, "", cfg)


def kill_resume_and_compare(work, prefix: str, cfg: DistillConfig) -> dict:
    """Run `cfg` uninterrupted, and killed after step 9 then resumed: weights, optimizer and balancer states,
    the export and the logs must be bitwise equal. Returns the uninterrupted run's last checkpoint."""
    root = work[0]
    full = run(work, f"{prefix}full", cfg)
    killed = run(work, f"{prefix}killed", cfg, stop_after_steps=9)
    assert not killed.completed and killed.global_step == 9
    resumed = run(work, f"{prefix}killed", replace(cfg, num_workers=2))  # a runtime key may differ
    assert resumed.completed and resumed.global_step == full.global_step == 12
    a = torch.load(root / f"{prefix}full/checkpoints/last.pt")
    b = torch.load(root / f"{prefix}killed/checkpoints/last.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert all(torch.equal(v[s], b["optimizer"]["state"][k][s]) for s in v), k
    assert a["balancer"] == b["balancer"] and a["state"] == b["state"]
    assert (root / f"{prefix}full/model.safetensors").read_bytes() == (
        root / f"{prefix}killed/model.safetensors"
    ).read_bytes()

    def log(name):  # the training log minus the timing column: same rows, no duplicates of redone steps
        lines = [ln.split(",") for ln in (root / name / "train_log.csv").read_text().splitlines()]
        col = lines[0].index("pairs_per_s")
        return [ln[:col] + ln[col + 1 :] for ln in lines]

    assert log(f"{prefix}full") == log(f"{prefix}killed")
    assert (root / f"{prefix}full/val_log.csv").read_text() == (root / f"{prefix}killed/val_log.csv").read_text()
    return a


def test_training_log_after_a_resume_equals_the_uninterrupted_log(work):
    """Checkpoints (every 4 steps) that fall between log rows (every 3): the rows around the resume point
    average the same steps as an uninterrupted run's, so the logs are equal (timing column aside)."""
    root = work[0]
    cfg = tiny_cfg(root, epochs=2, checkpoint_every_steps=4, log_every_steps=3, batch_size=4)
    full = run(work, "log_full", cfg)
    killed = run(work, "log_killed", cfg, stop_after_steps=10)  # last checkpoint at step 8, last row at 9
    assert not killed.completed
    run(work, "log_killed", cfg)

    def log(name):
        lines = [ln.split(",") for ln in (root / name / "train_log.csv").read_text().splitlines()]
        col = lines[0].index("pairs_per_s")
        return [ln[:col] + ln[col + 1 :] for ln in lines]

    # rows at every 3rd step, every checkpoint (4th) and each epoch end (12 steps an epoch)
    steps = [int(row[0]) for row in log("log_full")[1:]]
    assert steps == [3, 4, 6, 8, 9, 12, 15, 16, 18, 20, 21, 24] and full.global_step == 24
    assert log("log_full") == log("log_killed")


def test_resume_refuses_another_config_and_no_resume_starts_over(work):
    root = work[0]
    cfg = tiny_cfg(root, epochs=1)
    run(work, "cfg", cfg)
    with pytest.raises(InputError, match=r"distill\.lr: 0\.001 then, 0\.002 now.*--no-resume"):
        run(work, "cfg", replace(cfg, lr=2e-3))
    again = run(work, "cfg", replace(cfg, lr=2e-3), resume=False)
    assert again.completed and again.global_step == 6


def test_baseline_trains_on_pairs_alone(work):
    root = work[0]
    result = run(work, "baseline", tiny_cfg(root, epochs=1), baseline=True)
    header = (root / "baseline/train_log.csv").read_text().splitlines()[0].split(",")
    assert [c for c in header if c.endswith("_loss") and not c.startswith("w_")] == ["pair_contrastive_loss"]
    assert result.completed


def test_queue_larger_than_the_split_is_refused(work):
    root = work[0]
    with pytest.raises(InputError, match="queue_size=100"):
        run(work, "q", tiny_cfg(root, loss={"queue_size": 100}))


# -- the command: refused inputs -----------------------------------------------------------------------------
def cli(root: Path, *args: str):
    from stages.cli import app

    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"workdir": str(root), "distill": tiny_params(root, epochs=1)}))
    return CliRunner().invoke(app, ["distill", "--params", str(params), *args])


def test_command_trains_and_refuses_mismatched_inputs(tmp_path):
    root = tmp_path / "w"
    make_workdir(root)
    ok = cli(root)
    assert ok.exit_code == 0, ok.output
    assert (root / "student/model.safetensors").is_file() and (root / "config/distill.yaml").is_file()
    again = cli(root)  # finished: resumes at the end, trains nothing, keeps the export
    assert again.exit_code == 0 and "resuming" in again.output and "1 epochs, 6 steps" in again.output
    base = cli(root, "--baseline", "--set", "distill.epochs=1")
    assert base.exit_code == 0 and (root / "baseline/model.safetensors").is_file()

    dim = cli(root, "--set", "distill.teacher_dim=8")
    assert dim.exit_code == 2 and "feature dimension 16, expected 8" in dim.output

    # a store and an image cache computed from another dataset index
    other = tmp_path / "other"
    make_workdir(other, seed=1, name="other")
    shutil.rmtree(root / "features.zarr")
    shutil.copytree(other / "features.zarr", root / "features.zarr")
    bad = cli(root)
    assert bad.exit_code == 2 and "computed from dataset index" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    shutil.rmtree(root / "images.zarr")
    shutil.copytree(other / "images.zarr", root / "images.zarr")
    shutil.rmtree(root / "features.zarr")
    shutil.copytree(other / "features.zarr", root / "features.zarr")
    shutil.rmtree(root / "index")
    shutil.copytree(other / "index", root / "index")
    shutil.rmtree(root / "images.zarr")
    make_workdir(tmp_path / "third", seed=2, name="third")
    shutil.copytree(tmp_path / "third" / "images.zarr", root / "images.zarr")
    bad = cli(root)
    assert bad.exit_code == 2 and "image cache was made from dataset index" in bad.output


def test_incomplete_store_is_refused(tmp_path):
    import json

    root = tmp_path / "w"
    make_workdir(root)
    meta = root / "features.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["complete"] = False
    meta.write_text(json.dumps(doc))
    res = cli(root)
    assert res.exit_code == 2 and "incomplete" in res.output


# -- unpaired rows: images without captions and texts without an image beside the pairs -------------------
@pytest.fixture(scope="module")
def uwork(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_unpaired")
    index = make_workdir(root, unpaired=(10, 12))
    store = open_store(root / "features.zarr", expect_fingerprint=index.fingerprint)
    cache = open_image_cache(root / "images.zarr", expect_fingerprint=index.fingerprint)
    return root, index, store, cache


def test_unpaired_sampler_is_a_function_of_the_position_and_cycles_over_the_pool():
    from pipeline.distill.sampler import UnpairedSampler

    n, per, world, steps = 10, 3, 2, 4
    ranks = [UnpairedSampler(n, per, 5, steps, stream=1, world_size=world, rank=r) for r in range(world)]
    fresh = UnpairedSampler(n, per, 5, steps, stream=1, world_size=world, rank=0)
    drawn = np.concatenate([ranks[0].global_rows(e, s) for e in range(3) for s in range(steps)])  # 72 draws
    for c in range(len(drawn) // n):  # every cycle of n draws is a permutation of the pool, a new one each time
        assert sorted(drawn[c * n : (c + 1) * n].tolist()) == list(range(n))
    assert not np.array_equal(drawn[:n], drawn[n : 2 * n])
    for e, s in [(2, 3), (0, 0), (1, 2)]:  # any order, any fresh instance: the same rows
        g = fresh.global_rows(e, s)
        assert np.array_equal(g, drawn[(e * steps + s) * 6 : (e * steps + s + 1) * 6])
        assert np.array_equal(np.concatenate([r.rows(e, s) for r in ranks]), g)
    other_stream = UnpairedSampler(n, per, 5, steps, stream=2, world_size=world, rank=0)
    assert not np.array_equal(other_stream.global_rows(0, 0), drawn[:6])


@pytest.mark.parametrize("placement", ["device", "memmap"])
def test_unpaired_rows_are_looked_up_by_index(uwork, placement):
    from pipeline.distill.data import Unpaired
    from pipeline.distill.sampler import UnpairedSampler

    root, index, store, cache = uwork
    st, view = store.split("train"), index.split("train")
    assert st.unpaired_image.tolist() == list(range(16, 26)) and st.n_unpaired_texts == 12
    torch.manual_seed(0)
    model = build_student(tiny_cfg(root).student, DIM)
    bank = TeacherBank(
        st.image_emb, st.text_emb, st.text_image, torch.device("cpu"), placement=placement,
        unpaired_text_emb=st.unpaired_text_emb,
    )  # fmt: skip
    sampler = EpochSampler(view.n_captions, 8, seed=1)
    u_img = UnpairedSampler(10, 3, 1, sampler.steps_per_epoch, stream=1)
    u_txt = UnpairedSampler(12, 5, 1, sampler.steps_per_epoch, stream=2)
    unpaired = Unpaired(u_img, st.unpaired_image, u_txt, tokenize_all(model.tokenize, view.unpaired_text))
    tokens = tokenize_all(model.tokenize, view.caption_text)
    loader = BatchLoader(
        cache.split("train"), bank, tokens, sampler, queue_size=16, use_queue=True, num_workers=2, unpaired=unpaired
    )
    for hb in loader.iterate(2, 0, sampler.steps_per_epoch):
        b = loader.to_device(hb)
        img_rows = st.unpaired_image[u_img.rows(2, hb.step)]
        assert torch.equal(b.u_images, torch.from_numpy(cache.split("train")[img_rows]))
        assert torch.equal(b.unpaired.t_v.float(), torch.from_numpy(np.asarray(st.image_emb[img_rows], np.float32)))
        assert torch.equal(b.unpaired.v_ids, torch.from_numpy(img_rows))
        t_rows = u_txt.rows(2, hb.step)
        expect = model.tokenize(list(view.unpaired_text[t_rows]))
        assert torch.equal(b.u_input_ids, expect["input_ids"])
        assert torch.equal(
            b.unpaired.t_t.float(), torch.from_numpy(np.asarray(st.unpaired_text_emb[t_rows], np.float32))
        )
        assert torch.equal(b.unpaired.t_ids, torch.from_numpy(-1 - t_rows))
        assert b.images.shape[0] == 8 and b.t_v.shape[0] == 8  # the pairs are untouched


def test_kill_and_resume_with_unpaired_batches_is_bitwise_exact(uwork):
    """As test_kill_and_resume_ends_with_bitwise_equal_weights, with unpaired images and texts drawn every
    micro-step: killed after step 9, resumed, the same weights and logs bit for bit. The unpaired rows are
    really used: a run without them ends elsewhere."""
    root = uwork[0]
    cfg = tiny_cfg(
        root,
        epochs=2,
        checkpoint_every_steps=4,
        augment={"enabled": True},
        grad_accum=2,
        batch_size=4,
        unpaired_images_per_step=3,
        unpaired_texts_per_step=2,
        loss={"queue_size": 16, "relation": 1.0},
    )
    a = kill_resume_and_compare(uwork, "u_", cfg)
    pairs_only = run(uwork, "u_pairs", replace(cfg, unpaired_images_per_step=0, unpaired_texts_per_step=0))
    c = torch.load(root / "u_pairs/checkpoints/last.pt")
    assert pairs_only.global_step == 12 and not all(torch.equal(v, c["model"][k]) for k, v in a["model"].items())


def test_baseline_ignores_unpaired_rows(uwork):
    root = uwork[0]
    cfg = tiny_cfg(root, epochs=1)
    run(uwork, "u_base0", cfg, baseline=True)
    run(uwork, "u_base1", replace(cfg, unpaired_images_per_step=4, unpaired_texts_per_step=4), baseline=True)
    assert (root / "u_base0/model.safetensors").read_bytes() == (root / "u_base1/model.safetensors").read_bytes()


def test_unpaired_counts_are_checked(work, uwork):
    with pytest.raises(
        InputError, match=r"unpaired_images_per_step=11: the split 'train' has 10 images without captions"
    ):
        run(uwork, "u_bad", tiny_cfg(uwork[0], unpaired_images_per_step=11))
    with pytest.raises(InputError, match=r"unpaired_texts_per_step=1: the split 'train' has 0 texts without an image"):
        run(work, "u_bad", tiny_cfg(work[0], unpaired_texts_per_step=1))
    with pytest.raises(ConfigError, match=r"^distill\.unpaired_images_per_step: -1 is out of range"):
        tiny_cfg(work[0], unpaired_images_per_step=-1)


def test_val_recalls_rank_captioned_images_only(work):
    """Images without captions in a val split are not queries: the recalls equal those of the split without
    them (retrieval needs a caption per image), whatever their position."""
    from pipeline.distill.inputs import PairSplit
    from pipeline.distill.validation import validate

    root, index, store, cache = work
    view, images = index.split("val"), cache.split("val")
    torch.manual_seed(0)
    model = build_student(tiny_cfg(root).student, DIM)
    tokens = tokenize_all(model.tokenize, view.caption_text)
    ti = view.text_image.astype(np.int64)
    plain = PairSplit("val", view.caption_text, images, None, None, ti)
    # the same images plus two without captions, at the front: every caption's image row moves by 2
    extra = np.concatenate([images[[1, 2]], images])
    with_extra = PairSplit("val", view.caption_text, extra, None, None, ti + 2)
    a = validate(model, plain, tokens, 16, nullcontext)
    b = validate(model, with_extra, tokens, 16, nullcontext)
    assert a == pytest.approx(b, abs=1e-9)


def test_checkpoints_from_before_the_unpaired_keys_still_compare_equal():
    from pipeline.config import to_dict
    from pipeline.distill.checkpoints import comparable

    now = to_dict(DistillConfig())
    before = {k: v for k, v in now.items() if not k.startswith("unpaired_")}  # written before the keys existed
    assert comparable(before) == comparable(now)
    assert comparable(before) != comparable({**now, "unpaired_images_per_step": 4})


def test_a_frozen_text_tower_keeps_its_weights_and_is_run_once_per_run(work, monkeypatch):
    """With `student.text.freeze`, only the text projection trains, and the tower sees every caption once (the
    per-run cache), not once per step."""
    from pipeline.towers.student import DualEncoderStudent

    root = work[0]
    params = tiny_params(root, epochs=2)
    params["student"]["text"]["freeze"] = True
    cfg = from_dict(DistillConfig, params, "distill")
    torch.manual_seed(cfg.seed)
    initial = build_student(cfg.student, DIM).text_tower.state_dict()
    calls = []
    original = DualEncoderStudent.text_features
    monkeypatch.setattr(
        DualEncoderStudent,
        "text_features",
        lambda self, tok: calls.append(len(tok["input_ids"])) or original(self, tok),
    )
    result = run(work, "frozen_text", cfg)
    assert result.completed
    assert sum(calls) == 48 + 12  # every train and val caption once, whatever the number of steps and epochs
    trained = load_student(root / "frozen_text")
    for k, v in initial.items():
        assert torch.equal(v, trained.text_tower.state_dict()[k]), k
