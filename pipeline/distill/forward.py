"""The forward half of a training micro-step: a batch of uint8 images and tokens -> (augmented) pixels ->
student -> the global batch (all ranks) -> the raw, unweighted loss terms."""

from __future__ import annotations

from dataclasses import replace

import torch

from pipeline.distill.config import AugmentConfig
from pipeline.distill.data import random_resized_crop
from pipeline.distill.distributed import GatherRows
from pipeline.distill.losses import DistillLoss
from pipeline.distill.views import crop_boxes
from pipeline.towers.student import DualEncoderStudent


def loss_terms(
    model: DualEncoderStudent,
    forward,
    loss_fn: DistillLoss,
    b,
    *,
    augment: AugmentConfig,
    seed: int,
    gen: torch.Generator,
    autocast,
    world: int = 1,
    text_cache: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The forward half of a micro-step: uint8 images -> (augmented) normalized pixels on the device ->
    student (through `forward`: the model, DDP or compiled) -> global batch -> raw, unweighted loss terms.
    Dropout and augmentation draw from `seed` only. `text_cache` [M, F]: the frozen text tower's features of
    every caption row (the tower is then skipped)."""
    torch.manual_seed(seed)  # dropout of this micro-step (every device)
    x = model.to_float(b.images)
    ids, mask = b.input_ids, b.attention_mask
    n_pairs = x.shape[0]
    if b.u_images is not None:  # unpaired rows go through the same forward, after the pairs
        x = torch.cat([x, model.to_float(b.u_images)])
    if b.u_input_ids is not None:
        ids, mask = torch.cat([ids, b.u_input_ids]), torch.cat([mask, b.u_attention_mask])
    if b.image_boxes is not None:  # each image seen through the view its teacher row was computed on
        boxes = b.image_boxes if b.u_images is None else torch.cat([b.image_boxes, b.u_image_boxes])
        x = crop_boxes(x, boxes)
    if augment.enabled:
        gen.manual_seed(seed)
        x = random_resized_crop(x, model.image_size, gen, scale=augment.scale, ratio=augment.ratio, flip=augment.flip)
    pixels = model.normalize_pixels(x)
    text_features = None
    if text_cache is not None:
        text_features = text_cache[torch.from_numpy(b.rows).to(text_cache.device)]
    with autocast():
        s_v, s_t = forward(pixels, ids, mask, text_features)
    # [B + B_v, D] and [B + B_t, D] -> the pairs' rows and the unpaired rows (empty when none are drawn)
    s_v, u_v, s_t, u_t = s_v[:n_pairs], s_v[n_pairs:], s_t[:n_pairs], s_t[n_pairs:]
    if world > 1:  # the in-batch terms see the global batch; gradients flow back to each rank
        s_v, s_t = GatherRows.apply(s_v), GatherRows.apply(s_t)
        u_v = GatherRows.apply(u_v) if b.u_images is not None else u_v
        u_t = GatherRows.apply(u_t) if b.u_input_ids is not None else u_t
    unpaired = None
    if b.unpaired is not None:
        unpaired = replace(
            b.unpaired,
            s_v=u_v if b.u_images is not None else None,
            s_t=u_t if b.u_input_ids is not None else None,
        )
    return loss_fn(
        s_v,
        s_t,
        b.t_v,
        b.t_t,
        b.image_ids,
        b.queue_v,
        b.queue_t,
        b.queue_v_ids,
        b.queue_t_ids,
        unpaired=unpaired,
        knowledge=b.knowledge,  # mined candidates, cross-encoder scores, other teachers (global batch)
    )
