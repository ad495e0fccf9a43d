"""One split's teacher neighbours, a unit at a time: `SplitMiner` (the kernels and their proof: topk.py).

    caption unit [start, stop)  -> text_to_image rows/sims of those captions (and each image's pool updated)
    image unit   [start, stop)  -> image_to_text rows/sims of those images (once every caption unit is in)

The images (the text-to-image gallery) sit on the device in the coarse dtype for the GEMM; exact rescoring
gathers the stored rows from the host arrays (memory maps), so a float16 bank is never copied as float64.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from pipeline.errors import InputError
from pipeline.mine.topk import (
    Candidates,
    ColumnPool,
    candidates_from_scores,
    check_bound,
    coarse_bounds,
    exact_scores,
    exact_scores_torch,
    row_norms,
    select_top,
    window,
)

# candidates kept beyond k per query (a window holding more is read again from the full row): a float32 pass's
# window rarely holds more than 8; a bfloat16 pass's is ~100x wider (bench/mine_bench.py prints both)
EXTRA = {torch.float32: 8, torch.bfloat16: 32}
_FLOAT64_IMAGES = 2 * 2**30  # the image bank is held as float64 for exact rescoring up to this size


@contextmanager
def full_precision_matmul() -> Iterator[None]:
    """float32 GEMMs in full float32 (no TF32, no bfloat16 internals) and bfloat16 GEMMs that accumulate in
    float32 (no reduced-precision split reductions): the error bound of the coarse pass assumes both."""
    precision = torch.get_float32_matmul_precision()
    bf16_reduction = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = bf16_reduction


def _tensor(rows: np.ndarray) -> torch.Tensor:
    """A CPU tensor over stored rows (a read-only memory map: copied only by the .to() that follows)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(np.asarray(rows))


def check_k(k: int, n_images: int, n_captions: int, text_image: np.ndarray, where: str) -> None:
    """One line unless every caption has k images besides its own and every image k captions besides its own."""
    own = np.bincount(text_image, minlength=n_images) if n_images else np.zeros(0, np.int64)
    if n_images - 1 < k:
        raise InputError(f"{where}: mine.k = {k}, but a caption has only {n_images - 1} other images to rank")
    fewest = n_captions - int(own.max(initial=0))
    if fewest < k:
        raise InputError(f"{where}: mine.k = {k}, but an image has only {fewest} captions other than its own")


class SplitMiner:
    """Mining state of one split: the image bank on the device, row norms, and the images' caption pool."""

    def __init__(
        self,
        image_emb: np.ndarray,
        text_emb: np.ndarray,
        text_image: np.ndarray,
        k: int,
        *,
        device: torch.device,
        coarse_dtype: torch.dtype,
        block_rows: int,
        extra: int | None = None,
        exact_on_device: bool | None = None,
    ) -> None:
        self.images, self.captions = image_emb, text_emb  # [N, D], [M, D] host arrays (memory maps)
        self.text_image = np.asarray(text_image, np.int64)
        self.k, self.kk = int(k), int(k) + int(EXTRA[coarse_dtype] if extra is None else extra)
        self.device, self.coarse_dtype, self.block_rows = device, coarse_dtype, int(block_rows)
        self.n_images, self.n_captions = int(image_emb.shape[0]), int(text_emb.shape[0])
        dim = int(image_emb.shape[1])
        image_norms, caption_norms = row_norms(image_emb, coarse_dtype), row_norms(text_emb, coarse_dtype)
        store_dtype = np.dtype(image_emb.dtype)
        self.caption_eps = coarse_bounds(caption_norms, image_norms, dim, store_dtype)  # [M] a caption's coarse error
        self.image_eps = coarse_bounds(image_norms, caption_norms, dim, store_dtype)  # [N] an image's
        self.bank = _tensor(image_emb).to(device=device, dtype=coarse_dtype)  # [N, D]
        self.pool = ColumnPool(self.n_images, min(self.kk, self.n_captions), device)
        self.stats = {"queries": 0, "candidates": 0, "rescans": 0}  # rows rescored exactly, for logs and benches
        # exact rescoring: numpy on the CPU (gathers from the memory maps); on a GPU, from device copies of the
        # stored rows (float64 units to spare there), rounded only in float64
        self._device_rows = None
        self._host_rows = {"images": image_emb, "captions": text_emb}
        if exact_on_device if exact_on_device is not None else device.type != "cpu":
            self._device_rows = {"images": _tensor(image_emb).to(device), "captions": _tensor(text_emb).to(device)}
        elif image_emb.shape[0] * image_emb.shape[1] * 8 <= _FLOAT64_IMAGES:
            # every caption rescores ~k images: gathering them as float64 halves that cost (converted once here;
            # the captions, gathered ~5x less often, stay in the stored dtype)
            self._host_rows["images"] = _tensor(image_emb).double().numpy()

    # -- one GEMM block -----------------------------------------------------------------------------------
    def _scores(self, start: int, stop: int) -> torch.Tensor:
        """Coarse [stop - start, N] scores of captions start..stop against every image, own image -inf."""
        q = _tensor(self.captions[start:stop]).to(device=self.device, dtype=self.coarse_dtype)
        scores = (q @ self.bank.T).float()
        own = torch.from_numpy(self.text_image[start:stop]).to(self.device)
        scores[torch.arange(stop - start, device=self.device), own] = -math.inf
        return scores

    def caption_unit(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """text_to_image (rows int32 [n, k], sims float16 [n, k]) of captions start..stop; their coarse scores
        go into the images' pool. Caption units must be fed once each (the pool would count a row twice)."""
        rows, sims = [], []
        with full_precision_matmul():
            for a in range(start, stop, self.block_rows):
                b = min(stop, a + self.block_rows)
                scores = self._scores(a, b)
                eps = torch.from_numpy(self.caption_eps[a:b]).to(self.device, torch.float32)
                cand = candidates_from_scores(scores, self.k, self.kk - self.k, eps)
                self.pool.add_block(scores, a)
                del scores
                r, s = self._exact("images", "captions", a, b, cand, self.caption_eps[a:b], "text_to_image")
                rows.append(r)
                sims.append(s)
        return np.concatenate(rows), np.concatenate(sims)

    def image_unit(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """image_to_text (rows int32 [n, k], sims float16 [n, k]) of images start..stop, from the pool (every
        caption unit must be in it)."""
        with full_precision_matmul():
            values, rows = self.pool.values[start:stop], self.pool.rows[start:stop]
            eps = torch.from_numpy(self.image_eps[start:stop]).to(self.device, torch.float32)
            inside, overflow = window(values, rows, self.k, eps)
            cand = Candidates(
                torch.where(inside, rows, -1).cpu().numpy(), torch.where(inside, values, -math.inf).cpu().numpy()
            )
            wide = torch.nonzero(overflow).flatten().cpu().numpy()
            if len(wide):  # the window reaches past the pool: rescore these images against every caption
                cand = self._rescan_images(start, wide, cand)
            return self._exact("captions", "images", start, stop, cand, self.image_eps[start:stop], "image_to_text")

    def _rescan_images(self, start: int, local: np.ndarray, cand: Candidates) -> Candidates:
        """Replace the candidates of images start + local by their window over ALL captions (coarse again)."""
        images = start + local
        full = torch.empty(len(images), self.n_captions, dtype=torch.float32, device=self.device)
        g = self.bank[torch.from_numpy(images).to(self.device)]  # [n, D]
        for a in range(0, self.n_captions, self.block_rows):
            b = min(self.n_captions, a + self.block_rows)
            q = _tensor(self.captions[a:b]).to(device=self.device, dtype=self.coarse_dtype)
            full[:, a:b] = (g @ q.T).float()
        own = torch.from_numpy(self.text_image[None, :] == images[:, None]).to(self.device)
        full.masked_fill_(own, -math.inf)
        eps = torch.from_numpy(self.image_eps[images]).to(self.device, torch.float32)
        wide = candidates_from_scores(full, self.k, self.kk - self.k, eps)
        rows, coarse = cand.rows, cand.coarse
        if wide.rows.shape[1] > rows.shape[1]:
            pad = wide.rows.shape[1] - rows.shape[1]
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
            coarse = np.pad(coarse, ((0, 0), (0, pad)), constant_values=-np.inf)
        rows[local] = -1
        coarse[local] = -np.inf
        rows[local, : wide.rows.shape[1]] = wide.rows
        coarse[local, : wide.rows.shape[1]] = wide.coarse
        return Candidates(rows, coarse, cand.rescans + len(local))

    def _exact(
        self, gallery: str, queries: str, start: int, stop: int, cand: Candidates, eps: np.ndarray, what: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k best of the candidates by exact score; `gallery` / `queries`: "images" or "captions"."""
        if self._device_rows is not None:
            idx = torch.from_numpy(cand.rows).to(self.device)
            rows = self._device_rows
            exact = exact_scores_torch(rows[gallery], rows[queries][start:stop], idx).cpu().numpy()
        else:
            host = self._host_rows
            q = np.asarray(host[queries][start:stop])
            exact = exact_scores(host[gallery], q, cand.rows, threads=torch.get_num_threads())
        check_bound(exact, cand.coarse, cand.rows, eps, what)
        self.stats["queries"] += len(cand.rows)
        self.stats["candidates"] += int((cand.rows >= 0).sum())
        self.stats["rescans"] += cand.rescans
        rows, top = select_top(exact, cand.rows, self.k)
        return rows, top.astype(np.float16)  # numpy rounds float64 -> float16 once, to nearest even


__all__ = ["SplitMiner", "check_k", "full_precision_matmul", "EXTRA"]
