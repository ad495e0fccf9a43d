"""Compare a reproduced demo run with the committed one.

Float results are bitwise reproducible only on the same machine class (CPU vendor/model/ISA, library
versions, thread count: `environment` in run_info.json beside metrics.json, from pipeline/environment.py). An AMD EPYC and an
Intel Xeon give teacher features that differ in the last bit, and ten epochs of training on 80 pairs turn
that into other student weights. So:

- Always: the integer stages (demo data, prepare: JPEG decode and resize) must give identical output
  hashes in dvc.lock, and the dataset sizes must be equal.
- Same machine class as the committed run: the extract output must be identical too, and every figure of the
  metrics record exactly equal (recalls, rank summaries, intervals, seed spreads, parameter counts, per-gallery
  figures; only the measured latencies may differ). Anything else is nondeterminism, a bug.
- The README's demo tables (the models' table, RSUM per style gallery) must show the committed metrics (numbers
  are never typed by hand).
- Another machine class: the teacher's recalls may differ by one query of their direction (a near tie
  flipped by last-bit differences in the features); chance (a function of the gallery alone) not at all. A student
  trained from features that differ in the last bits is another draw of the same experiment, so each trained
  model may move as far as another set of seeds would: SIGMAS standard deviations of a difference of two means
  of n seeds, sd * sqrt(2 / n), with sd the spread the committed run measured over its own seeds (RSUM: the
  model's rsum_sd; a recall: the root mean square of its six recalls' seed sds, steadier than one sd of three
  values; never below one query). Each interval of a model's difference to a reference (`rsum_vs_<ref>`) must
  overlap its committed interval (two 95% intervals of one quantity that do not overlap differ far beyond
  chance), and what the demo claims is checked as a claim: each distilled student (`student*`) agrees with the
  teacher more than the pairs-only baseline does; the headline (the student with the largest committed RSUM
  gain) keeps its 95% interval above 0; every other committed interval above 0 keeps a positive difference.
- A run that does not record where it was computed (`environment`) cannot be compared: that is a failure.

The intervals of the claims and the README are those against `--reference` (default `baseline`, the demo's
compare_to). The demo's ablation (ablation/dvc.yaml) is compared by the same rules with `--reference
student_unpaired` and no dvc.lock (it has no integer stage of its own). `--readme-section` limits the README
checks to the lines under one heading (the demo's tables and the ablation's both show `student_unpaired`).

The models are the blocks of the metrics record that hold `rsum` (teacher, every trained model, chance): each
run's metrics_detail.json, the whole record (metrics.json keeps only its headline, each model's RSUM; a run from
before that split, whose metrics.json held the record, is read from its metrics.json).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys

import yaml

INTEGER_STAGES = ("demo_data", "prepare")
FLOAT_STAGES = ("extract",)
RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
AGREEMENT = ("teacher_cos_image", "teacher_cos_text")

# Another machine class: how many seed standard deviations a trained model may move (module docstring). The
# committed run's seed spread is measured on three seeds, so its sd is itself uncertain: 4 leaves room for that
# and for the ~20 figures checked at once. Measured against it: the demo rerun on an AMD EPYC against the Xeon
# run (2026-12) moved student_pairs' RSUM by 3.4 (tolerance 6.8) and no recall by more than its tolerance.
SIGMAS = 4.0
# The agreement with the teacher has no per-seed record: its tolerance stays the measured cross-machine spread
# (up to 0.025 between an AVX2 and an AVX-512 Xeon, 2026-11-24) with 2.5x room; a distilled student's agreement
# stays this far above the baseline's.
CROSS_MACHINE = {"agreement": 0.06, "min_agreement_gap": 0.04}
LATENCY_KEYS = ("latency",)  # measured timings: the only part of the record that may differ on the same class


def outs(lock: dict, stage: str) -> dict[str, str]:
    entry = lock["stages"].get(stage)
    if entry is None:
        return {}
    return {o["path"]: o.get("md5") or o.get("hash", "") for o in entry.get("outs", [])}


def compare_stage_outputs(old_lock: dict, new_lock: dict, stages: tuple[str, ...], failures: list[str]) -> bool:
    """Print and check that each stage's output hashes are reproduced; True when all are identical."""
    identical = True
    for stage in stages:
        old, new = outs(old_lock, stage), outs(new_lock, stage)
        if not old:
            failures.append(f"stage {stage}: missing from the committed dvc.lock")
        for path, digest in old.items():
            same = new.get(path) == digest
            identical &= same
            print(f"  {stage:10s} {path}: {'same' if same else f'CHANGED ({digest} -> {new.get(path)})'}")
            if not same:
                failures.append(f"stage {stage}: output {path} is not reproduced bit for bit")
    return identical


def check_value(name: str, old: float, new: float, tol: float, digits: int, failures: list[str]) -> None:
    """Print one committed/reproduced pair and record a failure when they differ by more than `tol`."""
    diff = abs(new - old)
    print(
        f"  {name:26s} committed {old:7.{digits}f} reproduced {new:7.{digits}f}  |diff| {diff:.{digits}f} "
        f"(tolerance {tol:.{digits}f})"
    )
    if diff > tol + 1e-9:
        failures.append(f"metrics {name}: {old} -> {new} (tolerance {tol:.{digits}f})")


def model_names(metrics: dict) -> list[str]:
    return [k for k, v in metrics.items() if isinstance(v, dict) and "rsum" in v]


def seed_tolerances(block: dict, per_query: dict[str, float]) -> dict[str, float] | None:
    """How far a trained model's recalls and RSUM may move on another machine class (module docstring), from
    the committed block's own seeds; None when it records fewer than two."""
    seeds = [v for v in (block.get("seeds") or {}).values() if isinstance(v, dict)]
    if len(seeds) < 2:
        return None
    scale = SIGMAS * math.sqrt(2 / len(seeds))
    recall_sd = math.sqrt(statistics.fmean(statistics.stdev(s[k] for s in seeds) ** 2 for k in RECALLS))
    tol = {k: max(scale * recall_sd, per_query[k[:3]]) for k in RECALLS}
    tol["rsum"] = max(scale * statistics.stdev(s["rsum"] for s in seeds), 3 * (per_query["i2t"] + per_query["t2i"]))
    return tol


def compare_metrics(
    old_m: dict, new_m: dict, same_class: bool, failures: list[str], reference: str = "baseline"
) -> list[str]:
    for key in ("dataset", "split", "n_images", "n_captions"):
        if old_m.get(key) != new_m.get(key):
            failures.append(f"metrics {key}: {old_m.get(key)!r} -> {new_m.get(key)!r}")
    per_query = {"i2t": 100.0 / max(old_m["n_images"], 1), "t2i": 100.0 / max(old_m["n_captions"], 1)}
    models = model_names(old_m)
    for model in models:
        if model not in new_m:
            failures.append(f"metrics: {model} missing from the reproduced run")
            continue
        if same_class or model == "chance":
            tol = dict.fromkeys((*RECALLS, "rsum"), 0.0)
        elif model == "teacher":  # a near tie flipped: one query of the direction
            tol = {k: per_query[k[:3]] for k in RECALLS} | {"rsum": 3 * (per_query["i2t"] + per_query["t2i"])}
        else:
            tol = seed_tolerances(old_m[model], per_query)
            if tol is None:
                failures.append(f"metrics: {model} records no seed spread (one seed): no tolerance on another machine")
                continue
        for key in (*RECALLS, "rsum"):
            check_value(f"{model}.{key}", old_m[model][key], new_m[model][key], tol[key], 2, failures)
        for key in AGREEMENT if AGREEMENT[0] in old_m[model] else ():
            check_value(
                f"{model}.{key}",
                old_m[model][key],
                new_m[model][key],
                0.0 if same_class else CROSS_MACHINE["agreement"],
                4,
                failures,
            )
        compare_intervals(model, old_m[model], new_m[model], failures)
    if same_class:
        compare_record(old_m, new_m, failures)
    check_claims(old_m, new_m, same_class, failures, reference)
    return models


def compare_intervals(model: str, old: dict, new: dict, failures: list[str]) -> None:
    """Each committed interval of the model's RSUM difference to a reference (`rsum_vs_<ref>`) is reproduced
    with an overlapping interval (the same class: compare_record checks them exactly)."""
    for key, old_iv in old.items():
        if not key.startswith("rsum_vs_") or not isinstance(old_iv, dict):
            continue
        new_iv = new.get(key)
        if not isinstance(new_iv, dict):
            failures.append(f"metrics: {model}.{key} missing from the reproduced run")
            continue
        print(
            f"  {model + '.' + key:26s} committed {old_iv['diff']:+.1f} ({old_iv['low']:+.1f} .. {old_iv['high']:+.1f}) "
            f"reproduced {new_iv['diff']:+.1f} ({new_iv['low']:+.1f} .. {new_iv['high']:+.1f})"
        )
        if new_iv["low"] > old_iv["high"] or new_iv["high"] < old_iv["low"]:
            failures.append(f"metrics: {model}.{key}: the reproduced 95% interval does not overlap the committed one")


def compare_record(old: object, new: object, failures: list[str], path: str = "") -> None:
    """The same machine class: every figure of the two records equal, the measured latencies aside."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if not path and key in LATENCY_KEYS:
                continue
            if key not in old or key not in new:
                where = "reproduced" if key in new else "committed"
                failures.append(f"metrics {path}{key}: only in the {where} run")
            else:
                compare_record(old[key], new[key], failures, f"{path}{key}.")
    elif old != new:
        failures.append(f"metrics {path[:-1]}: {old!r} -> {new!r} (the same machine class: must be identical)")


def check_claims(old_m: dict, new_m: dict, same_class: bool, failures: list[str], reference: str = "baseline") -> None:
    """What the demo claims, on any machine: distilled students agree with the teacher more than the baseline;
    a committed interval against `reference` above 0 stays above 0 (on another machine class: the headline's,
    the trained model with the largest committed gain; the others keep a positive difference)."""
    baseline = new_m.get("baseline")
    iv_key = f"rsum_vs_{reference}"
    gains = {m: v[iv_key] for m, v in old_m.items() if isinstance(v, dict) and v.get(iv_key)}
    students = [m for m in gains if m != "teacher"]
    headline = max(students, key=lambda m: gains[m]["diff"]) if students else None
    for model in model_names(new_m):
        if model.startswith("student") and baseline and AGREEMENT[0] in baseline:
            for key in AGREEMENT:
                gap = new_m[model][key] - baseline[key]
                if gap < CROSS_MACHINE["min_agreement_gap"]:
                    failures.append(
                        f"metrics: {model} {key} {new_m[model][key]} is not above the baseline's "
                        f"{baseline[key]} by {CROSS_MACHINE['min_agreement_gap']}"
                    )
        old_iv = gains.get(model)
        new_iv = new_m[model].get(iv_key)
        if not (old_iv and old_iv["low"] > 0):
            continue
        if same_class or model in (headline, "teacher"):
            if not (new_iv and new_iv["low"] > 0):
                shown = f"{new_iv['low']:.1f} .. {new_iv['high']:.1f}" if new_iv else "none"
                failures.append(f"metrics: {model} RSUM - {reference} 95% interval is no longer above 0 ({shown})")
        elif not (new_iv and new_iv["diff"] > 0):
            shown = f"{new_iv['diff']:+.1f}" if new_iv else "none"
            failures.append(f"metrics: {model} RSUM - {reference} is no longer positive ({shown})")


README_LABELS = {"teacher": "teacher"}  # the README's first cell of each model's row (default: the model name)


def readme_section(readme: str, heading: str | None) -> list[str]:
    """The README's lines under `heading` (a whole line, e.g. `## The built-in demo`) up to the next heading of
    any level; all of it when heading is None; [] when the heading is not there."""
    lines = readme.splitlines()
    if heading is None:
        return lines
    if heading not in lines:
        return []
    rest = lines[lines.index(heading) + 1 :]
    end = next((i for i, line in enumerate(rest) if line.startswith("#")), len(rest))
    return rest[:end]


INTERVAL_COLUMN = re.compile(r"^RSUM - (\w+) \(95% CI\)$")  # metrics.md's header of each reference's interval


def compare_readme(
    readme: str, metrics: dict, failures: list[str], reference: str = "baseline", heading: str | None = None
) -> None:
    """The README's demo table (made from metrics.md; under `heading`): each model's recalls, RSUM and average to
    0.1, and its RSUM difference with the interval to each reference the table has a column for (`RSUM - NAME
    (95% CI)`; `reference` among them), against the committed metrics."""
    section = readme_section(readme, heading)
    if heading is not None and not section:
        failures.append(f"README: no section {heading!r}")
        return
    headers = [line for line in section if line.startswith("| model |")]
    if len(headers) != 1:
        failures.append(f"README: expected one demo table header starting '| model |', found {len(headers)}")
        return
    header = [c.strip() for c in headers[0].strip().strip("|").split("|")][1:]
    fixed = len(RECALLS) + 2  # the recalls, RSUM, average
    columns = {i: m.group(1) for i, c in enumerate(header) if i >= fixed and (m := INTERVAL_COLUMN.match(c))}
    if reference not in columns.values():
        failures.append(f"README: the demo table has no column 'RSUM - {reference} (95% CI)'")
    for model in model_names(metrics):
        prefix = f"| {README_LABELS.get(model, model)} |"
        lines = [line for line in section if line.startswith(prefix)]
        if len(lines) != 1:
            failures.append(f"README: expected one demo table row starting {prefix!r}, found {len(lines)}")
            continue
        cells = [c.strip() for c in lines[0][len(prefix) :].strip().strip("|").split("|")]
        shown = cells[:fixed]
        expected = [f"{metrics[model][k]:.1f}" for k in (*RECALLS, "rsum", "average_score")]
        for i, ref in columns.items():
            iv = metrics[model].get(f"rsum_vs_{ref}")
            shown.append(cells[i] if i < len(cells) else "")
            expected.append(f"{iv['diff']:+.1f} ({iv['low']:+.1f} .. {iv['high']:+.1f})" if iv else "-")
        if shown != expected:
            failures.append(
                f"README: the {model} row shows {' | '.join(shown)}; the metrics record has {' | '.join(expected)}"
            )


GALLERY_TABLE = "| RSUM per style gallery |"  # the README's per-gallery table: a model per column, a gallery per row


def compare_readme_galleries(readme: str, metrics: dict, failures: list[str], heading: str | None = None) -> None:
    """The README's RSUM per style gallery (a row per gallery, named by a label whose first word is the gallery,
    e.g. `Twemoji (captioned ...)`; a column per model; under `heading`) against the committed per-gallery
    figures."""
    groups = list((metrics.get("teacher") or {}).get("groups") or {})
    lines = readme_section(readme, heading)
    starts = [i for i, line in enumerate(lines) if line.startswith(GALLERY_TABLE)]
    if not groups:
        return
    if len(starts) != 1:
        failures.append(f"README: expected one table starting {GALLERY_TABLE!r}, found {len(starts)}")
        return
    header = [c.strip() for c in lines[starts[0]].strip().strip("|").split("|")][1:]
    rows = {}
    for line in lines[starts[0] + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0].split()[0].lower() if cells[0] else ""] = cells[1:]
    for group in groups:
        if group not in rows:
            failures.append(f"README: the per-gallery table has no row for the gallery {group!r}")
            continue
        expected = [f"{metrics[m]['groups'][group]['rsum']:.1f}" if m in metrics else "?" for m in header]
        if rows[group] != expected:
            failures.append(
                f"README: the {group} gallery row shows {' | '.join(rows[group])}; the metrics record has "
                f"{' | '.join(expected)} (columns {', '.join(header)})"
            )
    missing = [m for m in model_names(metrics) if m not in header]
    if missing:
        failures.append(f"README: the per-gallery table has no column for {', '.join(missing)}")


def environment(metrics: dict, run_info_path: str | None) -> dict | None:
    """Where a run was computed: run_info.json's `environment` (older runs kept it in metrics.json)."""
    if run_info_path:
        try:
            with open(run_info_path) as f:
                return json.load(f).get("environment")
        except FileNotFoundError:
            pass
    return metrics.get("environment")


def main() -> int:
    ap = argparse.ArgumentParser()
    for name in ("committed-lock", "reproduced-lock"):
        ap.add_argument(f"--{name}", help="that run's dvc.lock (both or neither: the ablation has no integer stage)")
    for name in ("committed-metrics", "reproduced-metrics"):
        ap.add_argument(f"--{name}", required=True, help="that run's metrics_detail.json (the whole record)")
    for name in ("committed-run-info", "reproduced-run-info"):
        ap.add_argument(f"--{name}", help="run_info.json of that run (where it was computed)")
    ap.add_argument("--readme", help="check that this README's demo tables show the committed metrics")
    ap.add_argument("--readme-section", help="the heading (whole line) whose tables are checked (default: anywhere)")
    ap.add_argument("--reference", default="baseline", help="the model the intervals are against (compare_to)")
    ap.add_argument(
        "--inputs",
        nargs=3,
        metavar=("STAGES", "COMMITTED_LOCK", "REPRODUCED_LOCK"),
        help="bit for bit only when the outputs of each of STAGES (comma-separated) are the same in both dvc.lock "
        "files (else within the seed spread)",
    )
    a = ap.parse_args()
    if (a.committed_lock is None) != (a.reproduced_lock is None):
        ap.error("--committed-lock and --reproduced-lock go together")
    failures: list[str] = []

    old_m, new_m = (json.load(open(p)) for p in (a.committed_metrics, a.reproduced_metrics))
    old_env, new_env = environment(old_m, a.committed_run_info), environment(new_m, a.reproduced_run_info)
    for which, env in (("committed", old_env), ("reproduced", new_env)):
        if env is None:  # without it no tolerance can be chosen honestly
            failures.append(f"the {which} run records no environment (run_info.json): cannot tell its machine class")
    same_class = old_env is not None and old_env == new_env
    if same_class and a.inputs and not inputs_reproduced(*a.inputs):
        # the runs read an input that this run did not reproduce bit for bit: another draw of the same experiment
        print(f"the {a.inputs[0]} stages' outputs differ from the committed run's: compared as another machine class")
        same_class = False
    if same_class:
        print(
            f"same machine class as the committed run ({new_env['cpu']}, {new_env['cpu_id']}): "
            "every output and recall must be identical"
        )
    else:
        print("another machine class than the committed run: float stages within the measured cross-machine spread")
        for key in sorted(set(old_env or {}) | set(new_env or {})):
            old_v, new_v = (old_env or {}).get(key), (new_env or {}).get(key)
            if old_v != new_v:
                print(f"  environment {key}: committed {old_v!r}, here {new_v!r}")

    if a.committed_lock is None:
        print("no dvc.lock given: the stages' outputs are not compared, only the metrics")
    else:
        compare_locks(a.committed_lock, a.reproduced_lock, same_class, failures)
    models = compare_metrics(old_m, new_m, same_class, failures, a.reference)
    if a.readme:
        readme = open(a.readme, encoding="utf-8").read()
        compare_readme(readme, old_m, failures, a.reference, a.readme_section)
        compare_readme_galleries(readme, old_m, failures, a.readme_section)

    if failures:
        print("demo reproduction FAILED:")
        for f in failures:
            print("  - " + f)
        return 1
    how = "bit for bit" if same_class else "within the cross-machine tolerances"
    stages = "integer stages identical, " if a.committed_lock else ""
    print(f"demo reproduction OK ({how}): {stages}metrics of {', '.join(models)} reproduced")
    return 0


def inputs_reproduced(stages: str, committed: str, reproduced: str) -> bool:
    """Whether the outputs of each of `stages` (comma-separated) have the same hashes in the two dvc.lock files."""
    old_lock, new_lock = (yaml.safe_load(open(p)) for p in (committed, reproduced))
    return all(
        bool(outs(old_lock, stage)) and outs(old_lock, stage) == outs(new_lock, stage) for stage in stages.split(",")
    )


def compare_locks(committed: str, reproduced: str, same_class: bool, failures: list[str]) -> None:
    old_lock, new_lock = (yaml.safe_load(open(p)) for p in (committed, reproduced))
    compare_stage_outputs(old_lock, new_lock, INTEGER_STAGES, failures)
    if same_class:
        compare_stage_outputs(old_lock, new_lock, FLOAT_STAGES, failures)
    else:
        ignored: list[str] = []
        compare_stage_outputs(old_lock, new_lock, FLOAT_STAGES, ignored)
        if ignored:
            print(
                "  (extract differs in the last bits on another machine class: checked through the teacher's recalls)"
            )


if __name__ == "__main__":
    sys.exit(main())
