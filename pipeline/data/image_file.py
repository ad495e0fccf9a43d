"""Decoding an image: the one way every stage does it (prepare's cache, the teachers in extract and fit-teacher,
search's query image and folder galleries), so that each refuses the same images the same way. The bytes come
from pipeline/data/image_source.py (a file, a tar shard's member, a parquet cell: an `ImageRef`); this module
adds the guards around PIL.

- **Size.** A PNG of a few KB may declare 50,000 x 50,000 pixels and take 7.5 GB to decode. PIL refuses
  more than twice `Image.MAX_IMAGE_PIXELS` only while that global is set (another library may clear it);
  `open_image` refuses more than MAX_PIXELS (the same limit, 179M pixels) from the header, before decoding.
- **Truncation.** `ImageFile.LOAD_TRUNCATED_IMAGES`, a global another library may set, would fill the
  missing part of a truncated file with grey: every read refuses to run that way.
- **Range.** Pillow's `convert("RGB")` clips 16-bit images (mode I;16, or I) at 255, so a 16-bit PNG comes
  out white where it is brighter than 255/65535, and truncates float images (mode F, e.g. a float TIFF in
  [0, 1]) to 0 or 1, so they come out black. `to_rgb` scales them by their range instead: 16-bit values by
  255/65535 (rounded), float values in [0, 1] by 255; a 32-bit integer image with values outside 0..65535
  or a float image outside [0, 1] (or holding NaN) has no range to read it by and is refused. 8-bit images
  (every mode but those) convert exactly as `convert("RGB")` does, so a cache made before is unchanged.

Every failure is a `BadImage`: an InputError "<the image>: <reason>" (the file, or the shard and member, or the
parquet file and row) whose `reason` alone goes to prepare's report of skipped images and to extract's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from pipeline.data import image_source
from pipeline.data.exif import orientation, upright
from pipeline.data.image_source import ImageFiles, ImageRef
from pipeline.errors import InputError

MAX_PIXELS = 2 * 89_478_485  # where PIL's own guard raises with its default MAX_IMAGE_PIXELS
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# what Pillow raises for a file it cannot decode (a missing or unreadable file: OSError)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class NoPixelRange(ValueError):
    """A 32-bit or float image whose values have no range `to_rgb` can map onto 8 bits."""


class BadImage(InputError):
    """An image file that cannot be read; `reason` says why, without the path."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.reason = reason


@contextmanager
def open_image(image: ImageRef | Path | str, files: ImageFiles | None = None) -> Iterator[Image.Image]:
    """The image (a file, or an index row's ImageRef read through `files`) opened by PIL with the guards above.
    Decoding is lazy (load, convert, resize and draft decode), so an image that fails inside the block raises
    BadImage too."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True (by another library?): truncated "
            "images would be silently filled with grey; kdpipe refuses to read images that way"
        )
    ref = image if isinstance(image, ImageRef) else ImageRef(str(image))
    try:
        with image_source.open_image(ref, files) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise BadImage(ref.describe(), _too_large(f"{width:,} x {height:,} = {width * height:,}", MAX_PIXELS))
            yield img
    except DECODE_ERRORS as err:
        raise BadImage(ref.describe(), describe_failure(ref, err)) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB, high-bit-depth and float images scaled by their range (module doc); an RGB
    image is returned as it is (not loaded, not copied)."""
    if img.mode == "RGB":
        return img
    if img.mode in SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        return Image.fromarray(_to_8bit(img)).convert("RGB")
    return img.convert("RGB")


def _to_8bit(img: Image.Image) -> np.ndarray:
    """uint8 [H, W] of a one-band I;16*, I or F image."""
    values = np.asarray(img)
    if img.mode == "F":
        if not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise NoPixelRange(
                f"float pixels from {np.nanmin(values):g} to {np.nanmax(values):g}, not in [0, 1] (or NaN); "
                "save it as an 8- or 16-bit image"
            )
        return np.rint(values * np.float32(255)).astype(np.uint8)
    wide = values.astype(np.int64)
    if img.mode == "I" and (wide.min() < 0 or wide.max() > 65535):
        raise NoPixelRange(
            f"32-bit pixels from {wide.min()} to {wide.max()}, outside the 16-bit range kdpipe reads; "
            "save it as an 8- or 16-bit image"
        )
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)  # 0 -> 0, 65535 -> 255, rounded


def read_rgb(
    image: ImageRef | Path | str, draft_size: int | None = None, exif: str = "ignore", files: ImageFiles | None = None
) -> Image.Image:
    """Decode an image (a file, or an index row's ImageRef: a shard member, a parquet cell) fully as 8-bit RGB
    (BadImage on a missing, truncated, oversized or unreadable image). draft_size: a JPEG may be DCT-downscaled
    while decoding, never below that many pixels a side (square, so the same before or after a rotation); exif
    "apply": turned upright by its EXIF orientation tag (the dataset index's choice, pipeline/data/exif.py)."""
    with open_image(image, files) as im:
        tag = orientation(im) if exif == "apply" else 1
        if draft_size and im.format == "JPEG":
            im.draft("RGB", (draft_size, draft_size))
        rgb = to_rgb(im)  # decodes all pixel data, so a truncated file fails here
        return upright(im.copy() if rgb is im else rgb, tag)  # an image that outlives the open file


def _too_large(pixels: str, limit: int) -> str:
    return f"too large to decode safely ({pixels} pixels, more than {limit:,}); scale it down"


def describe_failure(ref: ImageRef, err: BaseException) -> str:
    """A short reason for an image that cannot be read, for the error line and the reports."""
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(err, PermissionError):
        return "permission denied"
    if "\0" in ref.path:
        return "the path holds a NUL byte, which no file name can"
    if isinstance(err, UnidentifiedImageError):
        try:
            if (ref.length if ref.container == "tar" else os.path.getsize(ref.path)) == 0:
                return "empty member" if ref.container else "empty file"
        except OSError:
            pass
        return "not an image file PIL can read"
    if isinstance(err, Image.DecompressionBombError):  # PIL's guard, where its global is set: the same words
        found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+) pixels", str(err))
        return _too_large(f"{int(found[1]):,}", int(found[2])) if found else f"too large to decode safely ({err})"
    if isinstance(err, NoPixelRange):
        return str(err)
    text = str(err)
    if "truncated" in text:
        return f"truncated image ({text})"
    return f"corrupt image ({type(err).__name__}: {text})"


__all__ = ["MAX_PIXELS", "NoPixelRange", "BadImage", "open_image", "to_rgb", "read_rgb", "describe_failure"]
