"""Compare a reproduced demo run with the committed one.

- Deterministic stages (demo data, prepare, extract): every output hash in dvc.lock must be identical.
- Metrics: each recall may differ by at most one query of its direction (100/N_images for i2t,
  100/N_captions for t2i: a single near-tie flipping on another CPU's float rounding), rsum by at most
  the sum of those; dataset sizes must be equal. Anything larger is a real change and fails.
"""
from __future__ import annotations

import argparse
import json
import sys

import yaml

DETERMINISTIC_STAGES = ("demo_data", "prepare", "extract")
RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def outs(lock: dict, stage: str) -> dict[str, str]:
    entry = lock["stages"].get(stage)
    if entry is None:
        return {}
    return {o["path"]: o.get("md5") or o.get("hash", "") for o in entry.get("outs", [])}


def main() -> int:
    ap = argparse.ArgumentParser()
    for name in ("committed-lock", "reproduced-lock", "committed-metrics", "reproduced-metrics"):
        ap.add_argument(f"--{name}", required=True)
    a = ap.parse_args()
    failures: list[str] = []

    old_lock, new_lock = (yaml.safe_load(open(p)) for p in (a.committed_lock, a.reproduced_lock))
    for stage in DETERMINISTIC_STAGES:
        old, new = outs(old_lock, stage), outs(new_lock, stage)
        if not old:
            failures.append(f"stage {stage}: missing from the committed dvc.lock")
        for path, digest in old.items():
            status = "same" if new.get(path) == digest else f"CHANGED ({digest} -> {new.get(path)})"
            print(f"  {stage:10s} {path}: {status}")
            if new.get(path) != digest:
                failures.append(f"stage {stage}: output {path} is not reproduced bit for bit")

    old_m, new_m = (json.load(open(p)) for p in (a.committed_metrics, a.reproduced_metrics))
    for key in ("dataset", "split", "n_images", "n_captions"):
        if old_m.get(key) != new_m.get(key):
            failures.append(f"metrics {key}: {old_m.get(key)!r} -> {new_m.get(key)!r}")
    per_query = {"i2t": 100.0 / max(old_m["n_images"], 1), "t2i": 100.0 / max(old_m["n_captions"], 1)}
    models = [m for m in ("teacher", "student", "baseline") if m in old_m]
    for model in models:
        if model not in new_m:
            failures.append(f"metrics: {model} missing from the reproduced run")
            continue
        rsum_tol = 0.0
        for key in RECALLS:
            tol = per_query[key[:3]] + 1e-6
            rsum_tol += tol
            diff = abs(new_m[model][key] - old_m[model][key])
            print(f"  {model:8s} {key:7s} committed {old_m[model][key]:7.2f} reproduced {new_m[model][key]:7.2f}"
                  f"  |diff| {diff:.2f} (tolerance {tol:.2f})")
            if diff > tol:
                failures.append(f"metrics {model}.{key}: {old_m[model][key]} -> {new_m[model][key]} (tolerance {tol:.2f})")
        diff = abs(new_m[model]["rsum"] - old_m[model]["rsum"])
        if diff > rsum_tol:
            failures.append(f"metrics {model}.rsum: {old_m[model]['rsum']} -> {new_m[model]['rsum']} (tolerance {rsum_tol:.2f})")

    if failures:
        print("demo reproduction FAILED:")
        for f in failures:
            print("  - " + f)
        return 1
    print(f"demo reproduction OK: deterministic stages identical, metrics of {', '.join(models)} within tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
