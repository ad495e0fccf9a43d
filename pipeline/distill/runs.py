"""`distill.runs`: the models a pipeline trains, as named variants of the `distill` section x seeds.

```yaml
distill:
  ...                # the settings every variant shares
  runs:
    seeds: [0, 1, 2]
    variants:
      student_unpaired: {overrides: {unpaired_images_per_step: 64}}
      student_pairs: {}
      baseline: {baseline: true}   # pairs-only InfoNCE (distill.baseline_loss), no teacher
```

dvc.yaml's `distill` stage is one definition with `matrix: {variant: ${distill.runs.variants},
seed: ${distill.runs.seeds}}`, so params.yaml stays the one place a variant is defined; each run trains
`kdpipe distill --variant NAME --seed S` into `<workdir>/models/NAME-sS/` (pipeline.paths). A variant's
`overrides` are keys of the `distill` section (nested as in the section); the merged section is then checked by
DistillConfig like any other, so a typo in a variant fails with its full key.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import from_dict
from pipeline.errors import ConfigError

RUNS_KEY = "runs"


@dataclass(frozen=True)
class VariantConfig:
    """One entry of `distill.runs.variants`."""

    baseline: bool = False  # train without the teacher: distill.baseline_loss on the pairs alone
    overrides: dict[str, Any] = field(default_factory=dict)  # distill keys that differ for this variant


@dataclass(frozen=True)
class RunsConfig:
    """Section `distill.runs`."""

    seeds: tuple[int, ...] = (0,)
    variants: dict[str, VariantConfig] = field(default_factory=dict)
    compare_to: str = "baseline"  # the variant every other model's difference is measured against (evaluate)

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds must be distinct non-negative integers, got {list(self.seeds)}")
        for name in self.variants:
            if not name or not name.replace("_", "").isalnum() or name == "teacher":
                raise ValueError(f"variants: {name!r} is not a usable name (letters, digits, '_'; not 'teacher')")
        if self.variants and self.compare_to not in self.variants:
            raise ValueError(f"compare_to {self.compare_to!r} is not one of the variants {list(self.variants)}")

    def run_names(self) -> dict[str, list[str]]:
        """{variant: [its run directory names, one per seed]}."""
        return {v: [run_name(v, s) for s in self.seeds] for v in self.variants}


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def split_runs(section: Mapping[str, Any] | None) -> tuple[RunsConfig | None, dict[str, Any]]:
    """The raw `distill` section -> (its typed `runs`, or None when absent; the section without it)."""
    rest = dict(section or {})
    raw = rest.pop(RUNS_KEY, None)
    return (None if raw is None else from_dict(RunsConfig, raw, f"distill.{RUNS_KEY}")), rest


def variant_section(section: Mapping[str, Any] | None, variant: str, seed: int) -> tuple[dict[str, Any], bool]:
    """The raw `distill` section one run trains with (the variant's overrides merged in, `seed` set), and whether
    it is a baseline. A variant or seed that `distill.runs` does not list is a ConfigError."""
    runs, rest = split_runs(section)
    if runs is None or variant not in runs.variants:
        known = list(runs.variants) if runs else []
        raise ConfigError(f"distill.{RUNS_KEY}.variants: no variant {variant!r}; defined: {known}")
    if seed not in runs.seeds:
        raise ConfigError(f"distill.{RUNS_KEY}.seeds: {seed} is not one of {list(runs.seeds)}")
    v = runs.variants[variant]
    merged = _deep_merge(rest, v.overrides)
    merged["seed"] = seed
    return merged, v.baseline


def _deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


__all__ = ["RunsConfig", "VariantConfig", "run_name", "split_runs", "variant_section"]
