"""The student's pixels, as other libraries' image preprocessing: an image processor for transformers and a
`preprocess_cfg` for open_clip that make, from an image file, the pixels kdpipe trained and evaluates the
student on.

kdpipe's pixels (`pipeline.data.pixels.decode_image`, recorded in the image cache's attrs as `resize`):
RGB conversion, then `squash` (the whole image to crop x crop) or `shorter_side_center_crop` (shorter side to
`resize`, then a crop x crop window at round((side - crop) / 2), as torchvision's CenterCrop), one PIL filter;
then the student divides by 255 and normalizes with its mean / std. A cache of another size than the student's
image_size is resized once more on the device: no processor reproduces that double resize, so it is refused.

What each library can say, checked against their code (transformers 5: `image_processing_backends.PilBackend`,
`image_transforms.center_crop`; open_clip 3.3: `transform.image_transform`):
- transformers (`CLIPImageProcessor`, PIL backend): RGB conversion first, the PIL filter, either mode. Its
  centre crop starts at (side - crop) // 2: the window lies one pixel to the left (top) of kdpipe's where the
  resized side minus the crop is 3 mod 4 (round-half-even of k + 1/2 with k odd). Its torchvision backend
  (picked by default where torchvision is installed) resizes with another kernel: load it with
  `backend="pil"` for these pixels.
- open_clip (`preprocess_cfg`): bilinear or bicubic only; `squash`, or `shortest` where resize == crop (its
  crop equals its resize); its centre crop rounds as kdpipe's. It converts to RGB *after* resizing, so images
  with alpha or a palette resize differently (PIL premultiplies alpha); RGB files (JPEG, RGB PNG) are exact.
- neither decodes JPEGs DCT-scaled: where kdpipe does (`draft`, files >= 2x the target size) their pixels are a
  full decode resized, a small difference that prepare's `draft: false` removes; neither turns photos upright by
  their EXIF orientation tag (prepare's `exif_orientation: apply`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import from_dict
from pipeline.data.pixels import PixelRecipe, ResizeConfig
from pipeline.errors import InputError

# PIL's resampling codes (Image.Resampling), as transformers' `resample` takes them
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4}


@dataclass(frozen=True)
class StudentPixels:
    """How the student's pixels are made: prepare's resize (from the image cache) and the student's constants."""

    resize: ResizeConfig
    size: int  # the student's image_size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # where the resize came from (the image cache), for error lines and the model card
    exif: str = "ignore"  # prepare turned images upright by their EXIF orientation tag ("apply") or not

    def describe(self) -> str:
        """One line for the model card."""
        recipe = PixelRecipe(self.resize, self.exif).phrase()
        return f"RGB, {recipe}; / 255, then (x - mean) / std with mean {self.mean}, std {self.std}"


def student_pixels(cache_attrs: dict[str, Any] | None, source: str, size: int, mean, std, what: str) -> StudentPixels:
    """The student's pixel recipe from its image cache's attrs; one InputError where it is unknown or where a
    processor could not make it (`what`: the export asking, for the error line)."""
    desc = dict((cache_attrs or {}).get("resize") or {})
    if not desc:
        raise InputError(
            f"{what}: {source} records no image preprocessing (`resize` attrs), so the student's pixels are "
            "unknown; run `kdpipe prepare` for this work directory (or pass --workdir)"
        )
    desc.pop("channels", None)
    resize = from_dict(ResizeConfig, desc, f"{source}:resize")
    if resize.crop != size:
        raise InputError(
            f"{what}: {source} holds {resize.crop} px images that the student resizes again to {size} px on the "
            "device; no image processor does that double resize: prepare at the student's size "
            f"(prepare.image.crop: {size})"
        )
    exif = (cache_attrs or {}).get("exif_orientation") or "ignore"
    return StudentPixels(resize, size, tuple(float(m) for m in mean), tuple(float(s) for s in std), source, exif)


def _common_caveats(px: StudentPixels) -> list[str]:
    out = []
    if px.resize.draft:
        out.append("kdpipe decodes JPEGs of twice the target size or more DCT-scaled (prepare.image.draft)")
    if px.exif == "apply":
        out.append("kdpipe turns photos upright by their EXIF orientation tag first, which neither library does")
    return out


def hf_image_processor(px: StudentPixels) -> dict[str, Any]:
    """preprocessor_config.json for transformers' CLIPImageProcessor (PIL backend) making the student's pixels."""
    r = px.resize
    common = {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": PIL_RESAMPLE[r.filter],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(px.mean),
        "image_std": list(px.std),
    }
    if r.mode == "squash":
        return common | {"size": {"height": r.crop, "width": r.crop}, "do_center_crop": False}
    return common | {
        "size": {"shortest_edge": r.resize},
        "do_center_crop": True,
        "crop_size": {"height": r.crop, "width": r.crop},
    }


def hf_pixel_caveats(px: StudentPixels) -> list[str]:
    """Where transformers' pixels can differ from kdpipe's, for the model card (empty: never)."""
    out = []
    if px.resize.mode == "shorter_side_center_crop":
        out.append(
            "its centre crop starts at (side - crop) // 2, kdpipe's at round((side - crop) / 2): one pixel apart "
            "where the resized side minus the crop is 3 mod 4"
        )
    return out + _common_caveats(px)


def open_clip_preprocess(px: StudentPixels) -> dict[str, Any]:
    """open_clip's `preprocess_cfg` making the student's pixels; one InputError where it cannot."""
    r = px.resize
    if r.filter not in ("bilinear", "bicubic"):
        raise InputError(
            f"export --open-clip: open_clip resizes with bilinear or bicubic only; the student's pixels "
            f"({px.source}) were resized with {r.filter}"
        )
    if r.mode == "shorter_side_center_crop" and r.resize != r.crop:
        raise InputError(
            f"export --open-clip: open_clip's `shortest` mode resizes the shorter side to the crop size; the "
            f"student's pixels ({px.source}) were resized to {r.resize} and cropped to {r.crop}"
        )
    return {
        "size": r.crop,
        "mode": "RGB",
        "mean": list(px.mean),
        "std": list(px.std),
        "interpolation": r.filter,
        "resize_mode": "squash" if r.mode == "squash" else "shortest",
        "fill_color": 0,
    }


def open_clip_pixel_caveats(px: StudentPixels) -> list[str]:
    out = ["open_clip converts to RGB after resizing: images with alpha or a palette differ (RGB files are exact)"]
    return out + _common_caveats(px)
