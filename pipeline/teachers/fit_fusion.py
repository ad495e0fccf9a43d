"""`kdpipe fit-cross-encoder`: training the demo cross-encoder (pipeline/teachers/fusion.py) on top of the LiT heads
fit-teacher wrote, on the frozen features of the same training pairs (fit_teacher.pairs, train split only).

Each caption is scored against a candidate list: its own image, the `hard_negatives` images the just-fitted
LiT heads rank highest for it, and `random_negatives` uniform images, and the loss is the cross-entropy of the
softmax over that list with the own image as the answer. That is how `kdpipe mine` and the losses use the
cross-encoder: to rank a caption's positive against the teacher's hardest candidates. Images of the caption's
own group (the same emoji in the other style) are never negatives (masked, as fit-teacher's InfoNCE masks
them). Everything comes from one generator seeded with `seed`, and no step sums in an order the threads
decide: the same inputs give bit-identical heads in any process, on any number of threads.

    <heads>.safetensors (fit-teacher) + teacher pairs -> frozen features (again: fit-teacher keeps none)
        -> hard negatives by the heads -> fusion head -> <out>/cross_encoder.safetensors + fit_summary.json

Only the demo's ablation reads it (its `kdpipe mine --ablation`, ablation.mine.cross_encoder.fusion.head), so
it is a stage of ablation/dvc.yaml, not of the headline demo.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import require_at_least
from pipeline.errors import InputError
from pipeline.hashing import sha256_file
from pipeline.store.durable import write_text_durably
from pipeline.store.ownership import Output, claim
from pipeline.teachers.fit_teacher import FitTeacherConfig, frozen_features, image_groups, read_training_pairs
from pipeline.teachers.fusion import FusionHead
from pipeline.teachers.lit import FrozenTowers, LiTHeads

CROSS_ENCODER_FILE = "cross_encoder.safetensors"
SUMMARY_FILE = "fit_summary.json"
# what fit-cross-encoder writes into (pipeline/store/ownership.py): a directory of nothing but its files
CROSS_ENCODER_DIR = Output(
    "fit-cross-encoder's output directory", directory=True, names=frozenset({CROSS_ENCODER_FILE, SUMMARY_FILE})
)


@dataclass(frozen=True)
class FitCrossEncoderConfig:
    """Section `fit_cross_encoder`; the training pairs, and the batch of the backbone pass, are fit_teacher's."""

    heads: Path = Path("artifacts/emoji/teacher/heads.safetensors")  # fit-teacher's LiT heads it sits on
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
    image_parts: tuple[torch.Tensor, torch.Tensor],
    text_features: torch.Tensor,
    candidates: torch.Tensor,
    masked: torch.Tensor,
) -> torch.Tensor:
    """Mean over captions of -log softmax(logits)[0]: caption b's [C] logits against images candidates[b]
    (column 0 its own image), `masked` [B, C] entries left out (another view of the same thing).
    image_parts: head.image_parts of all N images (frozen: computed once per fit); text_features [B, 384]."""
    x, lit = image_parts
    # each candidate projected where it stands, not each distinct image once and gathered: the gather's
    # backward is a scatter-add whose multithreaded CPU kernel sums in a different order from one process to
    # the next (three fits, three sha256s); the weights' gradient through a linear layer is a matmul
    p_v = torch.cat([lit[candidates], head.image_proj(x[candidates])], dim=-1)  # [B, C, D + H]
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
    head = FusionHead(heads.variant, heads.image_size, cfg.hidden, heads, scale)
    for layer in (head.image_proj, head.text_proj, head.fuse, head.out):  # from the seed, not the global stream
        bound = 1 / layer.in_features**0.5
        with torch.no_grad():
            layer.weight.uniform_(-bound, bound, generator=gen)
            layer.bias.zero_()
    with torch.no_grad():
        head.out.weight.zero_()  # the correction starts at 0: the head starts as the dual encoder
    with torch.no_grad():
        image_parts = head.image_parts(image_features.float())
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
            loss = candidate_loss(head, image_parts, text_features[rows].float(), candidates, same)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + float(loss.detach()), steps + 1
        losses.append(total / steps)
    return head.eval().requires_grad_(False), losses


@dataclass(frozen=True)
class FitCrossEncoderResult:
    path: Path
    sha256: str
    n_images: int
    n_captions: int
    final_loss: float
    seconds: float

    def summary(self) -> str:
        return (
            f"fit-cross-encoder: fusion head on {self.n_images} images / {self.n_captions} captions in "
            f"{self.seconds:.1f} s, final loss {self.final_loss:.4f} -> {self.path} (sha256 {self.sha256[:12]})"
        )


def run_fit_cross_encoder(
    cfg: FitCrossEncoderConfig, teacher: FitTeacherConfig, out_dir: Path | str, device: torch.device | str = "cpu"
) -> FitCrossEncoderResult:
    """Fit the fusion head on top of `cfg.heads`, on `teacher.pairs` (train split), and write
    `out_dir/cross_encoder.safetensors` and `out_dir/fit_summary.json`."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    claim(out_dir, CROSS_ENCODER_DIR)  # before the work
    heads = LiTHeads.load(cfg.heads, key="fit_cross_encoder.heads")
    if heads.logit_scale is None:
        raise InputError(f"fit_cross_encoder.heads: {cfg.heads} records no fit temperature; refit it with fit-teacher")
    paths, image_ids, captions, text_image = read_training_pairs(teacher)
    groups = image_groups(image_ids)
    towers = FrozenTowers(heads.variant, heads.image_size, device)  # the towers the heads were fitted on
    image_features, text_features = frozen_features(towers, paths, captions, teacher.feature_batch_size)
    hard = hard_negatives(heads, image_features, text_features, text_image, groups, cfg.hard_negatives)
    # on top of the heads, at their logit scale (1 / the temperature they were fitted at: the LiT teacher's own)
    head, losses = train_fusion(image_features, text_features, text_image, groups, hard, cfg, heads, heads.logit_scale)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    record = {
        "config": config,
        "pairs": str(teacher.pairs),
        "heads_sha256": sha256_file(cfg.heads),
        "n_images": len(paths),
        "n_captions": len(captions),
    }
    sha = head.save(out_dir / CROSS_ENCODER_FILE, fit=record)
    summary = {**record, "file": CROSS_ENCODER_FILE, "sha256": sha, "loss_per_epoch": losses}  # no timings
    write_text_durably(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    seconds = time.perf_counter() - t0
    return FitCrossEncoderResult(out_dir / CROSS_ENCODER_FILE, sha, len(paths), len(captions), losses[-1], seconds)


__all__ = [
    "CROSS_ENCODER_FILE",
    "FitCrossEncoderConfig",
    "FitCrossEncoderResult",
    "candidate_loss",
    "hard_negatives",
    "run_fit_cross_encoder",
    "train_fusion",
]
