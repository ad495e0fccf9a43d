"""End to end through the command line: prepare -> extract -> distill (student and baseline) -> evaluate on a
few real demo photos, with the real offline teacher and the tiniest student, in a temporary work directory.

The stages are chained only through their files, as DVC chains them; the checks are the contracts between
them (fingerprints, shapes, normalized rows) and the metrics file's schema.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.data.demo_photos import DEMO_IMAGES, DEMO_JSON, build_demo_images
from pipeline.data.index import DatasetIndex
from pipeline.store.features import open_store
from pipeline.store.image_cache import open_image_cache
from stages.cli import app

ROOT = Path(__file__).resolve().parents[1]
PER_SPLIT = {"train": 4, "val": 2, "test": 2}
METRIC_KEYS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_medr", "t2i_medr"]


def tiny_dataset(root: Path) -> Path:
    """The first photos of each demo split, written as JPEG, and their captions in Karpathy format (the photos
    ship in scikit-image: a test that uses them skips without the demo extras)."""
    pytest.importorskip("skimage", reason="the demo photos ship in scikit-image (install kdpipe[demo])")
    demo = json.loads((ROOT / DEMO_JSON).read_text())
    keep, count = [], dict.fromkeys(PER_SPLIT, 0)
    for image in demo["images"]:
        if count[image["split"]] < PER_SPLIT[image["split"]]:
            count[image["split"]] += 1
            keep.append(image)
    names = {image["filename"] for image in keep}
    build_demo_images(root / "images", tuple(d for d in DEMO_IMAGES if d.filename in names))
    (root / "dataset.json").write_text(json.dumps({"images": keep}))
    return root / "dataset.json"


def params(root: Path, tokenizer_dir: Path) -> Path:
    p = {
        "workdir": str(root / "artifacts"),
        "prepare": {
            "dataset": {
                "name": "tiny",
                "format": "karpathy",
                "annotations": str(root / "dataset.json"),
                "image_root": str(root / "images"),
            },
            "workers": 1,
        },
        "extract": {
            "teacher": {
                "kind": "label_bridge",
                "label_bridge": {"class_names": str(ROOT / "data/demo/imagenet_classes.tsv")},
            },
            "device": "cpu",
            "image_batch_size": 4,
            "text_batch_size": 8,
            "num_workers": 0,
        },
        "distill": {
            "student": {
                "image": {
                    "backend": "hf_vit",
                    "hidden_size": 32,
                    "num_layers": 1,
                    "num_heads": 2,
                    "intermediate_size": 64,
                    "patch_size": 16,
                    "image_size": 32,
                },
                "text": {
                    "tokenizer": str(tokenizer_dir),
                    "hidden_size": 32,
                    "num_layers": 1,
                    "num_heads": 2,
                    "intermediate_size": 64,
                    "max_tokens": 16,
                },
            },
            "loss": {"queue_size": 0},
            "epochs": 1,
            "batch_size": 4,
            "num_workers": 0,
            "device": "cpu",
        },
        "evaluate": {"device": "cpu", "latency": False},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"kdpipe {' '.join(args)} failed:\n{result.output}"
    return result.output


@pytest.mark.usefixtures("one_thread")
def test_all_stages_through_the_cli(tmp_path, tokenizer_dir):
    tiny_dataset(tmp_path)
    p = str(params(tmp_path, tokenizer_dir))
    work = tmp_path / "artifacts"

    run("prepare", "--params", p)
    index = DatasetIndex.load(work / "index")
    assert {s: index.split(s).n_images for s in index.splits} == PER_SPLIT
    cache = open_image_cache(work / "images.zarr", expect_fingerprint=index.fingerprint)
    assert cache.split("test").shape == (2, 224, 224, 3)

    run("extract", "--params", p)
    store = open_store(work / "features.zarr", expect_fingerprint=index.fingerprint, expect_dim=384)
    test = store.split("test")
    assert test.image_id.tolist() == index.split("test").image_id.tolist()
    assert np.allclose(np.linalg.norm(test.text_emb.astype(np.float32), axis=1), 1.0, atol=2e-3)

    run("distill", "--params", p)
    run("distill", "--params", p, "--baseline")
    for model in ("student", "baseline"):
        assert (work / model / "model.safetensors").is_file() and (work / model / "student_config.json").is_file()
        # the student records how its images were made from files, as the cache does: search and export use it
        pixels = json.loads((work / model / "student_config.json").read_text())["image"]["pixels"]
        assert pixels == {"resize": cache.attrs["resize"], "exif_orientation": "ignore"}

    run("evaluate", "--params", p)
    metrics = json.loads((work / "metrics_detail.json").read_text())  # the whole record; metrics.json its headline
    assert list(metrics)[:7] == ["dataset", "split", "n_images", "n_captions", "teacher", "student", "baseline"]
    assert json.loads((work / "metrics.json").read_text()) == {
        "dataset": "tiny",
        "split": "test",
        **{m: {"rsum": metrics[m]["rsum"]} for m in ("teacher", "student", "baseline")},
    }
    assert (metrics["dataset"], metrics["split"], metrics["n_images"]) == ("tiny", "test", 2)
    assert metrics["n_captions"] == len(index.split("test").caption_text)
    for model in ("teacher", "student", "baseline"):
        block = metrics[model]
        assert all(k in block for k in METRIC_KEYS)
        assert block["rsum"] == pytest.approx(sum(block[k] for k in METRIC_KEYS[:6]))
    assert (work / "plots" / "recall_at_k.png").is_file()

    # The same pipeline as dvc.yaml's matrix runs it: distill.runs' variants x seeds into models/, then evaluate
    # every run, seed-averaged, each compared with the baseline on the same bootstrap redraws.
    raw = yaml.safe_load(Path(p).read_text())
    raw["distill"]["runs"] = {
        "seeds": [0, 1],
        "variants": {"student_pairs": {"overrides": {"lr": 0.001}}, "baseline": {"baseline": True}},
    }
    raw["evaluate"]["bootstrap_resamples"] = 100
    Path(p).write_text(yaml.safe_dump(raw, sort_keys=False))  # variants in this order
    for variant in ("student_pairs", "baseline"):
        for seed in (0, 1):
            run("distill", "--params", p, "--variant", variant, "--seed", str(seed))
            run_dir = work / "models" / f"{variant}-s{seed}"
            assert (run_dir / "model.safetensors").is_file()
            for log in ("train", "val"):  # the training curves, copied out for `dvc plots`
                copied = work / "curves" / log / f"{variant}-s{seed}.csv"
                assert copied.read_bytes() == (run_dir / f"{log}_log.csv").read_bytes()
    resolved = yaml.safe_load((work / "config" / "distill-student_pairs-s1.yaml").read_text())["distill"]
    assert (resolved["seed"], resolved["lr"]) == (1, 0.001)
    result = CliRunner().invoke(app, ["distill", "--params", p, "--variant", "student_pairs", "--seed", "7"])
    assert result.exit_code == 2 and "distill.runs.seeds: 7 is not one of [0, 1]" in result.output

    run("evaluate", "--params", p)
    metrics = json.loads((work / "metrics_detail.json").read_text())
    assert [k for k, v in metrics.items() if isinstance(v, dict) and "rsum" in v] == [
        *("teacher", "student_pairs", "baseline", "chance")
    ]
    pairs = metrics["student_pairs"]
    seeds = pairs["seeds"]
    assert list(seeds) == ["student_pairs-s0", "student_pairs-s1"]
    assert pairs["rsum"] == pytest.approx(np.mean([s["rsum"] for s in seeds.values()]))
    assert pairs["rsum_vs_baseline"]["diff"] == pytest.approx(pairs["rsum"] - metrics["baseline"]["rsum"])
    assert "environment" not in metrics and "environment" in json.loads((work / "run_info.json").read_text())
    assert list(json.loads((work / "metrics.json").read_text())) == [
        *("dataset", "split", "teacher", "student_pairs", "baseline")
    ]
    ranks = np.load(work / "ranks.npz")
    assert {"teacher_i2t", "student_pairs-s0_i2t", "student_pairs-s1_t2i", "baseline-s1_i2t"} <= set(ranks.files)

    # An ablation (ablation/dvc.yaml runs it so): student_pairs + overrides, into a work directory of its own,
    # evaluated beside student_pairs' runs above, each row paired with them
    abl = tmp_path / "ablation"
    ablation = tmp_path / "ablation.yaml"
    variants = {"slower": {"overrides": {"lr": 0.0005, "loss": {"relation": 1.0}}}}
    ablation.write_text(
        yaml.safe_dump({"ablation": {"workdir": str(abl), "base": "student_pairs", "seeds": [1], "variants": variants}})
    )
    before = {f: (work / f).read_bytes() for f in ("metrics_detail.json", "ranks.npz")}
    run("distill", "--params", p, "--ablation", str(ablation), "--variant", "slower", "--seed", "1")
    assert (abl / "models" / "slower-s1" / "model.safetensors").is_file()
    assert not (work / "models" / "slower-s1").exists()
    for log in ("train", "val"):
        copied = abl / "curves" / log / "slower-s1.csv"
        assert copied.read_bytes() == (abl / "models" / "slower-s1" / f"{log}_log.csv").read_bytes()
    resolved = yaml.safe_load((abl / "config" / "distill-slower-s1.yaml").read_text())["distill"]
    pairs_run = yaml.safe_load((work / "config" / "distill-student_pairs-s1.yaml").read_text())["distill"]
    # the base run's resolved section, but for the ablation's overrides
    assert resolved == {**pairs_run, "lr": 0.0005, "loss": {**pairs_run["loss"], "relation": 1.0}}
    run("evaluate", "--params", p, "--ablation", str(ablation))
    assert {f: (work / f).read_bytes() for f in before} == before  # the demo's own record untouched
    record = json.loads((abl / "metrics_detail.json").read_text())
    assert [k for k, v in record.items() if isinstance(v, dict) and "rsum" in v] == [
        *("teacher", "student_pairs", "slower", "chance")
    ]
    assert record["student_pairs"]["rsum"] == metrics["student_pairs"]["seeds"]["student_pairs-s1"]["rsum"]
    diff = record["slower"]["rsum_vs_student_pairs"]["diff"]
    assert diff == pytest.approx(record["slower"]["rsum"] - record["student_pairs"]["rsum"])

    # An ablation with a mined store of its own (ablation.mine: the demo's adds its cross-encoder's scores): `kdpipe
    # mine --ablation` writes it into the ablation's work directory, and its runs read that one, not the main one
    abl_mined = tmp_path / "ablation-mined"
    ablation_mined = tmp_path / "ablation-mined.yaml"
    own = {"workdir": str(abl_mined), "base": "student_pairs", "seeds": [1], "mine": {"k": 2}}
    own["variants"] = {"hard": {"overrides": {"loss": {"dcd": 1.0, "teacher_temperature": 0.05}}}}
    ablation_mined.write_text(yaml.safe_dump({"ablation": own}))
    args = ["distill", "--params", p, "--ablation", str(ablation_mined), "--variant", "hard", "--seed", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and f"{abl_mined / 'mined.zarr'}: no mined store here" in result.output
    run("mine", "--params", p, "--ablation", str(ablation_mined))
    assert json.loads((abl_mined / "mined.zarr" / "zarr.json").read_text())["attributes"]["k"] == 2
    assert not (work / "mined.zarr").exists()
    run(*args)
    assert (abl_mined / "models" / "hard-s1" / "model.safetensors").is_file()
    result = CliRunner().invoke(app, ["mine", "--params", p, "--ablation", str(ablation)])  # one without `mine`
    assert result.exit_code == 2 and "ablation.mine is empty" in result.output

    # An ablation with a feature store of its own (ablation.extract: the main teacher's rows, copied, and a second
    # teacher beside them) and views (kdpipe views --ablation): its runs read both, the main ones stay as they were
    abl_own = tmp_path / "ablation-own"
    ablation_own = tmp_path / "ablation-own.yaml"
    second = {"kind": "label_bridge", "label_bridge": {"class_names": str(ROOT / "data/demo/imagenet_classes.tsv")}}
    second["label_bridge"]["prompt"] = "a picture of a {}."
    own = {
        "workdir": str(abl_own),
        "base": "student_pairs",
        "seeds": [1],
        "extract": {"extra_teachers": {"two": second}},
    }
    own["variants"] = {
        "both": {"overrides": {"loss": {"response": 1.0, "teacher_temperature": 0.05, "teachers": ["two"]}}},
        "views": {"overrides": {"teacher_views": True}},
    }
    ablation_own.write_text(yaml.safe_dump({"ablation": own}))
    main_files = {f: f.read_bytes() for f in sorted((work / "features.zarr").rglob("*")) if f.is_file()}
    run("extract", "--params", p, "--ablation", str(ablation_own))
    mine_store, main_store = open_store(abl_own / "features.zarr"), open_store(work / "features.zarr")
    for s in main_store.splits:
        assert np.array_equal(np.asarray(mine_store.split(s).image_emb), np.asarray(main_store.split(s).image_emb))
    assert mine_store.extra_teachers == ("two",) and not (work / "features.zarr" / "teachers").exists()
    run("views", "--params", p, "--set", "views.count=2", "--ablation", str(ablation_own))
    assert json.loads((abl_own / "views.zarr" / "zarr.json").read_text())["attributes"]["complete"] is True
    run("distill", "--params", p, "--ablation", str(ablation_own), "--all")
    for v in ("both", "views"):
        assert (abl_own / "models" / f"{v}-s1" / "model.safetensors").is_file()
    assert {f: f.read_bytes() for f in sorted((work / "features.zarr").rglob("*")) if f.is_file()} == main_files
    result = CliRunner().invoke(app, ["extract", "--params", p, "--ablation", str(ablation)])  # without `extract`
    assert result.exit_code == 2 and "ablation.extract is empty" in result.output
