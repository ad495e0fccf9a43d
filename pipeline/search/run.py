"""`kdpipe index` and `kdpipe search`: embed a gallery into a faiss index; answer text or image queries.

An index records what it was built from (ids.json: the gallery and, for a dataset's, its index's fingerprint and
content digest; the student directory and its weights' size, mtime and sha256; the pixel recipe), so a search can
tell an index made by another student, by this student before it was trained again, or from an older version of
the dataset, from a current one (`stale_reason`), and never answers from it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.pixels import PixelRecipe
from pipeline.errors import InputError
from pipeline.paths import ArtifactPaths
from pipeline.search.gallery import Gallery, embed_images, embed_texts, read_image
from pipeline.search.index import SEARCH_INDEX, IndexConfig, SearchIndex, build_index, recall_at_k, save_index
from pipeline.store.ownership import claim

WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class Hit:
    """One search result: the image's id, score, split (galleries over several splits) and captions."""

    score: float
    image_id: str
    split: str | None
    captions: list[str]


def student_weights(student_dir: Path, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """{size, mtime_ns, sha256} of the student's weights file; the sha256 is taken from `known` (an index's
    record) when size and mtime are unchanged, so a search does not hash 100 MB every time."""
    from pipeline.hashing import sha256_file

    path = Path(student_dir) / WEIGHTS_FILE
    try:
        st = os.stat(path)
    except OSError as err:
        raise InputError(f"{path}: cannot read the student's weights ({err.strerror})") from None
    out = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if known and {k: known.get(k) for k in out} == out and known.get("sha256"):
        return {**out, "sha256": known["sha256"]}
    return {**out, "sha256": sha256_file(path)}


def stale_reason(index: SearchIndex, student_dir: Path, recipe: PixelRecipe, paths: ArtifactPaths) -> str | None:
    """Why `index` cannot answer for this student (None: it can): made by other weights, with other pixels, from
    another version of the workdir's dataset (a split gallery), or before indexes recorded these."""
    meta = index.meta
    recorded = meta.get("student_weights")
    if not isinstance(recorded, dict) or "pixels" not in meta:
        return "it does not record the student that built it (made by an older kdpipe)"
    if student_weights(student_dir, recorded)["sha256"] != recorded.get("sha256"):
        return f"it was built by other weights than {Path(student_dir) / WEIGHTS_FILE} (retrained, or another student)"
    if meta["pixels"] != recipe.describe():
        return "its images were prepared otherwise than this student's"
    if meta.get("made_from") is not None:
        from pipeline.data.index import read_identity

        if meta["made_from"] != read_identity(paths.index_dir):
            return f"the dataset in {paths.index_dir} changed since it was built (kdpipe prepare ran again)"
    return None


def run_index(student_dir: Path, gallery: Gallery, out: Path, cfg: IndexConfig, recipe: PixelRecipe) -> list[str]:
    """Embed `gallery` with the student (whose pixel recipe is `recipe`), build and save the index in `out`."""
    from pipeline.towers.student import load_student

    claim(out, SEARCH_INDEX)  # before the work: a directory that is not an earlier index is refused
    if gallery.recipe != recipe:
        raise InputError(
            f"{gallery.name}: its images were prepared as {gallery.recipe.phrase()}, but the student at "
            f"{student_dir} was trained on {recipe.phrase()}: run `kdpipe prepare` with the student's "
            "prepare.image, or index a --folder"
        )
    if len(gallery.ids) == 0:
        raise InputError(f"{gallery.name}: the gallery is empty")
    weights = student_weights(student_dir)
    model = load_student(student_dir)
    emb = embed_images(model, gallery.images)
    t0 = time.perf_counter()
    index = build_index(emb, cfg)
    lines = [
        f"index: {cfg.kind} index of {gallery.name}, {len(gallery.ids):,} images (dim {emb.shape[1]}), built in "
        f"{time.perf_counter() - t0:.2f} s"
    ]
    if cfg.kind != "flat":
        # queries: the gallery's captions when it has them (the real use), else its own images
        queries = embed_texts(model, gallery.captions[:1000]) if gallery.captions else emb[:1000]
        lines.append(
            f"index: recall@10 vs exact {recall_at_k(index, emb, queries, 10):.4f} "
            f"over {len(queries)} {'caption' if gallery.captions else 'image'} queries"
        )
    splits = gallery.splits or [None] * len(gallery.ids)
    rows = [{"split": s, "captions": c} for s, c in zip(splits, gallery.captions_of())]
    meta = {
        "kind": cfg.kind,
        "dim": int(emb.shape[1]),
        "gallery": gallery.key,
        "source": gallery.name,
        "student": str(student_dir),
        "student_weights": weights,
        "pixels": recipe.describe(),
        "made_from": gallery.made_from,
        "ef_search": cfg.hnsw_ef_search,
        "nprobe": cfg.nprobe,
    }
    save_index(index, gallery.ids, out, rows=rows, **meta)
    lines.append(f"index: wrote {out}")
    return lines


def run_search(
    student_dir: Path,
    index: SearchIndex,
    recipe: PixelRecipe,
    paths: ArtifactPaths,
    *,
    text: str | None,
    image: Path | None,
    k: int,
) -> tuple[list[Hit], dict[str, float]]:
    """Top-k hits for one text or one image query (made into pixels by `recipe`, the student's) and the time of
    encoding and of searching (ms). Refuses an index that cannot answer for this student (`stale_reason`)."""
    from pipeline.towers.student import load_student

    if (text is None) == (image is None):
        raise InputError("search: give either a text query or --image PATH")
    why = stale_reason(index, student_dir, recipe, paths)
    if why:
        raise InputError(
            f"{index.directory}: this index cannot answer for the student at {student_dir}: {why}; "
            "run `kdpipe index` again"
        )
    query_pixels = read_image(image, recipe)[None] if image is not None else None  # a bad file fails before loading
    model = load_student(student_dir)
    if index.meta.get("dim") not in (None, model.dim):
        raise InputError(f"{index.directory}: index of dimension {index.meta['dim']}, the student has {model.dim}")
    t0 = time.perf_counter()
    q = embed_texts(model, [text]) if text is not None else embed_images(model, query_pixels, label="embed query")
    t1 = time.perf_counter()
    scores, rows = index.search(q, k)
    t2 = time.perf_counter()
    found = [(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]
    about = index.rows([r for r, _ in found])
    hits = [Hit(s, index.ids[r], a.get("split"), list(a.get("captions") or [])) for (r, s), a in zip(found, about)]
    return hits, {"encode_ms": (t1 - t0) * 1e3, "search_ms": (t2 - t1) * 1e3}
