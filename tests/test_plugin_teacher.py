"""extract.teacher.kind plugin: a user's own Teacher class, named by module:Class, through the CLI and DVC."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.errors import InputError
from pipeline.store.features import open_store
from pipeline.teachers import PluginTeacherConfig, TeacherConfig, build_teacher
from stages.cli import app

REPO = Path(__file__).resolve().parent.parent

# A user's teacher, outside kdpipe: the mean colour and the caption's letter counts, through a fixed matrix.
PLUGIN = """
import numpy as np
import torch
from pipeline.teachers.base import Teacher

SCALE = 1.0


class ColourTeacher(Teacher):
    def __init__(self, device, dtype, dim=8, seed=0):
        self.name, self.dim, self.device, self.seed = "colour", dim, device, seed
        g = torch.Generator().manual_seed(seed)
        self.image_proj = torch.randn(3, dim, generator=g) * SCALE
        self.text_proj = torch.randn(27, dim, generator=g)

    def identity(self):
        return {"name": self.name, "dim": self.dim, "seed": self.seed}

    def preprocess_image(self, image):
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1).mean((1, 2))

    def tokenize(self, texts):
        counts = torch.zeros(len(texts), 27)
        for i, t in enumerate(texts):
            for c in t.lower():
                counts[i, ord(c) - 97 if "a" <= c <= "z" else 26] += 1
        return {"counts": counts, "attention_mask": torch.ones(len(texts), 1)}

    def encode_image_batch(self, pixels):
        return torch.nn.functional.normalize(pixels.float() @ self.image_proj + 0.1, dim=-1)

    def encode_text_batch(self, tokens):
        return torch.nn.functional.normalize(tokens["counts"].float() @ self.text_proj, dim=-1)
"""


def project(tmp_path: Path) -> Path:
    """A dataset of 4 images, the plug-in module and a params.yaml that names it."""
    (tmp_path / "data").mkdir()
    rng = np.random.default_rng(1)
    lines = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "data" / f"{i}.png")
        lines.append({"image": f"{i}.png", "caption": f"caption number {i}", "split": "train" if i < 2 else "test"})
    (tmp_path / "data" / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "my_teachers.py").write_text(PLUGIN)
    params = {
        "workdir": "work",
        "prepare": {
            "dataset": {"name": "d", "format": "jsonl", "annotations": "data/d.jsonl"},
            "image": {"resize": 10, "crop": 8},
        },
        "extract": {
            "teacher": {
                "kind": "plugin",
                "plugin": {"target": "my_teachers:ColourTeacher", "options": {"dim": 6, "seed": 3}},
            },
            "store_dtype": "float32",
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def test_a_plugin_teacher_runs_through_the_cli(tmp_path, monkeypatch):
    root = project(tmp_path)
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    for stage in ("prepare", "extract"):
        r = CliRunner().invoke(app, [stage])
        assert r.exit_code == 0, r.output
    import my_teachers

    store = open_store(root / "work" / "features.zarr")
    assert store.dim == 6
    assert store.teacher["plugin"]["target"] == "my_teachers:ColourTeacher"
    assert store.teacher["plugin"]["sha256"] == __import__("hashlib").sha256(PLUGIN.encode()).hexdigest()
    assert {k: store.teacher[k] for k in ("name", "dim", "seed", "kind")} == {
        "name": "colour",
        "dim": 6,
        "seed": 3,
        "kind": "plugin",
    }
    expected_teacher = my_teachers.ColourTeacher(device="cpu", dtype=None, dim=6, seed=3)
    for split, rows in (("train", [0, 1]), ("test", [2, 3])):
        images = [Image.open(root / "data" / f"{i}.png") for i in rows]
        np.testing.assert_allclose(
            np.asarray(store.split(split).image_emb), expected_teacher.encode_images(images).numpy(), atol=1e-6
        )
        texts = [f"caption number {i}" for i in rows]
        np.testing.assert_allclose(
            np.asarray(store.split(split).text_emb), expected_teacher.encode_texts(texts).numpy(), atol=1e-6
        )


def test_plugin_problems_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "bad_teachers.py").write_text("class NotATeacher:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = [
        ("nowhere:X", "cannot import 'nowhere'"),
        ("bad_teachers:Missing", "bad_teachers:Missing: not found"),
        ("bad_teachers:NotATeacher", "not a subclass of pipeline.teachers.base.Teacher"),
    ]
    for target, message in cases:
        with pytest.raises(InputError, match=message):
            build_teacher(TeacherConfig(kind="plugin", plugin=PluginTeacherConfig(target=target)))
    (tmp_path / "half_teachers.py").write_text(PLUGIN.replace("    def encode_text_batch", "    def other"))
    with pytest.raises(InputError, match="does not implement encode_text_batch"):
        build_teacher(TeacherConfig(kind="plugin", plugin=PluginTeacherConfig(target="half_teachers:ColourTeacher")))
    (tmp_path / "ok_teachers.py").write_text(PLUGIN)
    with pytest.raises(InputError, match="failed: .*unexpected keyword argument 'colour'"):
        build_teacher(
            TeacherConfig(
                kind="plugin", plugin=PluginTeacherConfig(target="ok_teachers:ColourTeacher", options={"colour": 1})
            )
        )


@pytest.mark.slow
def test_a_plugin_teacher_runs_through_dvc_and_an_edit_reruns_extract(tmp_path):
    root = project(tmp_path)
    stages = {
        "prepare": {
            "cmd": "python -m stages prepare",
            "deps": ["data"],
            "params": ["prepare"],
            "outs": ["work/index", "work/images.zarr"],
        },
        "extract": {
            "cmd": "python -m stages extract",
            "deps": ["work/index", "my_teachers.py"],  # the plug-in's code, as the README says
            "params": ["extract"],
            "outs": ["work/features.zarr"],
        },
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), str(REPO)]),
        "KDPIPE_PROGRESS": "0",
        "KDPIPE_FSYNC": "0",
    }
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])

    def run(*args: str) -> str:
        r = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run(sys.executable, "-m", "dvc", "repro", "-q")
    first = open_store(root / "work" / "features.zarr")
    assert first.teacher["plugin"]["file"] == "my_teachers.py"
    images_before = np.asarray(first.split("train").image_emb).copy()
    assert "extract" not in run(sys.executable, "-m", "dvc", "status")
    (root / "my_teachers.py").write_text(PLUGIN.replace("SCALE = 1.0", "SCALE = -1.0"))
    assert "my_teachers.py" in run(sys.executable, "-m", "dvc", "status")
    run(sys.executable, "-m", "dvc", "repro", "-q")
    again = open_store(root / "work" / "features.zarr")
    assert again.teacher["plugin"]["sha256"] != first.teacher["plugin"]["sha256"]
    assert not np.allclose(np.asarray(again.split("train").image_emb), images_before)
