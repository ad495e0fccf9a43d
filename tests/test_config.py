"""Typed config: nested dataclasses from dicts, `--set` overrides, and the CLI turning mistakes into exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_helpers import one_error_line, run_cli
from PIL import Image

from pipeline.config import apply_overrides, from_dict, to_dict
from pipeline.data.pixels import ResizeConfig
from pipeline.data.prepare import PrepareConfig
from pipeline.data.readers import DatasetConfig
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
BASE = {
    "dataset": {"name": "toy", "annotations": "ann.json", "image_root": "imgs"},
    "image": {"crop": 200},
    "workers": 2,
}


def test_nested_sections_build_typed_values():
    cfg = from_dict(PrepareConfig, BASE, "prepare")
    assert cfg.dataset == DatasetConfig(name="toy", annotations=Path("ann.json"), image_root=Path("imgs"))
    assert cfg.image == ResizeConfig(crop=200) and cfg.image.resize == 256  # defaults fill the rest
    assert cfg.workers == 2 and cfg.scheduler is None and cfg.on_bad_image == "error"
    assert from_dict(PrepareConfig, to_dict(cfg), "prepare") == cfg  # what write_resolved records reads back
    assert from_dict(ResizeConfig, {"resize": 300}, "prepare.image").resize == 300


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            {"dataset": {**BASE["dataset"], "annotaions": "x"}},
            r"^prepare\.dataset\.annotaions: unknown key; allowed keys are: annotations, default_split, exif_orientation, format, ",
        ),
        ({"worker": 2}, r"^prepare\.worker: unknown key; allowed keys are: .*workers"),
        ({"image": {"crop": "224px"}}, r"^prepare\.image\.crop: expected an integer, got '224px'$"),
        ({"workers": True}, r"^prepare\.workers: expected an integer, got True$"),
        ({"workers": 1.5}, r"^prepare\.workers: expected an integer, got 1\.5$"),
        ({"image": {"draft": "yes"}}, r"^prepare\.image\.draft: expected true or false, got 'yes'$"),
        (
            {"on_bad_image": "ignore"},
            r"^prepare\.on_bad_image: 'ignore' is not one of the allowed values: 'error', 'skip'$",
        ),
        (
            {"image": {"mode": "stretch"}},
            r"^prepare\.image\.mode: 'stretch' is not one of the allowed values: 'shorter_side_center_crop', 'squash'$",
        ),
        (
            {"dataset": {**BASE["dataset"], "format": "tfrecord"}},
            r"^prepare\.dataset\.format: 'tfrecord' is not one of",
        ),
        ({"dataset": {**BASE["dataset"], "splits": "test"}}, r"^prepare\.dataset\.splits: expected a list"),
        ({"image": {"crop": 300}}, r"^prepare\.image: crop \(300\) must not exceed resize \(256\)"),
        ({"workers": 0}, r"^prepare: workers must be >= 1 or null"),
        ({"image": ["crop", 224]}, r"^prepare\.image: expected a mapping of keys"),
    ],
)
def test_bad_values_name_the_key(edit, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(PrepareConfig, {**BASE, **edit}, "prepare")


def test_missing_required_key_is_named():
    with pytest.raises(ConfigError, match=r"^prepare: .*'dataset'"):
        from_dict(PrepareConfig, {"workers": 2}, "prepare")
    with pytest.raises(ConfigError, match=r"^prepare\.dataset: .*'annotations'"):
        from_dict(PrepareConfig, {"dataset": {"name": "x"}}, "prepare")


def test_apply_overrides_parses_yaml_values_and_nests():
    raw = {"workdir": "w", "prepare": dict(BASE)}
    out = apply_overrides(
        raw,
        [
            "prepare.image.crop=128",
            "prepare.workers=null",
            "prepare.dataset.splits=[test, val]",
            "prepare.scheduler=tcp://10.0.0.1:8786",
            "prepare.image.filter=bicubic",
            "distill.loss.margin=0.05",
        ],
    )
    assert raw["prepare"]["workers"] == 2  # the input is not modified
    cfg = from_dict(PrepareConfig, out["prepare"], "prepare")
    assert (cfg.image.crop, cfg.workers, cfg.dataset.splits) == (128, None, ("test", "val"))
    assert cfg.scheduler == "tcp://10.0.0.1:8786" and cfg.image.filter == "bicubic"
    assert out["distill"] == {"loss": {"margin": 0.05}}
    for bad, message in [
        ("prepare.workers", "expected section.key=value"),
        ("workers=2", "a section name, then a key"),
        ("prepare.image=[1", "not valid YAML"),
        ("prepare.workers.x=1", "workers is not a section"),
    ]:
        with pytest.raises(ConfigError, match=message):
            apply_overrides(raw, [bad])


# -- the command line -------------------------------------------------------------------------------
@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory with two small images, a Karpathy file and params.yaml."""
    imgs = tmp_path / "data" / "imgs"
    imgs.mkdir(parents=True)
    Image.effect_mandelbrot((500, 375), (-2, -1.2, 1, 1.2), 60).convert("RGB").save(imgs / "a.jpg")
    Image.merge("RGB", [Image.linear_gradient("L").resize((300, 400))] * 3).save(imgs / "b.jpg")
    images = [
        {"filename": f, "split": s, "sentences": [{"raw": f"photo {f}"}, {"raw": f"another {f}"}]}
        for f, s in [("a.jpg", "train"), ("b.jpg", "test")]
    ]
    (tmp_path / "data" / "ann.json").write_text(json.dumps({"images": images}))
    params = {
        "workdir": "artifacts/toy",
        "prepare": {
            "dataset": {"name": "toy", "annotations": "data/ann.json", "image_root": "data/imgs"},
            "workers": 1,
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cli_prepare_runs_and_records_resolved_config(project):
    result = run_cli("prepare", "--set", "prepare.image.crop=160")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "written" and summary["images"] == {"train": 1, "test": 1}
    resolved = yaml.safe_load((project / "artifacts/toy/config/prepare.yaml").read_text())
    assert resolved["prepare"]["image"]["crop"] == 160 and resolved["prepare"]["dataset"]["name"] == "toy"
    from pipeline.store.image_cache import open_image_cache

    assert open_image_cache(project / "artifacts/toy/images.zarr").split("test").shape == (1, 160, 160, 3)
    again = run_cli("prepare", "--set", "prepare.image.crop=160")
    assert json.loads(again.stdout.strip().splitlines()[-1])["status"] == "unchanged"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("prepare.dataset.colour=red", "error: prepare.dataset.colour: unknown key; allowed keys are:"),
        ("prepare.workers=two", "error: prepare.workers: expected an integer, got 'two'"),
        (
            "prepare.on_bad_image=ignore",
            "error: prepare.on_bad_image: 'ignore' is not one of the allowed values: 'error', 'skip'",
        ),
        ("prepare.dataset.annotations=data/nope.json", "error: prepare.dataset.annotations: data/nope.json not found"),
        ("prepare.dataset.image_root=data/nope", "error: prepare.dataset.image_root: data/nope not found"),
        ("prepare.image.crop=999", "error: prepare.image: crop (999) must not exceed resize (256)"),
        ("evaluat.split=test", "error: params.yaml: unknown section 'evaluat'"),
    ],
)
def test_cli_mistakes_exit_2_with_one_line(project, override, expected):
    line = one_error_line(run_cli("prepare", "--set", override))
    assert line.startswith(expected), line
    assert not (project / "artifacts/toy/images.zarr").exists()


def test_cli_missing_params_file(project):
    assert one_error_line(run_cli("prepare", "--params", "nope.yaml")) == "error: nope.yaml: params file not found"


def test_cli_bad_image_is_one_line(project):
    (project / "data/imgs/b.jpg").write_bytes(b"")
    line = one_error_line(run_cli("prepare"))
    assert line.startswith("error: data/imgs/b.jpg: empty file;"), line


def test_real_process_exit_code_and_no_traceback(project):
    """The console entry point itself (not the test runner): exit 2, one red line, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "stages", "prepare", "--set", "prepare.dataset.annotations=data/missing.json"],
        cwd=project,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": ""},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: prepare.dataset.annotations: data/missing.json not found"
    assert proc.stdout == ""
