"""What the loop needs from torch.distributed (torchrun): its position in the process group, the
differentiable all-gather that gives the in-batch loss terms the global batch, and the average of the gradients
of parameters outside DDP."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def world_and_rank() -> tuple[int, int]:
    """(processes, this process's rank) of the initialized process group; (1, 0) without one."""
    if not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(), dist.get_rank()


def average_gradients(params: Iterable[torch.Tensor], world: int) -> None:
    """Average the gradients of parameters that DDP does not hold (the loss module's learned temperature) over
    the processes. Every process computes the same loss on the same global batch, so these gradients agree up to
    the order of floating-point reductions; averaged, the parameter's copies stay identical everywhere."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


class GatherRows(torch.autograd.Function):
    """[B, D] on each rank -> [world x B, D] on every rank (rank order), differentiable.

    Every rank then computes the same loss L on the global batch; the backward sums dL/d(rows of rank r)
    over the ranks (all_reduce) and keeps its own slice, so the gradient of rank r's rows is world x dL/dx_r,
    and DDP's average over the ranks gives exactly dL/dtheta."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]
