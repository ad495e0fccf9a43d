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


RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
SEED_SPREAD = 1.0  # each recall of a trained model's three seeds: mean - 1, mean, mean + 1 (sd 1; RSUM sd 6)


def _model(
    r1: float, cos: float | None = None, interval: tuple[float, float, float] | None = None, seeds: int = 0
) -> dict:
    m = {"i2t_r1": r1, "i2t_r5": 80.0, "i2t_r10": 90.0, "t2i_r1": 40.0, "t2i_r5": 70.0, "t2i_r10": 85.0}
    m["rsum"] = sum(m.values())
    m["average_score"] = m["rsum"] / 6
    m.update(i2t_medr=2.0, t2i_medr=3.0)
    m["groups"] = {g: {"rsum": m["rsum"] + d} for g, d in (("twemoji", 10.0), ("openmoji", -10.0))}
    if cos is not None:
        m.update(teacher_cos_image=cos, teacher_cos_text=cos)
    if interval is not None:
        m["rsum_vs_baseline"] = dict(zip(("diff", "low", "high"), interval))
    if seeds:
        offsets = [SEED_SPREAD * (i - (seeds - 1) / 2) for i in range(seeds)]
        m["seeds"] = {
            f"run-s{i}": {k: m[k] + o for k in RECALLS} | {"rsum": m["rsum"] + 6 * o} for i, o in enumerate(offsets)
        }
        m["rsum_sd"] = 6 * SEED_SPREAD
    return m


METRICS = {  # the layout of metrics_detail.json, the whole record (the environment is in run_info.json)
    "dataset": "demo",
    "split": "test",
    "n_images": 600,
    "n_captions": 3000,
    "teacher": _model(100.0, interval=(50.0, 20.0, 80.0)),
    "student_unpaired": _model(50.0, 0.20, interval=(5.0, 1.0, 9.0), seeds=3),
    "baseline": _model(50.0, 0.0, seeds=3),
    "chance": _model(16.0),
    "params": {"student_unpaired": 1000, "baseline": 1000},
    "latency": {"teacher": {"image_s": 0.1}},
}
ONE_QUERY = {"i2t": 100 / 600, "t2i": 100 / 3000}
RECALL_TOL = 4.0 * (2 / 3) ** 0.5 * SEED_SPREAD  # SIGMAS sds of a difference of two 3-seed means
RSUM_TOL = 4.0 * (2 / 3) ** 0.5 * 6 * SEED_SPREAD


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


def _metrics(env: dict | None, **changes) -> dict:
    m = copy.deepcopy(METRICS)
    if env is not None:
        m["environment"] = env
    for path, value in changes.items():
        model, key = path.split("__")
        m[model][key] = value
    return m


def test_identical_run_on_the_same_machine_class_passes(tmp_path, capsys, monkeypatch):
    rc, out = _run(tmp_path, LOCK, _metrics(ENV_A, latency__teacher={"image_s": 0.2}), capsys, monkeypatch)
    assert rc == 0 and "bit for bit" in out, out  # a measured latency may differ


@pytest.mark.parametrize(
    "new_lock, changes",
    [
        (_lock(demo_data="a1", prepare="b2", extract="XX", distill="d4"), {}),  # features not identical
        (LOCK, {"student_unpaired__i2t_r1": 50.0 + ONE_QUERY["i2t"]}),  # one query
        (LOCK, {"student_unpaired__teacher_cos_text": 0.21}),
        (LOCK, {"student_unpaired__t2i_medr": 4.0}),  # a rank summary
        (LOCK, {"baseline__rsum_sd": 6.5}),  # the seed spread
        (LOCK, {"student_unpaired__rsum_vs_baseline": {"diff": 5.0, "low": 1.0, "high": 9.5}}),  # an interval
        (LOCK, {"teacher__groups": {"twemoji": {"rsum": 520.0}, "openmoji": {"rsum": 500.0}}}),  # a gallery
        (LOCK, {"params__baseline": 1001}),  # a parameter count
    ],
)
def test_same_machine_class_tolerates_nothing(tmp_path, capsys, monkeypatch, new_lock, changes):
    rc, out = _run(tmp_path, new_lock, _metrics(ENV_A, **changes), capsys, monkeypatch)
    assert rc == 1 and "FAILED" in out, out


def test_another_machine_class_is_checked_within_the_measured_spread(tmp_path, capsys, monkeypatch):
    changes = {
        "student_unpaired__i2t_r1": 50.0 - 0.95 * RECALL_TOL,
        "student_unpaired__t2i_r1": 40.0 + 0.95 * RECALL_TOL,
        "student_unpaired__rsum": METRICS["student_unpaired"]["rsum"] - 0.95 * RSUM_TOL,
        "student_unpaired__rsum_vs_baseline": {"diff": 1.5, "low": 0.5, "high": 2.5},  # overlaps, stays above 0
        "baseline__teacher_cos_image": 0.04,
        "baseline__t2i_medr": 5.0,  # rank summaries are not compared across machine classes
        "teacher__t2i_r1": 40.0 - ONE_QUERY["t2i"],
    }
    new_lock = _lock(demo_data="a1", prepare="b2", extract="XX", distill="YY")
    rc, out = _run(tmp_path, new_lock, _metrics(ENV_B, **changes), capsys, monkeypatch)
    assert rc == 0, out
    assert "another machine class" in out and "environment cpu_id" in out


@pytest.mark.parametrize(
    "new_lock, changes",
    [
        (_lock(demo_data="a1", prepare="ZZ", extract="XX", distill="d4"), {}),  # integer stage changed
        (LOCK, {"teacher__t2i_r1": 40.0 - 2 * ONE_QUERY["t2i"]}),  # teacher: one query at most
        (LOCK, {"student_unpaired__t2i_r1": 40.0 - 1.05 * RECALL_TOL}),
        (LOCK, {"baseline__i2t_r10": 90.0 + 1.05 * RECALL_TOL}),
        (LOCK, {"student_unpaired__rsum": METRICS["student_unpaired"]["rsum"] - 1.05 * RSUM_TOL}),
        (LOCK, {"student_unpaired__teacher_cos_image": 0.20 - compare_demo.CROSS_MACHINE["agreement"] - 0.01}),
        (LOCK, {"student_unpaired__teacher_cos_text": 0.12, "baseline__teacher_cos_text": 0.10}),  # the claim fails
        (LOCK, {"student_unpaired__rsum_vs_baseline": {"diff": 12.0, "low": 9.5, "high": 14.0}}),  # no overlap
        (LOCK, {"student_unpaired__rsum_vs_baseline": None}),  # the interval is gone
    ],
)
def test_another_machine_class_still_fails_real_changes(tmp_path, capsys, monkeypatch, new_lock, changes):
    rc, out = _run(tmp_path, new_lock, _metrics(ENV_B, **changes), capsys, monkeypatch)
    assert rc == 1 and "FAILED" in out, out


def test_every_trained_model_a_quarter_worse_fails_on_another_machine_class(tmp_path, capsys, monkeypatch):
    """The planted bug CI once accepted: every trained model's recalls 25% lower, the claims intact."""
    new = _metrics(ENV_B)
    for model in ("student_unpaired", "baseline"):
        for key in (*RECALLS, "rsum"):
            new[model][key] *= 0.75
    rc, out = _run(tmp_path, LOCK, new, capsys, monkeypatch)
    assert rc == 1 and "student_unpaired.i2t_r1" in out.split("FAILED")[1], out


def test_a_trained_model_with_one_seed_has_no_cross_machine_tolerance(tmp_path, capsys, monkeypatch):
    old = _metrics(ENV_A)
    del old["baseline"]["seeds"]
    rc, out = _run(tmp_path, LOCK, _metrics(ENV_B), capsys, monkeypatch, old_metrics=old)
    assert rc == 1 and "baseline records no seed spread" in out, out


@pytest.mark.parametrize("missing", ["committed", "reproduced"])
def test_a_run_without_its_environment_cannot_be_compared(tmp_path, capsys, monkeypatch, missing):
    old = _metrics(None if missing == "committed" else ENV_A)
    new = _metrics(None if missing == "reproduced" else ENV_A)
    rc, out = _run(tmp_path, LOCK, new, capsys, monkeypatch, old_metrics=old)
    assert rc == 1 and f"the {missing} run records no environment" in out, out


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
            "| teacher | 100.0 | 80.0 | 90.0 | 40.0 | 70.0 | 85.0 | 465.0 | 77.5 | +50.0 (+20.0 .. +80.0) | 1 |",
            f"| student_unpaired | 50.0 | 80.0 | 90.0 | 40.0 | 70.0 | 85.0 | {student_rsum} | 69.2 | {interval} | 3 |",
            "| baseline | 50.0 | 80.0 | 90.0 | 40.0 | 70.0 | 85.0 | 415.0 | 69.2 | - | 3 (6.0) |",
            "| chance | 16.0 | 80.0 | 90.0 | 40.0 | 70.0 | 85.0 | 381.0 | 63.5 | - | - |",
        ]
    )


def test_readme_table_must_show_the_committed_metrics():
    failures: list[str] = []
    compare_demo.compare_readme(_readme("415.0"), METRICS, failures)
    assert failures == []
    compare_demo.compare_readme(_readme("416.0"), METRICS, failures)
    assert len(failures) == 1 and "student_unpaired row shows" in failures[0] and "415.0" in failures[0]
    failures.clear()
    compare_demo.compare_readme(_readme("415.0", "+5.0 (+2.0 .. +9.0)"), METRICS, failures)
    assert len(failures) == 1 and "+1.0 .. +9.0" in failures[0]
    failures.clear()
    compare_demo.compare_readme(_readme("415.0").replace("| student_unpaired |", "| student |"), METRICS, failures)
    assert failures and "expected one demo table row" in failures[0]


def test_every_interval_column_of_the_readme_table_is_checked():
    """With several references (distill.runs.compare_to), each `RSUM - NAME (95% CI)` column shows the record's
    interval against NAME, and the reference CI names must have its column."""
    metrics = copy.deepcopy(METRICS)
    metrics["teacher"]["rsum_vs_student_unpaired"] = {"diff": 10.0, "low": 5.0, "high": 15.0}
    metrics["baseline"]["rsum_vs_student_unpaired"] = {"diff": -5.0, "low": -9.0, "high": -1.0}
    lines = _readme("415.0").splitlines()
    lines[0] = lines[0].replace(
        "| RSUM - baseline (95% CI) |", "| RSUM - baseline (95% CI) | RSUM - student_unpaired (95% CI) |"
    )
    second = {
        "teacher": "+10.0 (+5.0 .. +15.0)",
        "student_unpaired": "-",
        "baseline": "-5.0 (-9.0 .. -1.0)",
        "chance": "-",
    }
    for i, line in enumerate(lines[1:], 1):
        model = line.split("|")[1].strip()
        cells = line.split(" | ")
        cells.insert(10, second[model])
        lines[i] = " | ".join(cells)
    readme = "\n".join(lines)
    failures: list[str] = []
    compare_demo.compare_readme(readme, metrics, failures)
    assert failures == []
    compare_demo.compare_readme(readme, metrics, failures, reference="student_unpaired")
    assert failures == []
    compare_demo.compare_readme(readme.replace("-5.0 (-9.0 .. -1.0)", "-5.0 (-9.0 .. -2.0)"), metrics, failures)
    assert len(failures) == 1 and "the baseline row shows" in failures[0]
    failures.clear()
    compare_demo.compare_readme(_readme("415.0"), metrics, failures, reference="student_unpaired")
    assert failures == ["README: the demo table has no column 'RSUM - student_unpaired (95% CI)'"]


def _gallery_table(
    openmoji_student: str = "405.0", columns: str = "teacher | student_unpaired | baseline | chance"
) -> str:
    return "\n".join(
        [
            "Per style:",
            "",
            f"| RSUM per style gallery | {columns} |",
            "|---|---:|---:|---:|---:|",
            "| Twemoji (captioned for the students) | 475.0 | 425.0 | 425.0 | 391.0 |",
            f"| OpenMoji (unpaired in training) | 455.0 | {openmoji_student} | 405.0 | 371.0 |",
            "",
            "| other | table |",
        ]
    )


def test_readme_gallery_table_must_show_the_committed_metrics():
    failures: list[str] = []
    compare_demo.compare_readme_galleries(_gallery_table(), METRICS, failures)
    assert failures == []
    compare_demo.compare_readme_galleries(_gallery_table("406.0"), METRICS, failures)
    assert len(failures) == 1 and "openmoji gallery row shows" in failures[0]
    failures.clear()
    compare_demo.compare_readme_galleries(
        _gallery_table(columns="teacher | student_unpaired | chance"), METRICS, failures
    )
    assert failures and any("no column for baseline" in f for f in failures)
    failures.clear()
    compare_demo.compare_readme_galleries("no table here", METRICS, failures)
    assert failures and "expected one table" in failures[0]


def _two_students(pairs_interval: tuple[float, float, float]) -> dict:
    """Committed-layout metrics with a second, weaker distilled student beside the headline one."""
    m = copy.deepcopy(METRICS)
    m["student_pairs"] = _model(50.0, 0.15, interval=pairs_interval, seeds=3)
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


# -- the ablation: intervals against student_unpaired, no dvc.lock of integer stages, its own README section ----
def _ablation(plus: tuple[float, float, float], minus: tuple[float, float, float], env: dict) -> dict:
    m = {k: copy.deepcopy(METRICS[k]) for k in ("dataset", "split", "n_images", "n_captions", "teacher")}
    m["student_unpaired"] = _model(50.0, 0.20, seeds=3)
    for name, iv in (("relation", plus), ("response", minus)):
        m[name] = _model(50.0, 0.2, seeds=3)
        m[name]["rsum_vs_student_unpaired"] = dict(zip(("diff", "low", "high"), iv))
    m["chance"] = copy.deepcopy(METRICS["chance"])
    return {**m, "environment": env}


def _run_ablation(tmp_path, new, capsys, monkeypatch, readme: str | None = None) -> tuple[int, str]:
    committed = _ablation((4.0, 1.0, 7.0), (-3.0, -6.0, -0.5), ENV_A)
    argv = []
    for name, doc in (("committed", committed), ("reproduced", new)):
        doc = copy.deepcopy(doc)
        (tmp_path / f"{name}_info.json").write_text(json.dumps({"environment": doc.pop("environment")}))
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
        argv += [f"--{name}-metrics", str(tmp_path / f"{name}.json")]
        argv += [f"--{name}-run-info", str(tmp_path / f"{name}_info.json")]
    if readme is not None:
        (tmp_path / "README.md").write_text(readme)
        argv += ["--readme", str(tmp_path / "README.md"), "--readme-section", "### Ablation"]
    monkeypatch.setattr("sys.argv", ["compare_demo.py", *argv, "--reference", "student_unpaired"])
    rc = compare_demo.main()
    return rc, capsys.readouterr().out


@pytest.mark.parametrize(
    "relation, env, passes",
    [
        ((4.0, 1.0, 7.0), ENV_A, True),  # identical
        ((1.5, -1.5, 4.5), ENV_B, False),  # the ablation's headline (largest gain) loses its interval above 0
        ((4.0, 0.5, 7.5), ENV_B, True),  # ... keeps it: within the spread elsewhere
    ],
)
def test_the_ablation_is_compared_against_its_reference_without_a_lock(
    tmp_path, capsys, monkeypatch, relation, env, passes
):
    rc, out = _run_ablation(tmp_path, _ablation(relation, (-3.0, -6.0, -0.5), env), capsys, monkeypatch)
    assert (rc == 0) == passes, out
    assert "no dvc.lock given" in out and ("RSUM - student_unpaired 95% interval" in out) != passes


def test_each_readme_table_is_checked_in_its_own_section(tmp_path, capsys, monkeypatch):
    """The demo's table and the ablation's both have a student_unpaired row: each is read under its heading."""
    committed = _ablation((4.0, 1.0, 7.0), (-3.0, -6.0, -0.5), ENV_A)
    rows = {m: committed[m] for m in ("teacher", "student_unpaired", "relation", "response", "chance")}

    def row(m: str) -> str:
        r = rows[m]
        iv = r.get("rsum_vs_student_unpaired")
        cells = [f"{r[k]:.1f}" for k in (*compare_demo.RECALLS, "rsum", "average_score")]
        cells.append(f"{iv['diff']:+.1f} ({iv['low']:+.1f} .. {iv['high']:+.1f})" if iv else "-")
        return f"| {m} | {' | '.join(cells)} | 3 |"

    def galleries(models: list[str], metrics: dict) -> str:
        head = f"| RSUM per style gallery | {' | '.join(models)} |\n|---|{'---:|' * len(models)}"
        cells = {g: [f"{metrics[m]['groups'][g]['rsum']:.1f}" for m in models] for g in ("twemoji", "openmoji")}
        return head + "".join(f"\n| {g.title()} (style) | {' | '.join(c)} |" for g, c in cells.items())

    demo = _readme("415.0") + "\n\n" + galleries(compare_demo.model_names(METRICS), METRICS)
    head = "| model | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | RSUM | average "
    head += "| RSUM - student_unpaired (95% CI) | seeds (RSUM sd) |\n|---|\n"
    ablation_table = head + "\n".join(row(m) for m in rows) + "\n\n" + galleries(list(rows), committed)
    readme = f"## The built-in demo\n{demo}\n### Ablation\n{ablation_table}\n## Next\n| response | 0 |\n"
    rc, out = _run_ablation(tmp_path, committed, capsys, monkeypatch, readme)
    assert rc == 0, out
    rc, out = _run_ablation(tmp_path, committed, capsys, monkeypatch, readme.replace("+4.0 (+1.0", "+4.0 (+1.5"))
    assert rc == 1 and "the relation row shows" in out
    failures: list[str] = []
    compare_demo.compare_readme(readme, METRICS, failures, heading="## The built-in demo")
    compare_demo.compare_readme_galleries(readme, METRICS, failures, heading="## The built-in demo")
    assert failures == []
    compare_demo.compare_readme_galleries(readme, METRICS, failures)  # the whole README: two gallery tables
    assert len(failures) == 1 and "expected one table starting" in failures[0]
    failures.clear()
    compare_demo.compare_readme(readme, METRICS, failures)  # the whole README: two tables, two headers
    assert failures == ["README: expected one demo table header starting '| model |', found 2"]
    failures.clear()
    compare_demo.compare_readme(readme, METRICS, failures, heading="## Missing")
    assert failures == ["README: no section '## Missing'"]


def test_a_run_whose_inputs_were_not_reproduced_is_compared_as_another_draw(tmp_path, capsys, monkeypatch):
    """--inputs STAGE OLD NEW: on the same machine class, exactness holds only when STAGE's outputs were
    reproduced; where they differ (the ablation's mine outputs on another machine class, or from a changed
    cross-encoder), the seed-spread tolerances apply, and a change beyond them still fails."""
    locks = {
        "in_old": _lock(mine="m1", views="v1"),
        "in_same": _lock(mine="m1", views="v1"),
        "in_other": _lock(mine="m2", views="v1"),
        "in_views": _lock(mine="m1", views="v2"),  # one of the listed stages is enough
    }
    for name, doc in locks.items():
        (tmp_path / f"{name}.lock").write_text(yaml.safe_dump(doc))
    moved = {"student_unpaired__i2t_r1": 50.0 + 0.5 * RECALL_TOL}

    def run(new_lock: str, changes: dict) -> tuple[int, str]:
        rc, out = _run(tmp_path, LOCK, _metrics(ENV_A, **changes), capsys, monkeypatch)  # writes the metrics files
        argv = list(compare_demo.sys.argv)
        cut = argv.index("--committed-lock")
        argv = argv[:cut] + argv[cut + 4 :]  # the demo's locks out: the ablation has none of its own
        argv += ["--inputs", "mine,views", str(tmp_path / "in_old.lock"), str(tmp_path / f"in_{new_lock}.lock")]
        monkeypatch.setattr("sys.argv", argv)
        return compare_demo.main(), capsys.readouterr().out

    rc, out = run("same", moved)
    assert rc == 1 and "FAILED" in out  # inputs reproduced: bit for bit
    rc, out = run("other", moved)
    assert rc == 0 and "mine,views stages' outputs differ" in out, out
    rc, out = run("views", moved)
    assert rc == 0 and "stages' outputs differ" in out, out
    rc, out = run("other", {"student_unpaired__i2t_r1": 50.0 + 1.05 * RECALL_TOL})
    assert rc == 1 and "FAILED" in out
