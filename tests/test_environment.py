"""The numerics environment recorded with metrics: which processor class and libraries computed them."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.environment import cpu_description, numerics_environment

INTEL = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile
"""

AMD = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_vnni avx512_bf16
"""


def test_cpu_description_names_vendor_model_and_kernel_relevant_flags():
    intel, amd = cpu_description(INTEL), cpu_description(AMD)
    assert intel == {
        "cpu": "Intel(R) Xeon(R) Processor",
        "cpu_id": "GenuineIntel 6 143",
        "cpu_isa": "avx2 fma avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile",
    }
    assert amd == {
        "cpu": "AMD EPYC",
        "cpu_id": "AuthenticAMD 25 17",
        "cpu_isa": "avx2 fma avx512f avx512_bf16 avx512_vnni",
    }
    assert intel != amd  # the two machines whose demo features differ in the last bit


def test_cpu_description_without_cpuinfo_still_names_the_machine():
    d = cpu_description("")
    assert set(d) == {"cpu", "cpu_id", "cpu_isa"} and d["cpu"]


def test_numerics_environment_on_this_machine():
    env = numerics_environment("cpu")
    assert env["torch"] == torch.__version__ and env["numpy"] == np.__version__
    assert env["threads"] == torch.get_num_threads() and env["device"] == "cpu"
    assert env["kernels"] == torch.backends.cpu.get_cpu_capability()
    assert env == numerics_environment(torch.device("cpu"))  # stable: two calls, same answer
