"""`kdpipe index` and `kdpipe search`: a faiss index of a gallery embedded by the student, and queries on it.

kdpipe index [--split test | --split all | --folder DIR] [--kind flat|hnsw|ivfpq] [--index DIR]
kdpipe search "a dog on a beach" [-k 10] [--split all] [--kind hnsw]      kdpipe search --image PATH

Each gallery and kind has its own index directory, <workdir>/search/<split>-<kind> (a folder:
folder-<name>-<hash of its path>-<kind>); `search` builds the one it needs on first use, and again when the
student was retrained, and says which index answered.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from pipeline.errors import ConfigError, InputError
from stages._common import NO_WAIT_OPTION, PARAMS_OPTION, WORKDIR_OPTION, echo, run_stage, writing
from stages._deploy import STUDENT_OPTION, artifact_paths, default_student

if TYPE_CHECKING:
    from pipeline.data.pixels import PixelRecipe
    from pipeline.paths import ArtifactPaths

KINDS = ("flat", "hnsw", "ivfpq")
INDEX_OPTION = typer.Option(None, "--index", help="Index directory (default: <workdir>/search/<gallery>-<kind>).")
SPLIT_OPTION = typer.Option(
    "test", "--split", help="Dataset split to search, or 'all' for every split (ignored with --folder)."
)
FOLDER_OPTION = typer.Option(None, "--folder", help="A folder of image files as the gallery instead of the dataset.")
KIND_OPTION = typer.Option("flat", "--kind", help="flat (exact, IndexFlatIP), hnsw or ivfpq (approximate).")


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"--kind {kind!r}: expected flat, hnsw or ivfpq")
    return kind


def _build(
    paths: ArtifactPaths, student: Path, recipe: PixelRecipe, split: str, folder: Path | None, kind: str, out: Path
) -> list[str]:
    """Embed the gallery (a split, every split, or a folder) with the student, whose pixel recipe is `recipe`,
    into `out` (lock held by the caller)."""
    from pipeline.search.gallery import folder_gallery, split_gallery
    from pipeline.search.index import IndexConfig
    from pipeline.search.run import run_index

    gallery = folder_gallery(folder, recipe) if folder is not None else split_gallery(paths, split)
    return run_index(student, gallery, out, IndexConfig(kind=kind), recipe)


def _refuse_other_gallery(out: Path, split: str, folder: Path | None, kind: str) -> None:
    """An explicit --index DIR that holds the index of another gallery or kind is not replaced silently."""
    import json

    from pipeline.search.gallery import gallery_key

    ids = out / "ids.json"
    if not ids.is_file():
        return
    try:
        meta = json.loads(ids.read_text())
    except ValueError:
        return  # not a finished index: save_index rewrites it
    # an index from before indexes recorded their gallery is replaced by one of its kind
    if meta.get("kind") != kind or meta.get("gallery", gallery_key(split, folder)) != gallery_key(split, folder):
        raise InputError(
            f"{out}: holds the {meta.get('kind')} index of {meta.get('source')}; give another --index to keep it, "
            "or remove it first"
        )


@run_stage
def index_command(
    params: Path = PARAMS_OPTION,
    workdir: Path = WORKDIR_OPTION,
    student: Path = STUDENT_OPTION,
    split: str = SPLIT_OPTION,
    folder: Path = FOLDER_OPTION,
    kind: str = KIND_OPTION,
    index: Path = INDEX_OPTION,
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Embed a gallery with the student into a faiss index next to its id table."""
    from pipeline.search.gallery import gallery_key, student_recipe

    paths = artifact_paths(params, workdir)
    kind = _check_kind(kind)
    out = index or paths.search_index(gallery_key(split, folder), kind)
    with writing(out, no_wait=no_wait):
        if index is not None:
            _refuse_other_gallery(out, split, folder, kind)
        student = student or default_student(params, paths)
        lines = _build(paths, student, student_recipe(student, paths), split, folder, kind, out)
    for line in lines:
        echo(line)


@run_stage
def search_command(
    text: str = typer.Argument(None, help="The text query."),
    image: Path = typer.Option(None, "--image", help="An image file as the query instead."),
    k: int = typer.Option(10, "-k", "--top", min=1, help="How many results."),
    split: str = SPLIT_OPTION,
    folder: Path = FOLDER_OPTION,
    kind: str = KIND_OPTION,
    params: Path = PARAMS_OPTION,
    workdir: Path = WORKDIR_OPTION,
    student: Path = STUDENT_OPTION,
    index: Path = INDEX_OPTION,
) -> None:
    """Top-K gallery images (score, id, captions) for a text (or image) query; names the index that answered."""
    from pipeline.search.gallery import gallery_key, student_recipe
    from pipeline.search.index import load_index
    from pipeline.search.run import run_search, stale_reason

    if (text is None) == (image is None):  # before anything slow: an index may be built below
        raise InputError("search: give either a text query or --image PATH")
    if image is not None and not image.is_file():
        raise InputError(f"{image}: image file not found")
    paths = artifact_paths(params, workdir)
    kind = _check_kind(kind)
    student = student or default_student(params, paths)
    recipe = student_recipe(student, paths)
    out = index or paths.search_index(gallery_key(split, folder), kind)
    if index is not None:
        found = load_index(out)  # answers as it is, or not at all (run_search says why)
    else:  # the default index of this gallery and kind: built on first use, again when it is stale
        with writing(out):
            found = load_index(out) if (out / "ids.json").is_file() else None
            why = "first use" if found is None else stale_reason(found, student, recipe, paths)
            if why:
                echo(f"search: building the {kind} index {out} ({why})")
                for line in _build(paths, student, recipe, split, folder, kind, out):
                    echo(line)
                found = load_index(out)
    hits, ms = run_search(student, found, recipe, paths, text=text, image=image, k=k)
    echo(f"search: the {found.meta.get('kind')} index {out} answers: {found.meta.get('source')}, student {student}")
    for rank, hit in enumerate(hits, 1):
        where = f"{hit.split}  " if hit.split else ""
        about = f"  {' | '.join(hit.captions)}" if hit.captions else ""
        echo(f"{rank:3d}  {hit.score:.4f}  {where}{hit.image_id}{about}")
    echo(f"search: {len(hits)} results; encode {ms['encode_ms']:.1f} ms + search {ms['search_ms']:.2f} ms")
