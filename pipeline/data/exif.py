"""EXIF orientation: whether an image file asks to be shown rotated or mirrored, and turning it upright.

Cameras and phones often store pixels as the sensor read them and add an orientation tag (1-8) saying how
to display them. The reference loaders (torchvision, BEiT-3, DSMD: `Image.open(...).convert("RGB")`) ignore
the tag, and Flickr30K/COCO numbers are reported that way, so kdpipe ignores it by default; a dataset of
phone photos wants it applied (`prepare.dataset.exif_orientation: apply`), and the choice is recorded in
the dataset index so that the student's image cache and the teacher's features read the same pixels.
"""

from __future__ import annotations

from PIL import Image

EXIF_ORIENTATION = ("ignore", "apply")
ORIENTATION_TAG = 0x0112

# Orientation tag -> the transpose that shows the image upright (EXIF 2.3; the mapping PIL's exif_transpose uses).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def orientation(img: Image.Image) -> int:
    """The image's EXIF orientation tag, 1 (as stored) when absent or not a valid value. Reads only the
    header: the pixels are not decoded."""
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
    except (OSError, SyntaxError, ValueError, TypeError):  # a malformed EXIF block: the pixels may still be fine
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def upright(img: Image.Image, tag: int) -> Image.Image:
    """`img` as its orientation `tag` says to display it (the same image for tag 1)."""
    method = _TRANSPOSE.get(tag)
    return img if method is None else img.transpose(method)
