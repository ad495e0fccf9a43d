"""Interop with HDF5 (h5py) and with features computed elsewhere.

- `export_hdf5(store, file.h5)`: one HDF5 file with the store's layout: a group per split holding the
  datasets `image_emb` [N, D], `text_emb` [M, D] (the store dtype), `text_image` int32 [M] and `image_id`
  (UTF-8 strings) [N]. The store attrs are the file attr `kdpipe_attrs` (JSON, the exact copy), and each
  top-level attr is repeated as an attr of its own (numbers and strings as such, the rest as JSON text).
- `import_hdf5(file.h5, store)`: the reverse, for files in that layout (ours, or written by other code:
  then `teacher` must be given and `image_id` may come from the dataset index). With `index`, every split
  is checked against the index (image ids, caption -> image rows, the recorded fingerprint).
- `import_dsmd(index, {split: (images.pt, texts.pt)}, store)`: DSMD-style per-caption tensors: a
  torch-saved [M, D] image-feature tensor in which each image's feature is repeated once per caption (in
  the index's caption order), and the [M, D] text features. The repeated rows are checked to be
  identical and collapsed to one row per image.

Every import writes a complete, validated format-v1 store (rows L2-normalized in float32, unless the
source already is a normalized store of the same dtype, whose rows are copied bit for bit), built beside `out`
and swapped in once complete, after the whole input was checked (pipeline/store/imports.py; here besides: the
file's `dtype` and `dim` attributes, root or kdpipe_attrs, against its arrays). `export_hdf5` replaces only an
HDF5 file of its own (`hdf5_format`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.index import DatasetIndex
from pipeline.errors import InputError, reading_file
from pipeline.store.durable import atomic_dir, atomic_path
from pipeline.store.features import EMB_ARRAYS, FEATURE_STORE, UNPAIRED_TEXT, open_store
from pipeline.store.features_writer import DEFAULT_CHUNK_ROWS, STORE_DTYPES, write_store
from pipeline.store.imports import SourceSplit, check_against_index, check_rows, import_attrs, write_imported
from pipeline.store.ownership import Output, claim
from pipeline.weights import load_tensors

HDF5_FORMAT = "kdpipe-features-hdf5"
_BLOCK_ROWS = 65536  # rows copied at a time (bounded memory for any store size)


def _is_our_hdf5(path: Path) -> bool:
    import h5py

    with h5py.File(path, "r") as f:
        return f.attrs.get("hdf5_format") == HDF5_FORMAT


HDF5_EXPORT = Output("an HDF5 export of a feature store", recognise=_is_our_hdf5)  # what export_hdf5 replaces


def export_hdf5(store_path: Path | str, h5_path: Path | str) -> Path:
    """Write a complete store as one HDF5 file (written to a temporary name, renamed when complete)."""
    import h5py

    h5_path = Path(h5_path)
    claim(h5_path, HDF5_EXPORT)  # before reading the store
    store = open_store(store_path)
    with atomic_path(h5_path, HDF5_EXPORT) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["kdpipe_attrs"] = json.dumps(store.attrs, ensure_ascii=False)
        f.attrs["hdf5_format"] = HDF5_FORMAT
        for key, value in store.attrs.items():
            if isinstance(value, (str, bool, int, float)):
                f.attrs[key] = value
            else:
                f.attrs[key] = json.dumps(value, ensure_ascii=False)
        for name in store.splits:
            sp = store.split(name)
            g = f.create_group(name)
            for key in (*EMB_ARRAYS, UNPAIRED_TEXT):
                src = getattr(sp, key)
                if src is None:  # the optional texts without an image
                    continue
                ds = g.create_dataset(key, shape=src.shape, dtype=src.dtype)
                for a in range(0, src.shape[0], _BLOCK_ROWS):
                    ds[a : a + _BLOCK_ROWS] = src[a : a + _BLOCK_ROWS]
            g.create_dataset("text_image", data=np.asarray(sp.text_image, dtype=np.int32))
            g.create_dataset(
                "image_id", data=np.array(sp.image_id.tolist(), dtype=object), dtype=h5py.string_dtype("utf-8")
            )
    return h5_path


def import_hdf5(
    h5_path: Path | str,
    out_path: Path | str,
    *,
    index: DatasetIndex | None = None,
    teacher: dict[str, Any] | None = None,
    dtype: str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Path:
    """Build a store from an HDF5 file in the export layout. `teacher` overrides (or, for files without
    kdpipe attrs, provides) the teacher identity; `dtype` defaults to the file's (float16 otherwise)."""
    import h5py

    h5_path, out_path = Path(h5_path), Path(out_path)
    claim(out_path, FEATURE_STORE)  # before the work; the store is then built beside it and swapped in
    if not h5_path.is_file():
        raise InputError(f"{h5_path}: HDF5 file not found")
    try:
        f = h5py.File(h5_path, "r")
    except OSError as err:
        raise InputError(f"{h5_path}: not a readable HDF5 file ({err})") from None
    with f:
        attrs = _file_attrs(f, h5_path)
        split_names = attrs.get("splits") or sorted(k for k in f.keys() if isinstance(f[k], h5py.Group))
        if not split_names:
            raise InputError(f"{h5_path}: no split groups (expected e.g. /test/image_emb, /test/text_emb, ...)")
        splits = {}
        for name in split_names:
            if name not in f or not isinstance(f[name], h5py.Group):
                raise InputError(f"{h5_path}: split group /{name} not found")
            splits[name] = _read_split(h5_path, name, f[name], index)
        normalized = _check_attrs(h5_path, f, attrs, splits)
        return write_imported(
            out_path,
            splits,
            attrs=import_attrs(h5_path, attrs, index, teacher, {"file": h5_path.name, "format": "hdf5"}),
            dtype=dtype,
            chunk_rows=chunk_rows,
            normalized=normalized,
            where=str(h5_path),
        )


def _check_attrs(h5_path: Path, f: Any, attrs: dict[str, Any], splits: dict[str, SourceSplit]) -> bool:
    """The file's `dtype` and `dim` attributes (in kdpipe_attrs or of the root) must agree with its arrays.
    Returns whether the file says its rows are unit length (`normalized`, either place)."""
    arrays = [(f"/{n}/{k}", getattr(sp, k)) for n, sp in splits.items() for k in EMB_ARRAYS]
    for where, found in _said(f, attrs, "dtype"):
        try:
            said = np.dtype(str(found))
        except TypeError:
            raise InputError(f"{h5_path}: {where} says {str(found)[:40]!r}, which is no dtype") from None
        wrong = next(((name, ds) for name, ds in arrays if np.dtype(ds.dtype) != said), None)
        if wrong is not None:
            raise InputError(
                f"{h5_path}: {where} says {said} but {wrong[0]} is {np.dtype(wrong[1].dtype)}; "
                "the attribute and the arrays must agree"
            )
    name, ds = arrays[0]
    for where, found in _said(f, attrs, "dim"):
        if not isinstance(found, (int, np.integer)) or isinstance(found, bool) or int(found) != ds.shape[1]:
            raise InputError(
                f"{h5_path}: {where} says {str(found)[:40]} but {name} has {ds.shape[1]} columns; "
                "the attribute and the arrays must agree"
            )
    return any(v is True or isinstance(v, np.bool_) and bool(v) for _, v in _said(f, attrs, "normalized"))


def _said(f: Any, attrs: dict[str, Any], key: str) -> list[tuple[str, Any]]:
    """(where, value) of each place the file records `key`: inside kdpipe_attrs, and as a root attribute."""
    found = [(f"attribute kdpipe_attrs.{key}", attrs[key])] if key in attrs else []
    if key in f.attrs:
        value = f.attrs[key]
        found.append((f"attribute {key}", value.decode() if isinstance(value, bytes) else value))
    return found


def _read_split(h5_path: Path, name: str, g: Any, index: DatasetIndex | None) -> SourceSplit:
    """The datasets of /<name>, with every shape, range and id checked against each other (and the index)."""
    for key in (*EMB_ARRAYS, "text_image"):
        if key not in g:
            raise InputError(f"{h5_path}: dataset /{name}/{key} not found")
    img, txt, ti = g["image_emb"], g["text_emb"], g["text_image"]
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise InputError(
            f"{h5_path}: /{name}/image_emb {img.shape} and /{name}/text_emb {txt.shape} must be [rows, D] with the same D"
        )
    if ti.shape != (txt.shape[0],):
        raise InputError(f"{h5_path}: /{name}/text_image has shape {ti.shape}, expected ({txt.shape[0]},)")
    text_image = np.asarray(ti[...]).astype(np.int64)
    if len(text_image) and (text_image.min() < 0 or text_image.max() >= img.shape[0]):
        raise InputError(f"{h5_path}: /{name}/text_image points outside the split's {img.shape[0]} images")
    if "image_id" in g:
        ids = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in g["image_id"][...].tolist()]
    elif index is not None and name in index.splits:
        ids = index.split(name).image_id.tolist()
    else:
        raise InputError(
            f"{h5_path}: /{name}/image_id not found (give the dataset index to take the image ids from it)"
        )
    if len(ids) != img.shape[0]:
        raise InputError(f"{h5_path}: /{name}/image_id has {len(ids)} entries for {img.shape[0]} images")
    if index is not None:
        check_against_index(h5_path, name, index, ids, text_image)
    unpaired = _unpaired_texts(h5_path, name, g, int(img.shape[1]), index)
    return SourceSplit(img, txt, text_image.astype(np.int32), ids, unpaired)


def _unpaired_texts(h5_path: Path, name: str, g: Any, dim: int, index: DatasetIndex | None) -> Any:
    """The optional /<split>/unpaired_text_emb dataset [U, dim] (an empty array when absent), checked."""
    if UNPAIRED_TEXT not in g:
        return np.empty((0, dim), np.float32)
    ds = g[UNPAIRED_TEXT]
    if ds.ndim != 2 or ds.shape[1] != dim:
        raise InputError(f"{h5_path}: /{name}/{UNPAIRED_TEXT} has shape {ds.shape}, expected [rows, {dim}]")
    if index is not None and name in index.splits and len(index.split(name).unpaired_text) != ds.shape[0]:
        raise InputError(
            f"{h5_path}: /{name}/{UNPAIRED_TEXT} has {ds.shape[0]} rows, the index "
            f"{len(index.split(name).unpaired_text)} texts without an image"
        )
    return ds


def _file_attrs(f: Any, h5_path: Path) -> dict[str, Any]:
    raw = f.attrs.get("kdpipe_attrs")
    if raw is None:
        return {}
    try:
        attrs = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except ValueError:
        raise InputError(f"{h5_path}: attribute kdpipe_attrs is not valid JSON") from None
    if not isinstance(attrs, dict):
        raise InputError(f"{h5_path}: attribute kdpipe_attrs is not a JSON object")
    return attrs


def _load_matrix(path: Path, what: str) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} file not found")
    todo = "save the features as one tensor (torch.save) or as .npy"
    if path.suffix == ".npy":
        with reading_file(path, f"{what} (.npy, no pickled objects)", todo):
            data = np.load(path, allow_pickle=False)
    else:
        import torch

        data = load_tensors(path, what, todo)
        if not isinstance(data, torch.Tensor):
            raise InputError(f"{path}: expected one tensor of {what}, found {type(data).__name__}")
        data = data.detach().float().numpy()
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 2:
        raise InputError(f"{path}: {what} must be a 2-D [rows, D] tensor, got shape {list(data.shape)}")
    check_rows(str(path), what, data, normalized=False)
    return data


def dsmd_to_split(
    index: DatasetIndex, split: str, image_feats: np.ndarray, text_feats: np.ndarray, where: str = ""
) -> dict[str, Any]:
    """Collapse per-caption image rows to one row per image of `split` (checking repeats are identical)."""
    view = index.split(split)
    where = where or split
    m, n = view.n_captions, view.n_images
    for what, feats in (("image", image_feats), ("text", text_feats)):
        if feats.shape[0] != m:
            raise InputError(
                f"{where}: {what} features have {feats.shape[0]} rows; split {split!r} of dataset "
                f"{index.name} has {m} captions (one row per caption, in index order)"
            )
    if image_feats.shape[1] != text_feats.shape[1]:
        raise InputError(
            f"{where}: image features are {image_feats.shape[1]}-d but text features {text_feats.shape[1]}-d"
        )
    ti = view.text_image.astype(np.int64)
    first = np.full(n, m, dtype=np.int64)
    np.minimum.at(first, ti, np.arange(m))
    if (first == m).any():
        lonely = int(np.flatnonzero(first == m)[0])
        raise InputError(
            f"{where}: image {view.image_id[lonely]!r} has no caption, so per-caption features hold no row for it"
        )
    same = (image_feats == image_feats[first[ti]]).all(axis=1)
    if not same.all():
        row = int(np.flatnonzero(~same)[0])
        raise InputError(
            f"{where}: image feature row {row} (a caption of image {view.image_id[ti[row]]!r}) differs "
            f"from row {int(first[ti[row]])} of the same image; the repeated rows must be identical"
        )
    return {
        "image_emb": image_feats[first],
        "text_emb": text_feats,
        "text_image": view.text_image,
        "image_id": view.image_id.tolist(),
    }


def import_dsmd(
    index: DatasetIndex,
    files: dict[str, tuple[Path | str, Path | str]],
    out_path: Path | str,
    *,
    teacher: dict[str, Any] | None = None,
    dtype: str = "float16",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Path:
    """files[split] = (image features [M, D], each image repeated per caption; text features [M, D])."""
    claim(out_path, FEATURE_STORE)  # before loading the tensors
    if not files:
        raise InputError("import-dsmd: no split given")
    if dtype not in STORE_DTYPES:
        raise InputError(f"store dtype {dtype!r}: expected one of {', '.join(STORE_DTYPES)}")
    splits = {}
    for split, (img_path, txt_path) in files.items():
        if split not in index.splits:
            raise InputError(
                f"import-dsmd: dataset {index.name} has no split {split!r}; it has {', '.join(index.splits)}"
            )
        image_feats = _load_matrix(Path(img_path), "image features")
        text_feats = _load_matrix(Path(txt_path), "text features")
        splits[split] = dsmd_to_split(index, split, image_feats, text_feats, where=str(img_path))
    teacher = teacher or {"name": "dsmd-import"}
    imported_from = {"format": "dsmd", "files": {s: [Path(a).name, Path(b).name] for s, (a, b) in files.items()}}
    with atomic_dir(out_path, FEATURE_STORE) as tmp:  # built beside `out_path`, swapped in when complete
        write_store(
            tmp,
            splits,
            teacher=teacher,
            dataset={"name": index.name, "fingerprint": index.fingerprint},
            dtype=dtype,
            chunk_rows=chunk_rows,
            extra_attrs={"imported_from": imported_from},
        )
    open_store(out_path, expect_fingerprint=index.fingerprint)
    return Path(out_path)


__all__ = ["export_hdf5", "import_hdf5", "import_dsmd", "dsmd_to_split"]
