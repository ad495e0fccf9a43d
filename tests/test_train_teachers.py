"""Distill with several teachers (distill.loss.teachers: the feature store's teachers/<name>/ stores): each
teacher's logit scale read from its own store, its rows gathered by index for the ensemble and MCAD terms exactly
as a naive gather gives them (bank on the device or memory-mapped), and kill/resume bit for bit."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_train import make_workdir, run, tiny_cfg
from test_train_knowledge import mined_neighbours

from pipeline.distill.data import BatchLoader, TeacherBank, tokenize_all
from pipeline.distill.inputs import extra_teachers, mined_lists, teacher_scales
from pipeline.distill.losses import DistillLoss, LossConfig
from pipeline.distill.run import run_distill
from pipeline.distill.sampler import EpochSampler
from pipeline.errors import InputError
from pipeline.store.features import TEACHERS, open_store
from pipeline.store.features_writer import write_store
from pipeline.store.image_cache import open_image_cache
from pipeline.towers.student import build_student

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MAIN_SCALE, SECOND_SCALE, SECOND_DIM = 20.0, 35.0, 8
# every term that reads the other teachers' rows: pairs (response, mcad), queue (response_queue), candidates
ENSEMBLE = {
    "queue_size": 16,
    "response": 1.0,
    "response_queue": 1.0,
    "dcd": 1.0,
    "mcad_kl": 1.0,
    "mcad_feature": 1.0,
    "teachers": ["second"],
}


def add_teacher(root, name: str, dim: int, scale: float, seed: int) -> None:
    """A second teacher under features.zarr/teachers/<name>/ (random rows of its own dimension, the main store's
    rows otherwise), and the logit scales recorded as extract records them."""
    import zarr

    main = open_store(root / "features.zarr")
    rng = np.random.default_rng(seed)
    splits = {}
    for s in main.splits:
        sp = main.split(s)
        splits[s] = {
            "image_emb": rng.normal(size=(sp.n_images, dim)),
            "text_emb": rng.normal(size=(sp.n_captions, dim)),
            "text_image": np.asarray(sp.text_image),
            "image_id": np.asarray(sp.image_id),
        }
    write_store(
        root / "features.zarr" / TEACHERS / name,
        splits,
        teacher={"name": name, "logit_scale": scale},
        dataset=main.dataset,
        chunk_rows=64,
    )
    attrs = zarr.open_group(str(root / "features.zarr"), mode="r+").attrs
    attrs.update({"teacher": {**attrs["teacher"], "logit_scale": MAIN_SCALE}, TEACHERS: [*main.extra_teachers, name]})


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    index = make_workdir(root)
    add_teacher(root, "second", SECOND_DIM, SECOND_SCALE, seed=3)
    store = open_store(root / "features.zarr", expect_fingerprint=index.fingerprint)
    cache = open_image_cache(root / "images.zarr", expect_fingerprint=index.fingerprint)
    return root, index, store, cache


def test_each_teachers_logit_scale_comes_from_its_own_store(work):
    store = work[2]
    cfg = LossConfig(response=1.0, teachers=("second",))
    assert teacher_scales(cfg, store) == (MAIN_SCALE, SECOND_SCALE)
    assert teacher_scales(replace(cfg, teacher_temperature=0.1), store) == (10.0, 10.0)
    with pytest.raises(InputError, match=r"features.zarr: no teacher 'third' in this feature store \(it has second\)"):
        teacher_scales(replace(cfg, teachers=("second", "third")), store)


def naive(arr, rows) -> torch.Tensor:
    """arr[rows] row by row, as float32."""
    return torch.from_numpy(np.stack([np.asarray(arr[int(r)], np.float32) for r in np.asarray(rows).reshape(-1)]))


@pytest.mark.parametrize("queue_size", [16, 0])
@pytest.mark.parametrize("placement", ["device", "memmap"])
def test_other_teachers_rows_are_a_naive_gather(work, placement, queue_size):
    """Each TeacherRows the terms get (pairs, queue, mined candidates) equals that teacher's stored rows of the
    batch's captions, their images, the queue's entries and the main teacher's mined lists, gathered naively."""
    root, index, store, cache = work
    st, view, second = store.split("train"), index.split("train"), store.teacher_store("second").split("train")
    mined = mined_neighbours(store, "train", 3, cross_encoder=True)
    cfg = tiny_cfg(root, bank_placement=placement, loss={**ENSEMBLE, "queue_size": queue_size})
    loss_fn = DistillLoss(cfg.loss, teacher_scales(cfg.loss, store))
    assert loss_fn.extra_rows == {"pairs", "queue", "candidates"}
    bank = TeacherBank(st.image_emb, st.text_emb, st.text_image, torch.device("cpu"), placement=placement)
    lists = mined_lists(cfg, loss_fn, mined, bank)
    if placement == "memmap" and queue_size == 0:  # the whole bank as the queue needs it on the device
        with pytest.raises(InputError, match="queue_size=0 .* needs teacher 'second'"):
            extra_teachers(cfg, store, loss_fn, bank, lists)
        return
    others = extra_teachers(cfg, store, loss_fn, bank, lists)
    assert [b.on_device for b in others.banks] == [placement == "device"]
    tokens = tokenize_all(build_student(cfg.student, 16).tokenize, view.caption_text)
    sampler = EpochSampler(view.n_captions, 8, seed=1)
    loader = BatchLoader(
        cache.split("train"), bank, tokens, sampler, queue_size=queue_size, use_queue=True, mined=lists, extra=others
    )
    t2i, i2t = mined.split("train").text_to_image.rows, mined.split("train").image_to_text.rows
    ti = np.asarray(st.text_image)
    for hb in loader.iterate(1, 0, sampler.steps_per_epoch):
        batch = loader.to_device(hb)
        (rows,) = batch.knowledge.extra
        r = hb.global_rows
        assert torch.equal(rows.t_v.float(), naive(second.image_emb, ti[r]))
        assert torch.equal(rows.t_t.float(), naive(second.text_emb, r))
        if queue_size:
            assert torch.equal(rows.queue_v.float(), naive(second.image_emb, ti[hb.queue_rows]))
            assert torch.equal(rows.queue_t.float(), naive(second.text_emb, hb.queue_rows))
        else:  # the whole bank, in the main queue's order
            assert torch.equal(rows.queue_v.float(), naive(second.image_emb, np.arange(second.n_images)))
            assert torch.equal(rows.queue_t.float(), naive(second.text_emb, np.arange(second.n_captions)))
        assert rows.cand_v.shape == (len(r), 3, SECOND_DIM) and rows.cand_t.shape == (len(r), 3, SECOND_DIM)
        assert torch.equal(rows.cand_v.float().reshape(-1, SECOND_DIM), naive(second.image_emb, t2i[r]))
        assert torch.equal(rows.cand_t.float().reshape(-1, SECOND_DIM), naive(second.text_emb, i2t[ti[r]]))
        loader.release(hb)


def test_kill_and_resume_with_several_teachers_and_mined_batches_is_bitwise_exact(work):
    """The ensemble terms with a second teacher (its bank memory-mapped: gathered by the loader threads), over
    the mined lists on candidate-aware batches: killed after step 9 and resumed, the same weights, optimizer
    state, balancer and logs bit for bit; the second teacher's rows are really read (other rows end elsewhere)."""
    root, index, store, cache = work
    mined = mined_neighbours(store, "train", 3, cross_encoder=True)
    cfg = tiny_cfg(
        root,
        epochs=2,
        checkpoint_every_steps=4,
        grad_accum=2,
        batch_size=4,
        batch_neighbours=1,
        bank_placement="memmap",
        loss=ENSEMBLE,
        keep_checkpoints=True,  # to compare the final training states
    )

    def go(out, c, s=store, **kw):
        return run_distill(
            c, index=index, store=s, cache=cache, out_dir=root / out, ckpt_dir=root / "ckpt" / out, mined=mined, **kw
        )

    full = go("e_full", cfg)
    assert not go("e_killed", cfg, stop_after_steps=9).completed
    assert go("e_killed", replace(cfg, num_workers=2)).global_step == full.global_step == 12
    a, b = (torch.load(root / f"ckpt/e_{n}/last.pt") for n in ("full", "killed"))
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert all(torch.equal(v[s], b["optimizer"]["state"][k][s]) for s in v), k
    assert a["balancer"] == b["balancer"] and a["state"] == b["state"]

    def log(name):  # the training log (its timings are in speed.csv)
        return (root / name / "train_log.csv").read_text()

    assert log("e_full") == log("e_killed")
    # the same run with the second teacher's rows replaced (same name, scale and shapes): another student
    other_root = root / "other"
    make_workdir(other_root)
    add_teacher(other_root, "second", SECOND_DIM, SECOND_SCALE, seed=4)
    go("e_other", cfg, s=open_store(other_root / "features.zarr", expect_fingerprint=index.fingerprint))
    c = torch.load(root / "ckpt/e_other/last.pt")
    assert not all(torch.equal(v, c["model"][k]) for k, v in a["model"].items())


def test_a_run_naming_a_teacher_the_store_lacks_is_one_line(work):
    root = work[0]
    with pytest.raises(InputError, match=r"no teacher 'third' in this feature store .*extract.extra_teachers"):
        run(work, "e_third", tiny_cfg(root, epochs=1, loss={"response": 1.0, "teachers": ["third"]}))
