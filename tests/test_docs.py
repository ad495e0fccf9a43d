"""The documentation holds: every document or section that the code, configs, dvc.yaml, CI scripts and docs cite
exists, and the README's Python snippet runs as written.

Citation forms recognised (`cited_targets`), each checked against the repository as it is:
- a path under docs/ (`docs/store-format.md`, `docs/architecture`), optionally with `#anchor` or followed by a
  quoted section (`docs/method.md "DCD"`, `docs/method.md, "DCD"`): the file (or directory) and that heading;
- the README with a section: `README "How it works"`, `README, "Evaluation"`, `README: "X"`, `README.md#anchor`,
  or unquoted inside parentheses, `(README: Using the student)`;
- a Markdown link `[text](path#anchor)` in a .md file, resolved from that file's directory;
- a bare document name (`methods.md`, `beit3.md "X"`): it must be a file of the repository's root or docs/, or
  one of the file names kdpipe writes (OUTPUT_NAMES);
- the developers' reference folder outside the repository (`shared/reference/methods.md`): one of the files it
  holds (SHARED_FILES), checked on disk too where the folder is present beside or inside the checkout.
A section matches a heading of the cited file (case and surrounding backticks aside); an anchor matches a
heading's GitHub slug.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from deploy_helpers import tiny_student
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCANNED_SUFFIXES = {".py", ".yaml", ".yml", ".toml", ".md", ".txt", ".cfg", ".sh"}
SCANNED_SCRIPTS = {".ci/run", "bench/run", "bench/gpu_check"}  # scripts without a suffix
SKIPPED_DIRS = {".git", ".venv", ".dvc", "artifacts", "data", "__pycache__", ".ruff_cache", "dvc_plots", "bench/data"}
# Names that look like documents but are files kdpipe (or a test fixture) writes, not documents cited:
OUTPUT_NAMES = {
    "README.md",  # the model card `kdpipe export` writes (pipeline/deploy/card.py)
    "metrics.md",  # evaluate's table (pipeline/evaluate/outputs.py)
    "notes.md",  # a non-image file in tests/test_formats.py's folder dataset
}
# The developers' reference folder (`shared/`: design notes and method references every developer and CI run
# has at hand, not part of the repository).
SHARED_FILES = {
    "design/architecture.md",
    "reference/beit3.md",
    "reference/dsmd.md",
    "reference/methods.md",
    "reference/retrieval-protocol.md",
    "reference/offline-assets.md",
    "reference/performance.md",
}

_DOC_PATH = re.compile(r"(?<![\w./-])(docs/[\w./-]*[\w-])(?:(#[\w-]+)|(?:,\s*|\s+)\"([^\"\n]+)\")?")
_README = re.compile(r"(?<![\w./-])README(?:\.md)?(?:(#[\w-]+)|(?:,\s*|:\s*|\s+)\"([^\"\n]+)\")")
_README_UNQUOTED = re.compile(r"\(README: ([^()\"\n]+)\)")
_BARE_DOC = re.compile(r"(?<![\w./-])(?<!\]\()([\w-]+\.md)\b(?:(?:,\s*|\s+)\"([^\"\n]+)\")?")
_SHARED = re.compile(r"(?<![\w.-])(?:\.\./)?shared/((?:design|reference)/[\w.-]+\.md)")
_MD_LINK = re.compile(r"\]\(([^()\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(path: Path) -> list[str]:
    """The headings of a Markdown file (outside code blocks), without their #s and backticks."""
    out, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            out.append(line.lstrip("#").strip().replace("`", ""))
    return out


def _norm(text: str) -> str:
    return " ".join(text.replace("`", "").split()).lower()


def check_target(path: Path, anchor: str | None, section: str | None) -> str | None:
    """Why a citation of `path` (with an optional #anchor or section) dangles, or None."""
    if not path.exists():
        return "no such file"
    if (anchor or section) and path.is_dir():
        return "a directory has no sections"
    if anchor and anchor[1:] not in {slug(h) for h in headings(path)}:
        return f"no heading with anchor {anchor}"
    if section and _norm(section) not in {_norm(h) for h in headings(path)}:
        return f'no section "{section}"'
    return None


def shared_dir(repo: Path) -> Path | None:
    """The developers' reference folder, where this checkout has one beside or inside it."""
    for candidate in (repo / "shared", repo.parent / "shared", repo.parent.parent / "shared"):
        if (candidate / "reference").is_dir():
            return candidate
    return None


def dangling(text: str, source: Path, repo: Path) -> list[str]:
    """Every citation in `text` (the contents of `source`) whose document or section does not exist."""
    problems: list[str] = []

    def report(cited: str, why: str | None) -> None:
        if why:
            problems.append(f"{source.relative_to(repo)}: {cited}: {why}")

    for m in _DOC_PATH.finditer(text):
        path = m.group(1).rstrip(".")
        report(m.group(0), check_target(repo / path, m.group(2), m.group(3)))
    for m in _README.finditer(text):
        report(m.group(0), check_target(repo / "README.md", m.group(1), m.group(2)))
    for m in _README_UNQUOTED.finditer(text):
        report(m.group(0), check_target(repo / "README.md", None, m.group(1)))
    for m in _BARE_DOC.finditer(text):
        name, section = m.group(1), m.group(2)
        if name in OUTPUT_NAMES and not section:
            continue
        found = [p for p in (repo / name, repo / "docs" / name, source.parent / name) if p.is_file()]
        report(m.group(0), check_target(found[0], None, section) if found else "no such document in the repository")
    shared = shared_dir(repo)
    for m in _SHARED.finditer(text):
        if m.group(1) not in SHARED_FILES:
            report(m.group(0), "not a file of the reference folder")
        elif shared is not None:
            report(m.group(0), check_target(shared / m.group(1), None, None))
    if source.suffix == ".md":
        for m in _MD_LINK.finditer(text):
            target, _, anchor = m.group(1).partition("#")
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path = source.parent / target if target else source
            report(m.group(0), check_target(path, f"#{anchor}" if anchor else None, None))
    return problems


def scanned_files(repo: Path) -> list[Path]:
    files = []
    for path in sorted(repo.rglob("*")):
        rel = path.relative_to(repo).as_posix()
        if any(rel == d or rel.startswith(d + "/") for d in SKIPPED_DIRS) or ".egg-info" in rel:
            continue
        if rel == "tests/test_docs.py":  # this file plants dangling citations on purpose
            continue
        if path.is_file() and (path.suffix in SCANNED_SUFFIXES or rel in SCANNED_SCRIPTS):
            files.append(path)
    return files


def test_every_cited_document_and_section_exists():
    files = scanned_files(REPO)
    names = {p.relative_to(REPO).as_posix() for p in files}
    # the scan covers what cites: code, configs, the pipeline, CI, the README and every docs page
    assert {"dvc.yaml", "params.yaml", "README.md", ".ci/run", "pipeline/store/features.py"} <= names
    assert {p for p in names if p.startswith("docs/")} == {
        p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md")
    }
    problems = [problem for path in files for problem in dangling(path.read_text(errors="replace"), path, REPO)]
    assert not problems, "dangling citations:\n" + "\n".join(problems)


PLANTED = {
    "docs/architecture": "no such file",
    'docs/method.md "No such method"': "no section",
    "docs/method.md#no-such-anchor": "no heading with anchor",
    'README "How it does not work"': "no section",
    'README, "Nothing here"': "no section",
    "(README: nothing here either)": "no section",
    "README.md#nowhere": "no heading with anchor",
    'methods.md "DCD"': "no such document",
    "shared/reference/method.md": "not a file of the reference folder",
}


@pytest.mark.parametrize("citation,why", PLANTED.items())
def test_a_dangling_citation_of_each_form_is_reported(citation, why):
    """The checker against citations known to dangle, one per form, inside ordinary prose and code."""
    text = f"x = 1  # the layout is fixed by {citation}, which says why.\n"
    problems = dangling(text, REPO / "pipeline" / "example.py", REPO)
    assert len(problems) == 1 and why in problems[0], problems


def test_a_markdown_link_to_a_missing_page_or_heading_is_reported():
    source = REPO / "docs" / "example.md"
    assert dangling("[ok](method.md#dcd) and [ok](../README.md#how-it-works)\n", source, REPO) == []
    problems = dangling("[gone](missing.md) and [bad anchor](method.md#no-such)\n", source, REPO)
    assert len(problems) == 2 and "no such file" in problems[0] and "anchor" in problems[1], problems


def test_existing_citations_of_each_form_pass():
    text = (
        'docs/method.md "DCD", docs/store-format.md, "Feature store, format version 1", docs/method.md#mcad, '
        'README "How it works", README, "Using the student", (README: Quick start), README.md#quick-start, '
        "docs/performance.md. metrics.md and README.md are outputs."
    )
    assert dangling(text, REPO / "pipeline" / "example.py", REPO) == []


def readme_block(marker: str, language: str = "python") -> str:
    """The code block that follows `<!-- test: MARKER -->` in the README."""
    readme = (REPO / "README.md").read_text()
    m = re.search(rf"<!-- test: {marker} -->\n```{language}\n(.*?)\n```", readme, re.S)
    assert m, f"README: no python block after <!-- test: {marker} -->"
    return m.group(1)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("records_pixels", [True, False], ids=["recorded-recipe", "older-student"])
def test_readme_python_snippet_runs_as_written(tokenizer_dir, tmp_path, monkeypatch, records_pixels):
    """The README's "In Python" block, verbatim, in a directory laid out as the demo's: a tiny student in the demo
    student's place, its workdir's image cache, an image where the demo's is. A student that records its pixel
    recipe and one saved before students did (the image cache tells) give the student's embeddings of the image
    squashed to 16 px by PIL directly."""
    from pipeline.data.pixels import PixelRecipe, ResizeConfig
    from pipeline.store.image_cache import write_image_cache
    from pipeline.towers.student import load_student, save_student

    code = readme_block("load-student")
    workdir = tmp_path / "artifacts/emoji"
    recipe = PixelRecipe(ResizeConfig(mode="squash", crop=16))
    cache_rows = {"train": np.zeros((1, 16, 16, 3), dtype=np.uint8)}
    write_image_cache(workdir / "images.zarr", cache_rows, fingerprint="f", meta={"resize": recipe.image.describe()})
    student_dir = workdir / "models/student-s0"
    save_student(tiny_student(tokenizer_dir, 3), student_dir, pixels=recipe.describe() if records_pixels else None)
    image_path = tmp_path / "data/emoji/images/openmoji/1F600.png"
    image_path.parent.mkdir(parents=True)
    rgb = np.random.default_rng(0).integers(0, 256, (72, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("RGBA").save(image_path)  # RGBA, not square: the recipe converts and squashes
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), namespace)
    image, texts = namespace["image"], namespace["texts"]
    # the oracle: the student loaded on its own, the image squashed to 16 px by PIL directly (the recipe above)
    student = load_student(student_dir)
    own_pixels = np.asarray(Image.open(image_path).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR))
    with torch.no_grad():
        expected_image = student.encode_images(own_pixels[None].copy())
        expected_texts = student.encode_texts(["grinning face", "red heart"])
    torch.testing.assert_close(image, expected_image, rtol=0, atol=1e-6)
    torch.testing.assert_close(texts, expected_texts, rtol=0, atol=1e-6)
    assert image.shape == (1, json.loads((student_dir / "student_config.json").read_text())["dim"])
    assert printed.getvalue().startswith("tensor([[")


def test_readme_own_data_params_parse():
    """The README's params for your own data are valid as written (unknown keys and bad values are refused)."""
    import yaml

    from pipeline.config import from_dict
    from pipeline.data.prepare import PrepareConfig

    raw = yaml.safe_load(readme_block("own-data-params", "yaml"))
    dataset = from_dict(PrepareConfig, raw["prepare"], "prepare").dataset
    assert (raw["workdir"], dataset.format, dataset.annotations.suffix) == ("artifacts/mydata", "jsonl", ".jsonl")


def test_readme_demo_table_shows_the_committed_metrics():
    """CI's checks (.ci/compare_demo.py) of the README's results tables against the committed metrics record."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_demo", REPO / ".ci" / "compare_demo.py")
    compare_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_demo)
    readme = (REPO / "README.md").read_text()
    failures: list[str] = []
    for workdir, reference, heading in (  # as .ci/run checks them, each table under its own heading
        ("emoji", "baseline", "## Quick start"),
        ("emoji-ablation", "student_unpaired", "### What each kind of teacher knowledge adds (ablation)"),
    ):
        metrics = json.loads((REPO / "artifacts" / workdir / "metrics_detail.json").read_text())
        compare_demo.compare_readme(readme, metrics, failures, reference, heading)
        compare_demo.compare_readme_galleries(readme, metrics, failures, heading)
    assert failures == []


def test_readme_has_the_commands_ci_reads():
    """Every `readme_command NAME` of .ci/run finds its `<!-- ci: NAME -->` marker in the README, followed by a
    code block (its first line is the command CI runs), as .ci/run's awk reads it."""
    names = re.findall(r"readme_command ([\w-]+)\)", (REPO / ".ci" / "run").read_text())
    assert set(names) == {"install-and-run", "test"}
    lines = (REPO / "README.md").read_text().splitlines()
    for name in names:
        at = [i for i, line in enumerate(lines) if line == f"<!-- ci: {name} -->"]
        assert len(at) == 1, f"README: {len(at)} markers <!-- ci: {name} -->"
        fence = next(i for i in range(at[0] + 1, len(lines)) if lines[i].startswith("```"))
        assert fence == at[0] + 1 and lines[fence + 1].strip() and not lines[fence + 1].startswith("```")
