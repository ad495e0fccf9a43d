"""The fit-teacher stage: train the LiT teacher's two linear heads on captioned training images.

    training pairs (teacher_pairs.json, train split only)
        -> frozen EfficientNet-Lite features [N, 1280] and MiniLM sentence embeddings [M, 384], once
        -> heads trained with the symmetric InfoNCE loss on caption batches (`train_heads`)
        -> <out>/heads.safetensors (+ sha256) and fit_summary.json

The demo's cross-encoder sits on these heads and is fitted by its own stage, `kdpipe fit-cross-encoder`
(pipeline/teachers/fit_fusion.py), for the ablation only: the headline demo does not wait for it.

The frozen features are computed once, so an epoch of head training costs two small matrix products per
batch; the backbone pass dominates the stage. Everything is seeded: the heads' init and the batch order come
from `seed` alone, so the same inputs give bit-identical heads on one machine (tests/test_lit_teacher.py).

In-batch negatives that show the same thing are not negatives: two captions of one image, and the two
styles of one emoji (same file name in another style folder, same words). They are masked out by a group id:
the image's file name without its folder (`twemoji/1F600.png` and `openmoji/1F600.png` are one group).
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import require_at_least
from pipeline.data.image_file import read_rgb
from pipeline.errors import InputError
from pipeline.progress import progress
from pipeline.store.durable import write_text_durably
from pipeline.store.ownership import Output, claim
from pipeline.teachers.lit import IMAGE_FEATURE_DIM, FrozenTowers, LiTHeads

HEADS_FILE = "heads.safetensors"
SUMMARY_FILE = "fit_summary.json"
# fit-teacher wrote the cross-encoder beside the heads before fit-cross-encoder was a stage of its own: a
# rerun into such a directory removes it (it sat on the heads being replaced), so the name stays fit-teacher's
LEGACY_CROSS_ENCODER_FILE = "cross_encoder.safetensors"
# what fit-teacher writes into (pipeline/store/ownership.py): a directory of nothing but its files
TEACHER_DIR = Output(
    "fit-teacher's output directory",
    directory=True,
    names=frozenset({HEADS_FILE, LEGACY_CROSS_ENCODER_FILE, SUMMARY_FILE}),
)


@dataclass(frozen=True)
class FitTeacherConfig:
    """Section `fit_teacher`."""

    pairs: Path = Path("data/emoji/teacher_pairs.json")  # Karpathy file; only its train split is used
    image_root: Path = Path("data/emoji/images")
    backbone: Literal["lite0", "lite2"] = "lite2"
    image_size: int = 128  # the emoji are 72 px: 128 keeps most of Lite2's recall at 1/4 of its 260 px cost
    dim: int = 256
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.05
    seed: int = 0
    feature_batch_size: int = 64

    def __post_init__(self) -> None:
        require_at_least(self, 1, "dim", "epochs", "batch_size", "feature_batch_size")
        require_at_least(self, 32, "image_size")
        if not self.lr > 0 or self.weight_decay < 0 or not self.temperature > 0:
            raise ValueError("lr and temperature must be > 0, weight_decay >= 0")


@dataclass(frozen=True)
class FitResult:
    heads_path: Path
    sha256: str
    n_images: int
    n_captions: int
    final_loss: float
    seconds: float

    def summary(self) -> str:
        return (
            f"fit-teacher: heads for {self.n_images} images / {self.n_captions} captions in {self.seconds:.1f} s, "
            f"final loss {self.final_loss:.4f} -> {self.heads_path} (sha256 {self.sha256[:12]})"
        )


# -- the loss and the training of the heads (pure tensors: fast to test) ---------------------------------------
def symmetric_info_nce(v: torch.Tensor, t: torch.Tensor, groups: torch.Tensor, temperature: float) -> torch.Tensor:
    """CLIP loss of [B, D] image and text rows (pairs on the diagonal); off-diagonal rows of the same group
    masked out (logit -inf): they show the same thing."""
    logits = t @ v.T / temperature  # [B, B] text -> image
    same = (groups[:, None] == groups[None, :]) & ~torch.eye(len(groups), dtype=torch.bool, device=groups.device)
    logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(groups), device=v.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def train_heads(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_image: np.ndarray,
    image_group: np.ndarray,
    cfg: FitTeacherConfig,
    *,
    variant: str,
    image_size: int,
) -> tuple[LiTHeads, list[float]]:
    """Heads fitted on [N, 1280] image features and [M, 384] caption features (caption m shows image
    text_image[m]; images of one group are the same thing). Returns the heads and the mean loss per epoch."""
    n_captions = len(text_features)
    if n_captions < 2:
        raise InputError(f"fit_teacher: {n_captions} training captions; at least 2 are needed")
    batch = min(cfg.batch_size, n_captions)
    x_img = image_features.float()
    mean, std = x_img.mean(0), x_img.std(0).clamp_min(1e-6)  # standardize: the heads see unit-scale inputs
    x_img = (x_img - mean) / std
    x_txt = text_features.float()
    text_image_t = torch.as_tensor(np.asarray(text_image, np.int64))
    group_t = torch.as_tensor(np.asarray(image_group, np.int64))[text_image_t]
    gen = torch.Generator().manual_seed(cfg.seed)
    img_head = torch.nn.Linear(x_img.shape[1], cfg.dim)
    txt_head = torch.nn.Linear(x_txt.shape[1], cfg.dim)
    for head in (img_head, txt_head):  # from the seed's generator, not the global stream
        bound = 1 / head.in_features**0.5
        with torch.no_grad():
            head.weight.uniform_(-bound, bound, generator=gen)
            head.bias.zero_()
    params = [*img_head.parameters(), *txt_head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = []
    for _ in range(cfg.epochs):
        order = torch.randperm(n_captions, generator=gen)
        total, steps = 0.0, 0
        for start in range(0, n_captions - batch + 1, batch):  # the last incomplete batch is dropped
            rows = order[start : start + batch]
            v = F.normalize(img_head(x_img[text_image_t[rows]]), dim=-1)
            t = F.normalize(txt_head(x_txt[rows]), dim=-1)
            loss = symmetric_info_nce(v, t, group_t[rows], cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + float(loss.detach()), steps + 1
        losses.append(total / steps)
    heads = LiTHeads(
        variant,
        image_size,
        mean,
        std,
        img_head.weight.detach().clone(),
        img_head.bias.detach().clone(),
        txt_head.weight.detach().clone(),
        txt_head.bias.detach().clone(),
        1.0 / cfg.temperature,
    )
    return heads, losses


# -- the stage ------------------------------------------------------------------------------------------------
@torch.inference_mode()
def frozen_features(towers: FrozenTowers, image_paths: list[Path], captions: list[str], batch_size: int):
    """([N, 1280] image features, [M, 384] caption features), fp32 on the CPU, with progress bars."""
    image_out = torch.empty(len(image_paths), IMAGE_FEATURE_DIM)
    with progress("fit-teacher: image features", len(image_paths), unit="images") as bar:
        for start in range(0, len(image_paths), batch_size):
            # read_rgb: the one image reader (a bad file is one BadImage line naming it)
            pixels = [towers.preprocess_image(read_rgb(path)) for path in image_paths[start : start + batch_size]]
            image_out[start : start + len(pixels)] = towers.image_features(torch.stack(pixels)).cpu()
            bar.advance(len(pixels))
    # each caption once: the demo's two styles of one emoji share their captions
    unique = sorted(set(captions))
    unique_out = torch.empty(len(unique), 384)
    with progress("fit-teacher: caption features", len(unique), unit="captions") as bar:
        for start in range(0, len(unique), 256):
            chunk = unique[start : start + 256]
            unique_out[start : start + len(chunk)] = towers.text_features(towers.tokenize(chunk)).cpu()
            bar.advance(len(chunk))
    row = {c: i for i, c in enumerate(unique)}
    text_out = unique_out[[row[c] for c in captions]]
    return image_out, text_out


def image_groups(image_ids: list[str]) -> np.ndarray:
    """int64 [N]: one group per emoji, the file name without the style folder (module docstring)."""
    names = [posixpath.basename(i) for i in image_ids]
    group_of = {n: g for g, n in enumerate(sorted(set(names)))}
    return np.array([group_of[n] for n in names], dtype=np.int64)


def read_training_pairs(cfg: FitTeacherConfig):
    """(image paths [N], image ids [N], captions [M], text_image [M]) of the pairs file's train split."""
    from pipeline.data.readers import DatasetConfig, read_dataset

    # checked here so that the message names this stage's keys, not prepare's
    if not Path(cfg.pairs).is_file():
        raise InputError(f"fit_teacher.pairs: {cfg.pairs} not found; build it with `kdpipe demo-data`")
    if not Path(cfg.image_root).is_dir():
        raise InputError(f"fit_teacher.image_root: {cfg.image_root} is not a directory")
    index = read_dataset(
        DatasetConfig(annotations=cfg.pairs, name="teacher-pairs", image_root=cfg.image_root, splits=("train",))
    )
    if "train" not in index.splits:
        raise InputError(f"fit_teacher.pairs: {cfg.pairs} has no train split")
    view = index.split("train")
    return (
        [Path(p) for p in view.image_path.tolist()],
        [str(i) for i in view.image_id.tolist()],
        [str(c) for c in view.caption_text.tolist()],
        view.text_image.astype(np.int64),
    )


def run_fit_teacher(cfg: FitTeacherConfig, out_dir: Path | str, device: torch.device | str = "cpu") -> FitResult:
    """Fit the heads on `cfg.pairs` and write `out_dir/heads.safetensors` and `out_dir/fit_summary.json`."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    claim(out_dir, TEACHER_DIR)  # before the work
    paths, image_ids, captions, text_image = read_training_pairs(cfg)
    groups = image_groups(image_ids)
    towers = FrozenTowers(cfg.backbone, cfg.image_size, device)
    image_features, text_features = frozen_features(towers, paths, captions, cfg.feature_batch_size)
    heads, losses = train_heads(
        image_features, text_features, text_image, groups, cfg, variant=cfg.backbone, image_size=cfg.image_size
    )
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    record = {"config": config, "n_images": len(paths), "n_captions": len(captions)}
    sha = heads.save(out_dir / HEADS_FILE, extra=record)
    summary = {**record, "heads": HEADS_FILE, "sha256": sha, "loss_per_epoch": losses}  # no timings: reproducible
    (out_dir / LEGACY_CROSS_ENCODER_FILE).unlink(missing_ok=True)
    write_text_durably(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    seconds = time.perf_counter() - t0
    return FitResult(out_dir / HEADS_FILE, sha, len(paths), len(captions), losses[-1], seconds)


__all__ = [
    "FitTeacherConfig",
    "FitResult",
    "train_heads",
    "symmetric_info_nce",
    "run_fit_teacher",
    "frozen_features",
    "image_groups",
    "read_training_pairs",
    "HEADS_FILE",
    "SUMMARY_FILE",
]
