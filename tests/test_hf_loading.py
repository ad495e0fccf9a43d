"""pipeline/teachers/hf_loading.py: a model directory or a hub id from the local cache, its identity, loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.teachers.hf_loading import load_model, model_identity, resolve_model_dir


def _tiny_bert(directory: Path) -> Path:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    BertModel(cfg).save_pretrained(directory)
    return directory


def _cache_with(model_dir: Path, cache: Path, repo_id: str, revision: str = "0123abcd" * 5) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    return repo / "snapshots" / revision


def test_a_directory_resolves_to_itself(tmp_path):
    d = _tiny_bert(tmp_path / "m")
    assert resolve_model_dir(str(d), "extract.teacher.hf.path") == d


def test_a_hub_id_resolves_from_the_local_cache_only(tmp_path):
    d = _tiny_bert(tmp_path / "m")
    snapshot = _cache_with(d, tmp_path / "cache", "acme/tiny-bert")
    assert resolve_model_dir("acme/tiny-bert", "k", cache_dir=tmp_path / "cache") == snapshot
    with pytest.raises(InputError, match=r"^k: acme/other is not a local directory and not in .*never downloads"):
        resolve_model_dir("acme/other", "k", cache_dir=tmp_path / "cache")


def test_directories_that_are_not_models_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has no config.json"):
        resolve_model_dir(tmp_path / "empty", "k")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(InputError, match="has no weights"):
        resolve_model_dir(tmp_path / "empty", "k")
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        resolve_model_dir(tmp_path / "f", "k")


def test_identity_follows_config_weights_and_tokenizer_files_not_the_location(tmp_path):
    d = _tiny_bert(tmp_path / "a")
    first = model_identity(d)
    assert set(first["weights"]) == {"model.safetensors"} and first["files"] == {}
    assert model_identity(shutil.copytree(d, tmp_path / "b")) == first  # moved: the same model
    (d / "vocab.txt").write_text("[PAD]\n")
    assert model_identity(d)["files"].keys() == {"vocab.txt"}
    cfg = json.loads((d / "config.json").read_text())
    cfg["layer_norm_eps"] = 1e-5
    (d / "config.json").write_text(json.dumps(cfg))
    assert model_identity(d)["config_sha256"] != first["config_sha256"]


def test_load_model_refuses_weights_that_do_not_fit(tmp_path):
    from transformers import BertModel, CLIPTextModel

    d = _tiny_bert(tmp_path / "m")
    model = load_model(BertModel, d, "k")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with pytest.raises(InputError, match="^k: "):
        load_model(CLIPTextModel, d, "k")
