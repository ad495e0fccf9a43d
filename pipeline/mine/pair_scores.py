"""Cross-encoder scores of (image, caption) pairs of one split: `PairScorer.score(image_rows, caption_rows)`.

Pairs are scored image by image: the distinct images of a call, in row order, are decoded by loader workers
in batches of `image_batch_size`, their states computed once (`CrossEncoder.image_states`), and every pair of
those images is scored in batches of `pair_batch_size` on rows gathered from the image and caption states.
Caption states are computed once per call for its distinct captions, in row order.

When a split's states fit in `state_cache_mib` (the demo's fusion head: 5 KB an image), they are computed
once for the whole split instead, in row order, and kept for the run. Either way, which items share a batch
is a function of the split and the call alone (never of what an earlier call left in memory), so the scores
of a unit do not depend on whether the run was resumed: a resumed mine writes the same bytes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.data.exif import orientation, upright
from pipeline.errors import InputError
from pipeline.teachers.base import CrossEncoder


def load_rgb(path: str, exif: str = "ignore") -> Image.Image:
    """An image file decoded fully as RGB, upright by its EXIF tag when the index says so (exif "apply"), as
    extract decodes it for the teacher (pipeline/extract/images.py, without its JPEG draft mode)."""
    with Image.open(path) as im:
        tag = orientation(im) if exif == "apply" else 1
        return upright(im.convert("RGB"), tag)


@dataclass(frozen=True)
class ScoringConfig:
    pair_batch_size: int = 256
    image_batch_size: int = 64
    text_batch_size: int = 256
    state_cache_mib: int = 1024
    num_workers: int = 0


class _Images(torch.utils.data.Dataset):
    """Item i -> (pixels [3, S, S] of image path i, "") or (zeros, the error) for a file that cannot be read:
    the main process raises it (an exception raised in a loader worker would reach the user as a traceback)."""

    def __init__(self, paths: list[str], load: Callable[[str], Image.Image], preprocess) -> None:
        self.paths, self.load, self.preprocess = paths, load, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            return self.preprocess(self.load(self.paths[i])), ""
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
            return self.preprocess(Image.new("RGB", (32, 32))), f"{type(err).__name__}: {err}"


class PairScorer:
    """Scores pairs of one split's store rows: `image_paths[i]` is store image row i's file, `captions[m]`
    store caption row m's text; `load(path)` decodes a file as RGB (EXIF as the index says)."""

    def __init__(
        self,
        ce: CrossEncoder,
        image_paths: list[str],
        captions: list[str],
        load: Callable[[str], Image.Image],
        cfg: ScoringConfig,
    ) -> None:
        self.ce, self.image_paths, self.captions, self.load, self.cfg = ce, image_paths, captions, load, cfg
        budget = cfg.state_cache_mib * 2**20
        self._keep_images = len(image_paths) * ce.image_state_bytes() <= budget
        self._keep_texts = len(captions) * ce.text_state_bytes() <= budget
        self._image_bank: torch.Tensor | None = None  # [N, ...] every image's state, when kept
        self._text_bank: torch.Tensor | None = None

    # -- states -------------------------------------------------------------------------------------------
    def _image_batches(self, rows: np.ndarray):
        """(rows of the batch, their states) for `rows` (sorted), `image_batch_size` at a time."""
        items = _Images([self.image_paths[r] for r in rows.tolist()], self.load, self.ce.preprocess_image)
        extra = {}
        if self.cfg.num_workers > 0:
            extra = {"prefetch_factor": 4}
            if sys.platform.startswith("linux"):
                extra["multiprocessing_context"] = "fork"
        loader = torch.utils.data.DataLoader(
            items,
            batch_size=self.cfg.image_batch_size,
            num_workers=self.cfg.num_workers,
            pin_memory=self.ce.device.type == "cuda",
            **extra,
        )
        for b, (pixels, errors) in enumerate(loader):
            first = b * self.cfg.image_batch_size
            for j, message in enumerate(errors):
                if message:
                    raise InputError(f"{self.image_paths[rows[first + j]]}: cannot read the image ({message})")
            yield rows[first : first + len(pixels)], self.ce.image_states(pixels.to(self.ce.device, non_blocking=True))

    def _text_states(self, rows: np.ndarray) -> torch.Tensor:
        """States [len(rows), ...] of captions `rows` (sorted), `text_batch_size` at a time."""
        out = []
        for a in range(0, len(rows), self.cfg.text_batch_size):
            texts = [self.captions[r] for r in rows[a : a + self.cfg.text_batch_size].tolist()]
            tokens = {k: v.to(self.ce.device) for k, v in self.ce.tokenize(texts).items()}
            out.append(self.ce.text_states(tokens))
        return torch.cat(out)

    def _banks(self) -> None:
        if self._keep_images and self._image_bank is None:
            every = np.arange(len(self.image_paths), dtype=np.int64)
            self._image_bank = torch.cat([s for _, s in self._image_batches(every)])
        if self._keep_texts and self._text_bank is None:
            self._text_bank = self._text_states(np.arange(len(self.captions), dtype=np.int64))

    # -- pairs --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, image_rows: np.ndarray, caption_rows: np.ndarray) -> np.ndarray:
        """float32 [P]: the cross-encoder's logit of each pair (image_rows[p], caption_rows[p])."""
        image_rows = np.asarray(image_rows, np.int64).ravel()
        caption_rows = np.asarray(caption_rows, np.int64).ravel()
        out = np.empty(len(image_rows), np.float32)
        if not len(out):
            return out
        self._banks()
        order = np.lexsort((caption_rows, image_rows))  # pairs grouped by image, each image's in caption order
        images, captions = image_rows[order], caption_rows[order]
        if self._text_bank is not None:
            text_states, text_at = self._text_bank, captions
        else:
            distinct = np.unique(captions)
            text_states, text_at = self._text_states(distinct), np.searchsorted(distinct, captions)
        distinct_images = np.unique(images)
        if self._image_bank is not None:
            batches = (
                (distinct_images[a : a + self.cfg.image_batch_size], None)
                for a in range(0, len(distinct_images), self.cfg.image_batch_size)
            )
        else:
            batches = self._image_batches(distinct_images)
        first = 0
        for rows, states in batches:
            last = int(np.searchsorted(images, rows[-1], side="right"))  # this batch's pairs: first..last
            if states is None:
                states, state_at = self._image_bank, images[first:last]
            else:
                state_at = np.searchsorted(rows, images[first:last])
            for a in range(0, last - first, self.cfg.pair_batch_size):
                sel = slice(a, min(last - first, a + self.cfg.pair_batch_size))
                img = states[torch.from_numpy(state_at[sel]).to(states.device)]
                txt = text_states[torch.from_numpy(text_at[first:last][sel]).to(text_states.device)]
                logits = self.ce.score_states(img, txt).float().cpu().numpy()
                out[order[first + sel.start : first + sel.stop]] = logits
            first = last
        if not np.isfinite(out).all():
            bad = int(np.flatnonzero(~np.isfinite(out))[0])
            raise InputError(
                f"the cross-encoder gave a non-finite score for image {self.image_paths[image_rows[bad]]} and "
                f"caption {self.captions[caption_rows[bad]]!r}; with compute_dtype float16 this is an overflow"
            )
        return out


__all__ = ["PairScorer", "ScoringConfig"]
