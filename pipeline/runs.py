"""`distill.runs`: the models a pipeline trains, as named variants of the `distill` section x seeds.

```yaml
distill:
  ...                # the settings every variant shares
  runs:
    seeds: [0, 1, 2]
    variants:
      student: {overrides: {unpaired_images_per_step: 64, loss: {relation: 1.0, intra_relation: 1.0}}}
      student_unpaired: {overrides: {unpaired_images_per_step: 64}}
      baseline: {baseline: true}   # pairs-only InfoNCE (distill.baseline_loss), no teacher
    compare_to: [baseline, student_unpaired]
```

dvc.yaml's `distill` stage is one definition with `matrix: {variant: ${distill.runs.variants},
seed: ${distill.runs.seeds}}`, so params.yaml stays the one place a variant is defined; each run trains
`kdpipe distill --variant NAME --seed S` into `<workdir>/models/NAME-sS/` (pipeline.paths). A variant's
`overrides` are keys of the `distill` section (nested as in the section); the merged section is then checked by
DistillConfig like any other, so a typo in a variant fails with its full key. `compare_to` names the variant (or
the list of variants) every other model is measured against by evaluate's paired bootstrap.

An ablation (`AblationConfig`, a params file of its own: the demo's is ablation/params.yaml, run by
ablation/dvc.yaml) is a second set of runs over the same data: each of its variants is one variant of
`distill.runs` (`base`) plus overrides of its own, trained with the same seeds into the ablation's work directory;
its evaluation shows the base's own runs (trained by the main pipeline, not again) beside them:

```yaml
ablation:
  workdir: artifacts/emoji-ablation   # its models, curves and metrics (the data: params.yaml's workdir)
  base: student_unpaired              # a variant of distill.runs; compared with each row by default
  seeds: [0, 1, 2]                    # seeds of distill.runs: the base's runs are the main pipeline's
  variants:
    lemkd: {overrides: {loss: {response: 1.0}}}   # = base + these keys of the distill section
  mine: {cross_encoder: {...}}        # optional: its own mined store, <workdir>/mined.zarr (kdpipe mine --ablation)
  fit_teacher: {backbone: lite0}      # optional: heads of another teacher, <workdir>/teacher (kdpipe fit-teacher --ablation)
  extract: {extra_teachers: {...}}    # optional: its own feature store, <workdir>/features.zarr (kdpipe extract --ablation)
```
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
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
    # the variant(s) every other model's difference is measured against (evaluate), in this order
    compare_to: tuple[str, ...] | str = "baseline"

    def __post_init__(self) -> None:
        _check_seeds(self.seeds)
        for name in self.variants:
            _check_name(name)
        object.__setattr__(self, "compare_to", _references(self.compare_to))
        missing = [r for r in self.compare_to if r not in self.variants]
        if self.variants and (missing or not self.compare_to):
            name = missing[0] if missing else None
            raise ValueError(f"compare_to {name!r} is not one of the variants {list(self.variants)}")

    def run_names(self) -> dict[str, list[str]]:
        """{variant: [its run directory names, one per seed]}."""
        return {v: [run_name(v, s) for s in self.seeds] for v in self.variants}


@dataclass(frozen=True)
class AblationConfig:
    """Section `ablation` of an ablation's params file (module docstring)."""

    workdir: Path  # where its models, curves and metrics go; the data is read from the main params' workdir
    base: str  # a variant of distill.runs: every variant here is it plus its own overrides
    seeds: tuple[int, ...]  # each a seed of distill.runs (the base's runs are the main pipeline's)
    variants: dict[str, VariantConfig]
    compare_to: tuple[str, ...] | str = ()  # () = the base; else these models (base or variants), in this order
    # keys of params.yaml's `mine` section. Empty: the runs read the main pipeline's mined store (if any setting
    # reads one). Set: `kdpipe mine --ablation` mines <workdir>/mined.zarr with them, and the runs read that store
    # (the demo's: the same neighbours, plus the demo cross-encoder's scores, which only its mcad row reads)
    mine: dict[str, Any] = field(default_factory=dict)
    # keys of params.yaml's `fit_teacher` section: `kdpipe fit-teacher --ablation` fits the heads of a teacher of
    # its own into <workdir>/teacher (the demo's: a second dual-stream teacher on another frozen image backbone)
    fit_teacher: dict[str, Any] = field(default_factory=dict)
    # keys of params.yaml's `extract` section. Set: `kdpipe extract --ablation` writes <workdir>/features.zarr with
    # them (the main teacher's rows copied from the main store, bit for bit; e.g. other teachers beside them), and
    # the runs read that store
    extract: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_seeds(self.seeds)
        if not self.variants:
            raise ValueError("variants: an ablation needs at least one variant")
        for name, v in self.variants.items():
            _check_name(name)
            if v.baseline:
                raise ValueError(
                    f"variants.{name}: baseline is not for an ablation (its variants are base + overrides)"
                )
        if self.base in self.variants:
            raise ValueError(f"variants: {self.base!r} is the base; name the variants after what they add")
        object.__setattr__(self, "compare_to", _references(self.compare_to) or (self.base,))
        models = [self.base, *self.variants]
        missing = [r for r in self.compare_to if r not in models]
        if missing:
            raise ValueError(f"compare_to {missing[0]!r} is not one of the models {models}")

    def checked_against(self, runs: RunsConfig | None) -> AblationConfig:
        """Itself, when `base` and `seeds` are those of the main params' distill.runs; else a ValueError."""
        if runs is None or self.base not in runs.variants:
            known = list(runs.variants) if runs else []
            raise ValueError(f"base {self.base!r} is not a variant of distill.runs {known}")
        if runs.variants[self.base].baseline:
            raise ValueError(f"base {self.base!r} is a baseline (no teacher): an ablation adds to a distilled run")
        other = [s for s in self.seeds if s not in runs.seeds]
        if other:
            raise ValueError(f"seeds: {other[0]} is not a seed of distill.runs {list(runs.seeds)}")
        return self

    def run_names(self) -> dict[str, list[str]]:
        """{model: [its run directory names, one per seed]}: the base first, then the variants."""
        return {v: [run_name(v, s) for s in self.seeds] for v in (self.base, *self.variants)}


def _check_seeds(seeds: tuple[int, ...]) -> None:
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must be distinct non-negative integers, got {list(seeds)}")


def _check_name(name: str) -> None:
    if not name or not name.replace("_", "").isalnum() or name == "teacher":
        raise ValueError(f"variants: {name!r} is not a usable name (letters, digits, '_'; not 'teacher')")


def _references(value: tuple[str, ...] | str) -> tuple[str, ...]:
    refs = (value,) if isinstance(value, str) else tuple(value)
    if len(set(refs)) != len(refs):
        raise ValueError(f"compare_to names a model twice: {list(refs)}")
    return refs


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


def ablation_section(
    section: Mapping[str, Any] | None, ablation: AblationConfig, variant: str, seed: int
) -> dict[str, Any]:
    """The raw `distill` section one ablation run trains with: the base variant's section (`variant_section`)
    with the ablation variant's overrides merged in. An unknown variant or seed is a ConfigError."""
    runs, _ = split_runs(section)
    try:
        ablation.checked_against(runs)
    except ValueError as err:
        raise ConfigError(f"ablation: {err}") from None
    if variant not in ablation.variants:
        raise ConfigError(f"ablation.variants: no variant {variant!r}; defined: {list(ablation.variants)}")
    if seed not in ablation.seeds:
        raise ConfigError(f"ablation.seeds: {seed} is not one of {list(ablation.seeds)}")
    base, _ = variant_section(section, ablation.base, seed)
    return _deep_merge(base, ablation.variants[variant].overrides)


# what an ablation's own stage of that name writes instead of reading the main pipeline's
_OWN_OUTPUT = {"mine": "mined store", "fit_teacher": "teacher heads", "extract": "feature store"}


def ablation_stage_section(name: str, section: Mapping[str, Any] | None, ablation: AblationConfig) -> dict[str, Any]:
    """The raw section `name` (mine, fit_teacher, extract) an ablation's own stage runs with: params.yaml's, the
    ablation's keys of that name merged in; a ConfigError when the ablation sets none (its runs read the main
    pipeline's output)."""
    extra = getattr(ablation, name)
    if not extra:
        raise ConfigError(
            f"ablation.{name} is empty: this ablation's runs read the main pipeline's {_OWN_OUTPUT[name]}"
        )
    return _deep_merge(section or {}, extra)


def _deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


__all__ = [
    "AblationConfig",
    "RunsConfig",
    "VariantConfig",
    "ablation_section",
    "ablation_stage_section",
    "run_name",
    "split_runs",
    "variant_section",
]
