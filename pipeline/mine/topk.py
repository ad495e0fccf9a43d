"""Exact top-K teacher neighbours: for each caption its K nearest images, for each image its K nearest captions.

The score of a pair is the inner product of the two stored rows. For a float16 store it is computed EXACTLY:
a float16 value of magnitude <= 1 is a multiple of 2^-24, so each product of two is a multiple of 2^-48, and
every partial sum of the D products is bounded by ||a|| ||b|| (about 1): an integer times 2^-48 below 2^53,
which float64 holds exactly in any summation order. So the score, the order (descending score, ties by
ascending row) and the stored float16 similarity do not depend on the device, the thread count, the BLAS or
the block size: the result equals a brute-force top-K bit for bit, and a resumed run equals an uninterrupted
one. (A float32 store: float64 accumulation, error below 1e-13 instead of 0.)

D-long float64 dot products for all M x N pairs would be slow, so there are two passes:
1. coarse: a float32 (or bfloat16) GEMM of a block of captions against all images, on the device, with a
   proven bound eps_q on its error for every pair of query q (`coarse_bounds`: float32 accumulation in any
   order, plus for bfloat16 what rounding each row lost, measured per row).
2. exact: a query's candidates are every row whose coarse score is >= tau - 2 eps, tau being its k-th
   largest coarse score. That holds every true top-k row r: k rows have coarse >= tau, so exact >= tau - eps,
   so the exact k-th score s_k >= tau - eps, and coarse(r) >= exact(r) - eps >= s_k - eps >= tau - 2 eps. The
   candidates (k and a few more) are scored in float64 and the top k taken; every candidate's coarse score is
   checked against the bound, so a library that broke it (a reduced-precision reduction) stops the run
   instead of giving a silently inexact result.

One GEMM block serves both directions: S = captions_block @ images^T, the caption's own image set to -inf
(which also removes, for each image, its own captions). Rows of S give the captions' candidates at once;
columns feed `ColumnPool`, each image's best `kk` coarse scores over all caption blocks so far, whose window
is taken once every block has been seen (an image whose window reaches past its pool is rescored against
all captions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

_FLOAT32_U = 2.0**-24
COARSE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class RowNorms:
    """float64 [R] per stored row x: ||x||, ||x'|| with x' = x in the coarse dtype, and ||x - x'||."""

    row: np.ndarray
    coarse: np.ndarray
    residual: np.ndarray


def row_norms(rows: np.ndarray, dtype: torch.dtype, chunk: int = 65536) -> RowNorms:
    """The norms `coarse_bounds` needs, of every row of a [R, D] array (read in chunks)."""
    out = [np.empty(len(rows), np.float64) for _ in range(3)]
    for a in range(0, len(rows), chunk):
        x = torch.from_numpy(np.asarray(rows[a : a + chunk], np.float64))
        x_coarse = x.to(dtype).double()
        for arr, v in zip(out, (x, x_coarse, x - x_coarse)):
            arr[a : a + len(x)] = torch.linalg.vector_norm(v, dim=1).numpy()
    return RowNorms(*out)


def coarse_bounds(queries: RowNorms, gallery: RowNorms, dim: int, store_dtype: np.dtype) -> np.ndarray:
    """eps [Q] with |coarse(q . g) - q . g| <= eps_q for every query q and gallery row g:

        q . g - q' . g' = q' . (g - g') + (q - q') . g        (q', g': the rows in the coarse dtype)
        |coarse - q' . g'| <= gamma_D sum |q'_i g'_i| <= gamma_D ||q'|| ||g'||
    so eps_q = ||q'|| max||g - g'|| + ||q - q'|| max||g|| + gamma_D ||q'|| max||g'||, gamma_D = D u / (1 - D u),
    u = 2^-24 (float32 accumulation in any order). float32 coarse: the residuals are 0 (float16 and float32
    rows are exact in float32); bfloat16: they are what rounding to 8 significant bits lost, measured, which
    is ~3.5x tighter than the worst case 2^-7 ||q|| ||g||. A float32 store adds the float64 rounding of its
    "exact" score; the last factor covers the rounding of these norms themselves."""
    gamma = dim * _FLOAT32_U / (1 - dim * _FLOAT32_U)
    eps = (
        queries.coarse * float(gallery.residual.max(initial=0.0))
        + queries.residual * float(gallery.row.max(initial=0.0))
        + gamma * queries.coarse * float(gallery.coarse.max(initial=0.0))
    )
    if np.dtype(store_dtype) != np.float16:
        eps += 2 * dim * 2.0**-53 * queries.row * float(gallery.row.max(initial=0.0))
    return eps * (1 + 2.0**-30)


@dataclass
class Candidates:
    """Each query's candidate rows (-1: padding) with their coarse scores, [B, C]."""

    rows: np.ndarray  # int64 [B, C]
    coarse: np.ndarray  # float32 [B, C] (-inf at padding)
    rescans: int = 0  # queries whose window reached past the kept best and were read again in full


def window(values: torch.Tensor, rows: torch.Tensor, k: int, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From each query's best coarse scores `values` [B, kk] (sorted descending) and their `rows`: the mask of
    those inside the window (>= the k-th - 2 eps) and the mask of queries whose window may reach past the kk
    given (the kk-th is inside and finite: rows beyond it may be inside too)."""
    floor = values[:, k - 1] - 2 * eps
    inside = (values >= floor[:, None]) & (rows >= 0)
    overflow = inside[:, -1] & torch.isfinite(values[:, -1])
    return inside, overflow


def candidates_from_scores(scores: torch.Tensor, k: int, extra: int, eps: torch.Tensor) -> Candidates:
    """Candidates of each row of a full coarse score block [B, N] (excluded entries -inf)."""
    kk = min(k + extra, scores.shape[1])
    values, rows = torch.topk(scores, kk, dim=1)  # sorted, largest first
    inside, overflow = window(values, rows, k, eps)
    if kk == scores.shape[1]:
        overflow[:] = False  # nothing lies beyond the whole row
    out_rows = torch.where(inside, rows, -1)
    out_coarse = torch.where(inside, values, -math.inf)
    wide = torch.nonzero(overflow).flatten()
    if len(wide):  # more than kk rows inside the window: these queries' windows are read from their full rows
        floor = values[wide, k - 1] - 2 * eps[wide]
        q, c = torch.nonzero(scores[wide] >= floor[:, None], as_tuple=True)  # grouped by query, c ascending
        counts = torch.bincount(q, minlength=len(wide))
        slot = torch.arange(len(q), device=q.device) - (torch.cumsum(counts, 0) - counts)[q]
        width = max(kk, int(counts.max()))
        if width > kk:
            out_rows = torch.nn.functional.pad(out_rows, (0, width - kk), value=-1)
            out_coarse = torch.nn.functional.pad(out_coarse, (0, width - kk), value=-math.inf)
        out_rows[wide], out_coarse[wide] = -1, -math.inf
        out_rows[wide[q], slot] = c
        out_coarse[wide[q], slot] = scores[wide[q], c]
    return Candidates(out_rows.cpu().numpy(), out_coarse.cpu().numpy(), len(wide))


class ColumnPool:
    """The `kk` best coarse scores of every column (image) over the row blocks (caption blocks) seen so far,
    with their rows; sorted descending per column, -inf / -1 where fewer were seen. Entries only leave a
    column for a larger score, so every row not held scores at most the column's kk-th held value."""

    def __init__(self, n_columns: int, kk: int, device: torch.device) -> None:
        self.kk = int(kk)
        self.values = torch.full((n_columns, self.kk), -math.inf, dtype=torch.float32, device=device)
        self.rows = torch.full((n_columns, self.kk), -1, dtype=torch.int64, device=device)

    def add_block(self, scores: torch.Tensor, first_row: int) -> None:
        """Take in a coarse block [B, N] whose rows are first_row.. (excluded entries -inf)."""
        threshold = self.values[:, -1]  # a column takes only entries above its kk-th so far
        hit = scores > threshold[None, :]
        n_hit = int(torch.count_nonzero(hit))
        if n_hit > 2 * self.kk * scores.shape[1]:  # a young pool: every column from its own top kk of the block
            kk = min(self.kk, scores.shape[0])
            values, rows = torch.topk(scores, kk, dim=0)  # [kk, N]
            cols = torch.arange(scores.shape[1], device=scores.device)
            self._merge(cols, values.T, torch.where(torch.isfinite(values), rows + first_row, -1).T)
        elif n_hit:  # the usual case: a few entries beat their column's kk-th
            r, c = torch.nonzero(hit, as_tuple=True)  # row-major: each column's entries by ascending row
            cols, where, counts = torch.unique(c, return_inverse=True, return_counts=True)
            order = torch.argsort(where, stable=True)
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(n_hit, device=c.device) - starts[where[order]]  # place within its column
            values = torch.full((len(cols), int(counts.max())), -math.inf, device=c.device)
            rows = torch.full(values.shape, -1, dtype=torch.int64, device=c.device)
            values[where[order], slot] = scores[r[order], c[order]]
            rows[where[order], slot] = r[order] + first_row
            self._merge(cols, values, rows)

    def _merge(self, cols: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> None:
        """Columns `cols` [T] keep their kk best of what they hold and the new [T, C] entries (-inf / -1 pads)."""
        all_values = torch.cat([self.values[cols], values], dim=1)
        all_rows = torch.cat([self.rows[cols], rows], dim=1)
        top, at = torch.topk(all_values, self.kk, dim=1)  # sorted, largest first
        self.values[cols] = top
        self.rows[cols] = torch.gather(all_rows, 1, at)

    def state(self) -> dict[str, np.ndarray]:
        return {"values": self.values.cpu().numpy(), "rows": self.rows.cpu().numpy()}

    def load(self, state: dict[str, np.ndarray]) -> None:
        if state["values"].shape != tuple(self.values.shape) or state["rows"].shape != tuple(self.rows.shape):
            raise ValueError(f"pool state of shape {state['values'].shape}, expected {tuple(self.values.shape)}")
        self.values.copy_(torch.from_numpy(state["values"]))
        self.rows.copy_(torch.from_numpy(state["rows"]))


def exact_scores(
    gallery: np.ndarray, queries: np.ndarray, rows: np.ndarray, chunk: int = 16, threads: int = 1
) -> np.ndarray:
    """float64 [B, C]: queries[b] . gallery[rows[b, c]], exact for float16 rows (module docstring); -inf where
    rows < 0. `chunk` queries' candidates are gathered at a time (a few MB: numpy's batched matmul on them is
    ~5x torch's bmm here), by `threads` threads (numpy's gather and matmul release the GIL)."""
    out = np.empty(rows.shape, np.float64)
    safe = np.where(rows >= 0, rows, 0)

    def part(a: int) -> None:
        g = np.asarray(gallery[safe[a : a + chunk]], np.float64)  # [b, C, D]
        q = np.asarray(queries[a : a + chunk], np.float64)[:, :, None]  # [b, D, 1]
        out[a : a + chunk] = np.matmul(g, q)[..., 0]

    starts = range(0, len(rows), chunk)
    if threads > 1 and len(rows) > chunk:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(part, starts))
    else:
        for a in starts:
            part(a)
    out[rows < 0] = -np.inf
    return out


def exact_scores_torch(
    gallery: torch.Tensor, queries: torch.Tensor, rows: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """`exact_scores` on the device (a GPU has float64 units to spare); the same numbers on any device."""
    out = torch.empty(rows.shape, dtype=torch.float64, device=rows.device)
    safe = rows.clamp_min(0)
    for a in range(0, len(rows), chunk):
        g = gallery[safe[a : a + chunk]].double()
        q = queries[a : a + chunk].double().unsqueeze(-1)
        out[a : a + chunk] = torch.bmm(g, q).squeeze(-1)
    return out.masked_fill(rows < 0, -math.inf)


def select_top(exact: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each query's candidates: (rows int32 [B, k], exact scores float64 [B, k]), by descending
    score, ties by ascending row."""
    order = np.lexsort((rows, -exact), axis=-1)[:, :k]
    top_rows = np.take_along_axis(rows, order, axis=-1)
    top = np.take_along_axis(exact, order, axis=-1)
    if (top_rows < 0).any():  # the caller checks there are k eligible rows: a padded pick is a bug
        raise RuntimeError("exact top-k picked a padding entry")
    return top_rows.astype(np.int32), top


def check_bound(exact: np.ndarray, coarse: np.ndarray, rows: np.ndarray, eps: np.ndarray, what: str) -> None:
    """Every candidate's coarse score lies within eps of its exact score, as the window's proof assumes."""
    valid = rows >= 0
    err = np.zeros(rows.shape, np.float64)
    err[valid] = np.abs(exact[valid] - coarse[valid].astype(np.float64))
    bad = err > eps[:, None]
    if bad.any():
        q, c = (int(x[0]) for x in np.nonzero(bad))
        raise RuntimeError(
            f"{what}: the coarse GEMM's error {err[q, c]:.3g} exceeds its proven bound {eps[q]:.3g} (query {q}); "
            "a library reduced the matmul's precision: set mine.coarse_dtype: float32"
        )


__all__ = [
    "COARSE_DTYPES",
    "Candidates",
    "ColumnPool",
    "candidates_from_scores",
    "check_bound",
    "coarse_bounds",
    "RowNorms",
    "exact_scores",
    "exact_scores_torch",
    "row_norms",
    "select_top",
    "window",
]
