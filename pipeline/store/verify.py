"""Full verification of a feature store: every chunk file read, hashed and compared with the checksum its
array records (pipeline/store/checksums.py), its size checked against the array's shape and dtype, and the
float rows checked for NaN or inf and, as the store says its rows are normalized, for an L2 norm of 1 within
the tolerance of their dtype (rows rescaled and given new checksums pass the hashes, not this). `kdpipe verify
STORE` prints one line per bad chunk; distill and evaluate call `require_verified` when `store.verify` is true.

Opening a store (`open_store`) does the cheap part only (every chunk file present with its exact size, one
checksum recorded per chunk): a chunk copied over from another store of the same shape passes that, and
only reading the bytes finds it. `check_finite` is the NaN/inf check alone, for the rows a stage is about
to use, naming the chunk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError
from pipeline.locks import output_lock, read_lock
from pipeline.progress import progress
from pipeline.store import checksums
from pipeline.store.features import EMB_ARRAYS, FORMAT, TEACHERS, UNPAIRED_TEXT, FeatureStore, open_array, read_attrs

_ARRAYS = (*EMB_ARRAYS, UNPAIRED_TEXT, "text_image", "image_id")
_MB = 1_000_000


@dataclass(frozen=True)
class StoreConfig:
    """params.yaml section `store`: how distill and evaluate read extract's feature store (one setting for both)."""

    # true: read every chunk file and check its recorded SHA-256 before using the store (`kdpipe verify`;
    # ~1.4 GB/s on one core, seconds for Flickr30K, still small next to a training run). Off by default:
    # opening always checks presence and sizes, and extract's own refusals cover what it writes.
    verify: bool = False


@dataclass(frozen=True)
class BadChunk:
    store: Path
    array: str  # "<split>/<array>"
    key: str  # chunk key inside the array directory, e.g. "c/3/0"
    problem: str

    def line(self) -> str:
        return f"{self.store}: {self.array} chunk {self.key}: {self.problem}"


@dataclass
class VerifyReport:
    path: Path
    chunks: int = 0  # chunk files read
    nbytes: int = 0
    seconds: float = 0.0
    bad: list[BadChunk] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # arrays without recorded checksums (older stores)
    written: list[str] = field(default_factory=list)  # arrays whose checksums --write recorded

    @property
    def ok(self) -> bool:
        return not self.bad

    def summary(self) -> str:
        rate = self.nbytes / _MB / self.seconds if self.seconds > 0 else float("inf")
        head = f"verify: {self.path}: {self.chunks} chunks, {self.nbytes / _MB:,.1f} MB in {self.seconds:.1f} s ({rate:,.0f} MB/s)"
        if self.bad:
            return f"{head}: {len(self.bad)} bad chunk(s)"
        if self.written:
            return f"{head}: no problem found; recorded the checksums of {len(self.written)} array(s) that had none"
        if self.unchecked:
            return (
                f"{head}: sizes and values fine, but {len(self.unchecked)} array(s) have no checksums (a store "
                "written before kdpipe recorded them): `kdpipe verify --write STORE` records the current files'"
            )
        return f"{head}: all checksums match"


def verify_store(path: Path | str, *, write: bool = False) -> VerifyReport:
    """Check every chunk file of a complete store. write=True records checksums for the arrays that have
    none (an older store), from the files as they are now, and only for arrays found otherwise sound;
    recorded checksums are never replaced (that would bless a swapped chunk)."""
    path = Path(path)
    # the whole check under the store's lock: shared to read (a rerun of extract waits for it, and it for
    # one), exclusive when it records checksums
    with output_lock(path) if write else read_lock(path):
        return _verify_store(path, write)


def _verify_store(path: Path, write: bool) -> VerifyReport:
    import zarr

    attrs = read_attrs(path)
    if attrs is None or attrs.get("format") != FORMAT:
        raise InputError(f"{path}: not a kdpipe feature store (no Zarr group with format={FORMAT!r})")
    if attrs.get("complete") is not True:
        raise InputError(f"{path}: feature store is incomplete; rerun `kdpipe extract` to finish it, then verify")
    group = zarr.open_group(str(path), mode="r")
    arrays = [
        (f"{s}/{k}", arr)
        for s in attrs.get("splits") or []
        for k in _ARRAYS
        if (arr := open_array(path, group, s, k, required=k != UNPAIRED_TEXT)) is not None
    ]
    for name in attrs.get(TEACHERS) or []:  # every extra teacher's store too (pipeline/store/features.py)
        sub = f"{TEACHERS}/{name}"
        if (read_attrs(path / sub) or {}).get("complete") is not True:
            raise InputError(
                f"{path / sub}: the extra teacher's store is missing or incomplete; rerun `kdpipe extract`"
            )
        sub_group = group[sub]
        arrays += [
            (f"{sub}/{s}/{k}", arr)
            for s in attrs.get("splits") or []
            for k in _ARRAYS
            if (arr := open_array(path / sub, sub_group, s, k, required=k != UNPAIRED_TEXT)) is not None
        ]
    unit_rows = attrs.get("normalized") is True  # format v1 says so; _verify_array checks every such row
    report = VerifyReport(path)
    start = time.perf_counter()
    total = sum(_expected_bytes(a) * len(checksums.chunk_keys(a)) for _, a in arrays)
    with progress(f"verify {path.name}", total=total // _MB, unit="MB") as bar:
        for name, arr in arrays:
            found = _verify_array(path, name, arr, report, bar, unit_rows=unit_rows)
            if found is not None and write:
                checksums.record(path / name, found)
                report.written.append(name)
    report.seconds = time.perf_counter() - start
    return report


def _expected_bytes(arr: Any) -> int:
    """Bytes of one chunk file of a raw array; for the string array (variable-length) a guess for progress."""
    per_row = int(np.prod(arr.chunks[1:], dtype=np.int64)) * np.dtype(arr.dtype).itemsize if _is_raw(arr) else 16
    return int(arr.chunks[0]) * per_row


def _is_raw(arr: Any) -> bool:
    return np.dtype(arr.dtype).kind in "fi"


def _verify_array(
    store: Path, name: str, arr: Any, report: VerifyReport, bar: Any, *, unit_rows: bool
) -> dict[str, str] | None:
    """Check the chunks of one array (with `unit_rows`, also that every row of an embedding array has norm 1,
    within its dtype's tolerance); returns the digests found when the array records none and all is sound
    (what --write would record), else None."""
    sums = checksums.recorded(f"{store}: {name}", arr)
    if sums is None:
        report.unchecked.append(name)
    raw, floats = _is_raw(arr), np.dtype(arr.dtype).kind == "f"
    size = _expected_bytes(arr)
    found: dict[str, str] = {}
    n_bad = len(report.bad)
    for i, key in enumerate(checksums.chunk_keys(arr)):
        f = store / name / key
        try:
            # a read-only map, not a read: hashing and the NaN check then work on the page cache (no copy)
            data = np.memmap(f, dtype=np.uint8, mode="r") if raw and f.stat().st_size else f.read_bytes()
        except FileNotFoundError:
            report.bad.append(BadChunk(store, name, key, "the chunk file is missing"))
            continue
        report.chunks += 1
        report.nbytes += len(data)
        before = report.nbytes - len(data)
        bar.advance(report.nbytes // _MB - before // _MB)
        if raw and len(data) != size:
            report.bad.append(BadChunk(store, name, key, f"{len(data)} bytes, expected {size} (truncated or foreign)"))
            continue
        found[key] = checksums.digest_bytes(data)
        if sums is not None and key not in sums:
            report.bad.append(BadChunk(store, name, key, "no checksum recorded for this chunk"))
        elif sums is not None and sums[key] != found[key]:
            report.bad.append(
                BadChunk(
                    store,
                    name,
                    key,
                    f"sha256 {found[key][:12]}... differs from the recorded {sums[key][:12]}... "
                    "(the file was changed or replaced after extract wrote it)",
                )
            )
        if floats:
            step = int(arr.chunks[0])
            rows = np.frombuffer(data, dtype=np.dtype(arr.dtype).newbyteorder("<")).reshape(step, -1)
            row = checksums.nonfinite_row(rows)
            # the norms of the real rows (the last chunk's padding is zeros), where the NaN check found none
            off = checksums.off_unit_row(rows[: int(arr.shape[0]) - i * step]) if unit_rows and row is None else None
            if row is not None:
                report.bad.append(BadChunk(store, name, key, f"row {i * step + row} holds NaN or inf"))
            elif off is not None:
                report.bad.append(
                    BadChunk(
                        store,
                        name,
                        key,
                        f"row {i * step + off[0]} has L2 norm {off[1]:.6g}, where the store's rows are normalized "
                        f"(norm 1 within {checksums.UNIT_NORM_TOLERANCE[rows.dtype.itemsize]:g} for {rows.dtype.name})",
                    )
                )
    return found if sums is None and len(report.bad) == n_bad else None


def require_verified(path: Path | str) -> VerifyReport:
    """For distill/evaluate with store.verify: true. One-line InputError naming the first bad chunk, or saying
    that the store has no checksums to verify against."""
    report = verify_store(path)
    if report.bad:
        more = f" (and {len(report.bad) - 1} more bad chunk(s))" if len(report.bad) > 1 else ""
        raise InputError(f"{report.bad[0].line()}{more}; `kdpipe verify {path}` lists them; rerun `kdpipe extract`")
    if report.unchecked:
        raise InputError(
            f"{path}: {report.unchecked[0]} has no checksums to verify against (a store written before kdpipe "
            f"recorded them): record them once with `kdpipe verify --write {path}`, or set store.verify: false"
        )
    return report


def check_finite(store: FeatureStore, split: str) -> None:
    """One-line InputError naming store, array, chunk and row when an embedding row of `split` holds NaN or
    inf (read through the memory maps, chunk by chunk: one pass over the split's rows)."""
    import zarr

    s = store.split(split)
    group = zarr.open_group(str(store.path), mode="r")
    for key in (*EMB_ARRAYS, UNPAIRED_TEXT):
        rows = getattr(s, key)
        if rows is None or len(rows) == 0:
            continue
        arr = group[f"{split}/{key}"]
        step = int(arr.chunks[0])
        for i, chunk_key in enumerate(checksums.chunk_keys(arr)):
            block = np.asarray(rows[i * step : (i + 1) * step])
            row = checksums.nonfinite_row(block)
            if row is not None:
                raise InputError(
                    f"{store.path}: {split}/{key} chunk {chunk_key} row {i * step + row}: holds NaN or inf; "
                    "the file was damaged or replaced after extract (which refuses such rows): rerun `kdpipe extract`"
                )


__all__ = ["StoreConfig", "BadChunk", "VerifyReport", "verify_store", "require_verified", "check_finite"]
