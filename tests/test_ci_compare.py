"""CI's demo comparison (.ci/compare_demo.py): bit for bit on the committed run's machine class, within the
measured cross-machine spread elsewhere, and the integer stages identical everywhere."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "compare_demo.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("compare_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare_demo = _load_script()

ENV_A = {
    "cpu": "Intel(R) Xeon(R) Processor",
    "cpu_id": "GenuineIntel 6 143",
    "cpu_isa": "avx2 avx512f",
    "kernels": "AVX512",
    "threads": 2,
    "torch": "2.13.0+cpu",
    "numpy": "2.4.6",
    "python": "3.11.7",
    "device": "cpu",
}
ENV_B = {**ENV_A, "cpu": "AMD EPYC", "cpu_id": "AuthenticAMD 25 17"}


def _lock(**hashes: str) -> dict:
    return {
        "schema": "2.0",
        "stages": {
            stage: {"cmd": f"kdpipe {stage}", "outs": [{"path": f"out/{stage}", "md5": h}]}
            for stage, h in hashes.items()
        },
    }


LOCK = _lock(demo_data="a1", prepare="b2", extract="c3", distill="d4")


def _model(r1: float, cos: float | None = None, interval: tuple[float, float, float] | None = None) -> dict:
    m = {"i2t_r1": r1, "i2t_r5": 100.0, "i2t_r10": 100.0, "t2i_r1": 40.0, "t2i_r5": 90.0, "t2i_r10": 100.0}
    m["rsum"] = sum(m.values())
    m["average_score"] = m["rsum"] / 6
    if cos is not None:
        m.update(teacher_cos_image=cos, teacher_cos_text=cos)
    if interval is not None:
        m["rsum_vs_baseline"] = dict(zip(("diff", "low", "high"), interval))
    return m


METRICS = {  # the layout of metrics_detail.json, the whole record (the environment is in run_info.json)
    "dataset": "demo",
    "split": "test",
    "n_images": 6,
    "n_captions": 30,
    "teacher": _model(100.0, interval=(50.0, 20.0, 80.0)),
    "student_unpaired": _model(50.0, 0.20, interval=(5.0, 1.0, 9.0)),
    "baseline": _model(50.0, 0.0),
    "chance": _model(16.0),
}


def _run(
    tmp_path: Path, new_lock: dict, new_metrics: dict, capsys, monkeypatch, old_metrics: dict | None = None
) -> tuple[int, str]:
    """new_metrics / old_metrics may carry `environment`: it goes to that run's run_info.json."""
    old_metrics = COMMITTED if old_metrics is None else old_metrics
    files = {}
    for name, doc in (("old.lock", LOCK), ("new.lock", new_lock)):
        files[name] = tmp_path / name
        files[name].write_text(yaml.safe_dump(doc))
    for name, doc in (("old", old_metrics), ("new", new_metrics)):
        doc = copy.deepcopy(doc)
        env = doc.pop("environment", None)
        files[f"{name}.json"] = tmp_path / f"{name}.json"
        files[f"{name}.json"].write_text(json.dumps(doc))
        files[f"{name}_info.json"] = tmp_path / f"{name}_info.json"  # absent when the run recorded none
        files[f"{name}_info.json"].unlink(missing_ok=True)
        if env is not None:
            files[f"{name}_info.json"].write_text(json.dumps({"environment": env, "tie_rule": "pessimistic"}))
    monkeypatch.setattr(
        "sys.argv",
        [
            "compare_demo.py",
            "--committed-lock",
            str(files["old.lock"]),
            "--reproduced-lock",
            str(files["new.lock"]),
            "--committed-metrics",
            str(files["old.json"]),
            "--reproduced-metrics",
            str(files["new.json"]),
            "--committed-run-info",
            str(files["old_info.json"]),
            "--reproduced-run-info",
            str(files["new_info.json"]),
        ],
    )
    rc = compare_demo.main()
    return rc, capsys.readouterr().out


COMMITTED = {**METRICS, "environment": ENV_A}  # the committed run, computed on machine class A


def _metrics(env: dict, **changes) -> dict:
    m = copy.deepcopy(METRICS)
    m["environment"] = env
    for path, value in changes.items():
        model, key = path.split("__")
        m[model][key] = value
    return m


def test_identical_run_on_the_same_machine_class_passes(tmp_path, capsys, monkeypatch):
    rc, out = _run(tmp_path, LOCK, _metrics(ENV_A), capsys, monkeypatch)
    assert rc == 0 and "bit for bit" in out


@pytest.mark.parametrize(
    "new_lock, changes",
    [
        (_lock(demo_data="a1", prepare="b2", extract="XX", distill="d4"), {}),  # features not identical
        (LOCK, {"student_unpaired__i2t_r1": 50.0 + 100 / 6}),  # one query
        (LOCK, {"student_unpaired__teacher_cos_text": 0.21}),
    ],
)
def test_same_machine_class_tolerates_nothing(tmp_path, capsys, monkeypatch, new_lock, changes):
    rc, out = _run(tmp_path, new_lock, _metrics(ENV_A, **changes), capsys, monkeypatch)
    assert rc == 1 and "FAILED" in out


def test_another_machine_class_is_checked_within_the_measured_spread(tmp_path, capsys, monkeypatch):
    points = compare_demo.CROSS_MACHINE["recall_points"]
    changes = {
        "student_unpaired__i2t_r1": 50.0 - points,
        "student_unpaired__t2i_r1": 40.0 + points,
        "baseline__teacher_cos_image": 0.04,
        "teacher__t2i_r1": 40.0 - 100 / 30,
    }
    new_lock = _lock(demo_data="a1", prepare="b2", extract="XX", distill="YY")
    rc, out = _run(tmp_path, new_lock, _metrics(ENV_B, **changes), capsys, monkeypatch)
    assert rc == 0, out
    assert "another machine class" in out and "environment cpu_id" in out


@pytest.mark.parametrize(
    "new_lock, changes",
    [
        (_lock(demo_data="a1", prepare="ZZ", extract="XX", distill="d4"), {}),  # integer stage changed
        (LOCK, {"teacher__t2i_r1": 40.0 - 2 * 100 / 30}),  # teacher: one query at most
        (
            LOCK,
            {"student_unpaired__t2i_r1": 40.0 - compare_demo.CROSS_MACHINE["recall_points"] - 0.1},
        ),
        (
            LOCK,
            {"student_unpaired__rsum": METRICS["student_unpaired"]["rsum"] - compare_demo.CROSS_MACHINE["rsum"] - 1},
        ),
        (LOCK, {"student_unpaired__teacher_cos_image": 0.20 - compare_demo.CROSS_MACHINE["agreement"] - 0.01}),
        (LOCK, {"student_unpaired__teacher_cos_text": 0.12, "baseline__teacher_cos_text": 0.10}),  # the claim fails
    ],
)
def test_another_machine_class_still_fails_real_changes(tmp_path, capsys, monkeypatch, new_lock, changes):
    rc, out = _run(tmp_path, new_lock, _metrics(ENV_B, **changes), capsys, monkeypatch)
    assert rc == 1 and "FAILED" in out


def test_committed_run_without_environment_is_treated_as_another_machine_class(tmp_path, capsys, monkeypatch):
    old = copy.deepcopy(METRICS)
    changes = {"student_unpaired__i2t_r1": 50.0 + 1.0}  # fails on the same class, passes on another
    rc, out = _run(tmp_path, LOCK, _metrics(ENV_A, **changes), capsys, monkeypatch, old_metrics=old)
    assert rc == 0 and "another machine class" in out


def test_an_older_run_with_its_environment_in_metrics_json_is_still_read(tmp_path):
    (tmp_path / "none.json").write_text("{}")
    assert compare_demo.environment({"environment": ENV_A}, None) == ENV_A
    assert compare_demo.environment({"environment": ENV_A}, str(tmp_path / "missing.json")) == ENV_A
    (tmp_path / "info.json").write_text(json.dumps({"environment": ENV_B}))
    assert compare_demo.environment({}, str(tmp_path / "info.json")) == ENV_B


@pytest.mark.parametrize(
    "changes",
    [
        {"student_unpaired__rsum_vs_baseline": {"diff": 3.0, "low": -1.0, "high": 7.0}},  # interval now spans 0
        {"chance__t2i_r1": 16.5},  # chance depends on the gallery alone: exact everywhere
    ],
)
def test_the_claims_and_chance_hold_on_any_machine(tmp_path, capsys, monkeypatch, changes):
    rc, out = _run(tmp_path, LOCK, _metrics(ENV_B, **changes), capsys, monkeypatch)
    assert rc == 1 and "FAILED" in out


def _readme(student_rsum: str, interval: str = "+5.0 (+1.0 .. +9.0)") -> str:
    return "\n".join(
        [
            "| model | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | RSUM | average "
            "| RSUM - baseline (95% CI) | seeds (RSUM sd) |",
            "| teacher | 100.0 | 100.0 | 100.0 | 40.0 | 90.0 | 100.0 | 530.0 | 88.3 | +50.0 (+20.0 .. +80.0) | 1 |",
            f"| student_unpaired | 50.0 | 100.0 | 100.0 | 40.0 | 90.0 | 100.0 | {student_rsum} | 80.0 | {interval} | 3 |",
            "| baseline | 50.0 | 100.0 | 100.0 | 40.0 | 90.0 | 100.0 | 480.0 | 80.0 | - | 3 (2.0) |",
            "| chance | 16.0 | 100.0 | 100.0 | 40.0 | 90.0 | 100.0 | 446.0 | 74.3 | - | - |",
        ]
    )


def test_readme_table_must_show_the_committed_metrics():
    failures: list[str] = []
    compare_demo.compare_readme(_readme("480.0"), METRICS, failures)
    assert failures == []
    compare_demo.compare_readme(_readme("481.0"), METRICS, failures)
    assert len(failures) == 1 and "student_unpaired row shows" in failures[0] and "480.0" in failures[0]
    failures.clear()
    compare_demo.compare_readme(_readme("480.0", "+5.0 (+2.0 .. +9.0)"), METRICS, failures)
    assert len(failures) == 1 and "+1.0 .. +9.0" in failures[0]
    failures.clear()
    compare_demo.compare_readme(_readme("480.0").replace("| student_unpaired |", "| student |"), METRICS, failures)
    assert failures and "expected one demo table row" in failures[0]


def _two_students(pairs_interval: tuple[float, float, float]) -> dict:
    """Committed-layout metrics with a second, weaker distilled student beside the headline one."""
    m = copy.deepcopy(METRICS)
    m["student_pairs"] = _model(50.0, 0.15, interval=pairs_interval)
    return m


@pytest.mark.parametrize(
    "reproduced_interval, env, passes",
    [
        ((1.5, -1.5, 4.5), ENV_B, True),  # another machine class: a weaker claim keeps a positive difference
        ((-0.5, -3.5, 2.5), ENV_B, False),  # ... but not a negative one
        ((1.5, -1.5, 4.5), ENV_A, False),  # the same class: every committed interval must stay above 0
    ],
)
def test_a_weaker_claim_keeps_its_sign_on_another_machine_class(
    tmp_path, capsys, monkeypatch, reproduced_interval, env, passes
):
    committed = {**_two_students((3.0, 0.5, 5.5)), "environment": ENV_A}
    new = {**_two_students(reproduced_interval), "environment": env}
    rc, out = _run(tmp_path, LOCK, new, capsys, monkeypatch, old_metrics=committed)
    assert (rc == 0) == passes, out
