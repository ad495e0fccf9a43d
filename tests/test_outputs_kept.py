"""kdpipe never deletes what it did not write, command by command: for every output path a command takes or derives,
an unrelated file, a folder of the user's files, or a file where a directory goes (a directory where a file goes)
survives byte for byte, and the command stops with one line naming the path (exit 2); its own earlier output is
replaced (test_ownership.py has the rule itself)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from deploy_helpers import tiny_workdir
from typer.testing import CliRunner

from pipeline.paths import ArtifactPaths
from pipeline.store.features import open_store
from pipeline.store.hdf5 import export_hdf5
from stages.cli import app


@pytest.fixture()
def work(tokenizer_dir, tmp_path, monkeypatch) -> ArtifactPaths:
    """A tiny work directory (index, image cache, store, student, baseline); cwd without a params.yaml."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDPIPE_FSYNC", "0")
    return tiny_workdir(tmp_path, tokenizer_dir)


def plant(path: Path, what: str) -> dict[str, bytes]:
    """A user's file or folder at `path`; returns what must still be there afterwards."""
    if what == "file":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"the user's own data\n")
    else:
        (path / "holiday").mkdir(parents=True, exist_ok=True)
        (path / "notes.txt").write_text("the user's notes\n")
        (path / "holiday" / "photo.jpg").write_bytes(bytes(range(256)))
    return snapshot(path)


def snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.name.endswith(".kdpipe-lock")  # the lock files beside outputs are kdpipe's
    }


def refused(result, path: Path) -> str:
    """One line on stderr naming `path`, exit 2, no traceback (stdout may say what the command set out to do)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def params(tmp_path: Path, work: ArtifactPaths, **sections) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"workdir": str(work.workdir), **sections}))
    return path


def h5_of(work: ArtifactPaths) -> Path:
    path = work.workdir.parent / "features.h5"
    if not path.exists():
        export_hdf5(work.features, path)
    return path


def embeddings_of(work: ArtifactPaths) -> Path:
    """The store in clip-retrieval's layout (import-embeddings' input)."""
    from pipeline.data.index import DatasetIndex
    from pipeline.store.clip_retrieval import export_embeddings

    path = work.workdir.parent / "embeddings"
    if not path.exists():
        export_embeddings(work.features, DatasetIndex.load(work.index_dir), path)
    return path


def dsmd_files(work: ArtifactPaths) -> list[str]:
    """--images / --texts of import-dsmd: the test split's rows per caption, as .npy."""
    sp = open_store(work.features).split("test")
    root = work.workdir.parent
    np.save(root / "i.npy", np.asarray(sp.image_emb, np.float32)[sp.text_image])
    np.save(root / "t.npy", np.asarray(sp.text_emb, np.float32))
    return ["--images", f"test={root / 'i.npy'}", "--texts", f"test={root / 't.npy'}"]


# (command, its output's kind, where the user's data lies, the command line); `out` is that place
COMMANDS = {
    "export --out": ("dir", lambda w, t: t / "out", lambda w, t, out: ["export", "--workdir", w.workdir, "--out", out]),
    "export's default": (
        "dir",
        lambda w, t: w.workdir / "export" / "student",
        lambda w, t, out: ["export", "--workdir", w.workdir],
    ),
    "index --index": (
        "dir",
        lambda w, t: t / "out",
        lambda w, t, out: ["index", "--workdir", w.workdir, "--index", out],
    ),
    "search's default index": (
        "dir",
        lambda w, t: w.search_index("test", "flat"),
        lambda w, t, out: ["search", "dog", "--workdir", w.workdir],
    ),
    "search's directory of indexes": (
        "dir",
        lambda w, t: w.workdir / "search",
        lambda w, t, out: ["search", "dog", "--workdir", w.workdir],
    ),
    "report --out": (
        "file",
        lambda w, t: t / "out",
        lambda w, t, out: ["report", "--workdir", w.workdir, "--out", out],
    ),
    "evaluate --features --out": (
        "file",
        lambda w, t: t / "out",
        lambda w, t, out: ["evaluate", "--features", w.features, "--out", out],
    ),
    "evaluate --out": (
        "file",
        lambda w, t: t / "out",
        lambda w, t, out: ["evaluate", "--params", params(t, w, evaluate={"latency": False}), "--out", out],
    ),
    "evaluate's metrics.md beside --out": (
        "file",
        lambda w, t: t / "metrics.md",
        lambda w, t, out: ["evaluate", "--params", params(t, w), "--out", t / "metrics.json"],
    ),
    "evaluate's plots/": ("dir", lambda w, t: w.plots, lambda w, t, out: ["evaluate", "--params", params(t, w)]),
    "export-hdf5 --out": ("file", lambda w, t: t / "out", lambda w, t, out: ["export-hdf5", w.features, "--out", out]),
    "import-hdf5 --out": ("dir", lambda w, t: t / "out", lambda w, t, out: ["import-hdf5", h5_of(w), "--out", out]),
    "import-dsmd --out": (
        "dir",
        lambda w, t: t / "out",
        lambda w, t, out: ["import-dsmd", "--index", w.index_dir, "--out", out, *dsmd_files(w)],
    ),
    "export-embeddings --out": (
        "dir",
        lambda w, t: t / "out",
        lambda w, t, out: ["export-embeddings", w.features, "--index", w.index_dir, "--out", out],
    ),
    "import-embeddings --out": (
        "dir",
        lambda w, t: t / "out",
        lambda w, t, out: ["import-embeddings", embeddings_of(w), "--index", w.index_dir, "--out", out],
    ),
    "demo-data --out": ("dir", lambda w, t: t / "out", lambda w, t, out: ["demo-data", "--out", out]),
    "demo-data --photos --out": (
        "dir",
        lambda w, t: t / "out",
        lambda w, t, out: ["demo-data", "--photos", "--out", out],
    ),
    "verify --write": ("dir", lambda w, t: t / "out", lambda w, t, out: ["verify", "--write", out]),
    "fit-teacher --out": (
        "dir",
        lambda w, t: t / "out",
        lambda w, t, out: ["fit-teacher", "--params", params(t, w), "--out", out],
    ),
    "prepare's index": (
        "dir",
        lambda w, t: t / "w2" / "index",
        lambda w, t, out: ["prepare", "--params", params(t, w, prepare=PREPARE), "--workdir", t / "w2"],
    ),
    "prepare's image cache": (
        "dir",
        lambda w, t: t / "w2" / "images.zarr",
        lambda w, t, out: ["prepare", "--params", params(t, w, prepare=PREPARE), "--workdir", t / "w2"],
    ),
    "extract --out": (
        "dir",
        lambda w, t: t / "out",
        lambda w, t, out: ["extract", "--params", params(t, w), "--out", out],
    ),
}
PREPARE = {"dataset": {"name": "toy", "annotations": "ann.json", "image_root": "images"}}


# a folder of the user's where the search indexes go is not a case: each index is a directory of its own inside
# it (search/test-flat, the row before), which nothing of the user's is replaced by
CASES = [(c, p) for c in COMMANDS for p in ("file", "folder") if (c, p) != ("search's directory of indexes", "folder")]


@pytest.mark.parametrize(("command", "planted"), CASES)
def test_a_users_file_or_folder_where_the_output_goes_survives(work, tmp_path, command, planted):
    _, where, args = COMMANDS[command]
    out = where(work, tmp_path)
    if out.exists():  # a default path the tiny work directory already fills (export's): the user's instead
        import shutil

        shutil.rmtree(out) if out.is_dir() else out.unlink()
    kept = plant(out, planted)
    line = refused(run(*args(work, tmp_path, out)), out)
    assert snapshot(out) == kept
    # what to do: move it away or choose another path (verify, which writes into a store only: it is none)
    assert "move it away or choose another path" in line or "not a kdpipe feature store" in line


def test_export_into_the_work_directory_or_a_parent_of_the_student_keeps_everything(work):
    before = snapshot(work.workdir)
    refused(run("export", "--workdir", work.workdir, "--out", work.workdir), work.workdir)
    assert snapshot(work.workdir) == before
    inside = work.student / "deploy"
    assert "inside the student directory" in refused(run("export", "--workdir", work.workdir, "--out", inside), inside)
    assert snapshot(work.workdir) == before


def test_export_replaces_its_own_export_but_not_once_a_user_added_a_file(work, tmp_path):
    out = tmp_path / "deploy"
    for _ in range(2):
        r = run("export", "--workdir", work.workdir, "--out", out)
        assert r.exit_code == 0, r.output
    assert (out / "README.md").read_text().startswith("# kdpipe student")
    (out / "my-benchmark.csv").write_text("mine")
    refused(run("export", "--workdir", work.workdir, "--out", out), out)
    assert (out / "my-benchmark.csv").read_text() == "mine"


@pytest.mark.parametrize(
    ("name", "flag"),
    [
        ("README.md", "--hf"),
        ("hf", "--hf"),
        ("open_clip", "--open-clip"),
        ("sentence_transformers", "--sentence-transformers"),
        ("onnx", "--onnx"),
    ],
)
def test_an_export_in_place_keeps_what_the_user_put_in_the_student_directory(work, name, flag):
    """Each format the export writes into the student directory replaces only an earlier one of its kind; all are
    claimed first, so a refused one leaves the others unwritten too."""
    plant(work.student / name, "file" if name.endswith(".md") else "folder")
    before = snapshot(work.student)
    refused(run("export", "--workdir", work.workdir, "--out", work.student, flag), work.student / name)
    assert snapshot(work.student) == before


@pytest.mark.parametrize(
    "command",
    [
        "index --index",
        "report --out",
        "evaluate --features --out",
        "export-hdf5 --out",
        "import-hdf5 --out",
        "import-dsmd --out",
        "import-embeddings --out",
        "export-embeddings --out",
        "demo-data --photos --out",
    ],
)
def test_a_command_replaces_its_own_earlier_output(work, tmp_path, command):
    _, where, args = COMMANDS[command]
    out = where(work, tmp_path)
    for _ in range(2):
        r = run(*args(work, tmp_path, out))
        assert r.exit_code == 0, r.output
    assert out.exists()


def test_evaluate_replaces_its_own_documents_and_plots(work, tmp_path):
    p = params(tmp_path, work, evaluate={"latency": False})
    for _ in range(2):
        r = run("evaluate", "--params", p)
        assert r.exit_code == 0, r.output
    assert json.loads(work.metrics.read_text())["split"] == "test"
    assert sorted(f.name for f in work.plots.iterdir()) == ["recall_at_k.png", "recall_i2t.csv", "recall_t2i.csv"]


@pytest.mark.parametrize(("option", "where"), [([], "student"), (["--baseline"], "baseline")])
@pytest.mark.parametrize("planted", ["file", "folder"])
def test_distill_keeps_a_users_file_or_folder_where_its_model_goes(tmp_path, monkeypatch, option, where, planted):
    from test_train import make_workdir, tiny_params

    monkeypatch.chdir(tmp_path)
    make_workdir(tmp_path)  # index, image cache and store under tmp_path, the work directory
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"workdir": str(tmp_path), "distill": tiny_params(tmp_path)}))
    kept = plant(tmp_path / where, planted)
    refused(run("distill", "--params", p, *option), tmp_path / where)
    assert snapshot(tmp_path / where) == kept
