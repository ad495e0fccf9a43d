"""The mine stage: stored candidates equal a brute-force top-K (exact scores, ties by row, own positives out),
stored cross-encoder scores equal the cross-encoder called directly, kill-and-resume is bitwise exact, and a
mined store is refused against any other feature store."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from extract_helpers import TinyTeacher, make_dataset, store_files
from mine_helpers import TinyCrossEncoder, brute_force
from PIL import Image
from typer.testing import CliRunner

from pipeline.data.index import DatasetIndex
from pipeline.errors import InputError
from pipeline.extract.config import ExtractConfig
from pipeline.extract.run import run_extract
from pipeline.hashing import sha256_file
from pipeline.mine.neighbours import SplitMiner, full_precision_matmul
from pipeline.mine.run import MineConfig, run_mine
from pipeline.mine.topk import candidates_from_scores, check_bound, coarse_bounds, row_norms
from pipeline.store import checksums
from pipeline.store.chunk_files import chunk_file
from pipeline.store.features import open_store, read_attrs
from pipeline.store.features_writer import write_store
from pipeline.store.mined import open_mined

TESTS = Path(__file__).parent
REPO = TESTS.parent


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    monkeypatch.setenv("KDPIPE_FSYNC", "0")


def _rows(rng, n, d, around=None):
    x = rng.normal(size=(n, d)) + (0 if around is None else 1.5 * around)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _tied_store(path, dtype="float16"):
    """A store whose train split has exact ties (duplicated image and caption rows), near-ties (rows one float16
    step apart), unpaired images (candidates and queries with no positive) and several chunks per array."""
    rng = np.random.default_rng(3)
    n_img, n_cap, d = 41, 97, 24
    image = _rows(rng, n_img, d).astype(np.float16).astype(np.float64)
    image[7] = image[3]  # exact ties for every caption
    image[30] = image[3]
    image[12] = image[11]
    image[12, 0] = np.nextafter(np.float16(image[11, 0]), np.float16(9), dtype=np.float16)  # one ulp apart
    text_image = rng.integers(0, n_img - 5, n_cap).astype(np.int32)  # the last 5 images have no caption
    text = _rows(rng, n_cap, d, around=image[text_image])
    text[50] = text[49]
    splits = {
        "train": {
            "image_emb": image,
            "text_emb": text,
            "text_image": text_image,
            "image_id": [f"i{j}" for j in range(n_img)],
        },
        "test": {
            "image_emb": _rows(rng, 9, d),
            "text_emb": _rows(rng, 18, d),
            "text_image": np.repeat(np.arange(9), 2).astype(np.int32),
            "image_id": [f"t{j}" for j in range(9)],
        },
    }
    write_store(
        path, splits, teacher={"name": "rand"}, dataset={"name": "d", "fingerprint": "f"}, dtype=dtype, chunk_rows=16
    )
    return open_store(path)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return _tied_store(tmp_path_factory.mktemp("tied") / "features.zarr")


@pytest.mark.parametrize("coarse", ["float32", "bfloat16"])
def test_stored_candidates_equal_a_brute_force_top_k(tied, tmp_path, coarse):
    cfg = MineConfig(k=6, splits=("train", "test"), chunk_rows=23, block_rows=10, coarse_dtype=coarse)
    result = run_mine(tied.path, cfg, tmp_path / "mined.zarr")
    assert result.units_total == 5 + 2 + 1 + 1  # 97 captions in chunks of 23 (5), 41 images (2); test: one each
    mined = open_mined(tmp_path / "mined.zarr", tied)
    for split in ("train", "test"):
        sp = tied.split(split)
        t2i, t2i_s, i2t, i2t_s = brute_force(sp.image_emb, sp.text_emb, np.asarray(sp.text_image), 6)
        got = mined.split(split)
        np.testing.assert_array_equal(got.text_to_image.rows, t2i)
        np.testing.assert_array_equal(got.image_to_text.rows, i2t)
        # float16 of the exact float64 score, rounded once
        np.testing.assert_array_equal(got.text_to_image.sims, t2i_s.astype(np.float16))
        np.testing.assert_array_equal(got.image_to_text.sims, i2t_s.astype(np.float16))
    train = mined.split("train").text_to_image.rows
    assert ((train == 3) & np.roll(train == 7, -1, axis=1)).any(), "the planted tie is ranked lower row first"


def test_the_window_is_exact_whatever_is_kept_beyond_k(tied):
    """extra=0 sends every query through the overflow path (its window always reaches past k); the device path
    (float64 in torch) equals the numpy path; all equal the oracle."""
    sp = tied.split("train")
    ti = np.asarray(sp.text_image)
    t2i, _, i2t, _ = brute_force(sp.image_emb, sp.text_emb, ti, 5)
    for extra, on_device in ((0, False), (1, True), (8, True)):
        m = SplitMiner(
            sp.image_emb,
            sp.text_emb,
            ti,
            5,
            device=torch.device("cpu"),
            coarse_dtype=torch.bfloat16,
            block_rows=13,
            extra=extra,
            exact_on_device=on_device,
        )
        rows = np.concatenate([m.caption_unit(a, min(97, a + 40))[0] for a in range(0, 97, 40)])
        np.testing.assert_array_equal(rows, t2i)
        np.testing.assert_array_equal(m.image_unit(0, 41)[0], i2t)


def test_the_window_holds_every_true_top_k_row_under_worst_case_coarse_errors():
    """The proof's case: the true top k (rows 0..k-1, the k-th at exactly s) pushed DOWN by the full bound eps,
    twenty rows just below s pushed UP by it. Their coarse scores then fill the k best places, so only a
    window of 2 eps below the coarse k-th still reaches the true k-th row."""
    k, eps, s = 4, 1e-3, 0.5
    exact = np.concatenate([[0.9, 0.8, 0.7, s], s - np.linspace(0.1, 0.9, 20) * eps, np.full(30, 0.1)])
    true_top = set(range(k))
    coarse = exact + np.where(np.isin(np.arange(len(exact)), list(true_top)), -eps, eps)
    # extra >= N: the top-k call already holds every row, so the window alone decides (no overflow rescan)
    cand = candidates_from_scores(torch.tensor(coarse[None], dtype=torch.float32), k, 99, torch.tensor([eps]))
    assert true_top <= set(cand.rows[0][cand.rows[0] >= 0].tolist())
    assert (cand.rows[0] >= 0).sum() == k + 20  # ... and nothing beyond the window


@pytest.mark.parametrize("coarse", [torch.float32, torch.bfloat16])
def test_the_coarse_bound_holds_for_every_pair_and_a_broken_one_stops_the_run(coarse):
    rng = np.random.default_rng(5)
    q = _rows(rng, 300, 512).astype(np.float16)
    g = _rows(rng, 400, 512, around=np.repeat(q[:100].astype(np.float64), 4, axis=0)).astype(np.float16)
    eps = coarse_bounds(row_norms(q, coarse), row_norms(g, coarse), 512, np.dtype(np.float16))
    with full_precision_matmul():
        got = (torch.from_numpy(q).to(coarse) @ torch.from_numpy(g).to(coarse).T).float().numpy()
    exact = q.astype(np.float64) @ g.astype(np.float64).T
    assert (np.abs(got - exact) <= eps[:, None]).all()
    rows = np.tile(np.arange(400), (300, 1))
    check_bound(exact, got, rows, eps, "ok")
    with pytest.raises(RuntimeError, match="exceeds its proven bound"):
        check_bound(exact, got, rows, eps * 0, "text_to_image")


def test_a_float32_store_mines_the_same_neighbours(tmp_path):
    store = _tied_store(tmp_path / "f32.zarr", dtype="float32")
    run_mine(store.path, MineConfig(k=4, chunk_rows=50), tmp_path / "mined.zarr")
    sp, got = store.split("train"), open_mined(tmp_path / "mined.zarr", store).split("train")
    t2i, _, i2t, _ = brute_force(sp.image_emb, sp.text_emb, np.asarray(sp.text_image), 4)
    np.testing.assert_array_equal(got.text_to_image.rows, t2i)
    np.testing.assert_array_equal(got.image_to_text.rows, i2t)


def test_plain_zarr_reads_it_and_every_chunk_matches_its_checksum(tied, tmp_path):
    out = tmp_path / "mined.zarr"
    run_mine(tied.path, MineConfig(k=3, chunk_rows=30), out)
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["format"] == "kdpipe-mined" and g.attrs["complete"] is True and g.attrs["k"] == 3
    assert g["train/text_to_image/rows"].shape == (97, 3) and g["train/text_to_image/rows"].dtype == np.int32
    assert g["train/image_to_text/sims"].dtype == np.float16
    assert not (out / ".mine").exists()
    for split, direction, name in (("train", "text_to_image", "rows"), ("train", "image_to_text", "sims")):
        arr = g[f"{split}/{direction}/{name}"]
        sums = checksums.recorded("x", arr)
        keys = checksums.chunk_keys(arr)
        assert len(keys) > 1 and sorted(sums) == sorted(keys)
        for i, key in enumerate(keys):
            assert sums[key] == sha256_file(chunk_file(arr, (i, 0)))


def test_a_mined_store_is_refused_against_another_store_and_when_tampered(tied, tmp_path):
    out = tmp_path / "mined.zarr"
    run_mine(tied.path, MineConfig(k=3), out)
    other = _tied_store(tmp_path / "other.zarr")  # the same rows, another dataset identity
    g = zarr.open_group(str(other.path), mode="r+")
    g.attrs["dataset"] = {"name": "d", "fingerprint": "g"}
    with pytest.raises(InputError, match="mined from other teacher rows"):
        open_mined(out, open_store(other.path))
    # a caption's own image written into its candidates
    arr = zarr.open_array(str(out / "train/text_to_image/rows"), mode="r+")
    rows = arr[:]
    rows[0, 0] = int(tied.split("train").text_image[0])
    arr[:] = rows
    with pytest.raises(InputError, match="own image"):
        open_mined(out, tied)
    arr[:] = np.full_like(rows, 41)  # out of range
    with pytest.raises(InputError, match="outside"):
        open_mined(out, tied)


def test_k_larger_than_a_split_allows_is_one_line(tied, tmp_path):
    with pytest.raises(InputError, match="mine.k = 9, but a caption has only 8 other images"):
        run_mine(tied.path, MineConfig(k=9, splits=("test",)), tmp_path / "m.zarr")
    with pytest.raises(InputError, match="no split 'val'"):
        run_mine(tied.path, MineConfig(splits=("val",)), tmp_path / "m.zarr")


def test_a_foreign_directory_is_never_cleared(tied, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine, not kdpipe's")
    with pytest.raises(InputError, match="exists and is not a mined store written by kdpipe; kdpipe replaces only"):
        run_mine(tied.path, MineConfig(k=3), out)
    assert (out / "notes.txt").read_text() == "mine, not kdpipe's"
    (tmp_path / "file").write_text("a user's file")
    with pytest.raises(InputError, match="is a file, where a mined store goes"):
        run_mine(tied.path, MineConfig(k=3), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "a user's file"


# ---------------------------------------------------------------------------------------------------------
# Cross-encoder scores (a store extracted from real image files)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    index = make_dataset(root)
    index.save(root / "index")
    store = root / "features.zarr"
    run_extract(index, ExtractConfig(chunk_rows=8, num_workers=0), store, teacher=TinyTeacher())
    return index, root, store


SCORED = MineConfig(k=5, chunk_rows=8, pair_batch_size=7, image_batch_size=3, text_batch_size=4, num_workers=0)


@pytest.fixture(scope="module")
def scored_reference(extracted, tmp_path_factory, one_thread):
    """One thread, as the killed subprocess runs: a CPU matmul's rounding may depend on the thread count (a
    resumed run equals an uninterrupted one on the same device with the same settings, as extract's)."""
    index, _, store = extracted
    out = tmp_path_factory.mktemp("ref") / "mined.zarr"
    run_mine(store, SCORED, out, index=index, cross_encoder=TinyCrossEncoder())
    return out


def test_stored_scores_equal_the_cross_encoder_called_directly(extracted, scored_reference):
    index, _, store = extracted
    ce = TinyCrossEncoder()
    view, got = index.split("train"), open_mined(scored_reference, open_store(store)).split("train")
    t2i = got.text_to_image
    assert t2i.ce_scores.shape == (view.n_captions, 6) and got.image_to_text.ce_scores.shape == (view.n_images, 5)

    def direct(image_row, caption_row):
        with Image.open(view.image_path[image_row]) as im:
            pixels = ce.preprocess_image(im.convert("RGB"))[None]
        return float(ce.score_pairs(pixels, ce.tokenize([str(view.caption_text[caption_row])]))[0])

    for m in range(view.n_captions):
        expected = [direct(view.text_image[m], m)] + [direct(j, m) for j in t2i.rows[m]]
        np.testing.assert_allclose(t2i.ce_scores[m], expected, rtol=1e-5, atol=1e-6)
    for j in range(0, view.n_images, 4):
        expected = [direct(j, m) for m in got.image_to_text.rows[j]]
        np.testing.assert_allclose(got.image_to_text.ce_scores[j], expected, rtol=1e-5, atol=1e-6)


def test_state_caching_and_loader_workers_do_not_change_a_byte(extracted, scored_reference, tmp_path):
    """Images decoded by two forked loader workers, and states computed per unit instead of kept for the
    split (state_cache_mib 0), give the same scores."""
    index, _, store = extracted
    cfg = MineConfig(**{**SCORED.__dict__, "num_workers": 2, "state_cache_mib": 0})
    run_mine(store, cfg, tmp_path / "mined.zarr", index=index, cross_encoder=TinyCrossEncoder())
    assert store_files(tmp_path / "mined.zarr") == store_files(scored_reference)


def _script(tmp_path, body):
    path = tmp_path / "run.py"
    path.write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n" + textwrap.dedent(body))
    return path


@pytest.mark.parametrize("kill_during", ["text_to_image", "text_to_image_ce"])
def test_sigkill_then_resume_is_bitwise_identical(extracted, scored_reference, tmp_path, kill_during):
    index, root, store = extracted
    out = tmp_path / "mined.zarr"
    script = _script(
        tmp_path,
        f"""
        import time
        from mine_helpers import TinyCrossEncoder
        from pipeline.data.index import DatasetIndex
        from pipeline.mine import neighbours
        from pipeline.mine.run import MineConfig, run_mine
        unit = neighbours.SplitMiner.caption_unit
        def slow(self, a, b):
            time.sleep(0.3)
            return unit(self, a, b)
        neighbours.SplitMiner.caption_unit = slow
        cfg = MineConfig(**{SCORED.__dict__!r})
        run_mine(sys.argv[1], cfg, sys.argv[2], index=DatasetIndex.load(sys.argv[3]), cross_encoder=TinyCrossEncoder(delay=0.1))
        """,
    )
    env = dict(os.environ, KDPIPE_PROGRESS="0", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", KDPIPE_FSYNC="1")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(store), str(out), str(root / "index")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    done = out / ".mine" / "done" / "train"
    deadline = time.monotonic() + 120
    try:
        while len(list(done.glob(f"{kill_during}.*.json"))) < 2:  # kill mid-unit, a few units in
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the mine did not get going"
            time.sleep(0.02)
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    committed = len(list(done.glob("*.json")))
    assert read_attrs(out)["complete"] is False
    result = run_mine(store, SCORED, out, index=index, cross_encoder=TinyCrossEncoder())
    assert result.units_reused == committed and 2 <= committed < result.units_total
    assert store_files(out) == store_files(scored_reference)


class FailingCrossEncoder(TinyCrossEncoder):
    """Scores three batches, then fails: a mine that stops half way through its cross-encoder pass."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def score_states(self, image_states, text_states):
        self.calls += 1
        if self.calls > 3:
            raise RuntimeError("injected failure")
        return super().score_states(image_states, text_states)


def test_a_partial_store_of_another_identity_starts_over_and_a_complete_one_is_rewritten(
    extracted, scored_reference, tmp_path, caplog
):
    index, _, store = extracted
    out = tmp_path / "mined.zarr"

    with pytest.raises(RuntimeError, match="injected failure"):
        run_mine(store, SCORED, out, index=index, cross_encoder=FailingCrossEncoder(seed=1))
    assert read_attrs(out)["complete"] is False
    caplog.set_level("INFO")
    result = run_mine(store, SCORED, out, index=index, cross_encoder=TinyCrossEncoder())  # another seed
    assert result.restart_reason == "the partial mined store was computed with a different cross-encoder"
    assert result.units_reused == 0
    assert store_files(out) == store_files(scored_reference)
    again = run_mine(store, SCORED, out, index=index, cross_encoder=TinyCrossEncoder())
    assert again.units_reused == 0 and "replacing the complete mined store" in caplog.text
    assert store_files(out) == store_files(scored_reference)


def test_a_failed_rewrite_of_a_complete_store_leaves_it_whole(extracted, scored_reference, tmp_path):
    """A complete mined store is rewritten beside it: a rewrite that fails half way leaves the complete store
    byte for byte (a reader still opens it), and the next run resumes the rewrite there and swaps it in."""
    index, _, store = extracted
    out = tmp_path / "mined.zarr"
    shutil.copytree(scored_reference, out)
    before = store_files(out)

    with pytest.raises(RuntimeError, match="injected failure"):
        run_mine(store, SCORED, out, index=index, cross_encoder=FailingCrossEncoder(), fresh=True)
    assert store_files(out) == before and read_attrs(out)["complete"] is True
    assert (tmp_path / ".mined.zarr.next").is_dir()  # the rewrite in progress, beside it
    result = run_mine(store, SCORED, out, index=index, cross_encoder=TinyCrossEncoder())
    assert result.units_reused > 0  # resumed beside it, then swapped in
    assert store_files(out) == store_files(scored_reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mined.zarr"]


def test_cli_mine_writes_the_store_and_bad_params_are_one_line(extracted, tmp_path):
    from stages.cli import app

    index, root, store = extracted
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"workdir": str(tmp_path / "w"), "mine": {"k": 4, "chunk_rows": 16}}))
    args = ["mine", "--params", str(params), "--features", str(store), "--index", str(root / "index")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "mine: top-4 neighbours of train 23 images" in result.output
    assert json.loads((tmp_path / "w" / "mined.zarr" / "zarr.json").read_text())["attributes"]["k"] == 4
    assert yaml.safe_load((tmp_path / "w" / "config" / "mine.yaml").read_text())["mine"]["k"] == 4
    for bad, expected in (("mine.k=0", "mine: k must be at least 1"), ("mine.kk=3", "mine.kk: unknown key")):
        result = CliRunner().invoke(app, [*args, "--set", bad])
        assert result.exit_code == 2 and expected in result.output, result.output
    result = CliRunner().invoke(app, [*args, "--set", "mine.k=30"])
    assert result.exit_code == 2 and "mine.k = 30, but a caption has only 22 other images" in result.output
    index_other = DatasetIndex.load(root / "index")
    assert index_other.fingerprint == index.fingerprint
