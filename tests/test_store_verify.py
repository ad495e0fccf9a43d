"""Checksummed feature store: each chunk file's SHA-256 in its array's attrs, checked cheaply on open (presence,
size, one checksum per chunk) and fully by `kdpipe verify`; every refusal names store, array and chunk."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from pipeline.errors import InputError
from pipeline.store.features import open_store
from pipeline.store.features_writer import write_store
from pipeline.store.verify import check_finite, require_verified, verify_store
from stages.cli import app

D = 8
FIXTURE = Path(__file__).parent / "data" / "feature_store_v1"  # written by kdpipe 0.x: no checksums


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    monkeypatch.setenv("KDPIPE_FSYNC", "0")


def _write(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    splits = {
        name: {
            "image_emb": rng.standard_normal((n, D)),
            "text_emb": rng.standard_normal((3 * n, D)),
            "text_image": np.repeat(np.arange(n), 3).astype(np.int32),
            "image_id": [f"{name}{i}.jpg" for i in range(n)],
        }
        for name, n in (("train", 100), ("test", 10))
    }
    write_store(path, splits, teacher={"name": "t"}, dataset={"name": "toy", "fingerprint": "f" * 64}, chunk_rows=64)
    return path


def _naive_check(path: Path) -> dict[str, bool]:
    """The README's recipe, with zarr and hashlib only: {array/chunk: the file's sha256 equals the recorded one}."""
    group = zarr.open_group(str(path), mode="r")
    out = {}
    for split in group.attrs["splits"]:
        for name, arr in group[split].arrays():
            entry = arr.attrs["chunk_checksums"]
            assert entry["algorithm"] == "sha256"
            for key, digest in entry["chunks"].items():
                data = (path / split / name / key).read_bytes()
                out[f"{split}/{name}/{key}"] = hashlib.sha256(data).hexdigest() == digest
    return out


def _verify_cli(*args: str):
    return CliRunner().invoke(app, ["verify", *args])


def test_each_chunk_file_has_its_sha256_recorded_and_a_clean_store_verifies(tmp_path):
    path = _write(tmp_path / "a.zarr", seed=0)
    checked = _naive_check(path)
    # every chunk file of every array is listed (train: 2 image chunks of 64 rows, 5 text chunks; small arrays 1)
    files = {str(f.relative_to(path)) for f in path.rglob("*") if f.is_file() and "c" in f.relative_to(path).parts}
    assert set(checked) == files and all(checked.values())
    assert sum(k.startswith("train/text_emb/") for k in checked) == 5
    report = verify_store(path)
    assert report.ok and report.chunks == len(files) and not report.unchecked
    assert report.nbytes == sum((path / k).stat().st_size for k in files)
    r = _verify_cli(str(path))
    assert r.exit_code == 0 and "all checksums match" in r.stdout, r.output
    require_verified(path)


def test_a_chunk_swapped_in_from_a_store_of_the_same_shape_opens_but_verify_names_it(tmp_path):
    path, other = _write(tmp_path / "a.zarr", seed=0), _write(tmp_path / "b.zarr", seed=1)
    shutil.copyfile(other / "train/text_emb/c/2/0", path / "train/text_emb/c/2/0")
    open_store(path)  # same size: the cheap check on open cannot tell
    report = verify_store(path)
    assert [(b.array, b.key) for b in report.bad] == [("train/text_emb", "c/2/0")]
    r = _verify_cli(str(path))
    assert r.exit_code == 1
    (line,) = [x for x in r.output.splitlines() if x.startswith("bad chunk:")]  # one line per bad chunk
    assert line.startswith(f"bad chunk: {path}: train/text_emb chunk c/2/0: sha256 ") and "changed or replaced" in line
    assert r.stdout.strip().splitlines()[-1].endswith("1 bad chunk(s)")  # then the summary
    with pytest.raises(InputError, match=rf"{path}: train/text_emb chunk c/2/0: sha256 .*kdpipe verify"):
        require_verified(path)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_truncated_or_missing_chunk_is_refused_on_open_naming_it(tmp_path, damage):
    path = _write(tmp_path / "a.zarr", seed=0)
    chunk = path / "train/image_emb/c/1/0"
    if damage == "truncated":
        chunk.write_bytes(chunk.read_bytes()[:100])
    else:
        chunk.unlink()
    with pytest.raises(InputError, match=rf"{path}: train/image_emb: chunk file c/1/0 (has 100 bytes|is missing)"):
        open_store(path)
    (bad,) = verify_store(path).bad
    assert (bad.array, bad.key) == ("train/image_emb", "c/1/0")
    assert ("100 bytes, expected 800" if damage == "truncated" else "missing") in bad.problem


@pytest.mark.parametrize("key", ["text_image", "image_id"])
def test_a_damaged_small_array_is_refused_on_open_in_one_line(tmp_path, key):
    path = _write(tmp_path / "a.zarr", seed=0)
    chunk = path / f"train/{key}/c/0"
    chunk.write_bytes(chunk.read_bytes()[:50])
    expected = "chunk file c/0 has 50 bytes, expected 1200" if key == "text_image" else "a chunk file cannot be decoded"
    with pytest.raises(InputError, match=rf"{path}: train/{key}: {expected}"):
        open_store(path)
    chunk.unlink()
    with pytest.raises(InputError, match=rf"{path}: train/{key}: chunk file c/0 is missing"):
        open_store(path)
    assert [(b.array, b.key) for b in verify_store(path).bad] == [(f"train/{key}", "c/0")]


def test_a_nan_chunk_is_named_by_verify_and_by_the_finite_check(tmp_path):
    path = _write(tmp_path / "a.zarr", seed=0)
    chunk = path / "train/text_emb/c/3/0"  # rows 180..239 (balanced chunks of 60 rows)
    rows = np.fromfile(chunk, dtype="<f2").reshape(-1, D)
    rows[5, 2] = np.nan
    rows.tofile(chunk)
    with pytest.raises(InputError, match=rf"{path}: train/text_emb chunk c/3/0 row 185: holds NaN or inf"):
        check_finite(open_store(path), "train")
    check_finite(open_store(path), "test")  # another split is fine
    problems = sorted(b.problem.split(" (")[0] for b in verify_store(path).bad)
    assert problems[0] == "row 185 holds NaN or inf" and problems[1].startswith("sha256 ")


def test_edited_checksum_metadata_is_refused_on_open(tmp_path):
    path = _write(tmp_path / "a.zarr", seed=0)
    meta = path / "test/image_emb/zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["chunk_checksums"]["chunks"]["c/0/0"]
    meta.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=rf"{path}: test/image_emb: chunk c/0/0 has no recorded checksum"):
        open_store(path)


def test_a_store_without_checksums_opens_verify_says_so_and_write_records_them(tmp_path):
    path = tmp_path / "old.zarr"
    shutil.copytree(FIXTURE, path)
    before = {f: f.read_bytes() for f in path.rglob("c/**/*") if f.is_file()}
    open_store(path)
    report = verify_store(path)
    assert report.ok and len(report.unchecked) == 8  # 2 splits x 4 arrays, sizes and values checked
    r = _verify_cli(str(path))
    assert r.exit_code == 0 and "have no checksums" in r.stdout and "--write" in r.stdout
    with pytest.raises(InputError, match="has no checksums to verify against.*kdpipe verify --write"):
        require_verified(path)
    r = _verify_cli(str(path), "--write")
    assert r.exit_code == 0 and "recorded the checksums of 8 array(s)" in r.stdout, r.output
    assert all(_naive_check(path).values()) and verify_store(path).ok and not verify_store(path).unchecked
    assert before == {f: f.read_bytes() for f in before}  # the chunks themselves untouched
    # --write never replaces a recorded checksum: a chunk swapped afterwards stays bad
    shutil.copyfile(path / "train/text_emb/c/0/0", path / "train/text_emb/c/1/0")
    assert _verify_cli(str(path), "--write").exit_code == 1
    assert [b.key for b in verify_store(path).bad] == ["c/1/0"]


def test_verify_refuses_what_is_not_a_complete_store_in_one_line(tmp_path):
    r = _verify_cli(str(tmp_path))
    assert r.exit_code == 2 and "not a kdpipe feature store" in r.output
    path = _write(tmp_path / "a.zarr", seed=0)
    doc = json.loads((path / "zarr.json").read_text())
    doc["attributes"]["complete"] = False
    (path / "zarr.json").write_text(json.dumps(doc))
    r = _verify_cli(str(path))
    assert r.exit_code == 2 and "incomplete" in r.output
