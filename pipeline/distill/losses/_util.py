"""Small helpers shared by the loss modules: fp32 inputs, image-id tensors, same-image masks, KL of rows,
per-anchor candidate lists."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def student_fp32(x: Tensor) -> Tensor:
    """A student embedding in float32 for the loss math; the cast keeps the autograd graph."""
    return x.float()


def teacher_fp32(x: Tensor) -> Tensor:
    """A teacher row (or a stored bank in float16) in float32, cut from any autograd graph."""
    return x.detach().float()


def as_ids(ids: Any, device: torch.device, n: int, what: str) -> Tensor:
    """Image ids (tensor, array or list) as an int64 tensor of length n on `device`. Pass a tensor already on
    the device for a large bank's ids: anything else is copied and moved on every call."""
    if not isinstance(ids, Tensor):  # a list or a (possibly read-only, memory-mapped) numpy array: copy
        ids = torch.from_numpy(np.array(ids))
    t = ids.to(device)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise ValueError(f"{what}: expected integer image ids, got dtype {t.dtype}")
    t = t.to(torch.int64).reshape(-1)
    if t.numel() != n:
        raise ValueError(f"{what}: expected {n} image ids, got {t.numel()}")
    return t


def same_image(ids_a: Tensor | None, ids_b: Tensor | None) -> Tensor | None:
    """[A, B] bool, True where row i of A and row j of B belong to the same image; None when unknown."""
    if ids_a is None or ids_b is None:
        return None
    return ids_a[:, None] == ids_b[None, :]


def off_diagonal_same_image(ids: Tensor | None) -> Tensor | None:
    """[B, B] bool: same image but not the pair itself (the false negatives of an in-batch matrix)."""
    if ids is None:
        return None
    mask = same_image(ids, ids)
    mask.fill_diagonal_(False)
    return mask


def with_rows(student: Tensor, teacher: Tensor | None, ids: Tensor | None, extra: tuple | None) -> tuple:
    """(student, teacher, ids) with `extra` = (student rows, teacher rows, ids) appended below, in float32
    (student rows keep their graph, teacher rows are cut from it). ids become None unless both sides have
    them (nothing is masked then). Without `extra` the inputs come back unchanged."""
    if extra is None:
        return student, teacher, ids
    s, t, i = extra
    both = ids is not None and i is not None
    return (
        torch.cat([student_fp32(student), student_fp32(s)]),
        torch.cat([teacher_fp32(teacher), teacher_fp32(t)]),
        torch.cat([ids, i]) if both else None,
    )


def kl_rows(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """mean_i KL(softmax(teacher_i) || softmax(student_i)) over the rows of two [R, C] logit matrices."""
    return F.kl_div(
        F.log_softmax(student_logits, dim=1),
        F.log_softmax(teacher_logits, dim=1),
        reduction="batchmean",
        log_target=True,
    )


def masked_kl(log_p: Tensor, log_q: Tensor, keep: Tensor | None) -> Tensor:
    """[R] KL(p || q) of each row from log-probabilities [R, C] that are -inf where `keep` [R, C] is False.

    The masked entries are set to 0 before the subtraction: p = 0 there, and -inf - -inf would put NaN into
    the forward and the backward (F.kl_div's 0 * log 0 convention does not cover a -inf target)."""
    if keep is not None:
        log_p, log_q = log_p.masked_fill(~keep, 0.0), log_q.masked_fill(~keep, 0.0)
        return (log_p.exp().masked_fill(~keep, 0.0) * (log_p - log_q)).sum(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def list_logits(anchor: Tensor, positive: Tensor, candidates: Tensor) -> Tensor:
    """[B, 1 + K] dot products of each anchor [B, D] with its positive [B, D] (column 0) and its own K
    candidate rows [B, K, D] (columns 1..K): one candidate list per anchor, not a shared queue."""
    pos = (anchor * positive).sum(-1, keepdim=True)  # [B, 1]
    cand = torch.einsum("bd,bkd->bk", anchor, candidates)  # [B, K]
    return torch.cat([pos, cand], dim=1)


def with_positive(ok: Tensor | None, b: int, k: int, device: torch.device) -> Tensor:
    """[B, 1 + K] bool: the positive (column 0) always kept, then the candidates' `ok` [B, K] (None: all)."""
    keep = torch.ones(b, 1 + k, dtype=torch.bool, device=device)
    if ok is not None:
        keep[:, 1:] = ok
    return keep
