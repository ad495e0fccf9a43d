"""Embeddings in clip-retrieval's layout: `kdpipe import-embeddings` and `kdpipe export-embeddings`.

The layout (what `clip-retrieval inference` writes and LAION ships its CLIP embeddings in; what autofaiss and
clip-retrieval's back end read):

    embeddings/
      img_emb/img_emb_{k}.npy           [R_k, D] float16 (or float32): row r = the image of sample r
      text_emb/text_emb_{k}.npy         [R_k, D]: row r = the caption of sample r
      metadata/metadata_{k}.parquet     R_k rows: image_path (or key), caption, ... of sample r

One row per SAMPLE, an (image, caption) pair: an image with five captions is five rows, its image row repeated.

Import (`import_embeddings`): each metadata row is matched to the dataset index through its `image_path` (the
image id, the path relative to image_root, or the absolute path) or its `key` (webdataset's `__key__`: the
member name without extension, or the image id without one), and its `caption` to that image's captions in
the index (the i-th row with a text for an image is its i-th caption with that text; without a caption column,
an image's only caption). Every image and caption of each split the embeddings touch must receive exactly one
row; repeated image rows must agree (max |diff| <= 1e-3: fp16 noise, the first kept), a row naming an image the
index lacks, or a caption it does not have, is one error line naming the file and row. The store is then
written through pipeline/store/imports.py, with every check import-hdf5 makes. A row with an empty image (a
kdpipe export's text without an image) is matched by its caption and `split` to the split's unpaired texts.

Export (`export_embeddings`): one part k per split (the store's order), rows = the split's captions in order
(image row repeated), then its images without captions (text row zero, caption null), then its texts without
an image (image row zero, image_path null): a zero row stands for "none" (a stored row is unit length). The
metadata holds image_path = the image id, caption, split, and in the parquet schema's metadata `kdpipe` the
store's attrs (teacher identity, normalized), so that importing an export with the same index gives back the
store bit for bit (rows copied, not renormalized).
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.index import DatasetIndex
from pipeline.errors import InputError
from pipeline.store.durable import fsync_tree, remove_stale_dirs, replace_dir, temp_beside
from pipeline.store.features import FEATURE_STORE, open_store
from pipeline.store.features_writer import DEFAULT_CHUNK_ROWS
from pipeline.store.imports import SourceSplit, check_against_index, import_attrs, write_imported
from pipeline.store.ownership import Output, claim

PARTS = ("img_emb", "text_emb", "metadata")
# what an export replaces (pipeline/store/ownership.py): a directory holding nothing but the three parts
EMBEDDINGS_EXPORT = Output("an embeddings export", directory=True, names=frozenset(PARTS))
_REPEAT_TOLERANCE = 1e-3  # max |difference| of two rows of one image (fp16 rounding of two batches is ~5e-4)
_BLOCK_ROWS = 65536


# ---------------------------------------------------------------------------------------------------------
# Reading the layout
# ---------------------------------------------------------------------------------------------------------
class _Gather:
    """Rows [R, D] picked from several memory-mapped .npy parts: row i = parts[part[i]][row[i]]."""

    def __init__(self, parts: list[np.ndarray], part: np.ndarray, row: np.ndarray, dim: int, dtype: np.dtype) -> None:
        self.parts, self.part, self.row = parts, part, row
        self.shape, self.dtype = (len(part), dim), dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, sl: slice) -> np.ndarray:
        part, row = self.part[sl], self.row[sl]
        out = np.zeros((len(part), self.shape[1]), self.dtype)
        for k in np.unique(part):
            take = part == k
            out[take] = self.parts[int(k)][row[take]]
        return out


def _parts(source: Path) -> list[int]:
    """The part numbers k of metadata/metadata_{k}.parquet, each with its img_emb and text_emb files."""
    if not source.is_dir():
        raise InputError(f"{source}: not a directory (expected img_emb/, text_emb/ and metadata/ in it)")
    found = sorted(
        int(m.group(1))
        for p in (source / "metadata").glob("metadata_*.parquet")
        if (m := re.fullmatch(r"metadata_(\d+)\.parquet", p.name))
    )
    if not found:
        raise InputError(f"{source}: no metadata/metadata_{{k}}.parquet files (clip-retrieval's layout)")
    for k in found:
        for name in ("img_emb", "text_emb"):
            if not (source / name / f"{name}_{k}.npy").is_file():
                raise InputError(f"{source}: {name}/{name}_{k}.npy is missing (metadata_{k}.parquet has it)")
    return found


def _load_part(source: Path, name: str, k: int) -> np.ndarray:
    path = source / name / f"{name}_{k}.npy"
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable .npy file ({err})") from None
    if arr.ndim != 2 or arr.dtype.kind != "f":
        raise InputError(f"{path}: expected a 2-D float array [rows, D], found {arr.dtype} {list(arr.shape)}")
    return arr


def _metadata(path: Path) -> tuple[dict[str, list], dict[str, Any]]:
    """The metadata columns as lists and the kdpipe attrs recorded in the schema ({} for other tools' files)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = [n for n in pf.schema_arrow.names if n in ("image_path", "key", "caption", "split")]
        table = pf.read(columns=names)
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"{path}: not a readable parquet file ({err})") from None
    raw = (pf.schema_arrow.metadata or {}).get(b"kdpipe")
    try:
        attrs = json.loads(raw) if raw else {}
    except ValueError:
        raise InputError(f"{path}: its kdpipe schema metadata is not JSON") from None
    return table.to_pydict(), attrs


# ---------------------------------------------------------------------------------------------------------
# Matching rows to the index
# ---------------------------------------------------------------------------------------------------------
class _Matcher:
    """Finds an index image by a metadata row's image_path or key, and hands out each image's captions."""

    def __init__(self, index: DatasetIndex, by: str) -> None:
        self.index, self.by = index, by
        self.rows: dict[str, int] = {}
        ambiguous: set[str] = set()
        for r, image_id in enumerate(index.image_id.tolist()):
            for name in self._names(r, image_id):
                if self.rows.setdefault(name, r) != r:
                    ambiguous.add(name)
        self.ambiguous = ambiguous
        self.captions: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for c, (text, r) in enumerate(zip(index.caption_text.tolist(), index.caption_image.tolist())):
            self.captions[r][text].append(c)
        self.n_captions = np.bincount(index.caption_image, minlength=index.n_images)

    def _names(self, r: int, image_id: str) -> list[str]:
        if self.by == "key":
            ref = self.index.image_ref(r)
            stem = ref.member.rsplit("/", 1)[-1] if ref.container == "tar" else image_id.rsplit("/", 1)[-1]
            return list({stem.split(".", 1)[0], image_id.rsplit(".", 1)[0]})
        return list({image_id, str(self.index.image_abspath(r)), self.index.image_path[r]})

    def image(self, name: str, where: str) -> int:
        if name in self.ambiguous:
            raise InputError(f"{where}: {self.by} {name!r} names more than one image of the index")
        row = self.rows.get(name)
        if row is None:
            raise InputError(f"{where}: {self.by} {name!r} is not an image of dataset {self.index.name}")
        return row

    def caption(self, image: int, text: str | None, where: str) -> int | None:
        """The index caption row this metadata row's text is, None for a row without a caption."""
        if text is None:
            if self.n_captions[image] != 1:
                return None  # no caption column: an image with several (or no) captions gets no text row
            text = self.index.caption_text[np.flatnonzero(self.index.caption_image == image)[0]]
        if text == "":
            return None
        left = self.captions[image].get(text)
        if not left:
            raise InputError(
                f"{where}: caption {text!r} is not a caption of image {self.index.image_id[image]!r} "
                "in the index (or this image lists it more often than the index)"
            )
        return left.pop(0)


def import_embeddings(
    source: Path | str,
    out_path: Path | str,
    index: DatasetIndex,
    *,
    match: str = "auto",
    teacher: dict[str, Any] | None = None,
    dtype: str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Path:
    """A feature store from embeddings in clip-retrieval's layout, rows matched to `index` (see the module doc)."""
    claim(out_path, FEATURE_STORE)  # before the work; the store is then built beside it and swapped in
    source = Path(source)
    parts = _parts(source)
    images = [_load_part(source, "img_emb", k) for k in parts]
    texts = [_load_part(source, "text_emb", k) for k in parts]
    dims = {a.shape[1] for a in images + texts}
    if len(dims) != 1:
        raise InputError(f"{source}: the .npy files have different dimensions {sorted(dims)}")
    dim = dims.pop()
    found: dict[str, Any] = {}
    image_src = np.full((index.n_images, 2), -1, np.int64)  # (part, row) of each index image
    caption_src = np.full((index.n_captions, 2), -1, np.int64)
    unpaired_src: dict[str, list[tuple[int, int]]] = defaultdict(list)
    matcher = None
    for p, k in enumerate(parts):
        meta_path = source / "metadata" / f"metadata_{k}.parquet"
        columns, attrs = _metadata(meta_path)
        found = found or attrs
        n = len(next(iter(columns.values()), []))
        if not (len(images[p]) == len(texts[p]) == n):
            raise InputError(
                f"{source}: part {k} has {len(images[p])} image rows, {len(texts[p])} text rows and {n} metadata rows; "
                "they must be equal"
            )
        by = match if match != "auto" else ("image_path" if "image_path" in columns else "key")
        if by not in columns:
            raise InputError(f"{meta_path}: no column {by!r} to match the rows to the dataset index")
        matcher = matcher if matcher is not None and matcher.by == by else _Matcher(index, by)
        _match_part(p, meta_path, columns, matcher, images, image_src, caption_src, unpaired_src)
    splits = _splits(index, image_src, caption_src, unpaired_src, images, texts, dim, str(source))
    if teacher is None and not found.get("teacher"):
        raise InputError(f"{source}: the embeddings record no teacher; give its name (--teacher-name)")
    attrs = import_attrs(source, found, index, teacher, {"dir": source.name, "format": "clip-retrieval"})
    return write_imported(
        out_path,
        splits,
        attrs=attrs,
        dtype=dtype,
        chunk_rows=chunk_rows,
        normalized=found.get("normalized") is True,
        where=str(source),
        expect_fingerprint=index.fingerprint,
    )


def _match_part(p, meta_path, columns, matcher, images, image_src, caption_src, unpaired_src) -> None:
    """Record which (part, row) holds each index image, caption and unpaired text named by part p's metadata."""
    names, captions, split_of = columns[matcher.by], columns.get("caption"), columns.get("split")
    for r, name in enumerate(names):
        where = f"{meta_path} row {r}"
        text = None if captions is None else (captions[r] or "")
        if name is None or name == "":
            if not text or split_of is None or not split_of[r]:
                raise InputError(f"{where}: no {matcher.by}, and not a text without an image (a caption and a split)")
            unpaired_src[split_of[r]].append((p, r, text))
            continue
        g = matcher.image(str(name), where)
        if image_src[g, 0] < 0:
            image_src[g] = (p, r)
        else:  # the image of another sample too: its rows must be the same embedding
            q, s = (int(v) for v in image_src[g])
            diff = np.abs(np.asarray(images[q][s], np.float32) - np.asarray(images[p][r], np.float32)).max()
            if diff > _REPEAT_TOLERANCE:
                raise InputError(
                    f"{where}: image {matcher.index.image_id[g]!r} has another embedding here than in part {q} row {s} "
                    f"(max difference {diff:.3g})"
                )
        c = matcher.caption(g, text, where)
        if c is not None:
            caption_src[c] = (p, r)


def _splits(index, image_src, caption_src, unpaired_src, images, texts, dim, where) -> dict[str, SourceSplit]:
    """One SourceSplit per split the embeddings touch, each complete (every image, caption, unpaired text)."""
    dtype = np.result_type(*[a.dtype for a in images + texts])
    out = {}
    for split in index.splits:
        view = index.split(split)
        src = image_src[view.image_rows]
        if (src[:, 0] < 0).all() and not unpaired_src.get(split):
            continue  # a split the embeddings do not cover: left out of the store
        if (src[:, 0] < 0).any():
            missing = view.image_id[np.flatnonzero(src[:, 0] < 0)[0]]
            raise InputError(
                f"{where}: image {missing!r} of split {split!r} has no embedding (every image of a split needs one)"
            )
        csrc = caption_src[view.caption_rows]
        if (csrc[:, 0] < 0).any():
            c = int(np.flatnonzero(csrc[:, 0] < 0)[0])
            raise InputError(
                f"{where}: caption {view.caption_text[c]!r} of image {view.image_id[view.text_image[c]]!r} "
                f"(split {split!r}) has no embedding"
            )
        unpaired = _unpaired(view, unpaired_src.get(split, []), where, split)
        check_against_index(where, split, index, view.image_id.tolist(), view.text_image)
        out[split] = SourceSplit(
            image_emb=_Gather(images, src[:, 0], src[:, 1], dim, dtype),
            text_emb=_Gather(texts, csrc[:, 0], csrc[:, 1], dim, dtype),
            text_image=view.text_image,
            image_id=view.image_id.tolist(),
            unpaired=_Gather(texts, unpaired[:, 0], unpaired[:, 1], dim, dtype),
        )
    if not out:
        raise InputError(f"{where}: no row matches an image of dataset {index.name}")
    return out


def _unpaired(view, rows: list[tuple[int, int, str]], where: str, split: str) -> np.ndarray:
    """(part, row) of each unpaired text of the split, matched by text in order."""
    wanted = view.unpaired_text.tolist()
    if [t for _, _, t in rows] != wanted:
        raise InputError(
            f"{where}: split {split!r} has {len(rows)} text rows without an image, the index {len(wanted)} texts "
            "without images (in the same order)"
        )
    return np.array([(p, r) for p, r, _ in rows], np.int64).reshape(-1, 2)


# ---------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------
def export_embeddings(store_path: Path | str, index: DatasetIndex, out: Path | str) -> Path:
    """Write a complete store in clip-retrieval's layout (see the module doc), atomically, into `out`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = open_store(store_path, expect_fingerprint=index.fingerprint)
    out = Path(out)
    claim(out, EMBEDDINGS_EXPORT)  # before the work; replace_dir claims it again just before the swap
    remove_stale_dirs(out)
    tmp = temp_beside(out)
    try:
        for name in PARTS:
            (tmp / name).mkdir(parents=True)
        for k, split in enumerate(store.splits):
            sp, view = store.split(split), index.split(split)
            check_against_index(store.path, split, index, sp.image_id.tolist(), sp.text_image)
            m, u = sp.n_captions, len(sp.unpaired_image)
            image_rows = np.concatenate(
                [sp.text_image.astype(np.int64), sp.unpaired_image, np.full(sp.n_unpaired_texts, -1)]
            )
            text_rows = np.arange(m + u + sp.n_unpaired_texts)
            texts = (sp.text_emb, sp.unpaired_text_emb)
            _write_rows(tmp / "img_emb" / f"img_emb_{k}.npy", image_rows, lambda rows, sp=sp: _take(sp.image_emb, rows))
            positions = np.arange(len(text_rows))  # captions, then zeros, then texts without an image
            _write_rows(
                tmp / "text_emb" / f"text_emb_{k}.npy",
                positions,
                lambda rows, t=texts, m=m, u=u: _take_texts(t, m, u, rows),
            )
            table = pa.table(
                {
                    "image_path": pa.array(
                        [sp.image_id[r] if r >= 0 else None for r in image_rows.tolist()], pa.string()
                    ),
                    "caption": pa.array(
                        view.caption_text.tolist() + [None] * u + view.unpaired_text.tolist(), pa.string()
                    ),
                    "split": pa.array([split] * len(image_rows), pa.string()),
                }
            ).replace_schema_metadata({"kdpipe": json.dumps(store.attrs, ensure_ascii=False)})
            pq.write_table(table, tmp / "metadata" / f"metadata_{k}.parquet")
        fsync_tree(tmp)
        replace_dir(tmp, out, EMBEDDINGS_EXPORT)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _take(rows_source: Any, rows: np.ndarray) -> np.ndarray:
    """Rows of a store array (a zero row where rows == -1)."""
    out = np.zeros((len(rows), rows_source.shape[1]), rows_source.dtype)
    have = rows >= 0
    if have.any():
        out[have] = np.asarray(rows_source[rows[have]])
    return out


def _take_texts(texts: tuple[Any, Any], m: int, u: int, positions: np.ndarray) -> np.ndarray:
    """Text rows of export positions: captions [0, m), zeros [m, m + u), unpaired texts after."""
    captions, unpaired = texts
    out = np.zeros((len(positions), captions.shape[1]), captions.dtype)
    cap = positions < m
    if cap.any():
        out[cap] = np.asarray(captions[positions[cap]])
    rest = positions >= m + u
    if rest.any():
        out[rest] = np.asarray(unpaired[positions[rest] - m - u])
    return out


def _write_rows(path: Path, rows: np.ndarray, take) -> None:
    """An .npy file of take(rows), written block by block (bounded memory)."""
    first = take(rows[:1])
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=first.dtype, shape=(len(rows), first.shape[1]))
    for a in range(0, len(rows), _BLOCK_ROWS):
        arr[a : a + _BLOCK_ROWS] = take(rows[a : a + _BLOCK_ROWS])
    arr.flush()
    del arr


__all__ = ["import_embeddings", "export_embeddings"]
