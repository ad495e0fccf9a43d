"""CPU threads (issue 13, item 5): intra-op threads + loader workers fit the CPUs the process may use,
one `runtime:` section sets them for every stage, unknown keys are refused, OpenMP waits passively."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.errors import ConfigError
from pipeline.extract.config import ExtractConfig
from pipeline.runtime import RuntimeConfig, available_cpus, plan_threads
from stages._common import load_stage

REPO = Path(__file__).parent.parent


@pytest.fixture
def restore_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize(
    ("threads", "cpus", "workers", "expected"),
    [
        (None, 8, 0, 8),  # nothing else runs: every CPU
        (None, 8, 3, 5),  # loader workers take their share: 5 + 3 = 8, no oversubscription
        (None, 2, 2, 1),  # never fewer than one
        (None, 2, 5, 1),
        (3, 2, 0, 3),  # an explicit setting is the user's call
    ],
)
def test_threads_fill_the_cpus_left_by_the_loader_workers(threads, cpus, workers, expected, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert plan_threads(RuntimeConfig(threads=threads), workers, cpus=cpus) == expected


def test_omp_num_threads_is_honoured_unless_runtime_threads_is_set(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert plan_threads(RuntimeConfig(), 0, cpus=8) == 3
    assert plan_threads(RuntimeConfig(threads=2), 0, cpus=8) == 2


def test_available_cpus_is_the_affinity_mask():
    if hasattr(os, "sched_getaffinity"):
        assert available_cpus() == len(os.sched_getaffinity(0))
    assert available_cpus() >= 1


def test_every_stage_applies_the_runtime_section(tmp_path, restore_threads):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"workdir": "w", "runtime": {"threads": 1}, "extract": {"num_workers": 0}}))
    load_stage(params, "extract", ExtractConfig, [])
    assert torch.get_num_threads() == 1
    load_stage(params, "extract", ExtractConfig, ["runtime.threads=null"])  # automatic: the CPUs, no workers
    assert torch.get_num_threads() == available_cpus()


def test_runtime_section_refuses_unknown_keys_and_bad_values(tmp_path, restore_threads):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"workdir": "w", "runtime": {"thread": 2}}))
    with pytest.raises(ConfigError, match=r"runtime\.thread: unknown key; allowed keys are: jobs, threads"):
        load_stage(params, "extract", ExtractConfig, [])
    params.write_text(yaml.safe_dump({"workdir": "w"}))
    with pytest.raises(ConfigError, match=r"runtime: threads must be at least 1 \(or null for automatic\), got 0"):
        load_stage(params, "extract", ExtractConfig, ["runtime.threads=0"])
    with pytest.raises(ConfigError, match=r"runtime: jobs must be at least 1 \(or null for automatic\), got 0"):
        load_stage(params, "extract", ExtractConfig, ["runtime.jobs=0"])


def test_the_command_line_makes_openmp_wait_passively_unless_told_otherwise():
    probe = "import os, stages; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "PYTHONPATH": str(REPO)}, capture_output=True)
    assert out.stdout.decode().strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "PYTHONPATH": str(REPO)}, capture_output=True)
    assert out.stdout.decode().strip() == "ACTIVE"


@pytest.mark.parametrize(
    "args", [["fit-teacher"], ["prepare"], ["extract"], ["distill"], ["evaluate"], ["export"], ["index"], ["report"]]
)
def test_every_command_that_reads_params_applies_runtime_threads(tmp_path, restore_threads, args):
    """Each command sets the threads from `runtime` before it reads its inputs (none exist here: it then fails)."""
    from typer.testing import CliRunner

    from stages.cli import app

    def elsewhere(node):  # the repo's data/ and artifacts/ paths moved under tmp_path, where nothing exists
        if isinstance(node, dict):
            return {k: elsewhere(v) for k, v in node.items()}
        if isinstance(node, str) and node.startswith(("data/", "artifacts/")):
            return str(tmp_path / node)
        return node

    raw = elsewhere(yaml.safe_load((REPO / "params.yaml").read_text()))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**raw, "workdir": str(tmp_path / "work"), "runtime": {"threads": 1}}))
    torch.set_num_threads(2)
    r = CliRunner().invoke(app, [*args, "--params", str(params)])
    assert r.exit_code == 2, r.output  # a missing input, said in one line
    assert torch.get_num_threads() == 1


_FAULTS = """
import ctypes, resource, sys
from pipeline.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
n = 48 << 20  # 48 MB, as a CNN's activations: over glibc's largest dynamic mmap threshold (32 MB)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    block = libc.malloc(n)
    libc.memset(block, 1, n)
    libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux")
def test_freed_memory_is_reused_not_faulted_in_again():
    """A 48 MB block freed and allocated again: from the kernel afresh each time (12k zeroed pages each) by
    default, from the kept heap once every stage has called keep_freed_memory (apply_threads does)."""

    def faults(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS, mode], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True
        )
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    default, kept = faults("default"), faults("keep")
    pages = (48 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert default > 9 * pages and kept < 2 * pages, (default, kept)
