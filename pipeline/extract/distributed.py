"""Devices and ranks of the extract stage under torchrun: the process group (joined here when the
environment names more than one rank) and the loader processes each rank gets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from pipeline.errors import InputError
from pipeline.runtime import available_cpus

_DIST_TIMEOUT = timedelta(hours=2)  # ranks wait at barriers while rank 0 prepares or finalizes


@dataclass
class Ranks:
    """This process's place among the torchrun ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    owns_group: bool = False

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r} is not an integer") from None


def init_ranks(device: torch.device) -> Ranks:
    world = env_int("WORLD_SIZE", 1)
    d = Ranks(
        rank=env_int("RANK", 0),
        world=world,
        local_rank=env_int("LOCAL_RANK", 0),
        local_world=env_int("LOCAL_WORLD_SIZE", 1),
    )
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
                dist.init_process_group("nccl", timeout=_DIST_TIMEOUT, device_id=device)
            else:
                dist.init_process_group("gloo", timeout=_DIST_TIMEOUT)
            d.owns_group = True
        d.rank, d.world = dist.get_rank(), dist.get_world_size()
    return d


def auto_workers(device: torch.device, local_world: int) -> int:
    if device.type != "cuda":
        return 0  # the CPU forward already uses every core; decoding in-process avoids fighting over them
    cpus = available_cpus()
    return max(1, min(32, cpus // max(1, local_world) - 1))
