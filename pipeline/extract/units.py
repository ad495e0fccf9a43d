"""Planning the work: one *unit* per chunk of each embedding array, with its marker name under `.extract/`
and, for image units, the digest of the image files it embeds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.data.index import DatasetIndex, SplitView
from pipeline.store.features import UNPAIRED_TEXT
from pipeline.store.features_writer import chunk_len

WORK_DIR = ".extract"  # progress records inside the store while it is being written; deleted at the end


def staging_dir(out: Path) -> Path:
    """Where a complete store at `out` is rewritten (whole, or only its stale image chunks) while it stays in
    place, readable and whole: `.NAME.next` beside it, swapped in once complete."""
    return out.parent / f".{out.name}.next"


def target_dir(out: Path) -> Path:
    """The directory the units of this run are written to (every rank asks, once rank 0 has prepared): the
    staging directory while it holds a rewrite in progress, else `out` itself."""
    stage = staging_dir(out)
    return stage if (stage / WORK_DIR / "created").is_file() else out


@dataclass(frozen=True)
class Unit:
    split: str
    array: str  # "image_emb" | "text_emb" | "unpaired_text_emb"
    index: int  # chunk index
    start: int  # first row (in the split)
    stop: int
    # image_emb units: the index's digest of the unit's image files (DatasetIndex.content_digest), recorded in
    # its marker and, at the end, in the store attrs `image_chunks`; None where the index has no hashes
    content: str | None = None

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def marker(self) -> str:
        return f"{self.split}/{self.array}.{self.index}.json"


def plan_units(index: DatasetIndex, views: dict[str, SplitView], chunk_rows: int, row_bytes: int) -> list[Unit]:
    """Every chunk of every embedding array, in the layout StoreWriter.create gives the split's arrays."""
    units = []
    for s, v in views.items():
        arrays = (("image_emb", v.n_images), ("text_emb", v.n_captions), (UNPAIRED_TEXT, len(v.unpaired_text)))
        for array, n in arrays:
            cr = chunk_len(n, chunk_rows, row_bytes)
            for i, a in enumerate(range(0, n, cr)):
                b = min(n, a + cr)
                content = index.content_digest(v.image_rows[a:b]) if array == "image_emb" else None
                units.append(Unit(s, array, i, a, b, content))
    return units


def image_chunks(units: list[Unit]) -> dict[str, list[str]] | None:
    """The content digest of each image chunk, per split (the store attr `image_chunks`); None if unknown."""
    chunks: dict[str, list[str]] = {}
    for u in units:
        if u.array == "image_emb":
            if u.content is None:
                return None
            chunks.setdefault(u.split, []).append(u.content)
    return chunks
