"""Validation: the student's embeddings of a split, its val recalls (the evaluate stage's protocol) and its
agreement with the teacher; and the frozen text tower's features, computed once per run."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.distill.data import as_tensor
from pipeline.distill.inputs import PairSplit
from pipeline.towers.student import DualEncoderStudent


@torch.no_grad()
def frozen_text_features(
    model: DualEncoderStudent, tokens: tuple[torch.Tensor, torch.Tensor], batch_size: int, autocast
) -> torch.Tensor:
    """The frozen text tower's pooled features of every caption [M, F], fp32 on the model's device."""
    out = []
    with autocast():
        for i in range(0, len(tokens[0]), batch_size):
            tok = {
                "input_ids": tokens[0][i : i + batch_size].long(),
                "attention_mask": tokens[1][i : i + batch_size].long(),
            }
            out.append(model.text_features(tok).float())
    return torch.cat(out)


@torch.no_grad()
def embed_split(
    model: DualEncoderStudent,
    split: PairSplit,
    tokens: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
    autocast,
    text_cache: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student embeddings of every image (store/cache order) and caption of a split, fp32 on the CPU
    (`text_cache`: the frozen text tower's features of the split's captions)."""
    was_training = model.training
    model.eval()
    rows = split.cache_rows if split.cache_rows is not None else np.arange(len(split.images))
    img, txt = [], []
    with autocast():
        for i in range(0, len(rows), batch_size):
            batch = as_tensor(np.take(split.images, rows[i : i + batch_size], axis=0))
            img.append(model.encode_images(batch).float().cpu())
        for i in range(0, len(tokens[0]), batch_size):
            if text_cache is not None:
                txt.append(model.project_text(text_cache[i : i + batch_size]).float().cpu())
                continue
            tok = {
                "input_ids": tokens[0][i : i + batch_size].long(),
                "attention_mask": tokens[1][i : i + batch_size].long(),
            }
            txt.append(model.encode_tokens(tok).float().cpu())
    model.train(was_training)
    return torch.cat(img), torch.cat(txt)


def validate(
    model, split: PairSplit, tokens, batch_size: int, autocast, text_cache=None, gallery: str = "split"
) -> dict[str, float]:
    """The split's recalls as the evaluate stage measures them: the same ranks (float32, pessimistic ties),
    each query within its own gallery (`gallery`: evaluate.gallery; pipeline/evaluate/galleries.py), the same
    names; and the mean student-teacher cosine where the store has the split."""
    from pipeline.evaluate.galleries import grouped_ranks, image_groups
    from pipeline.evaluate.retrieval import recall_metrics, teacher_agreement

    img, txt = embed_split(model, split, tokens, batch_size, autocast, text_cache)
    # images without captions (if the split has any) are not queries of the protocol: the recalls use the
    # captioned images (rows renumbered), the teacher agreement every image
    paired, text_image = np.unique(split.text_image, return_inverse=True)
    if split.image_id is None and gallery != "split":
        raise ValueError(f"gallery {gallery!r} needs the split's image ids")
    ids = split.image_id[paired] if split.image_id is not None else np.arange(len(paired))
    groups = image_groups(ids, gallery)
    metrics = recall_metrics(grouped_ranks(img[torch.from_numpy(paired)], txt, text_image, groups))
    if split.store is not None:  # how close the student is to the teacher on held-out data
        metrics.update(teacher_agreement(img, txt, split.store.image_emb, split.store.text_emb))
    return metrics
