"""What decides a run's floating-point results, recorded next to its metrics.

Float results are bitwise reproducible only on the same kind of processor with the same libraries and
thread count: MKL, oneDNN and PyTorch's own kernels pick code paths by CPU vendor, model and instruction
set (an AMD EPYC and an Intel Xeon give features that differ in the last bit, and training amplifies
that), and parallel reductions split work by thread count. `numerics_environment` names exactly those
inputs, so a reproduction can tell "same machine class: must match bit for bit" from "another machine
class: can only match within float noise" (`.ci/compare_demo.py`), and a reader of metrics.json knows
where its latencies were measured.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Instruction-set flags (of /proc/cpuinfo) that change which kernels MKL, oneDNN and numpy run.
_ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "avx_vnni",
    "amx_bf16",
    "amx_tile",
    "amx_fp16",
)


def _cpuinfo_fields(text: str) -> dict[str, str]:
    """The first processor block of /proc/cpuinfo as {field: value}."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_description(cpuinfo_text: str | None = None) -> dict[str, str]:
    """CPU model name, `vendor family model` and the kernel-relevant ISA flags (Linux; elsewhere what the
    platform module knows). `cpuinfo_text` is for tests; by default /proc/cpuinfo is read."""
    if cpuinfo_text is None:
        try:
            cpuinfo_text = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo_text = ""
    f = _cpuinfo_fields(cpuinfo_text)
    if not f:
        return {"cpu": platform.processor() or platform.machine(), "cpu_id": platform.machine(), "cpu_isa": ""}
    flags = set(f.get("flags", "").split())
    return {
        "cpu": f.get("model name", platform.machine()),
        "cpu_id": " ".join(x for x in (f.get("vendor_id"), f.get("cpu family"), f.get("model")) if x),
        "cpu_isa": " ".join(flag for flag in _ISA_FLAGS if flag in flags),
    }


def numerics_environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Everything that decides the float results of a run on `device` (see the module docstring)."""
    device = torch.device(device)
    env: dict[str, Any] = {
        **cpu_description(),
        "kernels": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "device": "cpu",
    }
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env
