"""A faiss index over L2-normalized gallery embeddings (inner product = cosine), stored next to its id table.

    <dir>/index.faiss      faiss.write_index of the index
    <dir>/codes.npy        flat only: the rows as 8-bit codes (uint8 [N, D]) for the fast exact scan
                           (pipeline/search/prefilter.py); its scale and error bounds are in ids.json "codes"
    <dir>/rows.jsonl       line i: {"split": ..., "captions": [...]} of row i (what a result prints)
    <dir>/ids.json         {"ids": [...], "source": ..., "student": ..., "student_weights": {...}, "pixels": {...},
                           "kind": ..., "dim": D}: row i of the index is ids[i]

The directory is written beside its place and swapped in whole (durable.atomic_dir), over nothing or over an
earlier index: a directory holding anything but these files is refused (SEARCH_INDEX).

Kinds: `flat` (IndexFlatIP, exact: the default), `hnsw` (IndexHNSWFlat over inner product: a graph, no training,
~1.5x the memory of flat) and `ivfpq` (IndexIVFPQ: k-means cells and product-quantized codes, for millions of
images; trained on the gallery itself). An approximate index reports its recall@10 against exact search.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline.errors import InputError, reading_file
from pipeline.search.prefilter import Codes, EightBitPrefilter, build_prefilter, encode, exact_top_k
from pipeline.store.durable import atomic_dir
from pipeline.store.ownership import Output
from pipeline.text_files import read_json

Kind = Literal["flat", "hnsw", "ivfpq"]
CODES_FILE = "codes.npy"
ROWS_FILE = "rows.jsonl"
SEARCH_INDEX = Output(
    "a search index", directory=True, names=frozenset({"index.faiss", CODES_FILE, ROWS_FILE, "ids.json"})
)
# a flat gallery of at least this many values (64 MB of float32) is searched through its 8-bit codes; below, a
# float32 scan is as fast or faster (measured on 2 cores: 20k x 768 1.55 vs 1.42 ms, 50k x 768 2.7 vs 6.3 ms)
PREFILTER_MIN_VALUES = 16_000_000


@dataclass(frozen=True)
class IndexConfig:
    kind: Kind = "flat"
    hnsw_m: int = 32  # graph degree
    hnsw_ef_search: int = 128  # candidates kept per query: recall vs speed
    ivf_lists: int | None = None  # None: ~4 sqrt(N), at most N / 39 (faiss wants 39 training points per cell)
    pq_bytes: int = 32  # bytes per vector (sub-quantizers of 8 bits); must divide dim
    nprobe: int = 16  # cells visited per query

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "hnsw", "ivfpq"):
            raise ValueError(f"kind must be flat, hnsw or ivfpq, got {self.kind!r}")


def build_index(emb: np.ndarray, cfg: IndexConfig | None = None) -> Any:
    import faiss

    cfg = cfg or IndexConfig()

    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, dim = emb.shape
    if cfg.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = cfg.hnsw_ef_search
    else:
        if dim % cfg.pq_bytes:
            raise InputError(f"index: pq_bytes {cfg.pq_bytes} must divide the embedding dimension {dim}")
        lists = cfg.ivf_lists or max(1, min(int(4 * np.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, lists, cfg.pq_bytes, 8, faiss.METRIC_INNER_PRODUCT)
        if n < 256 * 39:  # 8-bit sub-quantizers want ~39 x 256 training points; fewer still train, less well
            index.cp.min_points_per_centroid = 1
            index.pq.cp.min_points_per_centroid = 1
        index.train(emb)
        index.nprobe = min(cfg.nprobe, lists)
    index.add(emb)
    return index


def recall_at_k(approx: Any, emb: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k (the usual ANN "recall@k")."""
    import faiss

    exact = faiss.IndexFlatIP(emb.shape[1])
    exact.add(np.ascontiguousarray(emb, dtype=np.float32))
    k = min(k, emb.shape[0])
    q = np.ascontiguousarray(queries, dtype=np.float32)
    _, truth = exact.search(q, k)
    _, found = approx.search(q, k)
    return float(np.mean([len(set(t) & set(f)) / k for t, f in zip(truth.tolist(), found.tolist())]))


def save_index(
    index: Any, ids: list[str], directory: Path | str, rows: list[dict[str, Any]] | None = None, **meta: Any
) -> Path:
    """Write the index, its codes (flat), `rows` (what each row is: split, captions) and ids.json into `directory`,
    swapped in whole (over nothing or an earlier index)."""
    import faiss

    directory = Path(directory)
    if index.ntotal != len(ids) or (rows is not None and len(rows) != len(ids)):
        raise ValueError(f"{index.ntotal} vectors but {len(ids)} ids and {len(rows or ids)} rows")
    with atomic_dir(directory, SEARCH_INDEX) as tmp:
        if rows is not None:
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            (tmp / ROWS_FILE).write_text(lines, encoding="utf-8")
        faiss.write_index(index, str(tmp / "index.faiss"))
        if meta.get("kind") == "flat":
            codes = encode(flat_vectors(index))
            np.save(tmp / CODES_FILE, codes.codes)
            meta["codes"] = {"scale": codes.scale, "error_bound": codes.error_bound, "norm_max": codes.norm_max}
        (tmp / "ids.json").write_text(json.dumps({**meta, "ids": list(ids)}) + "\n")
    return directory


def flat_vectors(index: Any) -> np.ndarray:
    """A flat index's [N, D] float32 rows, a view of faiss's own storage (no copy)."""
    import faiss

    n, d = index.ntotal, index.d
    return faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d)


@dataclass
class SearchIndex:
    index: Any
    ids: list[str]
    meta: dict[str, Any]
    codes: Codes | None = None  # a flat index's 8-bit codes, when stored beside it
    directory: Path | None = None  # where it was loaded from (rows.jsonl)
    _prefilter: EightBitPrefilter | None = field(default=None, repr=False)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """[Q, D] normalized queries -> (scores float32 [Q, k'], rows int64 [Q, k']), k' = min(k, N)."""
        k = min(k, len(self.ids))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.meta.get("kind") == "flat" and len(queries) < 20 and k > 0:
            # faiss answers fewer than 20 queries with one thread (no BLAS), over all 4 bytes of every value
            rows = self.vectors()
            if rows.size >= PREFILTER_MIN_VALUES:
                # an 8-bit scan on every core, then an exact rerank: the same top-k from a quarter of the bytes
                # (pipeline/search/prefilter.py; 2.3x faster than a float32 matrix-vector product at 100k x 768)
                found = [exact_top_k(self.prefilter(), rows, q, k) for q in queries]
                return np.stack([f[0] for f in found]), np.stack([f[1] for f in found])
            # a gallery that fits in the caches: a float32 matrix-vector product on every core is faster
            scores, top = torch.topk(torch.from_numpy(rows) @ torch.from_numpy(queries).T, k, dim=0)
            return scores.T.numpy(), top.T.numpy().astype(np.int64)
        return self.index.search(queries, k)

    def prefilter(self) -> EightBitPrefilter:
        """The scan of the flat index's 8-bit codes: those stored beside it, else made now (an index written
        before they were stored; ~3 s per 100k x 768 on 2 cores)."""
        if self._prefilter is None:
            import faiss

            codes = self.codes or encode(self.vectors())
            self._prefilter = build_prefilter(codes, faiss.omp_get_max_threads())
        return self._prefilter

    def vectors(self) -> np.ndarray:
        """The flat index's [N, D] float32 rows (no copy)."""
        return flat_vectors(self.index)

    def rows(self, which: list[int]) -> list[dict[str, Any]]:
        """rows.jsonl's entries of rows `which` ({} each for an index without it). Only those lines are parsed."""
        path = self.directory / ROWS_FILE if self.directory else None
        if path is None or not path.is_file():
            return [{} for _ in which]
        lines = path.read_bytes().split(b"\n")
        if len(lines) != len(self.ids) + 1:  # + the empty string after the last newline
            raise InputError(f"{path}: {len(lines) - 1} lines for {len(self.ids)} index rows; run `kdpipe index` again")
        try:
            out = [json.loads(lines[r]) for r in which]
        except (ValueError, RecursionError) as err:  # RecursionError: a line nested thousands of levels deep
            raise InputError(f"{path}: not JSON lines ({err}); run `kdpipe index` again") from None
        return [r if isinstance(r, dict) else {} for r in out]


def load_index(directory: Path | str) -> SearchIndex:
    import faiss

    directory = Path(directory)
    if not (directory / "ids.json").is_file() or not (directory / "index.faiss").is_file():
        raise InputError(f"{directory}: no search index here (index.faiss / ids.json); run `kdpipe index` first")
    meta = read_json(directory / "ids.json")
    with reading_file(directory / "index.faiss", "a faiss index", "run `kdpipe index` again"):
        index = faiss.read_index(str(directory / "index.faiss"))
    if not isinstance(meta, dict):
        raise InputError(f"{directory / 'ids.json'}: expected a JSON object; run `kdpipe index` again")
    ids = meta.pop("ids", None)
    if not isinstance(ids, list) or len(ids) != index.ntotal:
        raise InputError(f"{directory}: ids.json does not match index.faiss ({index.ntotal} vectors)")
    if meta.get("kind") == "hnsw" and "ef_search" in meta:
        index.hnsw.efSearch = int(meta["ef_search"])
    if meta.get("kind") == "ivfpq" and "nprobe" in meta:
        faiss.extract_index_ivf(index).nprobe = int(meta["nprobe"])
    return SearchIndex(
        index, ids, meta, codes=_load_codes(directory, meta, (index.ntotal, index.d)), directory=directory
    )


def _load_codes(directory: Path, meta: dict[str, Any], shape: tuple[int, int]) -> Codes | None:
    bounds = meta.get("codes")
    if meta.get("kind") != "flat" or not isinstance(bounds, dict) or not (directory / CODES_FILE).is_file():
        return None  # an index from before the codes were stored: they are made on the first search
    try:
        codes = np.load(directory / CODES_FILE)
    except (OSError, ValueError) as err:
        raise InputError(
            f"{directory / CODES_FILE}: not a readable .npy file ({err}); run `kdpipe index` again"
        ) from None
    if codes.dtype != np.uint8 or codes.shape != shape:
        raise InputError(
            f"{directory / CODES_FILE}: {codes.dtype} {codes.shape} does not match index.faiss ({shape[0]} x "
            f"{shape[1]}); run `kdpipe index` again"
        )
    return Codes(codes, float(bounds["scale"]), float(bounds["error_bound"]), float(bounds["norm_max"]))
