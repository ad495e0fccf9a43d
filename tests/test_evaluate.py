"""The evaluate stage: `--features` writes the architecture's schema, bad stores end in one line and exit 2,
and the full stage ranks teacher and student over the same gallery (skipped images included) with the same
numbers as the metrics module, plus latency, parameters and plots."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from deploy_helpers import tiny_student_config
from extract_helpers import TinyTeacher
from typer.testing import CliRunner

from pipeline.data.index import DatasetIndex
from pipeline.environment import numerics_environment
from pipeline.errors import ConfigError, InputError
from pipeline.evaluate.retrieval import RetrievalRanks, recall_metrics, retrieval_ranks
from pipeline.evaluate.run import (
    METRIC_KEYS,
    EvaluateConfig,
    align_gallery,
    count_parameters,
    encode_gallery,
    run_evaluate,
)
from pipeline.evaluate.summary import with_average
from pipeline.paths import ArtifactPaths
from pipeline.store.features import open_store
from pipeline.store.features_writer import StoreWriter, write_store
from pipeline.store.image_cache import open_image_cache, write_image_cache
from stages.cli import app

MODEL_KEYS = [*METRIC_KEYS, "i2t_meanr", "t2i_meanr"]
WORDS = "a the dog cat man woman red blue runs sits on in with photo of".split()  # the tokenizer_dir vocabulary
D = 16


def store_splits(rng: np.random.Generator, sizes: dict[str, int]) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for name, n in sizes.items():
        ti = np.repeat(np.arange(n), rng.choice([1, 5, 7], size=n)).astype(np.int32)
        img = rng.standard_normal((n, D)).astype(np.float32)
        out[name] = {
            "image_emb": img,
            "text_emb": img[ti] + 0.8 * rng.standard_normal((len(ti), D)),
            "text_image": ti,
            "image_id": [f"{name}_{i}.jpg" for i in range(n)],
        }
    return out


@pytest.fixture()
def store(tmp_path) -> tuple[Path, dict]:
    splits = store_splits(np.random.default_rng(0), {"train": 20, "test": 13})
    path = tmp_path / "features.zarr"
    write_store(path, splits, teacher={"name": "tiny"}, dataset={"name": "toy", "fingerprint": "f" * 64})
    return path, splits


def run_cli(*args: str):
    return CliRunner().invoke(app, ["evaluate", *args])


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# -- kdpipe evaluate --features ---------------------------------------------------------------------------
def test_features_cli_writes_the_schema_exactly(store, tmp_path, monkeypatch):
    path, _ = store
    monkeypatch.chdir(tmp_path)  # no params.yaml here: none is needed
    out = tmp_path / "m.json"
    r = run_cli("--features", str(path), "--out", str(out))
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert list(doc)[:5] == ["dataset", "split", "n_images", "n_captions", "teacher"]
    assert set(doc) <= {"dataset", "split", "n_images", "n_captions", "teacher", "teacher_name", "tie_rule", "gallery"}
    assert list(doc["teacher"]) == MODEL_KEYS
    s = open_store(path).split("test")
    assert (doc["dataset"], doc["split"], doc["n_images"], doc["n_captions"]) == ("toy", "test", 13, s.n_captions)
    want = with_average(recall_metrics(retrieval_ranks(s.image_emb, s.text_emb, s.text_image)))
    assert doc["teacher"] == pytest.approx(want, abs=0)
    assert doc["teacher"]["average_score"] == doc["teacher"]["rsum"] / 6  # BEiT-3's figure
    assert all(0 <= doc["teacher"][f"{d}_r{k}"] <= 100 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert doc["teacher"]["rsum"] == pytest.approx(sum(doc["teacher"][k] for k in METRIC_KEYS[:6]))
    assert "RSUM" in r.output and str(out) in r.output

    r = run_cli("--features", str(path), "--split", "train", "--set", "evaluate.backend=torch")  # JSON to stdout
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["split"] == "train" and doc["n_images"] == 20


def test_features_cli_bad_stores_exit_2_with_one_line(store, tmp_path, monkeypatch):
    path, splits = store
    monkeypatch.chdir(tmp_path)
    assert "no split 'val'" in one_error_line(run_cli("--features", str(path), "--split", "val"))
    assert "not a feature store" in one_error_line(run_cli("--features", str(tmp_path)))
    assert "directory not found" in one_error_line(run_cli("--features", str(tmp_path / "nope")))
    StoreWriter(path).set_attrs(complete=False)
    assert "incomplete" in one_error_line(run_cli("--features", str(path)))
    StoreWriter(path).set_attrs(complete=True)
    import zarr

    ti = zarr.open_array(str(path / "test" / "text_image"), mode="r+")
    ti[3] = 13  # one past the last image
    assert "points outside" in one_error_line(run_cli("--features", str(path)))
    ti[3] = 12
    ti[:] = np.minimum(ti[:], 11)  # image 12 keeps no caption
    assert "has no caption" in one_error_line(run_cli("--features", str(path)))
    assert "evaluate.backend" in one_error_line(run_cli("--features", str(path), "--set", "evaluate.backend=annoy"))


# -- the full stage ----------------------------------------------------------------------------------------
def save_tiny_student(directory: Path, tokenizer_dir: Path, seed: int) -> None:
    from pipeline.towers.student import build_student, save_student

    torch.manual_seed(seed)
    save_student(build_student(tiny_student_config(tokenizer_dir, image_size=16), D), directory)


class ModuleTeacher(TinyTeacher):
    """TinyTeacher holding its weights in an nn.Module (so that its parameters can be counted)."""

    def __init__(self, **kw) -> None:
        super().__init__(dim=D, **kw)
        self.model = torch.nn.Linear(48, D, bias=False)
        with torch.no_grad():
            self.model.weight.copy_(self.image_proj.T)


@pytest.fixture()
def workdir(tmp_path, tokenizer_dir) -> ArtifactPaths:
    """index (train 6 + test 11 images, 1-7 captions each), image cache, a TinyTeacher store, two students."""
    rng = np.random.default_rng(1)
    images, captions = [], []
    for split, n in (("train", 6), ("test", 11)):
        for i in range(n):
            row = len(images)
            images.append((f"{'ab'[i % 2]}/{split}{i}.jpg", f"{split}{i}.jpg", split))  # two styles, a/ and b/
            for _ in range(int(rng.choice([1, 3, 7]))):
                captions.append((" ".join(rng.choice(WORDS, size=int(rng.integers(2, 8)))), row))
    index = DatasetIndex.from_lists("toy", tmp_path / "data", images, captions)
    paths = ArtifactPaths(tmp_path / "work")
    index.save(paths.index_dir)
    pixels = {s: rng.integers(0, 256, (index.split(s).n_images, 16, 16, 3), dtype=np.uint8) for s in index.splits}
    write_image_cache(paths.images, pixels, fingerprint=index.fingerprint)
    teacher = TinyTeacher(dim=D)
    from PIL import Image

    splits = {}
    for s in index.splits:
        v = index.split(s)
        splits[s] = {
            "image_emb": teacher.encode_images([Image.fromarray(x) for x in pixels[s]]).numpy(),
            "text_emb": teacher.encode_texts(list(v.caption_text)).numpy(),
            "text_image": v.text_image,
            "image_id": list(v.image_id),
        }
    write_store(
        paths.features, splits, teacher=teacher.identity(), dataset={"name": "toy", "fingerprint": index.fingerprint}
    )
    save_tiny_student(paths.workdir / "student", tokenizer_dir, seed=0)
    save_tiny_student(paths.workdir / "baseline", tokenizer_dir, seed=1)
    return paths


def expected_student_metrics(paths: ArtifactPaths, name: str, rows: np.ndarray | None = None) -> dict:
    """The student's metrics computed by hand: its own encoders, then the metrics module."""
    from pipeline.store.image_cache import open_image_cache
    from pipeline.towers.student import load_student

    model = load_student(paths.workdir / name)
    s = open_store(paths.features).split("test")
    v = DatasetIndex.load(paths.index_dir).split("test")
    imgs = open_image_cache(paths.images).split("test")
    imgs = np.array(imgs if rows is None else imgs[rows])
    keep = np.isin(v.caption_rows, v.caption_rows) if rows is None else np.isin(v.text_image, rows)
    with torch.inference_mode():
        img = model.encode_images(torch.from_numpy(imgs))
        txt = model.encode_texts(list(v.caption_text[keep]))
    return with_average(recall_metrics(retrieval_ranks(img, txt, s.text_image)))


def test_run_evaluate_teacher_and_students(workdir):
    paths = workdir
    cfg = EvaluateConfig(device="cpu", batch_size=4, latency_batch_size=4, latency_batches=2, chunk_size=5)
    out = run_evaluate(paths, cfg, teacher_factory=lambda device, dtype: ModuleTeacher())
    doc = json.loads((paths.workdir / "metrics_detail.json").read_text())  # the whole record
    assert doc == out.document
    # metrics.json: one row of `dvc metrics show`, each model's RSUM
    assert (
        json.loads(paths.metrics.read_text())
        == out.headline
        == {
            "dataset": "toy",
            "split": "test",
            **{m: {"rsum": doc[m]["rsum"]} for m in ("teacher", "student", "baseline")},
        }
    )
    assert list(doc) == [
        *("dataset", "split", "n_images", "n_captions", "teacher", "student", "baseline"),
        *("chance", "params", "latency"),
    ]
    s = open_store(paths.features).split("test")
    assert (doc["dataset"], doc["split"], doc["n_images"], doc["n_captions"]) == ("toy", "test", 11, s.n_captions)
    assert list(doc["teacher"]) == [*MODEL_KEYS, "rsum_vs_baseline", "vs_baseline"]
    assert list(doc["student"]) == [
        *(*MODEL_KEYS, "teacher_cos_image", "teacher_cos_text", "rsum_vs_baseline", "vs_baseline")
    ]
    assert list(doc["baseline"]) == [*MODEL_KEYS, "teacher_cos_image", "teacher_cos_text"]  # the reference
    for m in ("student", "baseline"):  # students also report their agreement with the teacher
        assert all(-1.0 <= doc[m][k] <= 1.0 for k in ("teacher_cos_image", "teacher_cos_text"))
    teacher = {k: v for k, v in doc["teacher"].items() if not k.endswith("vs_baseline")}
    assert teacher == with_average(recall_metrics(retrieval_ranks(s.image_emb, s.text_emb, s.text_image)))
    for m in ("student", "baseline"):
        recalls = {k: v for k, v in doc[m].items() if not k.startswith(("teacher_cos", "rsum_vs_", "vs_"))}
        assert recalls == pytest.approx(expected_student_metrics(paths, m), abs=1e-9)
    assert doc["student"] != doc["baseline"]  # two different models
    # each model's difference to the baseline: the point estimate is the plain difference
    iv = doc["student"]["rsum_vs_baseline"]
    assert doc["student"]["vs_baseline"]["rsum"] == iv and set(doc["student"]["vs_baseline"]) == {*MODEL_KEYS[:7]}
    assert iv["diff"] == pytest.approx(doc["student"]["rsum"] - doc["baseline"]["rsum"], abs=1e-9)
    assert iv["low"] <= iv["diff"] <= iv["high"]
    assert doc["chance"]["t2i_r1"] == pytest.approx(100 / 11) and doc["chance"]["t2i_r10"] == pytest.approx(1000 / 11)
    # latency and parameters, same device for all; how they were measured is in run_info.json
    lat = doc["latency"]
    assert lat["teacher"] is not None and set(lat) == {"teacher", "student", "baseline", "speedup"}
    for m in ("teacher", "student", "baseline"):
        assert lat[m]["image_s"] > 0 and lat[m]["caption_s"] > 0
    assert lat["speedup"]["student"]["image_s"] == pytest.approx(lat["teacher"]["image_s"] / lat["student"]["image_s"])
    from pipeline.towers.student import load_student

    assert doc["params"] == {
        "teacher": 48 * D,
        "student": count_parameters(load_student(paths.workdir / "student")),
        "baseline": count_parameters(load_student(paths.workdir / "baseline")),
    }
    info = json.loads(paths.run_info.read_text())
    assert info["teacher_name"] == "tiny" and info["tie_rule"] == "pessimistic" and info["gallery"] == "split"
    assert info["environment"] == numerics_environment("cpu")  # where these numbers were computed
    assert info["latency_method"]["device"] == "cpu" and "teacher_reason" not in info["latency_method"]
    assert info["runs"] == {"teacher": ["teacher"], "student": ["student"], "baseline": ["baseline"]}
    assert set(info["timing_s"]) == {"teacher", "student", "baseline"}
    # plots, table, ranks
    assert sorted(p.name for p in paths.plots.iterdir()) == ["recall_at_k.png", "recall_i2t.csv", "recall_t2i.csv"]
    rows = (paths.plots / "recall_t2i.csv").read_text().splitlines()
    assert rows[0] == "k,teacher,student,baseline,chance" and len(rows) == 51 and rows[10].startswith("10,")
    assert float(rows[10].split(",")[1]) == pytest.approx(doc["teacher"]["t2i_r10"], abs=1e-4)
    assert float(rows[10].split(",")[4]) == pytest.approx(doc["chance"]["t2i_r10"], abs=1e-4)
    ranks = np.load(paths.workdir / "ranks.npz")
    assert ranks["student_i2t"].shape == (11,) and ranks["teacher_t2i"].shape == (s.n_captions,)
    assert list(ranks["image_id"]) == list(s.image_id) and np.array_equal(ranks["text_image"], s.text_image)
    assert recall_metrics(RetrievalRanks(ranks["student_i2t"], ranks["student_t2i"]))["rsum"] == doc["student"]["rsum"]
    table = (paths.workdir / "metrics.md").read_text()
    assert table == out.table and "| teacher |" in table and "| student |" in table and "| chance |" in table
    assert f"| {iv['diff']:+.1f} ({iv['low']:+.1f} .. {iv['high']:+.1f}) |" in table and "speed-up" in table
    assert "RSUM" in out.summary()


def test_several_seeds_and_per_style_galleries(workdir):
    """Models given as runs (one with two seeds), galleries by directory: seed means, per-seed figures, the
    interval on seed-averaged redraws, per-group and pooled metrics against a per-group naive ranking."""
    from pipeline.evaluate.bootstrap import paired_bootstrap, resample_counts
    from pipeline.evaluate.galleries import chance_metrics

    paths = workdir
    cfg = EvaluateConfig(device="cpu", batch_size=4, latency=False, gallery="by_directory", bootstrap_resamples=300)
    out = run_evaluate(paths, cfg, runs={"two": ["student", "baseline"], "one": ["baseline"]}, reference="one")
    doc = detail = out.document
    s = open_store(paths.features).split("test")
    ti = np.asarray(s.text_image)
    groups = {g: np.flatnonzero([i.startswith(g + "/") for i in s.image_id]) for g in ("a", "b")}
    # teacher: each group ranked alone (naive: retrieval_ranks on the group's rows), pooled = all queries
    i2t, t2i = np.zeros(11, dtype=np.int64), np.zeros(len(ti), dtype=np.int64)
    for g, rows in groups.items():
        caps = np.flatnonzero(np.isin(ti, rows))
        local = np.searchsorted(rows, ti[caps])
        r = retrieval_ranks(np.asarray(s.image_emb)[rows], np.asarray(s.text_emb)[caps], local)
        i2t[rows], t2i[caps] = r.i2t, r.t2i
        group = with_average(recall_metrics(r))
        assert detail["teacher"]["groups"][g] == {k: group[k] for k in detail["teacher"]["groups"][g]}
    pooled = with_average(recall_metrics(RetrievalRanks(i2t, t2i)))
    assert {k: doc["teacher"][k] for k in pooled} == pooled
    assert doc["chance"]["rsum"] == chance_metrics(ti, groups)["rsum"]
    # seeds: the mean, the spread, each seed as evaluated alone
    two, seeds = doc["two"], detail["two"]["seeds"]
    assert list(seeds) == ["student", "baseline"] and "seeds" not in out.headline["two"]
    assert two["rsum"] == pytest.approx(np.mean([seeds[r]["rsum"] for r in ("student", "baseline")]))
    assert two["rsum_sd"] == pytest.approx(np.std([seeds[r]["rsum"] for r in ("student", "baseline")], ddof=1))
    assert seeds["baseline"]["rsum"] == doc["one"]["rsum"]
    # the interval: seed-averaged ranks of `two` vs `one` on the redraws every model shares
    ranks = np.load(paths.workdir / "ranks.npz")
    runs = {n: RetrievalRanks(ranks[f"{n}_i2t"], ranks[f"{n}_t2i"]) for n in ("student", "baseline")}
    counts = resample_counts(11, 300, 0)
    want = paired_bootstrap([runs["student"], runs["baseline"]], [runs["baseline"]], ti, counts=counts)
    assert two["rsum_vs_one"] == want["rsum"].as_dict() == detail["two"]["vs_one"]["rsum"]
    assert detail["two"]["vs_one"]["t2i_r1"] == want["t2i_r1"].as_dict()
    assert "rsum_vs_one" not in doc["one"] and out.run_info["groups"] == {"a": 6, "b": 5}
    header = (paths.plots / "recall_t2i.csv").read_text().splitlines()[0]
    assert header == "k,teacher,two,one,chance"  # evaluation order
    table = (paths.workdir / "metrics.md").read_text()
    assert "| RSUM per gallery | a | b |" in table and "| two |" in table and "| 2 (" in table


def test_plot_models_order_the_curves_and_must_name_every_model(workdir):
    cfg = EvaluateConfig(device="cpu", batch_size=4, latency=False, plot_models=("chance", "baseline", "student"))
    with pytest.raises(ConfigError, match=r"plot_models \['chance', 'baseline', 'student'\] must list exactly"):
        run_evaluate(workdir, cfg)
    run_evaluate(workdir, replace(cfg, plot_models=("chance", "baseline", "student", "teacher")))
    assert (workdir.plots / "recall_i2t.csv").read_text().startswith("k,chance,baseline,student,teacher\n")


def test_teacher_latency_is_null_with_a_reason(workdir):
    paths = workdir
    cfg = EvaluateConfig(device="cpu", batch_size=4, latency_batch_size=4, latency_batches=1, models=("student",))

    def unavailable(device, dtype):
        raise InputError("extract.teacher.beit3.checkpoint: not set")

    out = run_evaluate(paths, cfg, teacher_factory=unavailable)
    doc = out.document
    assert "baseline" not in doc and doc["latency"]["teacher"] is None and "speedup" not in doc["latency"]
    assert "not available: extract.teacher.beit3.checkpoint" in out.run_info["latency_method"]["teacher_reason"]
    assert doc["params"]["teacher"] is None and doc["latency"]["student"]["image_s"] > 0
    assert "rsum_vs_baseline" not in doc["student"] and out.run_info["bootstrap"]["references"] == []
    other = run_evaluate(paths, cfg, teacher_factory=lambda d, t: ModuleTeacher(seed=5))
    assert other.document["latency"]["teacher"] is None
    assert "not the one that computed" in other.run_info["latency_method"]["teacher_reason"]
    none = run_evaluate(paths, replace(cfg, latency=False), teacher_factory=None).document
    assert none["latency"] is None


def test_students_skip_the_images_the_store_skipped(workdir):
    """A store written with on_bad_image=skip lacks images 2 and 7 of the split (and their captions): the
    students are ranked over the same 9 images."""
    paths = workdir
    s = open_store(paths.features).split("test")
    keep = np.array([i for i in range(11) if i not in (2, 7)])
    kept_caps = np.flatnonzero(np.isin(s.text_image, keep))
    remap = np.full(11, -1)
    remap[keep] = np.arange(len(keep))
    index = DatasetIndex.load(paths.index_dir)
    train = open_store(paths.features).split("train")
    write_store(
        paths.features,
        {
            "train": {
                "image_emb": np.array(train.image_emb),
                "text_emb": np.array(train.text_emb),
                "text_image": train.text_image,
                "image_id": list(train.image_id),
            },
            "test": {
                "image_emb": np.array(s.image_emb)[keep],
                "text_emb": np.array(s.text_emb)[kept_caps],
                "text_image": remap[s.text_image[kept_caps]].astype(np.int32),
                "image_id": list(s.image_id[keep]),
            },
        },
        teacher=TinyTeacher(dim=D).identity(),
        dataset={"name": "toy", "fingerprint": index.fingerprint},
    )
    doc = run_evaluate(paths, EvaluateConfig(device="cpu", batch_size=4, latency=False, models=("student",))).document
    assert doc["n_images"] == 9 and doc["n_captions"] == len(kept_caps)
    recalls = {k: v for k, v in doc["student"].items() if not k.startswith("teacher_cos")}
    assert recalls == pytest.approx(expected_student_metrics(paths, "student", rows=keep), abs=1e-9)


def test_align_gallery_refuses_a_store_from_other_rows(workdir):
    paths = workdir
    v = DatasetIndex.load(paths.index_dir).split("test")
    s = open_store(paths.features).split("test")
    shuffled = replace(s, image_id=s.image_id[::-1].copy())
    with pytest.raises(InputError, match="not a subset of the index split in index order"):
        align_gallery(v, shuffled, "store")
    fewer = replace(s, text_emb=s.text_emb[:-1], text_image=s.text_image[:-1])
    with pytest.raises(InputError, match="does not line up"):
        align_gallery(v, fewer, "store")


def test_encode_gallery_keeps_caption_order(workdir):
    """Captions are encoded in length order; each embedding must land on its own row."""
    from pipeline.store.image_cache import open_image_cache
    from pipeline.towers.student import load_student

    paths = workdir
    model = load_student(paths.workdir / "student")
    v = DatasetIndex.load(paths.index_dir).split("test")
    g = align_gallery(v, open_store(paths.features).split("test"), "store")
    _, txt = encode_gallery(model, open_image_cache(paths.images).split("test"), g, 3, "student")
    with torch.inference_mode():
        for j in (0, 5, len(g.captions) - 1):
            torch.testing.assert_close(txt[j], model.encode_texts([g.captions[j]])[0], atol=1e-5, rtol=0)


def test_students_sharing_a_frozen_text_tower_run_it_once_with_the_same_result(
    workdir, tmp_path, tokenizer_dir, monkeypatch
):
    """Two students over one frozen tower referenced by digest (the demo's nine share MiniLM): the second
    projects the first's caption features, batch by batch, and gets exactly what encoding alone gives it."""
    from transformers import BertConfig, BertModel

    from pipeline.store.image_cache import open_image_cache
    from pipeline.towers.student import DualEncoderStudent, build_student, load_student, save_student
    from pipeline.towers.text import TextTowerConfig

    tower = tmp_path / "bert"
    torch.manual_seed(3)
    bert_cfg = BertConfig(
        vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertModel(bert_cfg, add_pooling_layer=False).save_pretrained(tower)
    for f in tokenizer_dir.iterdir():
        (tower / f.name).write_bytes(f.read_bytes())
    text = TextTowerConfig(path=tower, pooling="mean", freeze=True, max_tokens=12)
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_student(build_student(replace(tiny_student_config(tokenizer_dir), text=text), D), tmp_path / f"s{seed}")
    images = open_image_cache(workdir.images).split("test")
    g = align_gallery(
        DatasetIndex.load(workdir.index_dir).split("test"), open_store(workdir.features).split("test"), "store"
    )
    alone = [encode_gallery(load_student(tmp_path / f"s{i}"), images, g, 3, "alone")[1] for i in (0, 1)]
    calls = []
    original = DualEncoderStudent.text_features
    monkeypatch.setattr(DualEncoderStudent, "text_features", lambda m, t: calls.append(1) or original(m, t))
    shared: dict = {}
    together = [encode_gallery(load_student(tmp_path / f"s{i}"), images, g, 3, "shared", shared)[1] for i in (0, 1)]
    assert len(calls) == -(-len(g.captions) // 3)  # every batch once, for the first student only
    assert torch.equal(together[0], alone[0]) and torch.equal(together[1], alone[1])
    assert not torch.equal(together[0], together[1])  # each its own projection


def test_stage_cli_full_run(workdir, tmp_path):
    paths = workdir
    params = tmp_path / "params.yaml"
    section = {"device": "cpu", "batch_size": 4, "latency_batch_size": 4, "latency_batches": 1}
    params.write_text(
        yaml.safe_dump({"workdir": str(paths.workdir), "evaluate": section, "extract": {"teacher": {"kind": "beit3"}}})
    )
    r = CliRunner().invoke(app, ["evaluate", "--params", str(params)])
    assert r.exit_code == 0, r.output
    doc = json.loads((paths.workdir / "metrics_detail.json").read_text())
    assert set(doc) >= {"teacher", "student", "baseline", "latency", "params"}
    assert doc["latency"]["teacher"] is None  # no BEiT-3 checkpoint here
    assert "teacher_reason" in json.loads(paths.run_info.read_text())["latency_method"]
    assert "| student |" in r.stdout and "evaluate: test split" in r.stdout
    assert (paths.workdir / "config" / "evaluate.yaml").is_file()
    r = CliRunner().invoke(app, ["evaluate", "--params", str(params), "--set", "evaluate.models=[baseline]"])
    assert "evaluate: models must start with 'student'" in one_error_line(r)
    (paths.workdir / "student" / "student_config.json").unlink()
    assert "no student here" in one_error_line(CliRunner().invoke(app, ["evaluate", "--params", str(params)]))


def test_config_rejects_bad_values():
    from pipeline.config import from_dict

    with pytest.raises(ConfigError, match="evaluate.chunk_size"):
        from_dict(EvaluateConfig, {"chunk_size": "big"}, "evaluate")
    with pytest.raises(ConfigError, match="curve_max_k must be at least 10"):
        from_dict(EvaluateConfig, {"curve_max_k": 5}, "evaluate")
    with pytest.raises(ConfigError, match="'teacher' is not a usable"):
        from_dict(EvaluateConfig, {"models": ["student", "teacher"]}, "evaluate")


def test_teacher_agreement_is_the_mean_cosine():
    from pipeline.evaluate.retrieval import teacher_agreement

    rng = np.random.default_rng(0)
    t_img = rng.standard_normal((4, 8)).astype(np.float32)
    t_img /= np.linalg.norm(t_img, axis=1, keepdims=True)
    t_txt = rng.standard_normal((6, 8)).astype(np.float32)
    t_txt /= np.linalg.norm(t_txt, axis=1, keepdims=True)
    same = teacher_agreement(torch.from_numpy(t_img), torch.from_numpy(t_txt), t_img.astype(np.float16), t_txt)
    assert same["teacher_cos_image"] == pytest.approx(1.0, abs=1e-3)
    assert same["teacher_cos_text"] == pytest.approx(1.0, abs=1e-4)
    flipped = teacher_agreement(-torch.from_numpy(t_img), torch.from_numpy(t_txt[::-1].copy()), t_img, t_txt)
    assert flipped["teacher_cos_image"] == pytest.approx(-1.0, abs=1e-4)
    naive = float(np.mean([t_txt[5 - i] @ t_txt[i] for i in range(6)]))
    assert flipped["teacher_cos_text"] == pytest.approx(naive, abs=1e-4)


# -- the feature store's checksums and values (pipeline/store/verify.py) ------------------------------------
def test_a_nan_chunk_is_refused_naming_store_array_chunk_and_row(store, tmp_path, monkeypatch):
    path, _ = store
    monkeypatch.chdir(tmp_path)
    chunk = path / "test/text_emb/c/0/0"
    rows = np.fromfile(chunk, dtype="<f2").reshape(-1, D)
    rows[4] = np.nan
    rows.tofile(chunk)
    line = one_error_line(run_cli("--features", str(path)))
    assert line == (
        f"error: {path}: test/text_emb chunk c/0/0 row 4: holds NaN or inf; the file was damaged or replaced "
        "after extract (which refuses such rows): rerun `kdpipe extract`"
    )


def _swap_in_a_chunk_of_another_store(path: Path, tmp_path: Path) -> None:
    """A chunk file of a second store of the same shape copied over: same size, other rows."""
    other = tmp_path / "other.zarr"
    splits = store_splits(np.random.default_rng(5), {"train": 6, "test": 11})
    write_store(other, splits, teacher={"name": "tiny"}, dataset={"name": "toy", "fingerprint": "f" * 64})
    assert (other / "test/image_emb/c/0/0").stat().st_size == (path / "test/image_emb/c/0/0").stat().st_size
    (path / "test/image_emb/c/0/0").write_bytes((other / "test/image_emb/c/0/0").read_bytes())


def _error_line(result) -> str:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("error: ")]
    return line


def test_distill_and_evaluate_with_store_verify_refuse_a_swapped_chunk(workdir, tmp_path):
    paths = workdir
    _swap_in_a_chunk_of_another_store(paths.features, tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"workdir": str(paths.workdir), "evaluate": {"device": "cpu"}}))
    named = f"{paths.features}: test/image_emb chunk c/0/0: sha256 "
    for stage in (["evaluate"], ["distill"], ["evaluate", "--features", str(paths.features)]):
        r = CliRunner().invoke(app, [*stage, "--params", str(params), "--set", "store.verify=true"])
        assert _error_line(r).startswith(f"error: {named}"), (stage, r.output)
    # the default (store.verify: false) opens it: same size, so only reading the bytes can tell
    assert open_store(paths.features).split("test").n_images == 11
    r = CliRunner().invoke(app, ["evaluate", "--params", str(params), "--set", "store.verifyy=true"])
    assert "store.verifyy: unknown key; allowed keys are: verify" in _error_line(r)


def _distill_and_evaluate_params(paths: ArtifactPaths, tmp_path: Path) -> Path:
    """A params file under which both distill and evaluate run on the `workdir` fixture (it has no val split)."""
    params = tmp_path / "params.yaml"
    run_params = {"workdir": str(paths.workdir), "evaluate": {"device": "cpu"}, "distill": {"val_split": "test"}}
    params.write_text(yaml.safe_dump(run_params))
    return params


@pytest.mark.parametrize("stale", ["features", "images"])
def test_distill_and_evaluate_refuse_outputs_of_replaced_image_files(workdir, tmp_path, stale):
    """An image file replaced and `kdpipe prepare` rerun by hand, not extract (features) or not prepare either
    (images: the cache's pixels are the old file's): the fingerprints match, the recorded content does not."""
    paths = workdir
    index = DatasetIndex.load(paths.index_dir)
    index = index.with_hashes([f"{r:064x}" for r in range(index.n_images)])
    index.save(paths.index_dir)  # the hashes are not part of the fingerprint: every output still opens
    recorded = {"features": index.content_digest(splits=["train", "test"]), "images": index.content_digest()}
    recorded[stale] = "ab" * 32  # made from other files
    StoreWriter(paths.features).set_attrs(image_content=recorded["features"])
    cache = open_image_cache(paths.images)
    pixels = {s: np.asarray(cache.split(s)) for s in cache.splits}
    write_image_cache(paths.images, pixels, fingerprint=index.fingerprint, meta={"content": recorded["images"]})
    params = _distill_and_evaluate_params(paths, tmp_path)
    where, stage = (paths.features, "extract") if stale == "features" else (paths.images, "prepare")
    for command in ("distill", "evaluate"):
        line = _error_line(CliRunner().invoke(app, [command, "--params", str(params)]))
        assert line.startswith(f"error: {where}: made from image files that changed since (content abababababab"), line
        assert line.endswith(f"rerun `kdpipe {stage}`"), line


@pytest.mark.parametrize("command", ["distill", "evaluate"])
@pytest.mark.parametrize("rewritten", ["features.zarr", "images.zarr"])
def test_no_wait_also_refuses_to_wait_for_an_input_being_rewritten(workdir, tmp_path, command, rewritten):
    """`--no-wait` is the command's: next to a run rewriting one of its inputs it stops at once, naming that
    run, instead of waiting for it at the input's (shared) lock."""
    import threading

    from pipeline.locks import output_lock

    paths = workdir
    params = _distill_and_evaluate_params(paths, tmp_path)
    held, done = threading.Event(), threading.Event()

    def rewrite() -> None:  # another run (its own thread: a thread that holds a lock reads through it)
        with output_lock(paths.workdir / rewritten):
            held.set()
            done.wait(60)

    writer = threading.Thread(target=rewrite, daemon=True)
    writer.start()
    try:
        assert held.wait(60)
        line = _error_line(CliRunner().invoke(app, [command, "--params", str(params), "--no-wait"]))
    finally:
        done.set()
        writer.join(60)
    assert line.startswith(f"error: {paths.workdir / rewritten}: being rewritten by pid {os.getpid()} on "), line


# -- kdpipe evaluate --ablation ------------------------------------------------------------------------------
def _ablation_files(paths: ArtifactPaths, tmp_path: Path) -> tuple[Path, Path, Path]:
    """params.yaml with distill.runs {head, pairs_only} x seeds [0, 1] (head's runs: the fixture's two students),
    and an ablation file: `plus` = head + an override, its runs in an ablation work directory of its own."""
    import shutil

    abl = tmp_path / "abl"
    for run, src in (("head-s0", "student"), ("head-s1", "baseline")):
        shutil.copytree(paths.workdir / src, paths.model(run))
    for run, src in (("plus-s0", "baseline"), ("plus-s1", "student")):
        shutil.copytree(paths.workdir / src, ArtifactPaths(abl).model(run))
    params = tmp_path / "params.yaml"
    runs = {"seeds": [0, 1], "variants": {"head": {}, "pairs_only": {"baseline": True}}, "compare_to": "pairs_only"}
    evaluate = {"device": "cpu", "batch_size": 4, "latency": False, "bootstrap_resamples": 300}
    evaluate["plot_models"] = ["teacher", "head", "pairs_only", "chance"]  # the main pipeline's: not the ablation's
    params.write_text(yaml.safe_dump({"workdir": str(paths.workdir), "evaluate": evaluate, "distill": {"runs": runs}}))
    section = {"workdir": str(abl), "base": "head", "seeds": [0, 1], "variants": {"plus": {"overrides": {"lr": 1}}}}
    ablation_file = tmp_path / "ablation.yaml"
    ablation_file.write_text(yaml.safe_dump({"ablation": section}))
    return params, ablation_file, abl


def test_an_ablation_is_evaluated_into_its_own_workdir_paired_with_its_base(workdir, tmp_path):
    from pipeline.evaluate.bootstrap import paired_bootstrap, resample_counts
    from pipeline.evaluate.tables import interval_cell

    paths = workdir
    params, ablation_file, abl = _ablation_files(paths, tmp_path)
    r = CliRunner().invoke(app, ["evaluate", "--params", str(params), "--ablation", str(ablation_file)])
    assert r.exit_code == 0, r.output
    assert not paths.metrics.exists() and not paths.plots.exists()  # the main pipeline's results are not touched
    doc = json.loads((abl / "metrics_detail.json").read_text())
    info = json.loads((abl / "run_info.json").read_text())
    assert info["runs"] == {"teacher": ["teacher"], "head": ["head-s0", "head-s1"], "plus": ["plus-s0", "plus-s1"]}
    assert info["bootstrap"]["references"] == ["head"] and "rsum_vs_head" not in doc["head"]
    # oracle: the paired bootstrap of the ranks it committed, computed directly
    ranks = np.load(abl / "ranks.npz")
    run = {n: RetrievalRanks(ranks[f"{n}_i2t"], ranks[f"{n}_t2i"]) for n in ("head-s0", "head-s1", "plus-s0")}
    assert run["plus-s0"].i2t.tolist() == run["head-s1"].i2t.tolist()  # the same student, in the other workdir
    counts = resample_counts(11, 300, 0)
    ti = np.asarray(open_store(paths.features).split("test").text_image)
    plus = [run["plus-s0"], RetrievalRanks(ranks["plus-s1_i2t"], ranks["plus-s1_t2i"])]
    want = paired_bootstrap(plus, [run["head-s0"], run["head-s1"]], ti, counts=counts)
    assert doc["plus"]["rsum_vs_head"] == want["rsum"].as_dict() == doc["plus"]["vs_head"]["rsum"]
    assert (
        doc["teacher"]["vs_head"]["i2t_r1"]
        == paired_bootstrap(
            [RetrievalRanks(ranks["teacher_i2t"], ranks["teacher_t2i"])],
            [run["head-s0"], run["head-s1"]],
            ti,
            counts=counts,
        )["i2t_r1"].as_dict()
    )
    table = (abl / "metrics.md").read_text()
    assert "| RSUM - head (95% CI) | seeds (RSUM sd) |" in table
    assert f"| {interval_cell(doc['plus']['rsum_vs_head'])} | 2 (" in table
    assert (abl / "plots" / "recall_t2i.csv").read_text().splitlines()[0] == "k,teacher,head,plus,chance"
    assert json.loads((abl / "metrics.json").read_text())["plus"] == {"rsum": doc["plus"]["rsum"]}
    assert (abl / "config" / "evaluate.yaml").is_file()

    # several references: one interval column each, in their order
    raw = yaml.safe_load(ablation_file.read_text())
    ablation_file.write_text(yaml.safe_dump({"ablation": {**raw["ablation"], "compare_to": ["plus", "head"]}}))
    r = CliRunner().invoke(app, ["evaluate", "--params", str(params), "--ablation", str(ablation_file)])
    assert r.exit_code == 0, r.output
    doc = json.loads((abl / "metrics_detail.json").read_text())
    table = (abl / "metrics.md").read_text()
    assert "| RSUM - plus (95% CI) | RSUM - head (95% CI) | seeds (RSUM sd) |" in table
    row = f"| {interval_cell(doc['teacher']['rsum_vs_plus'])} | {interval_cell(doc['teacher']['rsum_vs_head'])} |"
    assert row in table and doc["head"]["rsum_vs_plus"]["diff"] == -doc["plus"]["rsum_vs_head"]["diff"]


@pytest.mark.parametrize(
    "content, message",
    [
        ({"ablation": {"workdir": "x", "base": "pairs_only", "seeds": [0], "variants": {"a": {}}}}, "is a baseline"),
        ({"ablation": {"workdir": "x", "base": "head", "seeds": [3], "variants": {"a": {}}}}, "seeds: 3 is not a seed"),
        ({"abaltion": {}}, "one section, `ablation`; found 'abaltion'"),
        ({"ablation": {"base": "head"}}, "ablation.yaml: ablation.workdir is missing (an ablation names workdir, base"),
        ({"ablation": None}, "ablation.workdir is missing"),
    ],
)
def test_a_bad_ablation_file_is_one_error_line(workdir, tmp_path, content, message):
    params, ablation_file, _ = _ablation_files(workdir, tmp_path)
    ablation_file.write_text(yaml.safe_dump(content))
    for stage in (["evaluate"], ["distill", "--variant", "a", "--seed", "0"]):
        line = one_error_line(
            CliRunner().invoke(app, [*stage, "--params", str(params), "--ablation", str(ablation_file)])
        )
        assert message in line and (str(ablation_file) in line or "ablation" in line), (stage, line)
