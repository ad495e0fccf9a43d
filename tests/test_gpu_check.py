"""bench/gpu_check: its dry run (every part at toy size on the CPU, through the code a GPU runs at full size) with
the checks each part makes of itself, and how it keeps to its time budgets."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # bench/ is scripts, not a package
import gpu_check  # noqa: E402
from _report import Report  # noqa: E402


@pytest.mark.slow
def test_dry_run_runs_every_part_and_each_agrees_with_its_reference(tmp_path):
    out = tmp_path / "dry.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), KDPIPE_PROGRESS="0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the wrapper's python3
    proc = subprocess.run(
        [str(REPO / "bench" / "gpu_check"), "--dry", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard: the run takes ~10 s of CPU
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    parts = json.loads(out.read_text())["parts"]
    assert list(gpu_check.PARTS) == [p for p in gpu_check.PARTS if p in parts] and set(parts) == set(gpu_check.PARTS)
    assert {name: p["skipped"] for name, p in parts.items() if p["skipped"]} == {}
    figures = {f["name"]: f for p in parts.values() for f in p["figures"]}

    def value(start: str) -> list[float]:
        found = [f["value"] for name, f in figures.items() if name.startswith(start) or f" {start}" in name]
        assert found, start
        return found

    mine_here = importlib.util.find_spec("pipeline.mine") is not None
    for name, f in figures.items():
        if name.startswith("kdpipe mine") and not mine_here:
            assert f["value"] is None and "not in this checkout" in f["note"]
        else:
            assert f["value"] is not None, name
    assert value("query ranks that differ from the naive implementation") == [0]
    assert value("gradients of the DDP + GatherRows step vs the plain step") == [0]  # one rank, the CPU: exact
    cosines = value("bf16 autocast vs float32, min cosine")
    assert len(cosines) == 3 * 2 and all(0.99 < c <= 1 + 1e-6 for c in cosines)  # 3 presets x image, text
    rates = value("pairs/s, batch")
    assert len(rates) == 2 and all(r > 0 for r in rates)  # eager and compiled


def fake_parts(monkeypatch, **parts) -> None:
    monkeypatch.setattr(gpu_check, "PARTS", parts)


def check(tmp_path) -> gpu_check.Check:
    return gpu_check.Check(Report(info={"device": "test"}), dry=True, work=tmp_path)


def busy(seconds: float) -> None:
    t = time.monotonic()
    while time.monotonic() - t < seconds:
        time.sleep(0.01)


def test_a_part_past_its_budget_is_stopped_with_its_figures_saved_and_the_next_one_runs(monkeypatch, tmp_path):
    out, saved_before_next = tmp_path / "results.json", []

    def slow(c):
        c.rep.add("slow", "before the budget", 1.0, "s")
        busy(20)
        c.rep.add("slow", "after the budget", 2.0, "s")

    def after(c):
        saved_before_next.append(json.loads(out.read_text()))  # what a run killed here would leave
        c.rep.add("after", "figure", 3.0, "s")

    fake_parts(monkeypatch, slow=(0.3, slow), after=(10, after))
    c, t = check(tmp_path), time.monotonic()
    assert gpu_check.run_parts(c, ["slow", "after"], time.monotonic() + 60, out) == []
    assert time.monotonic() - t < 10
    assert "stopped at its budget" in c.rep.parts["slow"].skipped
    assert [f.name for f in c.rep.parts["slow"].figures] == ["before the budget"]
    assert [f["name"] for f in saved_before_next[0]["parts"]["slow"]["figures"]] == ["before the budget"]
    assert [f.name for f in c.rep.parts["after"].figures] == ["figure"]


def test_the_whole_run_ends_at_its_deadline_and_later_parts_are_not_started(monkeypatch, tmp_path):
    started = []
    fake_parts(
        monkeypatch,
        first=(100, lambda c: (started.append("first"), busy(20))),
        second=(100, lambda c: started.append("second")),
    )
    monkeypatch.setattr(gpu_check, "MIN_START_S", 0.2)
    c, t = check(tmp_path), time.monotonic()
    gpu_check.run_parts(c, ["first", "second"], time.monotonic() + 0.5, None)
    assert time.monotonic() - t < 10 and started == ["first"]
    assert "stopped at its budget" in c.rep.parts["first"].skipped
    assert "not run" in c.rep.parts["second"].skipped


def test_a_failing_part_is_reported_and_the_others_still_run(monkeypatch, tmp_path):
    def broken(c):
        raise ValueError("bad shape [3, 4]")

    fake_parts(monkeypatch, broken=(10, broken), fine=(10, lambda c: c.rep.add("fine", "figure", 1.0, "s")))
    c = check(tmp_path)
    assert gpu_check.run_parts(c, ["broken", "fine"], time.monotonic() + 60, None) == ["broken"]
    assert c.rep.parts["broken"].skipped == "error: ValueError: bad shape [3, 4]"
    assert c.rep.parts["fine"].figures
