"""Exact image-text retrieval metrics: per-query ranks, R@K, RSUM, median and mean rank, recall@K curves.

The protocol is the one BEiT-3, CLIP_benchmark and LAVIS report (shared/reference/retrieval-protocol.md):
scores S = image_emb @ text_emb.T in float32 (fp16 stores are upcast first); image-to-text (i2t) ranks, for each
image, the best-placed of *its* captions among all M captions; text-to-image (t2i) ranks, for each caption, its one
image among all N images. Any number of captions per image (at least one). Ranks are 1-based.

Tie rule: **pessimistic**. A query's rank is 1 + the number of *negatives* (captions of other images for i2t, other
images for t2i) whose score is >= the best positive score; a tie with a negative is counted against the query.
The rule does not depend on gallery order, so the result does not depend on how captions or images are ordered.
(Captions of the same image never count against it: they are positives.)

How (backend "torch"): no sort and no top-k. A rank is a count, `1 + #(negatives >= positive)`, so one pass of
matmul + compare over score tiles gives every rank exactly, in memory bounded by one tile (chunk_size x chunk_size
scores), however large the gallery. Each tile serves both directions: row counts for i2t, column counts for t2i, so
the score matrix is computed once. Every score is computed exactly once, and a positive's score is read from the
tile that computed it: ranks are exact with respect to that one float32 score matrix. To have every positive before
the tiles that compare against it, captions are grouped by image and the "diagonal" tiles (a block of images x
their own captions) go first; they hold every positive and are self-contained; the other tiles follow.

The scores run on the GPU when `device` is one; "auto" is torch. Scores stay fp32: bf16 inputs move scores by
more than the gaps between neighbours and change about 10% of the ranks. The figures (COCO-5K-sized galleries,
tile sizes, per machine) are in docs/performance.md, measured by bench/evaluate_bench.py.

An IndexFlatIP backend (faiss top-64 both ways, near ties and deeper queries re-counted by torch) was removed:
every rank needs every score, which the shared tile pass computes once, while faiss computed them twice (one
search per direction) and still handed the hard queries back to torch; it measured 1.9x to 18x slower. faiss
serves what it is good at, top-k search over a gallery (pipeline/search/).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from pipeline.errors import InputError

Backend = Literal["torch", "auto"]
TIE_RULE = "pessimistic"
RECALL_KS = (1, 5, 10)
DEFAULT_CHUNK_CPU = 4096  # tile edge (the fastest measured: docs/performance.md); <= 64 MB of scores + 16 MB of masks
DEFAULT_CHUNK_CUDA = 16384  # 1 GiB of scores per tile
_RESIDENT_BYTES = 2 << 30  # inputs up to this size (as fp32) are converted once; larger ones tile by tile


@dataclass(frozen=True)
class RetrievalRanks:
    """1-based ranks of every query. i2t[n]: rank of the best-placed caption of image n among all captions;
    t2i[m]: rank of caption m's image among all images. Pessimistic ties (see the module docstring)."""

    i2t: np.ndarray  # int64 [N]
    t2i: np.ndarray  # int64 [M]


# ---------------------------------------------------------------------------------------------------------
# Metrics from ranks
# ---------------------------------------------------------------------------------------------------------
def recall_metrics(ranks: RetrievalRanks) -> dict[str, float]:
    """R@1/5/10 per direction in percent, rsum (sum of the six, max 600), median rank (LAVIS/VSE convention:
    floor of the median of the 1-based ranks) and mean rank per direction."""
    out: dict[str, float] = {}
    for direction, r in (("i2t", ranks.i2t), ("t2i", ranks.t2i)):
        for k in RECALL_KS:
            out[f"{direction}_r{k}"] = _percent_within(r, k)
    out["rsum"] = float(sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS))
    out["i2t_medr"] = float(np.floor(np.median(ranks.i2t)))
    out["t2i_medr"] = float(np.floor(np.median(ranks.t2i)))
    out["i2t_meanr"] = float(np.mean(ranks.i2t))
    out["t2i_meanr"] = float(np.mean(ranks.t2i))
    return out


def recall_curve(ranks: np.ndarray, max_k: int = 50) -> np.ndarray:
    """Recall@K in percent for K = 1..max_k (float64 [max_k]) from one direction's 1-based ranks."""
    r = np.asarray(ranks)
    if r.size == 0:
        raise ValueError("recall_curve: no ranks")
    hits = np.bincount(np.minimum(r, max_k + 1), minlength=max_k + 2)[1 : max_k + 1].cumsum()
    return 100.0 * hits / r.size


def recall_curves(ranks: RetrievalRanks, max_k: int = 50) -> dict[str, np.ndarray]:
    return {"i2t": recall_curve(ranks.i2t, max_k), "t2i": recall_curve(ranks.t2i, max_k)}


def teacher_agreement(
    image_emb: torch.Tensor, text_emb: torch.Tensor, teacher_image: np.ndarray, teacher_text: np.ndarray
) -> dict[str, float]:
    """Mean cosine between a student's and the teacher's embedding of each gallery image and caption (the
    names evaluate's metrics and distill's validation log share).

    Distillation's direct goal; on a tiny gallery, where a recall moves by a whole query, it is the finer
    measure of how close a student came to the teacher (an undistilled student stays near 0)."""
    out = {}
    for key, student, teacher in (
        ("teacher_cos_image", image_emb, teacher_image),
        ("teacher_cos_text", text_emb, teacher_text),
    ):
        t = torch.as_tensor(np.asarray(teacher, dtype=np.float32), device=student.device)
        out[key] = float((student.float() * t).sum(1).mean())
    return out


def _percent_within(r: np.ndarray, k: int) -> float:
    return 100.0 * int(np.count_nonzero(r <= k)) / r.size


# ---------------------------------------------------------------------------------------------------------
# Ranks
# ---------------------------------------------------------------------------------------------------------
def retrieval_ranks(
    image_emb: Any,
    text_emb: Any,
    text_image: Any,
    *,
    chunk_size: int | None = None,
    backend: Backend = "auto",
    device: str | torch.device | None = None,
) -> RetrievalRanks:
    """Exact 1-based ranks of every image (i2t) and caption (t2i) query, scores in float32.

    image_emb [N, D], text_emb [M, D]: numpy arrays (memory maps welcome, fp16 or fp32) or torch tensors;
    text_image [M]: row in image_emb of each caption's image; every image needs at least one caption.
    chunk_size: edge of a score tile (memory ~ 5 x chunk_size^2 bytes); default 4096 on CPU, 16384 on CUDA.
    device: where the scores are computed (default: the tensors' device, else CPU).
    """
    n, m, d = _check_inputs(image_emb, text_emb, text_image)
    ti = np.asarray(text_image).astype(np.int64, copy=False)
    dev = (
        torch.device(device)
        if device is not None
        else (image_emb.device if isinstance(image_emb, torch.Tensor) else torch.device("cpu"))
    )
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_CUDA if dev.type == "cuda" else DEFAULT_CHUNK_CPU
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if backend not in ("torch", "auto"):
        raise ValueError(f"backend {backend!r}; expected 'torch' or 'auto'")
    with torch.inference_mode(), _ieee_fp32_matmul():
        i2t, t2i = _tiled_ranks(_Rows(image_emb, dev, n * d), _Rows(text_emb, dev, m * d), ti, chunk_size)
    return RetrievalRanks(i2t=i2t, t2i=t2i)


def _check_inputs(image_emb: Any, text_emb: Any, text_image: Any) -> tuple[int, int, int]:
    if len(image_emb.shape) != 2 or len(text_emb.shape) != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} must be [rows, D] with the same D"
        )
    n, d = int(image_emb.shape[0]), int(image_emb.shape[1])
    m = int(text_emb.shape[0])
    ti = np.asarray(text_image)
    if ti.shape != (m,) or (m and ti.dtype.kind not in "iu"):
        raise ValueError(f"text_image must be an integer array of shape ({m},), got {ti.dtype} {ti.shape}")
    if n == 0 or m == 0:
        raise InputError(f"cannot rank an empty gallery ({n} images, {m} captions)")
    if int(ti.min()) < 0 or int(ti.max()) >= n:
        bad = int(np.flatnonzero((ti < 0) | (ti >= n))[0])
        raise InputError(f"text_image[{bad}] = {int(ti[bad])} points outside the {n} images")
    counts = np.bincount(ti, minlength=n)
    if not counts.all():
        raise InputError(
            f"image row {int(np.flatnonzero(counts == 0)[0])} has no caption; image-to-text "
            f"retrieval needs at least one caption per image ({int((counts == 0).sum())} have none)"
        )
    return n, m, d


@contextmanager
def _ieee_fp32_matmul() -> Iterator[None]:
    """Full float32 matmuls while ranking, whatever the process set (TF32 on CUDA, bf16 in oneDNN on CPU): TF32
    keeps 10 mantissa bits and reorders near ties. Uses the torch>=2.9 fp32_precision API when present."""
    saved = []
    for backend in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None)):
        try:
            current = backend.fp32_precision
        except (AttributeError, RuntimeError):
            continue
        if current not in ("ieee", "none"):
            backend.fp32_precision = "ieee"
            saved.append((backend, current))
    if not saved and torch.cuda.is_available():
        try:  # an older torch: the legacy flag
            if torch.backends.cuda.matmul.allow_tf32:
                torch.backends.cuda.matmul.allow_tf32 = False
                saved.append((torch.backends.cuda.matmul, None))
        except RuntimeError:
            pass
    try:
        yield
    finally:
        for backend, value in saved:
            if value is None:
                backend.allow_tf32 = True
            else:
                backend.fp32_precision = value


class _Rows:
    """Float32 rows of an embedding matrix on the scoring device: converted once when small enough, else slice
    by slice (memory maps of a million rows are never loaded whole)."""

    def __init__(self, x: Any, device: torch.device, numel: int) -> None:
        self.x, self.device = x, device
        self.full: torch.Tensor | None = None
        if numel * 4 <= _RESIDENT_BYTES:
            self.full = self._convert(x)

    def _convert(self, part: Any) -> torch.Tensor:
        if isinstance(part, torch.Tensor):
            t = part
        else:
            arr = np.asarray(part)
            if not arr.dtype.isnative:
                arr = arr.astype(arr.dtype.newbyteorder("="))
            with warnings.catch_warnings():  # a read-only memory map: nothing here ever writes through it
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(np.ascontiguousarray(arr))
        t = t.to(device=self.device, dtype=torch.float32)  # no copy when it already is fp32 on the device
        _check_finite(t)
        return t

    def slice(self, start: int, stop: int) -> torch.Tensor:
        return self.full[start:stop] if self.full is not None else self._convert(self.x[start:stop])

    def permuted(self, order: np.ndarray | None) -> _Rows:
        """The same rows in `order` (None: unchanged)."""
        if order is None:
            return self
        out = _Rows.__new__(_Rows)
        out.device = self.device
        if self.full is not None:
            out.x, out.full = None, self.full[torch.from_numpy(order).to(self.device)]
        else:
            out.x, out.full = _Gathered(self.x, order), None
        return out


def _check_finite(t: torch.Tensor) -> None:
    # One sum instead of isfinite().all() (10x cheaper): NaN or inf anywhere makes it non-finite; so do values so
    # large that their sum overflows, and those would overflow the scores too.
    if t.numel() and not bool(torch.isfinite(t.sum())):
        raise InputError("embeddings contain non-finite values (NaN or inf) or values too large for float32 scores")


class _Gathered:
    """x[order[a:b]] for slices, without materializing x[order] (for streamed, non-resident inputs)."""

    def __init__(self, x: Any, order: np.ndarray) -> None:
        self.x, self.order = x, order

    def __getitem__(self, s: slice) -> Any:
        idx = self.order[s]
        return self.x[torch.from_numpy(idx)] if isinstance(self.x, torch.Tensor) else self.x[idx]


def _tiled_ranks(
    img: _Rows, txt: _Rows, text_image: np.ndarray, chunk: int, *, want_i2t: bool = True, want_t2i: bool = True
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Exact pessimistic ranks by counting, tile by tile (see the module docstring).

    text_image may hold -1: a caption of no image in this set (a distractor for every i2t query, no t2i rank);
    images without captions are allowed when want_i2t is False. Returns (i2t [N] | None, t2i [M] | None)."""
    dev = img.device
    m = len(text_image)
    n = int(img.full.shape[0]) if img.full is not None else int(img.x.shape[0])
    # Group captions by image (stable), so that each block of images owns one contiguous caption range.
    order = None if bool(np.all(text_image[1:] >= text_image[:-1])) else np.argsort(text_image, kind="stable")
    ti = text_image if order is None else text_image[order]
    txt = txt.permuted(order)
    cap_start = np.searchsorted(ti, np.arange(n + 1), side="left")  # captions of image i: [cap_start[i], [i+1])
    blocks = _row_blocks(cap_start, chunk)

    ti_dev = torch.from_numpy(ti).to(dev)
    pos_t = torch.full((m,), float("nan"), device=dev)  # positive score of each caption (NaN for distractors)
    pos_i = torch.empty(n, device=dev)  # best positive score of each image
    n_own = torch.zeros(n, dtype=torch.int64, device=dev)  # own captions scoring exactly pos_i (>= 1)
    cnt_i = torch.zeros(n, dtype=torch.int64, device=dev)  # captions scoring >= pos_i, own ones included
    cnt_t = torch.zeros(m, dtype=torch.int64, device=dev)  # images scoring >= pos_t, the own one included
    scratch = _Scratch(dev)

    def accumulate(s: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> None:
        """Add tile s = scores of images [r0, r1) x captions [c0, c1) to the counts of both directions."""
        if want_i2t:
            cnt_i[r0:r1] += scratch.ge(s, pos_i[r0:r1, None]).sum(1, dtype=torch.int32)
        if want_t2i:
            cnt_t[c0:c1] += scratch.ge(s, pos_t[None, c0:c1]).sum(0, dtype=torch.int32)

    # Phase 1: the diagonal tiles, images [r0, r1) x their captions [g0, g1). Every positive lives in one of them.
    for r0, r1 in blocks:
        g0, g1 = int(cap_start[r0]), int(cap_start[r1])
        rows = img.slice(r0, r1)
        if g1 == g0:  # no captions here (only when want_i2t is False)
            pos_i[r0:r1] = float("inf")
            continue
        s = scratch.scores(rows, txt.slice(g0, g1))  # [b, g]
        local = ti_dev[g0:g1] - r0
        pos = s[local, torch.arange(g1 - g0, device=dev)]
        best = torch.full((r1 - r0,), float("-inf"), device=dev).scatter_reduce(0, local, pos, "amax")
        pos_t[g0:g1] = pos
        pos_i[r0:r1] = best
        n_own[r0:r1] = torch.zeros(r1 - r0, dtype=torch.int64, device=dev).scatter_add(
            0, local, (pos == best[local]).to(torch.int64)
        )
        accumulate(s, r0, r1, g0, g1)

    # Phase 2: every other tile, against positives that are all known now.
    for r0, r1 in blocks:
        g0, g1 = int(cap_start[r0]), int(cap_start[r1])
        rows = img.slice(r0, r1)
        for lo, hi in ((0, g0), (g1, m)):
            for c0 in range(lo, hi, chunk):
                c1 = min(c0 + chunk, hi)
                accumulate(scratch.scores(rows, txt.slice(c0, c1)), r0, r1, c0, c1)

    i2t = t2i = None
    if want_i2t:
        i2t = (1 + cnt_i - n_own).cpu().numpy()
    if want_t2i:
        t2i_sorted = cnt_t.cpu().numpy()  # 1 + (count - the own image)
        t2i = t2i_sorted if order is None else np.empty_like(t2i_sorted)
        if order is not None:
            t2i[order] = t2i_sorted
    return i2t, t2i


def _row_blocks(cap_start: np.ndarray, chunk: int) -> list[tuple[int, int]]:
    """Consecutive image blocks of at most `chunk` images and at most `chunk` captions (an image with more than
    `chunk` captions gets a block of its own)."""
    n = len(cap_start) - 1
    blocks, r = [], 0
    while r < n:
        by_captions = int(np.searchsorted(cap_start, cap_start[r] + chunk, side="right")) - 1
        r1 = max(r + 1, min(r + chunk, by_captions, n))
        blocks.append((r, r1))
        r = r1
    return blocks


class _Scratch:
    """Reused buffers for a score tile and its compare mask (allocating 100 MB per tile costs page faults)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._s = torch.empty(0, device=device)
        self._b = torch.empty(0, dtype=torch.bool, device=device)

    def scores(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        shape = (rows.shape[0], cols.shape[0])
        if self._s.numel() < shape[0] * shape[1]:
            self._s = torch.empty(shape[0] * shape[1], device=self.device)
        return torch.mm(rows, cols.T, out=self._s[: shape[0] * shape[1]].view(shape))

    def ge(self, s: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        if self._b.numel() < s.numel():
            self._b = torch.empty(s.numel(), dtype=torch.bool, device=self.device)
        return torch.ge(s, threshold, out=self._b[: s.numel()].view(s.shape))


__all__ = [
    "RetrievalRanks",
    "TIE_RULE",
    "RECALL_KS",
    "retrieval_ranks",
    "recall_metrics",
    "recall_curve",
    "recall_curves",
    "teacher_agreement",
]
