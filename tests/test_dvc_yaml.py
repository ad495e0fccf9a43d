"""dvc.yaml lists exactly the code each stage runs, so that editing a loss never invalidates extraction.

The import closure of each stage's command module is computed statically (every `import pipeline...` /
`from pipeline... import` / `from stages... import`, at any depth, including imports inside functions)
and must equal the code deps of the stage in dvc.yaml.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
OWN_PACKAGES = ("pipeline", "stages")


def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    return {n for n in names if n.split(".")[0] in OWN_PACKAGES}


def import_closure(start: str) -> set[Path]:
    seen: set[Path] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        # importing a.b.c runs a/__init__.py and a/b/__init__.py too
        for i in range(1, len(parts) + 1):
            f = module_file(".".join(parts[:i]))
            if f is not None and f not in seen:
                seen.add(f)
                todo.extend(imported_modules(f))
    return {p.relative_to(ROOT) for p in seen}


def stage_code_deps(stage: dict) -> set[Path]:
    deps = {Path(d) for d in stage.get("deps", [])}
    return {d for d in deps if d.parts[0] in OWN_PACKAGES}


DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
COMMAND_MODULE = {  # a `matrix` / `foreach` stage is one definition here
    "demo_data": "stages.demo_data",
    "fit_teacher": "stages.fit_teacher",
    "fit_cross_encoder": "stages.fit_cross_encoder",
    "prepare": "stages.prepare",
    "extract": "stages.extract",
    "mine": "stages.mine",
    "views": "stages.views",
    "distill": "stages.distill",
    "evaluate": "stages.evaluate",
}


# the demo's ablation (its own file, run by `dvc repro ablation/dvc.yaml`): fit-cross-encoder and mine, which only its
# variants read, and the same distill and evaluate commands, with --ablation
ABLATION_DVC = yaml.safe_load((ROOT / "ablation" / "dvc.yaml").read_text())
STAGES = {
    **{s: DVC["stages"][s] for s in DVC["stages"]},
    **{f"ablation/{s}": v for s, v in ABLATION_DVC["stages"].items()},
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_are_its_import_closure(stage):
    expected = import_closure(COMMAND_MODULE[stage.removeprefix("ablation/")]) - {Path("stages/__init__.py")}
    listed = stage_code_deps(STAGES[stage])
    assert sorted(map(str, expected - listed)) == [], "code the stage runs but dvc.yaml does not list"
    assert sorted(map(str, listed - expected)) == [], "code dvc.yaml lists but the stage never imports"


def test_extract_does_not_depend_on_training_code():
    deps = {str(d) for d in stage_code_deps(DVC["stages"]["extract"])}
    assert not any(d.startswith(("pipeline/distill/", "pipeline/towers/student.py")) for d in deps)


def test_distill_is_one_definition_over_the_runs_of_params_yaml():
    stage = DVC["stages"]["distill"]
    assert stage["cmd"] == "kdpipe distill --all"  # every run of distill.runs, each a process of its own
    # the runs' directories persist: a complete run is kept, a killed one resumes (tests/test_dvc_resume.py)
    assert stage["outs"] == [
        {"${workdir}/models": {"persist": True}},
        {"${workdir}/curves": {"cache": False, "persist": True}},
    ]
    assert "distill_baseline" not in DVC["stages"]  # the baseline is a variant now


def test_evaluate_depends_on_every_run_and_plots_every_model():
    assert "${workdir}/models" in DVC["stages"]["evaluate"]["deps"]
    curves = [p for p in DVC["plots"] if isinstance(p, dict) and "recall@K" in next(iter(p))]
    assert len(curves) == 2
    for plot in curves:
        (props,) = plot.values()
        (columns,) = props["y"].values()  # DVC needs the y columns named: params.yaml lists them (test_params_files)
        assert props["x"] == "k" and columns == "${evaluate.plot_models}"


def test_plots_point_only_at_uncached_outputs():
    """A fresh clone has only what git holds: every plot file must lie in a `cache: false` output."""
    uncached = []
    for stage in DVC["stages"].values():
        for section in ("outs", "metrics", "plots"):
            for out in stage.get(section, []):
                if isinstance(out, dict):
                    ((path, props),) = out.items()
                    if props.get("cache") is False:
                        uncached.append(path)
    for plot in DVC["plots"]:
        files = [plot] if isinstance(plot, str) else [k for k in plot if "/" in k]
        files += [f for p in ([] if isinstance(plot, str) else plot.values()) for f in (p.get("y") or {}) if "/" in f]
        for f in files:
            assert any(inside(f, u) for u in uncached), f


def inside(plot_file: str, out: str) -> bool:
    """plot_file is the output, lies inside it, or is the directory that holds a matrix stage's outputs."""
    if plot_file == out or plot_file.startswith(out.rstrip("/") + "/"):
        return True
    return "${item" in out and out.split("${item")[0].rstrip("/") == plot_file.rstrip("/")


def test_the_ablation_runs_its_own_params_from_the_repository_root():
    """ablation/dvc.yaml: each stage runs at the root (its paths are the root's), each variant x seed of
    ablation/params.yaml, both commands reading that file; `dvc repro` (the demo) never reaches it."""
    params = yaml.safe_load((ROOT / "ablation" / "params.yaml").read_text())
    assert set(params) == {"ablation"} and ABLATION_DVC["vars"] == ["../params.yaml:workdir,fit_teacher"]
    distill, evaluate = ABLATION_DVC["stages"]["distill"], ABLATION_DVC["stages"]["evaluate"]
    assert distill["cmd"] == "kdpipe distill --ablation ablation/params.yaml --all"  # each variant x seed
    for stage in (distill, evaluate):
        assert stage["wdir"] == ".." and "--ablation ablation/params.yaml" in stage["cmd"]
        assert {"ablation/params.yaml": ["ablation"]} in stage["params"]
    assert {"${workdir}/models", "${ablation.workdir}/models"} <= set(evaluate["deps"])  # the base's runs, its own
    assert not any("ablation" in str(s.get("cmd")) for s in DVC["stages"].values())


def test_every_distill_run_depends_on_the_mined_store_it_would_read():
    """dvc.yaml's distill lists ${workdir}/mined.zarr for every run and the mine stage writes it, so that `dvc repro`
    with a preset whose runs read it (the dcd / mcad configs as params.yaml) mines first and retrains after a
    re-mine (one that rewrites the same bytes retrains nothing: DVC compares contents). The ablation's runs read its
    own store exactly when ablation/params.yaml sets `mine`, and its distill lists that one."""
    assert "${workdir}/mined.zarr" in DVC["stages"]["distill"]["deps"]
    assert DVC["stages"]["mine"]["outs"] == [{"${workdir}/mined.zarr": {"persist": True}}]
    assert "mine" in DVC["stages"]["mine"]["params"]
    ablation = yaml.safe_load((ROOT / "ablation" / "params.yaml").read_text())["ablation"]
    own = "${ablation.workdir}/mined.zarr"
    assert bool(ablation.get("mine")) == (own in ABLATION_DVC["stages"]["distill"]["deps"])
    assert ABLATION_DVC["stages"]["mine"]["outs"] == [{own: {"persist": True}}]
    assert "--ablation ablation/params.yaml" in ABLATION_DVC["stages"]["mine"]["cmd"]
    assert "${workdir}/mined.zarr" not in ABLATION_DVC["stages"]["distill"]["deps"]  # not the main one as well


def test_the_ablation_reads_the_stores_of_its_own_stages():
    """Its runs read its own feature store (ablation.extract: the main teacher's rows + a second teacher) and its
    views (the views variant), each written by a stage of ablation/dvc.yaml from the ablation's keys."""
    ablation = yaml.safe_load((ROOT / "ablation" / "params.yaml").read_text())["ablation"]
    deps = ABLATION_DVC["stages"]["distill"]["deps"]
    own = "${ablation.workdir}/features.zarr"
    assert bool(ablation.get("extract")) == (own in deps) != ("${workdir}/features.zarr" in deps)
    assert ABLATION_DVC["stages"]["extract"]["outs"] == [{own: {"persist": True}}]
    assert ABLATION_DVC["stages"]["extract"]["cmd"] == "kdpipe extract --ablation ablation/params.yaml"
    assert "${ablation.workdir}/teacher/heads.safetensors" in ABLATION_DVC["stages"]["extract"]["deps"]
    assert ABLATION_DVC["stages"]["fit_teacher"]["outs"] == ["${ablation.workdir}/teacher"]
    assert "${ablation.workdir}/views.zarr" in deps
    assert ABLATION_DVC["stages"]["views"]["outs"] == [{"${ablation.workdir}/views.zarr": {"persist": True}}]
