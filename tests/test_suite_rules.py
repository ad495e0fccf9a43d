"""Rules of the test suite itself, read from the test files' syntax trees:

- a skip for a missing package names an optional package, never kdpipe's own code (pipeline, stages, the test
  helpers, bench/) nor a package kdpipe requires: a broken import of those must fail, not turn into a skip;
- no test module skips as a whole (a module-level importorskip or skip, a `pytestmark` that skips): the skip
  goes on the tests that need the package, so that every other test of the module still runs without it
  (`KDPIPE_TEST_WITHOUT=demo python -m pytest` shows which tests those are, tests/conftest.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from extras import required_modules  # the modules of what kdpipe requires, transitively

ROOT = Path(__file__).resolve().parent.parent
TEST_FILES = sorted((ROOT / "tests").glob("*.py"))
SKIPS = {"importorskip", "skip"}
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}


def own_modules() -> set[str]:
    """The top-level names kdpipe's own code imports as: its packages, the test helpers, the bench scripts."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    return packages | {p.stem for p in TEST_FILES} | {p.stem for p in (ROOT / "bench").glob("*.py")}


def is_pytest_call(node: ast.AST, names: set[str]) -> bool:
    """`pytest.<name>(...)` for a name in `names`."""
    f = node.func if isinstance(node, ast.Call) else None
    return isinstance(f, ast.Attribute) and f.attr in names and isinstance(f.value, ast.Name) and f.value.id == "pytest"


def skipped_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module) of every module a skip depends on: importorskip's argument, and the imports inside a
    `try` whose ImportError handler skips."""
    found = []
    for node in ast.walk(tree):
        if is_pytest_call(node, {"importorskip"}) and node.args and isinstance(node.args[0], ast.Constant):
            found.append((node.lineno, node.args[0].value))
        if isinstance(node, ast.Try):
            catches = {
                n.id for h in node.handlers if h.type is not None for n in ast.walk(h.type) if isinstance(n, ast.Name)
            }
            skips = any(is_pytest_call(n, SKIPS) for h in node.handlers for n in ast.walk(h))
            if catches & IMPORT_ERRORS and skips:
                for n in (n for stmt in node.body for n in ast.walk(stmt)):
                    if isinstance(n, ast.Import):
                        found += [(n.lineno, a.name) for a in n.names]
                    elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
                        found.append((n.lineno, n.module))
    return found


def module_level_skips(tree: ast.Module) -> list[int]:
    """Lines where a whole module is skipped: a skip call outside any function or class, or a pytestmark that
    holds a skip / skipif mark."""
    lines = []
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        lines += [n.lineno for n in ast.walk(stmt) if is_pytest_call(n, SKIPS)]
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in targets):
            marks = [n for n in ast.walk(stmt) if isinstance(n, ast.Attribute) and n.attr in ("skip", "skipif")]
            lines += [n.lineno for n in marks]
    return lines


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_a_broken_import_of_kdpipe_or_of_a_required_package_fails_instead_of_skipping():
    forbidden = own_modules() | required_modules()
    assert {"pipeline", "stages", "deploy_helpers", "torch", "zarr", "yaml"} <= forbidden  # the lists are read
    bad = [
        f"{path.name}:{line}: skips when {module!r} does not import"
        for path in TEST_FILES
        for line, module in skipped_imports(parsed(path))
        if module.split(".")[0] in forbidden
    ]
    assert not bad, "a skip hides a broken import of kdpipe or of a package it requires:\n" + "\n".join(bad)


def test_no_test_module_is_skipped_as_a_whole():
    bad = [f"{path.name}:{line}" for path in TEST_FILES for line in module_level_skips(parsed(path))]
    assert not bad, "a module-level skip (put it on the tests that need the package):\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "source, skipped, whole_module",
    [
        ('pytest.importorskip("pipeline.data.readers")\n', ["pipeline.data.readers"], True),
        ('def test_x():\n    m = pytest.importorskip("skimage.data")\n', ["skimage.data"], False),
        ("try:\n    import zarr\nexcept ImportError:\n    pytest.skip('no zarr', allow_module_level=True)\n", ["zarr"], True),
        ("pytestmark = [pytest.mark.usefixtures('x'), pytest.mark.skipif(True, reason='r')]\n", [], True),
        ("pytestmark = pytest.mark.usefixtures('one_thread')\n", [], False),
        ("@pytest.mark.skipif(True, reason='r')\ndef test_x():\n    pass\n", [], False),
    ],
)  # fmt: skip
def test_the_rules_see_each_form(source, skipped, whole_module):
    """The two checks above on small sources: what they must find, and what they must leave alone."""
    tree = ast.parse(source)
    assert [m for _, m in skipped_imports(tree)] == skipped
    assert bool(module_level_skips(tree)) == whole_module
