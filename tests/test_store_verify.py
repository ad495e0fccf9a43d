"""Checksummed feature store: each chunk file's SHA-256 in its array's attrs, checked cheaply on open (presence,
size, one checksum per chunk) and fully by `kdpipe verify`; every refusal names store, array and chunk."""

from __future__ import annotations

import hashlib
import json
import re
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


def _rewrite_chunk(path: Path, array: str, key: str, edit) -> None:
    """Edit the rows of one chunk file in place and record its new checksum, as someone hiding the edit would."""
    from pipeline.store import checksums

    chunk = path / array / key
    dtype = np.dtype(zarr.open_array(str(path / array), mode="r").dtype).newbyteorder("<")
    rows = np.fromfile(chunk, dtype=dtype).reshape(-1, D)
    edit(rows)
    rows.tofile(chunk)
    checksums.record(path / array, {key: hashlib.sha256(chunk.read_bytes()).hexdigest()})


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_rows_rescaled_with_new_checksums_are_named_by_verify_and_refused_on_open(tmp_path, dtype):
    """Checksums recomputed after the edit pass; the rows' norms do not (the store says they are 1)."""
    path = _write(tmp_path / "a.zarr", seed=0) if dtype == "float16" else None
    if path is None:
        rng = np.random.default_rng(0)
        splits = {
            "test": {
                "image_emb": rng.standard_normal((10, D)),
                "text_emb": rng.standard_normal((30, D)),
                "text_image": np.repeat(np.arange(10), 3).astype(np.int32),
                "image_id": [f"t{i}.jpg" for i in range(10)],
            }
        }
        path = tmp_path / "a.zarr"
        write_store(path, splits, teacher={"name": "t"}, dataset={"name": "toy", "fingerprint": "f" * 64}, dtype=dtype)
    array = "test/text_emb"
    _rewrite_chunk(path, array, "c/0/0", lambda rows: rows.__imul__(4))  # every row: norm 4
    assert all(_naive_check(path).values())  # the README's checksum recipe finds nothing
    with pytest.raises(
        InputError,
        match=rf"{path}: {array}: row 0 has L2 norm (4|3\.999\d*), in a store of normalized rows.*kdpipe verify",
    ):
        open_store(path)
    (bad,) = verify_store(path).bad
    assert (bad.array, bad.key) == (array, "c/0/0") and re.match(r"row 0 has L2 norm (4|3\.999\d*), ", bad.problem)
    r = _verify_cli(str(path))
    assert r.exit_code == 1 and f"bad chunk: {path}: {array} chunk c/0/0: row 0 has L2 norm " in r.output


def test_one_row_off_unit_norm_is_named_by_verify_and_the_tolerance_follows_the_dtype(tmp_path):
    path = _write(tmp_path / "a.zarr", seed=0)  # float16, train/text_emb: 300 rows in chunks of 60

    def nudge(scale):
        def edit(rows):
            rows[7] = (rows[7].astype(np.float32) * scale).astype(rows.dtype)

        return edit

    _rewrite_chunk(path, "train/text_emb", "c/2/0", nudge(1.0005))  # within float16's rounding: fine
    open_store(path)
    assert verify_store(path).ok
    _rewrite_chunk(path, "train/text_emb", "c/2/0", nudge(1.01))  # 1%: no rounding does that
    open_store(path)  # the cheap check samples the first row of each chunk only
    (bad,) = verify_store(path).bad
    assert bad.key == "c/2/0" and re.match(r"row 127 has L2 norm 1\.01\d*, .*within 0\.002 for float16", bad.problem)
    _rewrite_chunk(path, "train/text_emb", "c/2/0", lambda rows: rows.__setitem__(7, 0))  # a zero row
    assert verify_store(path).bad[0].problem.startswith("row 127 has L2 norm 0, ")


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda p: (p / "test/text_emb/zarr.json").write_text("{broken"),
            r"test/text_emb: cannot be read as a Zarr array",
        ),
        (lambda p: shutil.rmtree(p / "test/text_image"), r"split 'test' has no array 'text_image'"),
    ],
)
def test_verify_refuses_a_store_whose_array_metadata_is_broken_or_missing(tmp_path, edit, message):
    path = _write(tmp_path / "a.zarr", seed=0)
    edit(path)
    r = _verify_cli(str(path))
    assert r.exit_code == 2 and "Traceback" not in r.output
    (line,) = r.output.strip().splitlines()
    assert re.match(rf"error: {path}: {message}", line), line
