"""Typed config: nested dataclasses from dicts, `--set` overrides, and the CLI turning mistakes into exit 2."""

import copy
import dataclasses
import json
import math
import re
import subprocess
import sys
import types
import typing
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


# -- every number of every section: finite, in range, named ------------------------------------------------
def _sections() -> dict[str, type]:
    from pipeline.distill.config import DistillConfig
    from pipeline.evaluate.run import EvaluateConfig
    from pipeline.extract.config import ExtractConfig
    from pipeline.extract.views import ViewsConfig
    from pipeline.mine.run import MineConfig
    from pipeline.runs import RunsConfig
    from pipeline.runtime import RuntimeConfig
    from pipeline.store.verify import StoreConfig
    from pipeline.teachers.fit_fusion import FitCrossEncoderConfig
    from pipeline.teachers.fit_teacher import FitTeacherConfig

    return {
        "runtime": RuntimeConfig,
        "fit_teacher": FitTeacherConfig,
        "fit_cross_encoder": FitCrossEncoderConfig,
        "prepare": PrepareConfig,
        "extract": ExtractConfig,
        "mine": MineConfig,
        "views": ViewsConfig,
        "distill": DistillConfig,
        "distill.runs": RunsConfig,
        "evaluate": EvaluateConfig,
        "store": StoreConfig,
    }


def _numeric_leaves(cls: type, path: tuple[str, ...] = ()):
    """(path of keys, int or float, number of items for a fixed-length tuple, 1 for a variadic one, 0 for a
    plain number) of every int/float field reachable from dataclass `cls` through nested dataclasses."""
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        options = [
            a for a in (typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,))
        ]
        for option in options:
            if dataclasses.is_dataclass(option):
                yield from _numeric_leaves(option, (*path, f.name))
            elif option in (int, float):
                yield (*path, f.name), option, 0
            elif typing.get_origin(option) is tuple and typing.get_args(option)[0] in (int, float):
                args = typing.get_args(option)
                yield (*path, f.name), args[0], 1 if args[-1] is Ellipsis else len(args)


def _with(section: dict, path: tuple[str, ...], value) -> dict:
    out = copy.deepcopy(section)
    node = out
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node.get(key), dict) or key not in node else node[key]
    node[path[-1]] = value
    return out


def test_every_section_of_params_yaml_is_walked():
    from stages._common import TOP_LEVEL_KEYS

    assert {s.split(".")[0] for s in _sections()} == set(TOP_LEVEL_KEYS) - {"workdir"}


def test_every_number_of_every_section_must_be_finite_and_in_range():
    """An infinite lr, a NaN weight decay, a chunk size of 1e20, a negative seed: each refused by the config
    layer, naming its key, whatever the section's own checks say (they are not all written)."""
    from pipeline.config import INT_MAX
    from pipeline.runs import split_runs

    raw = yaml.safe_load((REPO / "params.yaml").read_text())  # every section valid as the demo runs it
    runs, distill = split_runs(raw["distill"])
    valid = {**raw, "distill": distill, "distill.runs": raw["distill"]["runs"]}
    accepted, walked = [], 0
    for section, cls in _sections().items():
        from_dict(cls, valid.get(section), section)  # the base is accepted
        for path, kind, items in _numeric_leaves(cls):
            walked += 1
            key = ".".join((section, *path))
            bad = (math.inf, -math.inf, math.nan) if kind is float else (-1, INT_MAX + 1, 10**20)
            for value in bad:
                data = _with(valid.get(section) or {}, path, [value] * items if items else value)
                try:
                    from_dict(cls, data, section)
                except ConfigError as err:
                    assert re.match(rf"{re.escape(key)}(\[\d+\])?: ", str(err)), (key, str(err))
                else:
                    accepted.append((key, value))
    assert walked > 80 and accepted == []  # every int and float field of every section, and none got through


def test_a_path_parameter_with_a_nul_byte_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"^prepare\.dataset\.image_root: the path 'im\\x00gs' holds a NUL byte"):
        from_dict(PrepareConfig, {**BASE, "dataset": {**BASE["dataset"], "image_root": "im\0gs"}}, "prepare")


def test_a_message_quoting_a_huge_value_is_cut_to_a_line(project):
    """A message quotes the value as it stands; the printed line keeps its start (the key) and its end (what is
    allowed), and says how much it left out: a megabyte --set value, a megabyte split name in the annotations."""
    from pipeline.printable import MESSAGE_LIMIT

    ann = project / "data/ann.json"
    data = json.loads(ann.read_text())
    data["images"][0]["split"] = "s" * 1_000_000
    ann.write_text(json.dumps(data))
    for args, head, tail in [
        (
            ("--set", "prepare.workers=" + "x" * 300_000),
            "error: prepare.workers: expected an integer, got 'xxx",
            "xxx'",
        ),
        ((), "error: data/ann.json images[0] (a.jpg): split 'sss", "sss' is not one of train, restval, val, test"),
    ]:
        line = one_error_line(run_cli("prepare", *args))
        assert line.startswith(head) and line.endswith(tail), line[:200]
        assert len(line) <= MESSAGE_LIMIT + 60 and re.search(r" \.\.\. \[[\d,]+ characters left out\] \.\.\. ", line)
