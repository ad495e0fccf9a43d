"""`kdpipe evaluate`: exact retrieval metrics of the teacher and the student(s) -> metrics.json, run_info.json,
metrics.md, ranks.npz and plots/. The students are the runs of `distill.runs` (every variant x seed, in
<workdir>/models/) when params.yaml defines them, else evaluate.models (<workdir>/student, <workdir>/baseline).
With `--ablation FILE`: the ablation's base variant (its runs in <workdir>/models/, as the main pipeline trained
them) and its variants (<ablation.workdir>/models/), compared with its `compare_to`, every model on the recall
plots; everything written into the ablation's work directory.

kdpipe evaluate                                  # teacher (feature store) + students on evaluate.split
kdpipe evaluate --ablation ablation/params.yaml  # an ablation: the base's runs + its own, into its workdir
kdpipe evaluate --features STORE [--split test] [--out FILE]   # stored embeddings alone, as `teacher`
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from stages._ablation import ABLATION_OPTION, load_ablation
from stages._common import (
    NO_WAIT_OPTION,
    PARAMS_OPTION,
    SET_OPTION,
    WORKDIR_OPTION,
    apply_runtime,
    artifact_paths,
    echo,
    load_params,
    load_raw,
    run_stage,
    save_resolved,
    writing,
)
from stages._store import verify_if_asked

if TYPE_CHECKING:
    from pipeline.paths import ArtifactPaths


@run_stage
def command(
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
    workdir: Path = WORKDIR_OPTION,
    features: Path = typer.Option(
        None,
        "--features",
        help="Evaluate this feature store's embeddings alone (as `teacher`); no model, index or params file needed.",
    ),
    split: str = typer.Option(None, "--split", help="Split to evaluate (default: evaluate.split, i.e. test)."),
    out: Path = typer.Option(
        None, "--out", help="Metrics file to write (default: <workdir>/metrics.json; with --features: print the JSON)."
    ),
    ablation: Path = ABLATION_OPTION,
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Exact R@1/5/10, RSUM and median rank of teacher and student(s); latency, parameters, recall@K plots."""
    from pipeline.config import apply_overrides, from_dict
    from pipeline.evaluate.outputs import METRICS_FILE
    from pipeline.evaluate.run import EvaluateConfig, evaluate_features, run_evaluate, write_json
    from pipeline.store.ownership import claim

    if features is not None:
        # No params file needed: the default one is read when present (device, backend, tile size), an
        # explicitly named one must exist.
        raw = load_params(params) if params.is_file() or params != Path("params.yaml") else {}
        raw = apply_overrides(raw, list(set_ or []))
        cfg = from_dict(EvaluateConfig, raw.get("evaluate"), "evaluate")
        apply_runtime(raw)
        verify_if_asked(raw, features)
        if out is not None:
            claim(out, METRICS_FILE)  # before the work: a path that is not an earlier metrics file is refused
        doc = evaluate_features(features, split or cfg.split, cfg)
        if out is None:
            for line in json.dumps(doc, indent=2).splitlines():
                echo(line)
        else:
            with writing(out, no_wait=no_wait):
                write_json(doc, out, METRICS_FILE)
            t = doc["teacher"]
            echo(
                f"evaluate: {features} {doc['split']}: {doc['n_images']:,} images / {doc['n_captions']:,} "
                f"captions, RSUM {t['rsum']:.2f} (i2t R@1 {t['i2t_r1']:.2f}, t2i R@1 {t['t2i_r1']:.2f}); wrote {out}"
            )
        return
    raw = load_raw(params, set_)  # evaluate's section, and distill.runs / extract.teacher below
    cfg, paths = from_dict(EvaluateConfig, raw.get("evaluate"), "evaluate"), artifact_paths(raw, params, workdir)
    apply_runtime(raw)
    if split:
        cfg = replace(cfg, split=split)
    verify_if_asked(raw, paths.features)

    def teacher_factory(device, dtype):  # extract.teacher, for the latency comparison only
        from pipeline.teachers import TeacherConfig, build_teacher

        teacher_cfg = from_dict(TeacherConfig, (raw.get("extract") or {}).get("teacher"), "extract.teacher")
        return build_teacher(teacher_cfg, device=device, dtype=dtype)

    # The trained models are the runs of distill.runs (variant x seed) when the params file defines them.
    from pipeline.runs import split_runs

    runs_cfg = split_runs(raw.get("distill"))[0]
    runs, reference, out_paths = None, ("baseline",), paths
    if ablation is not None:
        runs, reference, out_paths = ablation_runs(load_ablation(ablation), runs_cfg, paths)
        cfg = replace(cfg, plot_models=None)  # evaluate.plot_models lists the main pipeline's models
    elif runs_cfg:
        runs = {
            v: [str(paths.model(r).relative_to(paths.workdir)) for r in rs] for v, rs in runs_cfg.run_names().items()
        }
        reference = runs_cfg.compare_to
    # metrics.json (or --out) and plots/: every evaluate run writes plots/, ranks.npz and run_info.json too
    with writing(out or out_paths.metrics, out_paths.plots, no_wait=no_wait):
        result = run_evaluate(
            paths,
            cfg,
            runs=runs,
            reference=reference,
            teacher_factory=teacher_factory,
            metrics_path=out,
            out=out_paths,
        )
        save_resolved(cfg, out_paths, "evaluate")
    for line in (*result.table.splitlines(), result.summary()):
        echo(line)


def ablation_runs(
    ablation, runs_cfg, paths: ArtifactPaths
) -> tuple[dict[str, list[str]], tuple[str, ...], ArtifactPaths]:
    """An ablation's models ({model: run directories}: the base's in the main work directory, the variants' in the
    ablation's, absolute), its references and its work directory."""
    from pipeline.errors import ConfigError
    from pipeline.paths import ArtifactPaths
    from pipeline.runs import run_name

    try:
        ablation.checked_against(runs_cfg)
    except ValueError as err:
        raise ConfigError(f"ablation: {err}") from None
    out = ArtifactPaths(ablation.workdir)
    runs = {
        v: [str((paths if v == ablation.base else out).model(run_name(v, s)).resolve()) for s in ablation.seeds]
        for v in (ablation.base, *ablation.variants)
    }
    return runs, ablation.compare_to, out
