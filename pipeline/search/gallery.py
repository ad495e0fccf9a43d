"""Galleries to search: a dataset split (prepare's image cache + the index's image ids) or a folder of images,
and the student's embeddings of their images and of text queries."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import InputError
from pipeline.paths import ArtifactPaths
from pipeline.progress import progress

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Gallery:
    ids: list[str]  # [N] image ids (a dataset's ids, or paths relative to the folder)
    images: np.ndarray  # uint8 [N, H, W, 3] (a memory map for a dataset split)
    captions: list[str]  # [M] a split's captions ([] for a folder)
    text_image: np.ndarray  # int [M] row in `images` of each caption


def split_gallery(paths: ArtifactPaths, split: str) -> Gallery:
    """A split of the dataset that `kdpipe prepare` cached under `paths.workdir`."""
    from pipeline.data.index import DatasetIndex, read_fingerprint
    from pipeline.store.image_cache import open_image_cache

    if not paths.index_dir.is_dir():
        raise InputError(f"{paths.index_dir}: no dataset index here; run `kdpipe prepare` first")
    index = DatasetIndex.load(paths.index_dir)
    view = index.split(split)
    cache = open_image_cache(paths.images, expect_fingerprint=read_fingerprint(paths.index_dir))
    images = cache.split(split)
    if images.shape[0] != view.n_images:
        raise InputError(f"{paths.images}: split {split} has {images.shape[0]} images, the index {view.n_images}")
    return Gallery(list(view.image_id), images, list(view.caption_text), np.asarray(view.text_image))


def folder_gallery(folder: Path | str, image_size: int) -> Gallery:
    """Every image file under `folder` (sorted), shorter side resized and center-cropped to `image_size` as
    prepare does (Resize(size * 256 / 224) + CenterCrop(size))."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a directory of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    rows = np.stack([read_image(path, image_size) for path in files])
    return Gallery([str(p.relative_to(folder)) for p in files], rows, [], np.zeros(0, dtype=np.int64))


def read_image(path: Path | str, image_size: int) -> np.ndarray:
    """One image file -> uint8 [S, S, 3], as prepare makes cache rows (shorter side, then center crop)."""
    from pipeline.data.prepare import ResizeConfig, decode_image

    if not Path(path).is_file():
        raise InputError(f"{path}: image file not found")
    try:
        return decode_image(path, ResizeConfig(resize=round(image_size * 256 / 224), crop=image_size))
    except (OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{path}: cannot read this image ({type(err).__name__}: {err})") from None


@torch.inference_mode()
def embed_images(model, images: np.ndarray, batch_size: int = 64, label: str = "embed images") -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, dim] L2-normalized student embeddings."""
    n = images.shape[0]
    out = np.empty((n, model.dim), dtype=np.float32)
    with progress(label, n, "img") as bar:
        for s in range(0, n, batch_size):
            e = min(s + batch_size, n)
            out[s:e] = model.encode_images(np.array(images[s:e])).float().cpu().numpy()
            bar.advance(e - s)
    return out


@torch.inference_mode()
def embed_texts(model, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Captions -> float32 [M, dim] L2-normalized student embeddings."""
    out = np.empty((len(texts), model.dim), dtype=np.float32)
    for s in range(0, len(texts), batch_size):
        out[s : s + batch_size] = model.encode_texts(list(texts[s : s + batch_size])).float().cpu().numpy()
    return out
