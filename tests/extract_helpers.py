"""A tiny deterministic teacher and a tiny image dataset for the extract and feature-store tests.

The teacher is a fixed random projection: images -> mean-pooled 4x4 pixels projected to D, captions ->
mean of per-character embeddings. It implements the `Teacher` interface, so it runs through exactly the
code path of a real teacher (preprocess in loader workers, tokenize, bucketing by length, encode on the
device). `delay` (seconds per batch) makes a run slow enough to be killed half way; `fail_after` (batches)
makes it fail half way, leaving a partial store behind.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.data.index import DatasetIndex
from pipeline.teachers.base import Teacher, TokenBatch


class TinyTeacher(Teacher):
    name = "tiny"

    def __init__(
        self,
        dim: int = 32,
        image_size: int = 8,
        max_len: int = 12,
        seed: int = 0,
        delay: float = 0.0,
        fail_after: int | None = None,
        scale: float | None = None,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.dim, self.image_size, self.max_len, self.seed, self.delay = dim, image_size, max_len, seed, delay
        self.device = torch.device("cpu")
        self.fail_after, self.batches = fail_after, 0
        self.scale = scale  # its logit scale (None: it has none)
        self.image_proj = torch.randn(3 * 16, dim, generator=g)
        self.char_emb = torch.randn(128, dim, generator=g)

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dim": self.dim,
            "image_size": self.image_size,
            "max_text_len": self.max_len,
            "seed": self.seed,
        }

    def logit_scale(self) -> float | None:
        return self.scale

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    def tokenize(self, texts: list[str]) -> TokenBatch:
        ids = [[min(ord(c), 127) for c in t[: self.max_len]] for t in texts]
        length = max((len(i) for i in ids), default=1)
        out = torch.zeros(len(ids), length, dtype=torch.long)
        mask = torch.ones(len(ids), length, dtype=torch.bool)
        for r, row in enumerate(ids):
            out[r, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[r, : len(row)] = False
        return {"input_ids": out, "padding_mask": mask}

    def _tick(self) -> None:
        self.batches += 1
        if self.fail_after is not None and self.batches > self.fail_after:
            raise RuntimeError("TinyTeacher: injected failure")
        if self.delay:
            time.sleep(self.delay)

    def encode_image_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        self._tick()
        pooled = torch.nn.functional.adaptive_avg_pool2d(pixels.float(), 4).flatten(1)  # [B, 48]
        return torch.nn.functional.normalize(pooled @ self.image_proj, dim=-1)

    def encode_text_batch(self, tokens: TokenBatch) -> torch.Tensor:
        self._tick()
        emb = self.char_emb[tokens["input_ids"].cpu()]  # [B, L, D]
        keep = (~tokens["padding_mask"].cpu()).unsqueeze(-1).float()
        mean = (emb * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(mean, dim=-1)


def make_dataset(
    root: Path,
    n_train: int = 23,
    n_test: int = 9,
    captions_per_image: int = 3,
    size: tuple[int, int] = (20, 14),
    name: str = "tiny",
) -> DatasetIndex:
    """Random JPEG and PNG images under root/images and an index with a train and a test split."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, captions = [], []
    words = ["a", "dog", "cat", "runs", "on", "the", "grass", "near", "two", "red", "boats", "river"]
    for i in range(n_train + n_test):
        ext = "jpg" if i % 3 else "png"
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"img{i:03d}.{ext}")
        images.append((f"img{i:03d}", f"img{i:03d}.{ext}", "train" if i < n_train else "test"))
        for c in range(captions_per_image - (i % 2)):  # 2 or 3 captions per image, of varied lengths
            n_words = int(rng.integers(1, 9))
            captions.append((" ".join(rng.choice(words, n_words)) + f" {c}", i))
    return DatasetIndex.from_lists(name, root / "images", images, captions)


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store by relative path -> content (to compare stores bit for bit)."""
    path = Path(path)
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def verified_files(path: Path) -> dict[str, bytes]:
    """`store_files` of a store whose every chunk file matches the SHA-256 recorded in its array's attrs (so two
    stores compared this way also agree on their checksum metadata, which lives in the arrays' zarr.json)."""
    from pipeline.store.verify import verify_store

    report = verify_store(path)
    assert report.ok and not report.unchecked, ([b.line() for b in report.bad], report.unchecked)
    return store_files(path)
