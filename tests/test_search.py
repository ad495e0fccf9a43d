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
from pipeline.data.index import DatasetIndex
from pipeline.errors import InputError
from pipeline.search.index import IndexConfig, build_index, load_index, recall_at_k, save_index
from pipeline.store.image_cache import open_image_cache, write_image_cache
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


def result_lines(output: str) -> list[list[str]]:
    """The result lines of `kdpipe search` output, split on runs of two spaces: rank, score, [split,] id, captions."""
    return [line.strip().split("  ") for line in output.splitlines() if line[:3].strip().isdigit()]


def test_cli_index_and_search_split_and_folder(tokenizer_dir, tmp_path):
    paths = tiny_workdir(tmp_path, tokenizer_dir)
    run = CliRunner().invoke
    result = run(app, ["search", "a red dog", "--workdir", str(paths.workdir), "-k", "3"])
    assert result.exit_code == 0, result.output  # first use: builds the default index (test split, exact)
    flat = paths.search_index("test", "flat")
    assert f"building the flat index {flat} (first use)" in result.output
    assert "index: flat index of toy split test, 9 images" in result.output and (flat / "ids.json").is_file()
    result = run(app, ["index", "--workdir", str(paths.workdir), "--split", "test", "--kind", "hnsw"])
    assert result.exit_code == 0, result.output
    hnsw = paths.search_index("test", "hnsw")
    assert f"wrote {hnsw}" in result.output and (flat / "ids.json").is_file()  # the flat index is still there
    result = run(app, ["search", "a red dog", "--workdir", str(paths.workdir), "-k", "3"])
    assert result.exit_code == 0, result.output
    assert "building" not in result.output and f"the flat index {flat} answers: toy split test" in result.output
    # oracle: the student's own embeddings, ranked by numpy; each result prints the image's captions
    from pipeline.search.gallery import embed_images, embed_texts, split_gallery

    model = load_student(paths.student)
    gallery = split_gallery(paths, "test")
    with torch.no_grad():
        s = embed_texts(model, ["a red dog"]) @ embed_images(model, gallery.images).T
    top = np.argsort(-s[0], kind="stable")[:3]
    captions = gallery.captions_of()
    assert [r[2:] for r in result_lines(result.output)] == [[gallery.ids[i], " | ".join(captions[i])] for i in top]
    assert result.output.strip().splitlines()[-1].startswith("search: 3 results; encode ")
    result = run(app, ["search", "a red dog", "--workdir", str(paths.workdir), "-k", "3", "--kind", "hnsw"])
    assert result.exit_code == 0, result.output
    assert f"the hnsw index {hnsw} answers" in result.output

    # every split at once: each result names its split
    result = run(app, ["search", "a red dog", "--workdir", str(paths.workdir), "-k", "13", "--split", "all"])
    assert result.exit_code == 0, result.output
    assert "toy split all" in result.output
    rows = result_lines(result.output)
    assert sorted((r[2], r[3]) for r in rows) == sorted(
        [("train", f"train{i}.jpg") for i in range(4)] + [("test", f"test{i}.jpg") for i in range(9)]
    )

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["b.png", "sub/a.png", "c.jpg"]):
        Image.fromarray(np.asarray(gallery.images[i])).resize((40, 30)).save(folder / name)
    out = tmp_path / "folder_index"
    result = run(app, ["index", "--workdir", str(paths.workdir), "--folder", str(folder), "--index", str(out)])
    assert result.exit_code == 0, result.output
    image_query = ["search", "--image", str(folder / "sub/a.png"), "--workdir", str(paths.workdir), "-k", "1"]
    result = run(app, [*image_query, "--index", str(out)])
    assert result.exit_code == 0, result.output
    rank, score, image_id = result_lines(result.output)[0]
    assert image_id == "sub/a.png" and float(score) == pytest.approx(1.0, abs=1e-5)  # itself, same pixels
    # an explicit --index of another gallery or kind is not replaced
    result = run(app, ["index", "--workdir", str(paths.workdir), "--split", "test", "--index", str(out)])
    assert result.exit_code == 2 and f"{out}: holds the flat index of folder {folder}" in result.output
    # without --index, the folder's own default index
    result = run(app, [*image_query, "--folder", str(folder)])
    assert result.exit_code == 0, result.output
    assert "(first use)" in result.output and result_lines(result.output)[0][2] == "sub/a.png"


def test_an_index_of_other_weights_is_rebuilt_or_refused(tokenizer_dir, tmp_path):
    """After the student is retrained, its default index is rebuilt before answering, and an explicit --index
    built by other weights is refused in one line: never an answer from another model's embeddings."""
    import os

    from deploy_helpers import tiny_student

    from pipeline.towers.student import save_student

    paths = tiny_workdir(tmp_path, tokenizer_dir)
    run = CliRunner().invoke
    query = ["search", "a red dog", "--workdir", str(paths.workdir), "-k", "2"]
    assert run(app, query).exit_code == 0
    weights = paths.student / "model.safetensors"
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes: still current
    result = run(app, query)
    assert result.exit_code == 0 and "building" not in result.output, result.output
    save_student(tiny_student(tokenizer_dir, 7), paths.student)  # retrained
    result = run(app, query)
    assert result.exit_code == 0, result.output
    assert "(it was built by other weights than" in result.output
    out = tmp_path / "mine"
    assert run(app, ["index", "--workdir", str(paths.workdir), "--index", str(out)]).exit_code == 0
    save_student(tiny_student(tokenizer_dir, 8), paths.student)
    result = run(app, [*query, "--index", str(out)])
    assert result.exit_code == 2 and result.output.startswith(f"error: {out}: this index cannot answer"), result.output
    # the dataset prepared again (a caption changed: a new index fingerprint, the cache made from it)
    assert "(it was built by other weights" in run(app, query).output  # the default index follows the student
    assert "building" not in run(app, query).output
    index = DatasetIndex.load(paths.index_dir)
    edited = DatasetIndex.from_lists(
        index.name,
        index.image_root,
        list(zip(index.image_id, index.image_path, index.image_split)),
        [("a blue cat", 0), *zip(index.caption_text[1:], index.caption_image[1:].tolist())],
    )
    edited.save(paths.index_dir)
    cache = open_image_cache(paths.images)
    pixels = {s: np.array(cache.split(s)) for s in cache.splits}
    write_image_cache(paths.images, pixels, fingerprint=edited.fingerprint, meta={"resize": cache.attrs["resize"]})
    result = run(app, query)
    assert result.exit_code == 0 and f"the dataset in {paths.index_dir} changed since it was built" in result.output


def test_cli_search_errors_are_one_line(tokenizer_dir, tmp_path):
    import shutil

    run = CliRunner().invoke
    result = run(app, ["search", "dog", "--workdir", str(tmp_path)])  # nothing trained here
    assert result.exit_code == 2 and result.output.startswith("error: ") and "kdpipe distill" in result.output
    paths = tiny_workdir(tmp_path / "w", tokenizer_dir)
    for query in ([], ["dog", "--image", str(tmp_path / "a.png")]):  # neither, or both: refused before any build
        result = run(app, ["search", *query, "--workdir", str(paths.workdir)])
        assert result.output == "error: search: give either a text query or --image PATH\n"
    result = run(app, ["search", "--image", str(tmp_path / "missing.png"), "--workdir", str(paths.workdir)])
    assert result.output == f"error: {tmp_path / 'missing.png'}: image file not found\n"
    assert not (paths.workdir / "search").exists()
    result = run(app, ["search", "dog", "--workdir", str(paths.workdir), "--index", str(tmp_path / "none")])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "kdpipe index" in result.output
    shutil.rmtree(paths.index_dir)
    result = run(app, ["search", "dog", "--workdir", str(paths.workdir)])  # nothing to build one from
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 2 and last.startswith("error: ") and "kdpipe prepare" in last
    result = run(app, ["index", "--workdir", str(tmp_path), "--kind", "lsh"])
    assert result.exit_code == 2 and "--kind 'lsh'" in result.output
    assert len(result.output.strip().splitlines()) == 1


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
    ids = paths.search_index("test", "flat") / "ids.json"
    assert '"student": "' + str(paths.model("s_a-s3")) in ids.read_text()
    params.write_text(yaml.safe_dump({"workdir": str(paths.workdir)}))  # no runs: distill's own output, missing
    result = CliRunner().invoke(app, ["export", "--params", str(params)])
    assert result.exit_code == 2 and f"{paths.student}: no student here" in result.output
