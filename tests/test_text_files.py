"""Pathological text inputs end in one line naming the file: JSON and YAML nested thousands of levels deep, a
YAML alias bomb (refused before it expands), an alias inside itself; ordinary files parse as before."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from cli_helpers import one_error_line, run_cli

from pipeline.data.readers import DatasetConfig, read_dataset
from pipeline.errors import ConfigError, InputError
from pipeline.text_files import MAX_YAML_DEPTH, MAX_YAML_VALUES, parse_json, parse_yaml, read_json

REPO = Path(__file__).resolve().parent.parent
DEEP = 100_000  # far past any parser's recursion limit


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    """`a0: [x x ...]`, `a1: [*a0 *a0 ...]`, ...: width**levels scalars from a few hundred bytes."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_yaml_like_pyyaml_on_every_params_file_of_the_repository():
    """The oracle: yaml.safe_load, on the files kdpipe is really given (anchors and merges included)."""
    files = [REPO / "params.yaml", *sorted((REPO / "configs").glob("*.yaml"))]
    assert len(files) > 3
    for path in files:
        text = path.read_text()
        assert parse_yaml(text, str(path)) == yaml.safe_load(text), path
    anchors = "base: &b {lr: 0.001, epochs: 3}\nrun: {<<: *b, epochs: 5}\nboth: [*b, *b]\n"
    assert parse_yaml(anchors, "x") == yaml.safe_load(anchors)


def test_a_yaml_alias_bomb_is_refused_before_it_expands():
    text = billion_laughs()  # 9**9 = 387M scalars
    assert len(text) < 500
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"^bomb.yaml: stands for more than {MAX_YAML_VALUES:,} values once its"):
        parse_yaml(text, "bomb.yaml")
    assert time.perf_counter() - start < 5  # composed and counted, never expanded (that takes minutes and GBs)
    ok = billion_laughs(levels=3, width=9)  # 729 scalars: aliases of a sensible size stay allowed
    assert parse_yaml(ok, "ok.yaml") == yaml.safe_load(ok)


@pytest.mark.parametrize(
    "text, message",
    [
        ("a: " + "[" * DEEP + "]" * DEEP, r"^f.yaml: YAML nested thousands of levels deep"),
        ("a: " + "[" * 100 + "]" * 100, rf"^f.yaml: nested more than {MAX_YAML_DEPTH} levels deep"),
        ("a: " + "{b: " * 100 + "1" + "}" * 100, rf"^f.yaml: nested more than {MAX_YAML_DEPTH} levels deep"),
        ("a: &x [1, *x]", r"^f.yaml: an alias \(\*name\) inside the value it names"),
        ("a: [1,\nb: 2", r"^f.yaml line 2: not valid YAML"),
    ],
)
def test_pathological_yaml_is_one_config_error(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_yaml(text, "f.yaml")


def test_params_file_and_set_value_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bomb.yaml").write_text(
        "workdir: w\nruntime:\n" + "".join(f"  {ln}\n" for ln in billion_laughs().splitlines())
    )
    (tmp_path / "deep.yaml").write_text("workdir: w\nprepare: " + "[" * DEEP + "]" * DEEP + "\n")
    assert one_error_line(run_cli("prepare", "--params", "bomb.yaml")).startswith(
        f"error: bomb.yaml: stands for more than {MAX_YAML_VALUES:,} values"
    )
    assert one_error_line(run_cli("prepare", "--params", "deep.yaml")).startswith(
        "error: deep.yaml: YAML nested thousands of levels deep"
    )
    line = one_error_line(run_cli("prepare", "--params", "deep.yaml", "--set", "prepare.x=" + "[" * 5000 + "]" * 5000))
    assert line.startswith("error: deep.yaml: YAML nested")  # the file first; then the --set value alone:
    (tmp_path / "ok.yaml").write_text("workdir: w\n")
    line = one_error_line(run_cli("prepare", "--params", "ok.yaml", "--set", "prepare.x=" + "[" * 5000 + "]" * 5000))
    assert line.startswith("error: --set 'prepare.x=[[[") and line.endswith(
        "YAML nested thousands of levels deep; write it flat"
    )


def test_json_like_the_json_module_and_deep_json_is_one_input_error(tmp_path):
    doc = {"images": [{"filename": "a.jpg", "sentences": [{"raw": "é ✓ 🐈"}]}], "n": [1, 2.5, None, True]}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    assert read_json(path) == doc
    with pytest.raises(InputError, match=r"^x.json: JSON arrays or objects nested thousands of levels deep"):
        parse_json("[" * DEEP + "]" * DEEP, "x.json")
    with pytest.raises(InputError, match=r"^x.jsonl line 7 column 1: malformed JSON"):
        parse_json('{"a":\n}', "x.jsonl", first_line=6)
    path.write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(InputError, match=rf"^{path}: not UTF-8 text \(invalid continuation byte at byte 7\)"):
        read_json(path)


@pytest.mark.parametrize("fmt", ["karpathy", "jsonl", "dsmd"])
def test_annotations_nested_very_deep_are_one_line_naming_the_file(tmp_path, fmt):
    deep = "[" * DEEP + "]" * DEEP
    text = {
        "karpathy": '{"images": [{"filename": "a.jpg", "split": "train", "sentences": ' + deep + "}]}",
        "jsonl": '{"image": "a.jpg", "caption": "x", "split": "train"}\n{"image": ' + deep + "}\n",
        "dsmd": '[{"filename": "a.jpg", "description": ' + deep + "}]",
    }[fmt]
    path = tmp_path / f"ann.{'jsonl' if fmt == 'jsonl' else 'json'}"
    path.write_text(text)
    cfg = DatasetConfig(annotations=path, image_root=tmp_path, format=fmt, default_split="train")
    with pytest.raises(InputError, match=rf"^{path}: JSON arrays or objects nested thousands of levels deep"):
        read_dataset(cfg)
