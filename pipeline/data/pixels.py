"""The student's pixels: how an image file becomes the uint8 [crop, crop, 3] row the student is given.

One function makes them for every caller: `image_pixels` (an opened image) and `decode_image` (a file) build
prepare's image cache (pipeline/data/prepare.py), search queries and folder galleries
(pipeline/search/gallery.py), and are the reference the exported image processor is tested against. The
student turns such a row into its input itself (/255, resize to its image size, mean/std: towers/student.py).

The recipe (`PixelRecipe`) is section `prepare.image` (`ResizeConfig`) plus the dataset's EXIF choice. The
image cache records it in its attrs (`resize`, `exif_orientation`) and distill in the student's
student_config.json (`image.pixels`), so a query is decoded exactly as the rows the student learned from.

Geometry follows the method's preprocessing (torchvision `Resize(256)` + `CenterCrop(224)` on a PIL image):
shorter side to `resize` (longer side `int(resize * long / short)`), filter `filter` (PIL, antialiased),
then a centered `crop` x `crop` window (offsets rounded as torchvision does); or, with `mode: squash`, the
whole image to `crop` x `crop`. With `draft: true`, a JPEG at least twice the resize target in both sides is
decoded at 1/2, 1/4 or 1/8 scale by libjpeg (DCT scaling, never below the target), then resized from its
exact source extent as above (the accuracy of that: pipeline/data/prepare.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from pipeline.data.exif import EXIF_ORIENTATION, orientation, upright
from pipeline.data.image_file import open_image, to_rgb
from pipeline.data.image_source import ImageFiles, ImageRef
from pipeline.errors import InputError

FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


@dataclass(frozen=True)
class ResizeConfig:
    """Section `prepare.image`: how source images become the student's uint8 input."""

    # shorter_side_center_crop: shorter side to `resize`, then a centered crop x crop window (the method's
    # Resize(256) + CenterCrop(224)); squash: the whole image to crop x crop, aspect ratio ignored (`resize` unused)
    mode: Literal["shorter_side_center_crop", "squash"] = "shorter_side_center_crop"
    resize: int = 256
    crop: int = 224
    # torchvision's Resize default on PIL images is bilinear (antialiased), which is what the method used
    filter: Literal["nearest", "bilinear", "bicubic", "lanczos", "box"] = "bilinear"
    draft: bool = True  # JPEG DCT-scaled decoding when the source is >= 2x the target (see module doc)

    def __post_init__(self) -> None:
        if self.crop < 1 or self.resize < 1:
            raise ValueError(f"resize and crop must be >= 1 (got resize={self.resize}, crop={self.crop})")
        if self.mode == "shorter_side_center_crop" and self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize}) in mode {self.mode}")

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.crop, self.crop)

    def describe(self) -> dict[str, Any]:
        """JSON-native description recorded in the cache; a different description means different pixels."""
        return {
            "mode": self.mode,
            "resize": self.resize,
            "crop": self.crop,
            "filter": self.filter,
            "draft": self.draft,
            "channels": "RGB",
        }

    def geometry(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        """(resized size (w, h), crop box (left, top, right, bottom)) for a source image of this size."""
        if self.mode == "squash":
            return (self.crop, self.crop), (0, 0, self.crop, self.crop)
        if width <= height:
            size = (self.resize, int(self.resize * height / width))
        else:
            size = (int(self.resize * width / height), self.resize)
        left = int(round((size[0] - self.crop) / 2.0))  # Python's round, as torchvision's center_crop
        top = int(round((size[1] - self.crop) / 2.0))
        return size, (left, top, left + self.crop, top + self.crop)


@dataclass(frozen=True)
class PixelRecipe:
    """Everything that decides the student's pixels of an image file: the geometry and the EXIF choice."""

    image: ResizeConfig
    exif: Literal["ignore", "apply"] = "ignore"

    def describe(self) -> dict[str, Any]:
        """What student_config.json records (`image.pixels`): the cache's `resize` and `exif_orientation`."""
        return {"resize": self.image.describe(), "exif_orientation": self.exif}

    @classmethod
    def from_description(cls, resize: Any, exif: Any, where: str) -> PixelRecipe:
        """The recipe from a recorded `resize` description and EXIF choice; one line naming `where` if it is
        not one this kdpipe can reproduce."""
        keys = ("mode", "resize", "crop", "filter", "draft")
        if (
            not isinstance(resize, dict)
            or resize.get("channels", "RGB") != "RGB"
            or any(k not in resize for k in keys)
            or exif not in EXIF_ORIENTATION
        ):
            raise InputError(
                f"{where}: no image recipe this kdpipe can reproduce (resize {resize!r}, exif_orientation "
                f"{exif!r}); run `kdpipe prepare` again"
            )
        try:
            return cls(ResizeConfig(**{k: resize[k] for k in keys}), exif)
        except (TypeError, ValueError) as err:
            raise InputError(f"{where}: invalid image recipe ({err}); run `kdpipe prepare` again") from None

    @classmethod
    def of_cache(cls, attrs: dict[str, Any], where: str) -> PixelRecipe:
        """The recipe an image cache's rows were made with (its attrs; `where` names it in errors)."""
        return cls.from_description(attrs.get("resize"), attrs.get("exif_orientation") or "ignore", where)

    @classmethod
    def of_student(cls, meta: dict[str, Any], where: str) -> PixelRecipe | None:
        """The recipe recorded in a student's student_config.json (`meta`); None for a student saved before
        students recorded it."""
        pixels = (meta.get("image") or {}).get("pixels")
        if pixels is None:
            return None
        if not isinstance(pixels, dict):
            raise InputError(f"{where}: image.pixels must be a mapping, got {pixels!r}")
        return cls.from_description(pixels.get("resize"), pixels.get("exif_orientation") or "ignore", where)

    def phrase(self) -> str:
        """One phrase for a person (error lines, the model card): how an image file becomes the student's pixels."""
        rc = self.image
        if rc.mode == "squash":
            how = f"squash: the whole image resized to {rc.crop} x {rc.crop} (aspect ratio not kept)"
        else:
            how = f"shorter side resized to {rc.resize}, then the centre {rc.crop} x {rc.crop} crop"
        upright = "turned upright by its EXIF orientation tag, " if self.exif == "apply" else ""
        return f"{upright}{how}, {rc.filter} filter"


def image_pixels(img: Image.Image, rc: ResizeConfig, tag: int = 1) -> np.ndarray:
    """An opened image -> uint8 [crop, crop, 3], first turned upright by EXIF orientation `tag` (1: as stored).
    Raises OSError/SyntaxError/ValueError/EOFError for a bad file (the pixels are decoded here; inside
    image_file.open_image, which makes them a BadImage)."""
    if tag != 1:
        # Transposed after a full decode: a drafted (DCT-scaled) image would have to map its fractional source
        # box through the rotation too, and phone photos are the only ones that pay for the simpler path.
        img.load()
        img = upright(img, tag)
    size, crop = rc.geometry(*img.size)
    source = None  # the region of the decoded image that the resize maps onto `size`: all of it
    if rc.draft and img.format == "JPEG" and tag == 1:
        # DCT-scaled decoding, only if the file is >= 2x `size` in both sides. The scaled image has
        # ceil(side / scale) pixels, the last row/column partly padding: `source` is the exact
        # (fractional) extent of the original image in it, so the geometry stays that of a full decode.
        drafted = img.draft("RGB", size)
        if drafted is not None:
            source = drafted[1]
    img.load()  # decodes everything: truncation shows up here
    rgb = to_rgb(img)  # 16-bit and float images by their range, not clipped (pipeline/data/image_file.py)
    out = rgb.resize(size, FILTERS[rc.filter], box=source).crop(crop)
    return np.asarray(out)


def read_pixels(
    image: str | Path | ImageRef, rc: ResizeConfig, exif: str = "ignore", files: ImageFiles | None = None
) -> tuple[np.ndarray, int]:
    """One image (a file, or an index row's ImageRef: a shard member, a parquet cell) -> (uint8 [crop, crop, 3],
    its EXIF orientation tag). exif: "apply" turns the image upright by that tag first (pipeline/data/exif.py).
    `files` keeps containers open across calls (pipeline/data/image_source.py). Raises BadImage for a bad image
    (pipeline/data/image_file.py: missing, truncated, oversized, unreadable, or with no pixel range)."""
    with open_image(image, files) as img:
        tag = orientation(img)
        return image_pixels(img, rc, tag if exif == "apply" else 1), tag


def decode_image(image: str | Path | ImageRef, rc: ResizeConfig, exif: str = "ignore") -> np.ndarray:
    """One image -> uint8 [crop, crop, 3] (read_pixels without the tag)."""
    return read_pixels(image, rc, exif)[0]


__all__ = ["FILTERS", "ResizeConfig", "PixelRecipe", "image_pixels", "read_pixels", "decode_image"]
