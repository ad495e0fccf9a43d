"""Exact top-k over a flat index, reading a quarter of the bytes: an 8-bit scan, then an exact rerank.

One exact query reads every stored row; at 100k x 768 float32 that is 307 MB, and on 2 CPU cores the scan runs
at memory speed (docs/performance.md). The same rows as 8-bit codes are 77 MB. faiss scans them with integer
arithmetic against an 8-bit query, and every row's approximate score has a bounded error, so a short list of
candidates provably holds the exact top-k; only those rows are scored in float32:

    rows      x_i = s c_i + e_i, c_i = round(x_i / s): one scale s for the gallery, ||e_i|| <= B
    query     q = t d + f, d = round(q / t), t = max|q| / 127
    approx    a_i = s t (d . c_i), exact: float32 holds every partial sum exactly while 127^2 D < 2^24 (D <= 1040)
    error     |q . x_i - a_i| = |q . e_i + s f . c_i| <= ||q|| B + ||f|| (max_i ||x_i|| + B) =: m
    cut       t_k = the k-th largest a_i; k rows score >= t_k - m exactly, so the exact k-th is >= t_k - m,
              and every row of the exact top-k has a_i >= t_k - 2m: those are the candidates.

m also covers the float32 rounding of the rerank (2 D u ||q|| max ||x||), so rows that float32 puts in the
top-k are candidates too. If the scan's list (`fetch` rows) ends above the cut, the candidates may go on beyond
it: that query scans again for 8x as many, up to every row. The result is the float32 top-k either way (equal
scores in row order). faiss scans the codes (IndexScalarQuantizer, direct signed 8-bit) in one shard per thread;
a search sets faiss's OpenMP threads for its duration, so one prefilter serves one query at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_FLOAT32_UNIT = 2.0**-24  # unit roundoff of float32
_BLOCK = 16_384  # rows encoded at a time


@dataclass(frozen=True)
class Codes:
    """What the scan needs of a gallery, made once (`kdpipe index` stores it beside the index)."""

    codes: np.ndarray  # uint8 [N, D]: c_i + 128 (faiss's direct signed 8-bit layout)
    scale: float  # s
    error_bound: float  # B: the largest ||x_i - s c_i||
    norm_max: float  # the largest ||x_i||


@dataclass
class EightBitPrefilter:
    shards: Any  # faiss.IndexShards over the codes, one shard per thread
    parts: list[Any]  # the shards themselves: IndexShards does not own them, so they are kept alive here
    codes: Codes

    @property
    def n(self) -> int:
        return len(self.codes.codes)


def encode(rows: np.ndarray) -> Codes:
    """8-bit codes of float32 `rows` [N, D] with one scale, and the bounds of their error (float64)."""
    n, d = rows.shape
    x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    peak = float(x.abs().max()) if n else 0.0
    scale = peak / 127 if peak > 0 else 1.0
    codes = torch.empty((n, d), dtype=torch.uint8)
    error_bound = norm_max = 0.0
    for start in range(0, n, _BLOCK):  # blocks: the float64 copies stay small
        block = x[start : start + _BLOCK]
        c = torch.round(block / scale)  # integers in [-127, 127] (half to even, as np.rint)
        codes[start : start + _BLOCK] = (c + 128).to(torch.uint8)
        wide = block.double()
        error_bound = max(error_bound, float((wide - scale * c.double()).pow(2).sum(1).max().sqrt()))
        norm_max = max(norm_max, float(wide.pow(2).sum(1).max().sqrt()))
    return Codes(codes.numpy(), scale, error_bound, norm_max)


def build_prefilter(codes: Codes, threads: int) -> EightBitPrefilter:
    """The faiss scan of `codes`, in `threads` shards."""
    import faiss

    n, d = codes.codes.shape
    shards = faiss.IndexShards(d, True, True)  # threaded; ids run on from one shard to the next
    subs = []
    for part in np.array_split(codes.codes, max(1, min(threads, n))):
        sub = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit_direct_signed, faiss.METRIC_INNER_PRODUCT)
        sub.add_sa_codes(np.ascontiguousarray(part))
        shards.add_shard(sub)
        subs.append(sub)
    return EightBitPrefilter(shards, subs, codes)


def exact_top_k(pre: EightBitPrefilter, rows: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact float32 top-k of `rows @ query` (scores [k], rows [k] int64) by the 8-bit scan and a rerank."""
    k = min(k, pre.n)
    if k <= 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
    fetch = min(pre.n, max(4 * k, 1024))
    while (candidates := scan_candidates(pre, q, k, fetch)) is None:  # the list stopped inside the candidates
        fetch = min(pre.n, 8 * fetch)  # scanning again costs less than scoring every row in float32
    # einsum, not BLAS: OpenBLAS's threads spin for a while after a call and took the cores from the next
    # query's faiss scan (measured 3x slower queries on 2 cores)
    exact = np.einsum("ij,j->i", rows if len(candidates) == pre.n else rows[candidates], q[0])
    order = np.lexsort((candidates, -exact))[:k]  # by score, then by row
    return exact[order].astype(np.float32), candidates[order].astype(np.int64)


def scan_candidates(pre: EightBitPrefilter, q: np.ndarray, k: int, fetch: int) -> np.ndarray | None:
    """Sorted rows that hold the exact top-k of query `q` [1, D], from the best `fetch` approximate scores;
    None when those do not provably hold them all (the fetched list ends above the cut)."""
    approx, ids, margin = approximate(pre, q, fetch)
    cut = approx[k - 1] - 2 * margin
    if fetch < pre.n and approx[-1] >= cut:
        return None
    return np.sort(ids[approx >= cut])


def approximate(pre: EightBitPrefilter, q: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The best `fetch` approximate scores of query `q` [1, D] (descending), their rows, and the bound m on
    |exact - approximate| that holds for every row."""
    dim = q.shape[1]
    peak = float(np.abs(q).max())
    t = peak / 127 if peak > 0 else 1.0
    d = np.rint(q / np.float32(t)).astype(np.float32)  # integers: faiss's own 8-bit cast of them is exact
    approx, ids = _search_shards(pre, d, fetch)
    f = float(np.linalg.norm(q.astype(np.float64) - t * d.astype(np.float64)))
    norm = float(np.linalg.norm(q))
    c = pre.codes
    margin = norm * c.error_bound + f * (c.norm_max + c.error_bound)
    margin += 2 * dim * _FLOAT32_UNIT * norm * c.norm_max  # the float32 rerank's own rounding
    if 127 * 127 * dim >= 2**24:  # partial sums past 2^24 are rounded in float32: D u sum |d_j c_ij| at most
        margin += c.scale * t * dim * _FLOAT32_UNIT * 127 * 127 * dim
    return approx[0].astype(np.float64) * (c.scale * t), ids[0], margin


def _search_shards(pre: EightBitPrefilter, d: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
    """One thread per shard: within a shard, faiss would start a team of OpenMP threads for the one query
    that only wait (2 shards x 2 threads on 2 cores: 4.6 ms a query against 3.2 ms with one thread each)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return pre.shards.search(d, fetch)
    finally:
        faiss.omp_set_num_threads(before)
