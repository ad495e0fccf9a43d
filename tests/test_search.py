"""faiss search: the exact index returns the brute-force top-k, approximate ones report recall@10 against it,
indexes round-trip through disk, and `kdpipe index` / `kdpipe search` answer text and image queries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from deploy_helpers import tiny_workdir
from PIL import Image
from typer.testing import CliRunner

import pipeline.search.index as search_index
from pipeline.errors import InputError
from pipeline.search.index import IndexConfig, build_index, load_index, recall_at_k, save_index
from pipeline.towers.student import load_student
from stages.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")


def unit(rng, n, d=32):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("scan", ["8-bit", "float32"])
def test_flat_index_is_brute_force_and_round_trips(tmp_path, monkeypatch, scan):
    # this small gallery is scanned in float32; the 8-bit scan + rerank serves galleries past a size
    monkeypatch.setattr(search_index, "PREFILTER_MIN_VALUES", 0 if scan == "8-bit" else 10**9)
    rng = np.random.default_rng(0)
    emb, q = unit(rng, 500), unit(rng, 20)
    index = build_index(emb)
    save_index(index, [f"img{i}" for i in range(500)], tmp_path, kind="flat", dim=32)
    loaded = load_index(tmp_path)
    scores, rows = loaded.search(q, 10)
    oracle = np.argsort(-(q @ emb.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(rows, oracle)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ emb.T, oracle, 1), atol=1e-5)
    assert loaded.ids[rows[0, 0]] == f"img{oracle[0, 0]}" and recall_at_k(index, emb, q) == 1.0
    # one query at a time (the 8-bit scan + exact rerank, or float32) and a batch of 20+ (faiss) agree with the oracle
    one = [loaded.search(q[i : i + 1], 10) for i in range(3)]
    np.testing.assert_array_equal(np.concatenate([r for _, r in one]), oracle[:3])
    assert loaded.search(q[:1], 10)[1].dtype == np.int64 and loaded.search(q[:1], 999)[1].shape == (1, 500)
    # the 8-bit codes of the fast exact scan are stored beside a flat index; without them (an index written
    # before they were) the same answers; codes of another shape are refused in one line
    assert loaded.codes is not None and loaded.codes.codes.shape == (500, 32)
    (tmp_path / "codes.npy").unlink()
    older = load_index(tmp_path)
    assert older.codes is None
    np.testing.assert_array_equal(np.concatenate([older.search(q[i : i + 1], 10)[1] for i in range(3)]), oracle[:3])
    np.save(tmp_path / "codes.npy", np.zeros((499, 32), np.uint8))
    with pytest.raises(InputError, match=r"codes\.npy: uint8 \(499, 32\) does not match index\.faiss \(500 x 32\)"):
        load_index(tmp_path)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_indexes_recall_against_exact(kind, tmp_path):
    rng = np.random.default_rng(1)
    emb = unit(rng, 2000)
    q = emb[:100] + 0.05 * unit(rng, 100)  # near-duplicate queries: a good index finds their neighbours
    index = build_index(emb, IndexConfig(kind=kind, pq_bytes=8))
    r = recall_at_k(index, emb, q)
    assert (r > 0.9) if kind == "hnsw" else (0.2 < r < 1.0)  # PQ codes are lossy; HNSW is near exact here
    save_index(index, [str(i) for i in range(2000)], tmp_path, kind=kind, nprobe=16, ef_search=128)
    np.testing.assert_array_equal(load_index(tmp_path).search(q, 10)[1], index.search(q, 10)[1])
    assert not (tmp_path / "codes.npy").exists()  # the 8-bit codes serve the exact flat index only


def test_load_refuses_missing_or_mismatched(tmp_path):
    with pytest.raises(InputError, match="run `kdpipe index` first"):
        load_index(tmp_path)
    save_index(build_index(unit(np.random.default_rng(0), 3)), ["a", "b", "c"], tmp_path, kind="flat")
    (tmp_path / "ids.json").write_text('{"ids": ["a"]}')
    with pytest.raises(InputError, match="does not match"):
        load_index(tmp_path)


def test_cli_index_and_search_split_and_folder(tokenizer_dir, tmp_path):
    paths = tiny_workdir(tmp_path, tokenizer_dir)
    run = CliRunner().invoke
    result = run(app, ["search", "a red dog", "--workdir", str(paths.workdir), "-k", "3"])
    assert result.exit_code == 0, result.output  # first use: builds the default index (test split, exact)
    assert "index: flat over 9 images" in result.output and (paths.workdir / "search" / "ids.json").is_file()
    result = run(app, ["index", "--workdir", str(paths.workdir), "--split", "test"])
    assert result.exit_code == 0, result.output
    result = run(app, ["search", "a red dog", "--workdir", str(paths.workdir), "-k", "3"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    # oracle: the student's own embeddings, ranked by numpy
    from pipeline.search.gallery import embed_images, embed_texts, split_gallery

    model = load_student(paths.student)
    gallery = split_gallery(paths, "test")
    with torch.no_grad():
        s = embed_texts(model, ["a red dog"]) @ embed_images(model, gallery.images).T
    expected = [gallery.ids[i] for i in np.argsort(-s[0], kind="stable")[:3]]
    assert [line.split()[2] for line in lines[:3]] == expected
    assert lines[3].startswith("search: 3 results; encode ") and lines[3].endswith(" ms")

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["b.png", "sub/a.png", "c.jpg"]):
        Image.fromarray(np.asarray(gallery.images[i])).resize((40, 30)).save(folder / name)
    out = tmp_path / "folder_index"
    result = run(app, ["index", "--workdir", str(paths.workdir), "--folder", str(folder), "--index", str(out)])
    assert result.exit_code == 0, result.output
    result = run(
        app,
        [
            "search",
            "--image",
            str(folder / "sub/a.png"),
            "--workdir",
            str(paths.workdir),
            "--index",
            str(out),
            "-k",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    hits = [line.split() for line in result.output.splitlines() if line.startswith("  1  ")]
    rank, score, image_id = hits[0]
    assert image_id == "sub/a.png" and float(score) == pytest.approx(1.0, abs=1e-5)  # itself, same pixels


def test_cli_search_errors_are_one_line(tokenizer_dir, tmp_path):
    result = CliRunner().invoke(app, ["search", "dog", "--workdir", str(tmp_path), "--index", str(tmp_path)])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "kdpipe index" in result.output
    result = CliRunner().invoke(app, ["search", "dog", "--workdir", str(tmp_path)])  # nothing to build one from
    assert result.exit_code == 2 and result.output.startswith("error: ") and "kdpipe prepare" in result.output
    result = CliRunner().invoke(app, ["index", "--workdir", str(tmp_path), "--kind", "lsh"])
    assert result.exit_code == 2 and "--kind 'lsh'" in result.output


def test_the_default_student_is_distill_runs_first_distilled_variant(tokenizer_dir, tmp_path):
    """search, index, export and report use, unless told, the model `dvc repro` trained: with `distill.runs`
    (the demo), the first seed of the first distilled variant and of compare_to, in models/."""
    import shutil

    import yaml

    from stages._deploy import default_models

    paths = tiny_workdir(tmp_path, tokenizer_dir)
    params = tmp_path / "params.yaml"
    runs = {"seeds": [3, 4], "variants": {"base": {"baseline": True}, "s_a": {}, "s_b": {}}, "compare_to": "base"}
    params.write_text(yaml.safe_dump({"workdir": str(paths.workdir), "distill": {"runs": runs}}))
    plain = {"student": paths.student, "baseline": paths.workdir / "baseline"}
    assert default_models(params, paths) == plain  # the runs are not there, distill's own output is
    shutil.move(paths.student, paths.model("s_a-s3"))
    shutil.move(paths.workdir / "baseline", paths.model("base-s3"))
    assert default_models(params, paths) == {"s_a": paths.model("s_a-s3"), "base": paths.model("base-s3")}
    result = CliRunner().invoke(app, ["search", "a red dog", "--params", str(params), "-k", "2"])
    assert result.exit_code == 0, result.output
    assert '"student": "' + str(paths.model("s_a-s3")) in (paths.workdir / "search" / "ids.json").read_text()
    params.write_text(yaml.safe_dump({"workdir": str(paths.workdir)}))  # no runs: distill's own output, missing
    result = CliRunner().invoke(app, ["export", "--params", str(params)])
    assert result.exit_code == 2 and f"{paths.student}: no student here" in result.output
