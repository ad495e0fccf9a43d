"""`kdpipe index` and `kdpipe search`: embed a gallery into a faiss index; answer text or image queries."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.errors import InputError
from pipeline.search.gallery import Gallery, embed_images, embed_texts, folder_gallery, read_image
from pipeline.search.index import (
    SEARCH_INDEX,
    IndexConfig,
    SearchIndex,
    build_index,
    load_index,
    recall_at_k,
    save_index,
)
from pipeline.store.ownership import claim
from pipeline.towers.student import load_student


def run_index(student_dir: Path, gallery: Gallery | Path, out: Path, cfg: IndexConfig, source: str) -> list[str]:
    """Embed `gallery` (or every image of a folder) with the student, build and save the index."""
    claim(out, SEARCH_INDEX)  # before the work: a directory that is not an earlier index is refused
    model = load_student(student_dir)
    if not isinstance(gallery, Gallery):
        gallery = folder_gallery(gallery, model.image_size)
    if len(gallery.ids) == 0:
        raise InputError(f"{source}: the gallery is empty")
    emb = embed_images(model, gallery.images)
    t0 = time.perf_counter()
    index = build_index(emb, cfg)
    lines = [
        f"index: {cfg.kind} over {len(gallery.ids):,} images (dim {emb.shape[1]}) built in "
        f"{time.perf_counter() - t0:.2f} s"
    ]
    if cfg.kind != "flat":
        # queries: the gallery's captions when it has them (the real use), else its own images
        queries = embed_texts(model, gallery.captions[:1000]) if gallery.captions else emb[:1000]
        lines.append(
            f"index: recall@10 vs exact {recall_at_k(index, emb, queries, 10):.4f} "
            f"over {len(queries)} {'caption' if gallery.captions else 'image'} queries"
        )
    meta = {
        "kind": cfg.kind,
        "dim": int(emb.shape[1]),
        "source": source,
        "student": str(student_dir),
        "ef_search": cfg.hnsw_ef_search,
        "nprobe": cfg.nprobe,
    }
    save_index(index, gallery.ids, out, **meta)
    lines.append(f"index: wrote {out}")
    return lines


def run_search(
    student_dir: Path, index_dir: Path, *, text: str | None, image: Path | None, k: int
) -> tuple[list[tuple[str, float]], dict[str, float]]:
    """Top-k (id, score) for one text or one image query, and the time of encoding and of searching (ms)."""
    if (text is None) == (image is None):
        raise InputError("search: give either a text query or --image PATH")
    index: SearchIndex = load_index(index_dir)
    model = load_student(student_dir)
    if index.meta.get("dim") not in (None, model.dim):
        raise InputError(f"{index_dir}: index of dimension {index.meta['dim']}, the student has {model.dim}")
    t0 = time.perf_counter()
    if text is not None:
        q = embed_texts(model, [text])
    else:
        q = embed_images(model, read_image(image, model.image_size)[None], label="embed query")
    t1 = time.perf_counter()
    scores, rows = index.search(q, k)
    t2 = time.perf_counter()
    hits = [(index.ids[int(r)], float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]
    return hits, {"encode_ms": (t1 - t0) * 1e3, "search_ms": (t2 - t1) * 1e3}
