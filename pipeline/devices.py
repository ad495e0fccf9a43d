"""Choosing the torch device from a config value, with one clear error when it cannot be had."""

from __future__ import annotations

import os

import torch

from pipeline.errors import InputError


def resolve_device(name: str | torch.device, key: str = "device", local_rank: int | None = None) -> torch.device:
    """`auto` (CUDA when there is a GPU, else the CPU), `cpu`, `cuda` or `cuda:N` as a torch.device.

    Under torchrun a plain `cuda`/`auto` means this process's GPU, `cuda:LOCAL_RANK` (`local_rank`, else the
    LOCAL_RANK environment variable). A CUDA request on a machine without a usable GPU, a GPU index beyond
    the machine's, or a name that is no device is one InputError naming the parameter `key`."""
    text = str(name)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError):
        raise InputError(f"{key}={text!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise InputError(f"{key}={text!r}: kdpipe runs on cpu or cuda")
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (CPU-only build)"
        raise InputError(
            f"{key}={text} but no CUDA GPU is available here (torch {torch.__version__}, CUDA {built}); "
            f"set {key} to cpu or auto"
        )
    if dev.index is None:
        rank = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device("cuda", rank)
    if dev.index >= torch.cuda.device_count():
        raise InputError(
            f"{key}={text}: GPU {dev.index} requested but this machine has {torch.cuda.device_count()}; "
            "start at most one process per GPU"
        )
    return dev
