"""Malformed or mismatched model files end in one line naming the file and what to do, in every command that
loads a student (search, export, evaluate): a truncated model.safetensors, weights of a student of another
width, a tower's config.json or tokenizer file that is not JSON, a student_config.json cut short; and a
truncated training checkpoint on resume."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import one_error_line, run_cli
from deploy_helpers import tiny_student, tiny_workdir
from safetensors.torch import load_file, save_file

from pipeline.errors import InputError
from pipeline.towers.student import load_student, save_student

pytestmark = pytest.mark.usefixtures("one_thread")
AGAIN = re.escape("export the student again (kdpipe distill) or copy its directory whole")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def other_width(student: Path) -> None:
    """model.safetensors of a student whose image projection maps to 8 dimensions instead of 16."""
    state = load_file(str(student / "model.safetensors"))
    state["image_proj.weight"] = torch.zeros(8, state["image_proj.weight"].shape[1])
    save_file(state, str(student / "model.safetensors"), metadata={"format": "pt"})


def deep_rows(index: Path) -> None:
    """Every line of the index's rows.jsonl nested 100,000 levels deep (json's scanner: a RecursionError)."""
    n = len((index / "rows.jsonl").read_bytes().split(b"\n")) - 1
    (index / "rows.jsonl").write_text(("[" * 100_000 + "]" * 100_000 + "\n") * n)


def not_json(path: Path) -> None:
    path.write_text('{"model_type": "vit",')


@pytest.fixture(scope="module")
def workdir(tokenizer_dir, tmp_path_factory):
    return tiny_workdir(tmp_path_factory.mktemp("model_files"), tokenizer_dir)


@pytest.mark.parametrize(
    "damage, line",
    [
        (
            lambda s: truncate(s / "model.safetensors"),
            r"model\.safetensors: cannot be read as a safetensors file \(SafetensorError: .*\); " + AGAIN,
        ),
        (
            other_width,
            r"model\.safetensors: image_proj\.weight has shape \[8, 32\], the student of student_config\.json "
            r"needs \[16, 32\] \(weights of another student\?\); " + AGAIN,
        ),
        (
            lambda s: not_json(s / "image_tower" / "config.json"),
            r"student_config\.json:config\.image\.path: .*image_tower: cannot be read as a Hugging Face model "
            r"directory \(OSError: .*config\.json.*\); save the model there again",
        ),
        (
            lambda s: not_json(s / "text_tower" / "config.json"),
            r"student_config\.json:config\.text\.tokenizer: .*text_tower holds no loadable tokenizer \(.*config\.json"
            r"' is not a valid JSON file",
        ),
        (
            lambda s: not_json(s / "text_tower" / "tokenizer_config.json"),
            r"student_config\.json:config\.text\.tokenizer: .*text_tower holds no loadable tokenizer",
        ),
        (
            lambda s: (s / "student_config.json").write_text('{"format": "kdpipe-student", "version": 1}'),
            r"student_config\.json: no student config and dim in it",
        ),
        (
            lambda s: (s / "student_config.json").write_text("[" * 100_000 + "]" * 100_000),
            r"student_config\.json: JSON arrays or objects nested thousands of levels deep",
        ),
    ],
    ids=["truncated", "other-width", "image-config", "text-config", "tokenizer", "config-cut", "config-deep"],
)
def test_every_command_that_loads_a_student_refuses_a_damaged_one_in_one_line(workdir, tmp_path, damage, line):
    student = tmp_path / "student"
    shutil.copytree(workdir.student, student)
    damage(student)
    with pytest.raises(InputError, match=line):
        load_student(student)
    wd = str(workdir.workdir)
    for args in (
        ("search", "a dog", "--workdir", wd, "--student", student),
        ("export", "--workdir", wd, "--student", student, "--out", tmp_path / "export"),
    ):
        error = one_error_line(run_cli(*args))  # each command refuses alike
        assert re.search(line, error), (args[0], error)
    assert not (tmp_path / "export").exists()


def test_evaluate_refuses_a_truncated_student_in_one_line(workdir, tmp_path):
    wd = tmp_path / "work"
    shutil.copytree(workdir.workdir, wd)
    truncate(wd / "student" / "model.safetensors")
    (tmp_path / "params.yaml").write_text(f"workdir: {wd}\n")
    error = one_error_line(run_cli("evaluate", "--params", tmp_path / "params.yaml"))
    assert error.startswith(f"error: {wd / 'student' / 'model.safetensors'}: cannot be read as a safetensors file")


def test_an_intact_student_round_trips(workdir, tokenizer_dir, tmp_path):
    """The checks refuse only damage: a saved student loads with the very same weights."""
    model = tiny_student(tokenizer_dir, 3)
    save_student(model, tmp_path / "s")
    loaded = load_student(tmp_path / "s")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_truncated_training_checkpoint_is_one_line_on_resume(tmp_path):
    from pipeline.distill.checkpoints import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint

    path = tmp_path / "last.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": torch.zeros(1000)}, path)
    truncate(path)
    with pytest.raises(
        InputError, match=r"last\.pt: cannot read the checkpoint \(\w+\); use --no-resume to start over"
    ):
        load_checkpoint(path, {}, {})
    (tmp_path / "last.pt").write_text(json.dumps({"not": "a checkpoint"}))
    with pytest.raises(InputError, match=r"last\.pt: cannot read the checkpoint"):
        load_checkpoint(path, {}, {})


@pytest.mark.parametrize(
    "damage, line",
    [
        (lambda ix: truncate(ix / "index.faiss"), r"index\.faiss: cannot be read as a faiss index \(RuntimeError: "),
        (lambda ix: (ix / "ids.json").write_text('{"ids": ['), r"ids\.json line 1 column 10: malformed JSON"),
        (deep_rows, r"rows\.jsonl: not JSON lines \(maximum recursion depth exceeded.*\); run `kdpipe index` again"),
    ],
    ids=["index-truncated", "ids-not-json", "rows-deep"],
)
def test_search_refuses_a_damaged_index_in_one_line(workdir, tmp_path, damage, line):
    index = tmp_path / "index"
    assert run_cli("index", "--workdir", workdir.workdir, "--index", index).exit_code == 0
    damage(index)
    error = one_error_line(run_cli("search", "a dog", "--workdir", workdir.workdir, "--index", index))
    assert re.search(line, error), error


def test_distill_refuses_a_truncated_pretrained_tower_in_one_line(workdir, tmp_path):
    """The towers a student starts from (distill.student.image.path, a Hugging Face directory)."""
    from dataclasses import replace

    from pipeline.towers.image import build_image_tower
    from pipeline.towers.student import StudentConfig

    tower = tmp_path / "vit"
    shutil.copytree(workdir.student / "image_tower", tower)
    config = json.loads((workdir.student / "student_config.json").read_text())["config"]["image"]
    cfg = replace(StudentConfig().image, path=tower, image_size=config["image_size"])
    build_image_tower(cfg)  # intact: loads
    truncate(tower / "model.safetensors")
    with pytest.raises(
        InputError,
        match=rf"^distill\.student\.image\.path: {tower}: cannot be read as a Hugging Face "
        r"model directory \(SafetensorError: .*\); save the model there again",
    ):
        build_image_tower(cfg)
