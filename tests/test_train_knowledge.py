"""Distill with the knowledge terms wired in: the learned student temperature (stepped by the optimizer, held by
the checkpoint, resumed bit for bit), the teachers' logit scales read from the store, and checkpoints written
before the knowledge keys existed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_train import kill_resume_and_compare, run, tiny_cfg, work  # noqa: F401  (`work`: the tiny dataset fixture)

from pipeline.config import to_dict
from pipeline.distill.checkpoints import comparable
from pipeline.distill.config import DistillConfig
from pipeline.distill.inputs import teacher_scales
from pipeline.distill.losses import KNOWLEDGE_LOSS_KEYS, LossConfig
from pipeline.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

LEARNED = {
    "queue_size": 16,
    "response": 1.0,
    "response_queue": 1.0,
    "intra_relation": 1.0,
    "teacher_temperature": 0.1,  # the synthetic store records no logit scale
    "student_temperature": 0.2,
    "learn_student_temperature": True,
}


def test_kill_and_resume_with_a_learned_student_temperature_is_bitwise_exact(work):  # noqa: F811
    """The temperature is a parameter the optimizer steps (it moves off its initial value), the checkpoint holds
    it with its Adam moments, and a run killed after step 9 and resumed ends with the same value, weights and
    logs (the train log's student_temperature column included) bit for bit."""
    root = work[0]
    cfg = tiny_cfg(root, epochs=2, checkpoint_every_steps=4, grad_accum=2, batch_size=4, loss=LEARNED)
    a = kill_resume_and_compare(work, "t_", cfg)
    b = torch.load(root / "checkpoints/t_killed/last.pt")
    assert set(a["loss"]) == {"student_log_scale"}
    assert torch.equal(a["loss"]["student_log_scale"], b["loss"]["student_log_scale"])
    learned = float(a["loss"]["student_log_scale"])
    assert learned != pytest.approx(float(torch.tensor(1 / 0.2).log()), abs=1e-4)  # stepped
    header, *rows = (root / "t_full/train_log.csv").read_text().splitlines()
    col = header.split(",").index("student_temperature")
    temps = [float(r.split(",")[col]) for r in rows]
    assert temps[-1] == pytest.approx(float(torch.exp(-torch.tensor(learned))), rel=1e-5) and temps[0] != temps[-1]
    # no weight decay on a temperature (CLIP's logit scale): its own optimizer group
    groups = a["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [cfg.weight_decay, 0.0] and len(groups[1]["params"]) == 1


def test_a_fixed_temperature_keeps_one_optimizer_group_and_an_empty_loss_state(work):  # noqa: F811
    root = work[0]
    cfg = tiny_cfg(root, epochs=1, keep_checkpoints=True, loss={**LEARNED, "learn_student_temperature": False})
    run(work, "t_fixed", cfg)
    blob = torch.load(root / "checkpoints/t_fixed/last.pt")
    assert blob["loss"] == {} and len(blob["optimizer"]["param_groups"]) == 1
    assert "student_temperature" not in (root / "t_fixed/train_log.csv").read_text().splitlines()[0]


def test_a_checkpoint_without_its_loss_state_is_refused(work):  # noqa: F811
    root = work[0]
    cfg = tiny_cfg(root, epochs=2, checkpoint_every_steps=2, loss=LEARNED)
    run(work, "t_noloss", cfg, stop_after_steps=2)
    path = root / "checkpoints/t_noloss/last.pt"
    blob = torch.load(path)
    del blob["loss"]
    torch.save(blob, path)
    with pytest.raises(InputError, match="has no loss state.*--no-resume"):
        run(work, "t_noloss", cfg)


def test_teacher_scales_come_from_the_store_or_the_config(tmp_path):
    cfg = LossConfig(response=1.0)
    store = SimpleNamespace(path=tmp_path / "features.zarr", teacher={"name": "t", "logit_scale": 42.5})
    assert teacher_scales(cfg, store) == (42.5,)
    assert teacher_scales(replace(cfg, teacher_temperature=0.02), store) == (50.0,)
    assert teacher_scales(LossConfig(), store) is None  # DSMD's terms read no distribution
    none = SimpleNamespace(path=store.path, teacher={"name": "t", "logit_scale": None})
    with pytest.raises(InputError, match=r"features.zarr: teacher .* records no logit scale.*teacher_temperature"):
        teacher_scales(cfg, none)
    with pytest.raises(InputError, match="logit_scale must be a finite number > 0"):
        teacher_scales(cfg, SimpleNamespace(path=store.path, teacher={"logit_scale": -1.0}))


def test_a_store_without_a_logit_scale_is_one_clear_line(work):  # noqa: F811
    with pytest.raises(InputError, match="records no logit scale"):
        run(work, "t_noscale", tiny_cfg(work[0], epochs=1, loss={"response": 1.0}))


def test_checkpoints_from_before_the_knowledge_keys_still_compare_equal():
    now = to_dict(DistillConfig())
    before = {k: v for k, v in now.items() if k != "batch_neighbours"}
    for section in ("loss", "baseline_loss"):  # written before the keys existed
        before[section] = {k: v for k, v in now[section].items() if k not in KNOWLEDGE_LOSS_KEYS}
    assert comparable(before) == comparable(now)
    changed = {**now, "loss": {**now["loss"], "response": 1.0}}
    assert comparable(before) != comparable(changed)
    assert comparable(before) != comparable({**now, "batch_neighbours": 2})


# -- candidate-aware batches ---------------------------------------------------------------------------------
def mined_neighbours(store, split: str, k: int, cross_encoder: bool = False):
    """A stand-in for the mined store (pipeline/store/mined.py's MinedStore, the parts distill reads): each
    caption's k nearest images and each image's k nearest captions by the stored teacher rows, own image / own
    captions excluded (brute force), and made-up cross-encoder logits (5 x the teacher's cosine + noise)."""
    sp = store.split(split)
    t, v = np.asarray(sp.text_emb, np.float64), np.asarray(sp.image_emb, np.float64)
    ti = np.asarray(sp.text_image, np.int64)
    scores = t @ v.T
    own = ti[:, None] == np.arange(len(v))[None, :]  # [M, N]
    t2i = np.argsort(np.where(own, -np.inf, scores), axis=1, kind="stable")[:, ::-1][:, :k]
    i2t = np.argsort(np.where(own.T, -np.inf, scores.T), axis=1, kind="stable")[:, ::-1][:, :k]
    rng = np.random.default_rng(7)
    ce_t2i = ce_i2t = None
    if cross_encoder:
        ce_t2i = 5 * np.concatenate([scores[np.arange(len(t)), ti][:, None], np.take_along_axis(scores, t2i, 1)], 1)
        ce_t2i = (ce_t2i + rng.normal(size=ce_t2i.shape)).astype(np.float32)
        ce_i2t = (5 * np.take_along_axis(scores.T, i2t, 1) + rng.normal(size=i2t.shape)).astype(np.float32)
    directions = SimpleNamespace(
        text_to_image=SimpleNamespace(rows=t2i.astype(np.int32), ce_scores=ce_t2i),
        image_to_text=SimpleNamespace(rows=i2t.astype(np.int32), ce_scores=ce_i2t),
    )
    return SimpleNamespace(path=Path("mined.zarr"), k=k, split=lambda name: directions)


def test_kill_and_resume_with_candidate_aware_batches_is_bitwise_exact(work):  # noqa: F811
    """The batches of (epoch, step) come from the teacher's neighbours, and still from the position alone:
    killed after step 9 and resumed, the same weights and logs bit for bit; a uniform sampler ends elsewhere."""
    root, _, store, _ = work
    mined = mined_neighbours(store, "train", 4)
    cfg = tiny_cfg(
        root, epochs=2, checkpoint_every_steps=4, grad_accum=2, batch_size=4, batch_neighbours=2, keep_checkpoints=True
    )

    def go(out, c, **kw):
        return run(work, out, c, mined=mined, **kw)

    full = go("c_full", cfg)
    assert not go("c_killed", cfg, stop_after_steps=9).completed
    assert go("c_killed", replace(cfg, num_workers=2)).global_step == full.global_step == 12
    a, b = (torch.load(root / f"checkpoints/c_{n}/last.pt") for n in ("full", "killed"))
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert a["meta"]["mined_k"] == 4
    uniform = go("c_uniform", replace(cfg, batch_neighbours=0))
    c = torch.load(root / "checkpoints/c_uniform/last.pt")
    assert uniform.completed and not all(torch.equal(v, c["model"][k]) for k, v in a["model"].items())
    assert c["meta"]["mined_k"] is None  # given but not read: a resume without it is the same run


def test_candidate_aware_batches_need_the_mined_store_and_spare_the_baseline(work):  # noqa: F811
    root, _, store, _ = work
    cfg = tiny_cfg(root, epochs=1, batch_neighbours=2)
    with pytest.raises(InputError, match="batch_neighbours=2: candidate-aware batches need .* `kdpipe mine`"):
        run(work, "c_none", cfg)
    with pytest.raises(InputError, match=r"batch_neighbours=5: mined.zarr holds 4 mined images per caption"):
        run(work, "c_k", replace(cfg, batch_neighbours=5), mined=mined_neighbours(store, "train", 4))
    # the baseline has no teacher: its batches stay uniform, equal to a baseline without the setting
    run(work, "c_base0", replace(cfg, batch_neighbours=0), baseline=True)
    run(work, "c_base1", cfg, baseline=True)
    assert (root / "c_base0/model.safetensors").read_bytes() == (root / "c_base1/model.safetensors").read_bytes()


def test_a_checkpoint_on_neighbours_mined_with_another_k_is_not_resumed(work, caplog):  # noqa: F811
    """Re-mined with another K, the same config reads other neighbours: the run starts over, saying why."""
    store = work[2]
    cfg = tiny_cfg(work[0], epochs=2, checkpoint_every_steps=2, batch_neighbours=2)
    run(work, "c_k4", cfg, mined=mined_neighbours(store, "train", 4), stop_after_steps=2)
    with caplog.at_level("INFO", logger="pipeline.distill.run"):
        again = run(work, "c_k4", cfg, mined=mined_neighbours(store, "train", 5), stop_after_steps=3)
    assert "(inputs mined_k: 4 then, 5 now); starting over" in caplog.text
    assert again.global_step == 3 and "resuming" not in caplog.text


# -- the candidate lists of the dcd and mcad terms -------------------------------------------------------------
MINED_LOSS = {"queue_size": 16, "dcd": 1.0, "mcad_kl": 1.0, "mcad_feature": 1.0, "teacher_temperature": 0.1}


@pytest.mark.parametrize("placement", ["device", "memmap"])
def test_candidate_rows_and_scores_are_looked_up_by_index(work, placement):  # noqa: F811
    """Each pair's candidates are the stored teacher rows of its mined rows; the scores line up with them."""
    from pipeline.distill.data import BatchLoader, TeacherBank, tokenize_all
    from pipeline.distill.knowledge import MinedLists
    from pipeline.distill.sampler import EpochSampler
    from pipeline.towers.student import build_student

    root, index, store, cache = work
    st, view = store.split("train"), index.split("train")
    mined = mined_neighbours(store, "train", 3, cross_encoder=True)
    split = mined.split("train")
    bank = TeacherBank(st.image_emb, st.text_emb, st.text_image, torch.device("cpu"), placement=placement)
    tokens = tokenize_all(build_student(tiny_cfg(root).student, 16).tokenize, view.caption_text)
    sampler = EpochSampler(view.n_captions, 8, seed=1)
    lists = MinedLists(split, bank, cross_encoder=True)
    loader = BatchLoader(cache.split("train"), bank, tokens, sampler, queue_size=16, use_queue=True, mined=lists)
    t2i, i2t = split.text_to_image, split.image_to_text
    for hb in loader.iterate(1, 0, sampler.steps_per_epoch):
        k = loader.to_device(hb).knowledge
        for j, r in enumerate(hb.global_rows.tolist()):
            img = int(st.text_image[r])
            assert torch.equal(k.cand_v[j].float(), torch.from_numpy(np.asarray(st.image_emb[t2i.rows[r]], np.float32)))
            assert torch.equal(
                k.cand_t[j].float(), torch.from_numpy(np.asarray(st.text_emb[i2t.rows[img]], np.float32))
            )
            assert k.ce_t2i[j].tolist() == t2i.ce_scores[r].tolist()
            assert k.ce_i2t[j].tolist() == [float(t2i.ce_scores[r, 0]), *i2t.ce_scores[img].tolist()]
        loader.release(hb)


def test_kill_and_resume_with_mined_candidate_lists_is_bitwise_exact(work):  # noqa: F811
    """dcd, mcad_kl and mcad_feature over the mined lists with cross-encoder scores, on candidate-aware batches:
    killed after step 9 and resumed, the same weights and logs bit for bit; the scores are really read (other
    scores end elsewhere)."""
    root, _, store, _ = work
    mined = mined_neighbours(store, "train", 3, cross_encoder=True)
    cfg = tiny_cfg(
        root,
        epochs=2,
        checkpoint_every_steps=4,
        grad_accum=2,
        batch_size=4,
        batch_neighbours=1,
        keep_checkpoints=True,
        loss=MINED_LOSS,
    )

    def go(out, c, m=mined, **kw):
        return run(work, out, c, mined=m, **kw)

    full = go("m_full", cfg)
    assert not go("m_killed", cfg, stop_after_steps=9).completed
    assert go("m_killed", replace(cfg, num_workers=2)).global_step == full.global_step == 12
    a, b = (torch.load(root / f"checkpoints/m_{n}/last.pt") for n in ("full", "killed"))
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert a["balancer"] == b["balancer"]
    header = (root / "m_full/train_log.csv").read_text().splitlines()[0].split(",")
    assert {"dcd_loss", "mcad_kl_loss", "mcad_feature_loss"} <= set(header)
    other = mined_neighbours(store, "train", 3, cross_encoder=True)
    other.split("train").text_to_image.ce_scores[:] *= -1  # the cross-encoder's judgment reversed
    go("m_other", cfg, m=other)
    c = torch.load(root / "checkpoints/m_other/last.pt")
    assert not all(torch.equal(v, c["model"][k]) for k, v in a["model"].items())


def test_the_candidate_list_terms_need_their_inputs(work):  # noqa: F811
    root, _, store, _ = work
    cfg = tiny_cfg(root, epochs=1, loss=MINED_LOSS)
    with pytest.raises(InputError, match="dcd, mcad_feature, mcad_kl need the teacher's mined candidates"):
        run(work, "m_none", cfg)
    with pytest.raises(InputError, match="mined without a cross-encoder.*mcad_ce_weight=0.5"):
        run(work, "m_noce", cfg, mined=mined_neighbours(store, "train", 3))
    # without the cross-encoder's weight, its scores are not needed
    ok = replace(cfg, loss=replace(cfg.loss, mcad_ce_weight=0.0))
    result = run(work, "m_noce", ok, mined=mined_neighbours(store, "train", 3))
    assert result.completed


def test_which_runs_read_the_mined_store():
    from pipeline.distill.config import reads_mined

    dsmd = DistillConfig()
    assert not reads_mined(dsmd, baseline=False)
    assert reads_mined(replace(dsmd, batch_neighbours=2), baseline=False)
    assert not reads_mined(replace(dsmd, batch_neighbours=2), baseline=True)  # no teacher: uniform batches
    for term in ("dcd", "mcad_kl", "mcad_feature"):
        cfg = replace(dsmd, loss=LossConfig(**{term: 1.0, "teacher_temperature": 0.1}))
        assert reads_mined(cfg, baseline=False) and not reads_mined(cfg, baseline=True)


def test_the_command_opens_the_mined_store_when_a_run_reads_it(tmp_path):
    """`kdpipe distill` opens <workdir>/mined.zarr for a run that reads it and trains on it; a missing or stale
    one is one line naming it and the command to run; a run that does not read it never opens it."""
    from test_train import cli, make_workdir

    from pipeline.mine.run import MineConfig, run_mine

    root = tmp_path / "w"
    make_workdir(root)
    neighbours = ("--set", "distill.batch_neighbours=2")
    missing = cli(root, *neighbours)
    assert missing.exit_code == 2 and len(missing.output.strip().splitlines()) == 1, missing.output
    assert "mined.zarr: no mined store here" in missing.output and "`kdpipe mine`" in missing.output
    assert cli(root, *neighbours, "--baseline").exit_code == 0  # the baseline reads no teacher: no mined store
    run_mine(root / "features.zarr", MineConfig(k=3, chunk_rows=8), root / "mined.zarr")
    ok = cli(root, *neighbours, "--set", "distill.keep_checkpoints=true")
    assert ok.exit_code == 0, ok.output
    assert torch.load(root / "checkpoints/student/last.pt")["meta"]["mined_k"] == 3
    make_workdir(root, seed=1)  # re-extracted: other teacher rows (and another index) than the mined ones
    stale = cli(root, *neighbours, "--no-resume")
    assert stale.exit_code == 2 and len(stale.output.strip().splitlines()) == 1, stale.output
    assert "mined from other teacher rows" in stale.output and "rerun `kdpipe mine`" in stale.output
