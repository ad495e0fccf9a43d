"""A tiny deterministic cross-encoder and a brute-force top-K oracle for the mine tests.

`TinyCrossEncoder` scores a pair with a fixed random two-layer MLP over [pooled pixels ; mean character
embedding ; their product]: a joint function of the pair, behind the `CrossEncoder` interface, so it runs
through exactly the path of a real one (preprocess in loader workers, states per item, scores per pair).
`delay` (seconds per scored batch) makes a run slow enough to be killed half way.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.teachers.base import CrossEncoder, TokenBatch


class TinyCrossEncoder(CrossEncoder):
    name = "tiny-ce"

    def __init__(self, dim: int = 16, image_size: int = 8, max_len: int = 12, seed: int = 0, delay: float = 0.0):
        g = torch.Generator().manual_seed(seed)
        self.dim, self.image_size, self.max_len, self.seed, self.delay = dim, image_size, max_len, seed, delay
        self.device = torch.device("cpu")
        self.image_proj = torch.randn(3 * 16, dim, generator=g)
        self.char_emb = torch.randn(128, dim, generator=g)
        self.w1 = torch.randn(3 * dim, dim, generator=g) / (3 * dim) ** 0.5
        self.w2 = torch.randn(dim, generator=g)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "image_size": self.image_size, "seed": self.seed}

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    def tokenize(self, texts: list[str]) -> TokenBatch:
        ids = torch.zeros(len(texts), self.max_len, dtype=torch.long)
        mask = torch.zeros(len(texts), self.max_len, dtype=torch.long)
        for r, t in enumerate(texts):
            codes = [min(ord(c), 127) for c in t[: self.max_len]]
            ids[r, : len(codes)] = torch.tensor(codes, dtype=torch.long)
            mask[r, : len(codes)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def image_states(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(pixels.float(), 4).flatten(1) @ self.image_proj  # [B, d]

    def text_states(self, tokens: TokenBatch) -> torch.Tensor:
        emb = self.char_emb[tokens["input_ids"].cpu()]
        keep = tokens["attention_mask"].cpu().unsqueeze(-1).float()
        return (emb * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # [B, d]

    def score_states(self, image_states: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        x = torch.cat([image_states, text_states, image_states * text_states], dim=-1)
        return torch.tanh(x @ self.w1) @ self.w2

    def image_state_bytes(self) -> int:
        return self.dim * 4

    def text_state_bytes(self) -> int:
        return self.dim * 4


def brute_force(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray, k: int):
    """The obviously-correct top-k, one query at a time: float64 scores of the stored rows, the own positives
    left out, sorted by (-score, row). Returns (t2i rows, t2i scores, i2t rows, i2t scores)."""
    img, txt = np.asarray(image_emb, np.float64), np.asarray(text_emb, np.float64)
    t2i_rows, t2i_sims, i2t_rows, i2t_sims = [], [], [], []
    for m in range(len(txt)):
        cands = sorted((-float(img[j] @ txt[m]), j) for j in range(len(img)) if j != text_image[m])[:k]
        t2i_rows.append([j for _, j in cands])
        t2i_sims.append([-s for s, _ in cands])
    for j in range(len(img)):
        cands = sorted((-float(img[j] @ txt[m]), m) for m in range(len(txt)) if text_image[m] != j)[:k]
        i2t_rows.append([m for _, m in cands])
        i2t_sims.append([-s for s, _ in cands])
    return (np.array(t2i_rows), np.array(t2i_sims), np.array(i2t_rows), np.array(i2t_sims))
