"""Galleries to search: a dataset split (prepare's image cache + the index's image ids and captions), every split
at once (`all`), or a folder of images; and the student's embeddings of their images and of text queries.

Every image the student embeds here is made by the one function that made its training images
(pipeline/data/pixels.py), with the recipe it was trained on (`student_recipe`): a gallery image queried as
an image file gets exactly the pixels of its cache row.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.pixels import PixelRecipe, decode_image
from pipeline.errors import InputError
from pipeline.paths import ArtifactPaths
from pipeline.progress import progress
from pipeline.text_files import read_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ALL_SPLITS = "all"  # `--split all`: every split of the dataset in one gallery


def gallery_key(split: str, folder: Path | str | None = None) -> str:
    """A gallery's short name, unique per workdir (its index directories are <workdir>/search/<key>-<kind>): the
    split (or `all`), or for a folder its name and a hash of its absolute path (two folders of one name differ)."""
    if folder is None:
        return split
    where = Path(folder).resolve()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", where.name) or "root"
    return f"folder-{name}-{hashlib.sha256(str(where).encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class Gallery:
    key: str  # gallery_key
    name: str  # what it is, for the user: "emoji split test", "folder photos"
    ids: list[str]  # [N] image ids (a dataset's ids, or paths relative to the folder)
    images: Any  # uint8 [N, H, W, 3]: an array, a memory map of a cache split, or StackedRows of several
    captions: list[str]  # [M] the dataset's captions of these images ([] for a folder)
    text_image: np.ndarray  # int [M] row in `images` of each caption
    recipe: PixelRecipe  # how its images became pixels
    splits: list[str] | None = None  # [N] each image's split, when the gallery holds several
    made_from: dict[str, Any] | None = None  # a dataset's gallery: its index's identity (data/index.py read_identity)

    def captions_of(self) -> list[list[str]]:
        """[N] each image's captions, in dataset order ([] for an image without any)."""
        out: list[list[str]] = [[] for _ in self.ids]
        for text, row in zip(self.captions, np.asarray(self.text_image).tolist()):
            out[row].append(text)
        return out


class StackedRows:
    """Several uint8 [N_i, H, W, 3] arrays (memory maps of cache splits) as one [sum N_i, H, W, 3], without copying
    them: `rows[i]` and `rows[s:e]` read only what they need."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0, *(len(p) for p in parts)])
        self.shape = (int(self.starts[-1]), *parts[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: int | slice) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("StackedRows: slices with a step are not supported")
            pieces = [
                part[max(start, a) - a : min(stop, b) - a]
                for part, a, b in zip(self.parts, self.starts[:-1], self.starts[1:])
                if max(start, a) < min(stop, b)
            ]
            return np.concatenate(pieces) if pieces else np.zeros((0, *self.shape[1:]), np.uint8)
        i = int(key) + (len(self) if key < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"row {key} out of range for {len(self)} rows")
        p = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[p][i - self.starts[p]]


def split_gallery(paths: ArtifactPaths, split: str) -> Gallery:
    """A split (or, with `split="all"`, every split) of the dataset that `kdpipe prepare` cached under
    `paths.workdir`, in the index's split order."""
    from pipeline.data.index import DatasetIndex, read_fingerprint, read_identity
    from pipeline.store.image_cache import open_image_cache

    if not paths.index_dir.is_dir():
        raise InputError(f"{paths.index_dir}: no dataset index here; run `kdpipe prepare` first")
    index = DatasetIndex.load(paths.index_dir)
    names = list(index.splits) if split == ALL_SPLITS else [split]
    views = [index.split(s) for s in names]
    cache = open_image_cache(paths.images, expect_fingerprint=read_fingerprint(paths.index_dir))
    parts = [cache.split(s) for s in names]
    for view, images in zip(views, parts):
        if images.shape[0] != view.n_images:
            raise InputError(
                f"{paths.images}: split {view.name} has {images.shape[0]} images, the index {view.n_images}"
            )
    offsets = np.cumsum([0, *(v.n_images for v in views)])
    return Gallery(
        key=gallery_key(split),
        name=f"{index.name} split {split}",
        ids=[str(i) for v in views for i in v.image_id.tolist()],
        images=parts[0] if len(parts) == 1 else StackedRows(parts),
        captions=[str(c) for v in views for c in v.caption_text.tolist()],
        text_image=np.concatenate([np.asarray(v.text_image, np.int64) + o for v, o in zip(views, offsets)]),
        recipe=PixelRecipe.of_cache(cache.attrs, str(paths.images)),
        splits=[v.name for v in views for _ in range(v.n_images)] if len(views) > 1 else None,
        made_from=read_identity(paths.index_dir),
    )


def folder_gallery(folder: Path | str, recipe: PixelRecipe) -> Gallery:
    """Every image file under `folder` (sorted), made into the student's pixels by `recipe`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a directory of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    with progress("index: decode images", len(files), "img") as bar:
        rows = []
        for path in files:
            rows.append(read_image(path, recipe))
            bar.advance(1)
    ids = [str(p.relative_to(folder)) for p in files]
    return Gallery(gallery_key("", folder), f"folder {folder}", ids, np.stack(rows), [], np.zeros(0, np.int64), recipe)


def read_image(path: Path | str, recipe: PixelRecipe) -> np.ndarray:
    """One image file -> uint8 [crop, crop, 3]: the student's pixels (pipeline/data/pixels.py), as prepare makes
    its cache rows with the same recipe; an image prepare would refuse (missing, truncated, oversized,
    unreadable) is the same one-line BadImage here."""
    return decode_image(path, recipe.image, recipe.exif)


def student_recipe(student_dir: Path, paths: ArtifactPaths) -> PixelRecipe:
    """How the student at `student_dir` was given its images: the recipe distill recorded in its
    student_config.json, or, for a student saved before students recorded it, that of the workdir's image cache
    (which distill trains from)."""
    meta_path = Path(student_dir) / "student_config.json"
    if not meta_path.is_file():
        raise InputError(f"{student_dir}: no student here (student_config.json missing); run `kdpipe distill` first")
    meta = read_json(meta_path)  # malformed or absurdly nested: one line naming it
    if not isinstance(meta, dict):
        raise InputError(f"{meta_path}: not a student's configuration (expected a JSON object)")
    recorded = PixelRecipe.of_student(meta, str(meta_path))
    if recorded is not None:
        return recorded
    from pipeline.store.image_cache import open_image_cache

    if not paths.images.exists():
        raise InputError(
            f"{meta_path}: this student does not record how its images were prepared, and there is no image cache "
            f"at {paths.images} to read it from; pass the --workdir it was trained in"
        )
    return PixelRecipe.of_cache(open_image_cache(paths.images).attrs, str(paths.images))


def embed_images(model: Any, images: Any, batch_size: int = 64, label: str = "embed images") -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, dim] L2-normalized student embeddings."""
    import torch

    n = images.shape[0]
    out = np.empty((n, model.dim), dtype=np.float32)
    with torch.inference_mode(), progress(label, n, "img") as bar:
        for s in range(0, n, batch_size):
            e = min(s + batch_size, n)
            out[s:e] = model.encode_images(np.array(images[s:e])).float().cpu().numpy()
            bar.advance(e - s)
    return out


def embed_texts(model: Any, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Captions -> float32 [M, dim] L2-normalized student embeddings."""
    import torch

    out = np.empty((len(texts), model.dim), dtype=np.float32)
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            out[s : s + batch_size] = model.encode_texts(list(texts[s : s + batch_size])).float().cpu().numpy()
    return out
