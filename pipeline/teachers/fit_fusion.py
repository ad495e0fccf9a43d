"""Training the demo cross-encoder (pipeline/teachers/fusion.py) inside `kdpipe fit-teacher`, on the frozen features
fit-teacher already computed for the LiT heads (the teacher's training pairs only), on top of those heads.

Each caption is scored against a candidate list: its own image, the `hard_negatives` images the just-fitted
LiT heads rank highest for it, and `random_negatives` uniform images, and the loss is the cross-entropy of the
softmax over that list with the own image as the answer. That is how `kdpipe mine` and the losses use the
cross-encoder: to rank a caption's positive against the teacher's hardest candidates. Images of the caption's
own group (the same emoji in the other style) are never negatives (masked, as fit-teacher's InfoNCE masks
them). Everything comes from one generator seeded with `seed`: the same inputs give bit-identical heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import require_at_least
from pipeline.errors import InputError
from pipeline.teachers.fusion import FusionHead
from pipeline.teachers.lit import LiTHeads


@dataclass(frozen=True)
class FitCrossEncoderConfig:
    """Section `fit_teacher.cross_encoder` (absent or null: no cross-encoder is fitted)."""

    hidden: int = 128
    hard_negatives: int = 15  # per caption: the LiT heads' most similar images of other groups
    random_negatives: int = 8  # per caption: uniform images of other groups (keeps easy pairs in view)
    epochs: int = 10
    batch_size: int = 256  # captions per step
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        require_at_least(self, 1, "hidden", "hard_negatives", "epochs", "batch_size")
        require_at_least(self, 0, "random_negatives")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0 and weight_decay >= 0")


def hard_negatives(
    heads: LiTHeads,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_image: np.ndarray,
    image_group: np.ndarray,
    n: int,
) -> torch.Tensor:
    """int64 [M, n]: each caption's n most similar images by the LiT heads, none of its own group; ties by
    the lower image row (a stable sort), so the list does not depend on the sort's implementation."""
    groups = torch.as_tensor(np.asarray(image_group, np.int64))
    own = groups[torch.as_tensor(np.asarray(text_image, np.int64))]
    others = int((groups[None, :] != own[:, None]).sum(1).min())
    if others < n:
        raise InputError(
            f"fit_teacher.cross_encoder.hard_negatives = {n}, but a caption has only {others} other images"
        )
    with torch.no_grad():
        sims = heads.project_texts(text_features.float()) @ heads.project_images(image_features.float()).T  # [M, N]
    sims = sims.masked_fill(groups[None, :] == own[:, None], float("-inf"))
    return torch.argsort(-sims, dim=1, stable=True)[:, :n]


def candidate_loss(
    head: FusionHead,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    candidates: torch.Tensor,
    masked: torch.Tensor,
) -> torch.Tensor:
    """Mean over captions of -log softmax(logits)[0]: caption b's [C] logits against images candidates[b]
    (column 0 its own image), `masked` [B, C] entries left out (another view of the same thing).
    image_features [N, 1280] (all images), text_features [B, 384] (the B captions)."""
    distinct, where = torch.unique(candidates, return_inverse=True)  # project each image once
    p_v = head.project_images(image_features[distinct])[where]  # [B, C, D + H]
    p_t = head.project_texts(text_features)[:, None, :].expand_as(p_v)
    logits = head.fused(p_v, p_t).masked_fill(masked, float("-inf"))  # [B, C]
    return F.cross_entropy(logits, torch.zeros(len(candidates), dtype=torch.long))


def train_fusion(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_image: np.ndarray,
    image_group: np.ndarray,
    hard: torch.Tensor,
    cfg: FitCrossEncoderConfig,
    heads: LiTHeads,
    scale: float,
) -> tuple[FusionHead, list[float]]:
    """The fusion head fitted on [N, 1280] image and [M, 384] caption features, caption m showing image
    text_image[m], with `hard` [M, H] negatives per caption, on top of the LiT `heads` at logit scale `scale`.
    Returns the head and the mean loss per epoch."""
    n_captions, n_images = len(text_features), len(image_features)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_img = image_features.float()
    head = FusionHead(heads.variant, heads.image_size, cfg.hidden, heads, scale)
    for layer in (head.image_proj, head.text_proj, head.fuse, head.out):  # from the seed, not the global stream
        bound = 1 / layer.in_features**0.5
        with torch.no_grad():
            layer.weight.uniform_(-bound, bound, generator=gen)
            layer.bias.zero_()
    with torch.no_grad():
        head.out.weight.zero_()  # the correction starts at 0: the head starts as the dual encoder
    text_image_t = torch.as_tensor(np.asarray(text_image, np.int64))
    groups = torch.as_tensor(np.asarray(image_group, np.int64))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch = min(cfg.batch_size, n_captions)
    losses = []
    for _ in range(cfg.epochs):
        order = torch.randperm(n_captions, generator=gen)
        total, steps = 0.0, 0
        for start in range(0, n_captions - batch + 1, batch):  # the last incomplete batch is dropped
            rows = order[start : start + batch]
            randoms = torch.randint(n_images, (batch, cfg.random_negatives), generator=gen)
            candidates = torch.cat([text_image_t[rows, None], hard[rows], randoms], dim=1)  # [B, 1 + H + R]
            same = groups[candidates] == groups[text_image_t[rows]][:, None]
            same[:, 0] = False  # the answer itself
            loss = candidate_loss(head, x_img, text_features[rows].float(), candidates, same)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + float(loss.detach()), steps + 1
        losses.append(total / steps)
    return head.eval().requires_grad_(False), losses


__all__ = ["FitCrossEncoderConfig", "candidate_loss", "hard_negatives", "train_fusion"]
