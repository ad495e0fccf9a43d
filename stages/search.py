"""`kdpipe index` and `kdpipe search`: a faiss index of a gallery embedded by the student, and queries on it.

kdpipe index [--split test | --folder DIR] [--kind flat|hnsw|ivfpq] [--index DIR]   # default <workdir>/search
kdpipe search "a dog on a beach" [-k 10]        kdpipe search --image PATH
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.errors import ConfigError
from stages._common import NO_WAIT_OPTION, PARAMS_OPTION, WORKDIR_OPTION, echo, run_stage, writing
from stages._deploy import STUDENT_OPTION, artifact_paths, default_student

INDEX_OPTION = typer.Option(None, "--index", help="Index directory (default: <workdir>/search).")


@run_stage
def index_command(
    params: Path = PARAMS_OPTION,
    workdir: Path = WORKDIR_OPTION,
    student: Path = STUDENT_OPTION,
    split: str = typer.Option("test", "--split", help="Dataset split from the image cache (ignored with --folder)."),
    folder: Path = typer.Option(None, "--folder", help="Index every image file under this folder instead."),
    kind: str = typer.Option("flat", "--kind", help="flat (exact, IndexFlatIP), hnsw or ivfpq (approximate)."),
    index: Path = INDEX_OPTION,
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Embed a gallery with the student into a faiss index next to its id table."""
    from pipeline.search.gallery import split_gallery
    from pipeline.search.index import IndexConfig
    from pipeline.search.run import run_index

    paths = artifact_paths(params, workdir)
    if kind not in ("flat", "hnsw", "ivfpq"):
        raise ConfigError(f"--kind {kind!r}: expected flat, hnsw or ivfpq")
    cfg = IndexConfig(kind=kind)
    source = str(folder) if folder is not None else f"{paths.workdir} split {split}"
    index = index or paths.workdir / "search"
    with writing(index, no_wait=no_wait):
        gallery = folder if folder is not None else split_gallery(paths, split)
        lines = run_index(student or default_student(params, paths), gallery, index, cfg, source)
    for line in lines:
        echo(line)


@run_stage
def search_command(
    text: str = typer.Argument(None, help="The text query."),
    image: Path = typer.Option(None, "--image", help="An image file as the query instead."),
    k: int = typer.Option(10, "-k", "--top", min=1, help="How many results."),
    params: Path = PARAMS_OPTION,
    workdir: Path = WORKDIR_OPTION,
    student: Path = STUDENT_OPTION,
    index: Path = INDEX_OPTION,
) -> None:
    """Top-K gallery ids with scores for a text (or image) query, and the query latency."""
    from pipeline.search.gallery import split_gallery
    from pipeline.search.index import IndexConfig
    from pipeline.search.run import run_index, run_search

    paths = artifact_paths(params, workdir)
    student = student or default_student(params, paths)
    if index is None and not (paths.workdir / "search" / "ids.json").is_file():
        # first use on a workdir: the default index (exact, test split), as `kdpipe index` would build it
        with writing(paths.workdir / "search"):
            if not (paths.workdir / "search" / "ids.json").is_file():  # unless a run we waited for built it
                lines = run_index(
                    student,
                    split_gallery(paths, "test"),
                    paths.workdir / "search",
                    IndexConfig(),
                    f"{paths.workdir} split test",
                )
                for line in lines:
                    echo(line)
    hits, ms = run_search(student, index or paths.workdir / "search", text=text, image=image, k=k)
    for rank, (image_id, score) in enumerate(hits, 1):
        echo(f"{rank:3d}  {score:.4f}  {image_id}")
    echo(f"search: {len(hits)} results; encode {ms['encode_ms']:.1f} ms + search {ms['search_ms']:.2f} ms")
