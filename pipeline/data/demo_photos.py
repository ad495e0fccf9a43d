"""The built-in demo's images: real photos that ship inside installed packages, written as JPEG files.

The captions are the project's own text, committed in `data/demo/dataset_demo.json` (Karpathy format);
the pixels are not committed but rebuilt from the packages by `build_demo_images` (`kdpipe demo-data`):
scikit-image's bundled `skimage.data` images (only those that ship in the wheel; the loaders used here
never download), scikit-learn's `load_sample_image` photos and matplotlib's `sample_data`. A few larger
photos also give a crop that shows a different part of the scene; a crop always stays in its source
photo's split (`DemoImage.group`), so no test scene leaks into training.

Every file is re-encoded the same way (RGB, JPEG quality 92, 4:4:4, no optimisation, no metadata), so
the same installed packages give byte-identical files.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import InputError
from pipeline.store.durable import write_file_durably
from pipeline.store.ownership import Output, claim

DEMO_DIR = Path("data/demo")
DEMO_JSON = DEMO_DIR / "dataset_demo.json"
DEMO_IMAGE_DIR = DEMO_DIR / "images"
JPEG_QUALITY = 92


@dataclass(frozen=True)
class DemoImage:
    filename: str
    source: str  # "<package>:<name>", e.g. "skimage:chelsea", "sklearn:china.jpg", "skimage:stereo_motorcycle/left"
    crop: tuple[int, int, int, int] | None = None  # (left, top, right, bottom) in source pixels

    @property
    def group(self) -> str:
        """The photo this image shows (a crop or a stereo view shares it): all of a group share one split."""
        return self.source.split("/")[0]


# The demo's images, in dataset order. Keep in sync with dataset_demo.json (a test checks).
DEMO_IMAGES: tuple[DemoImage, ...] = (
    DemoImage("skimage_astronaut.jpg", "skimage:astronaut"),
    DemoImage("skimage_camera.jpg", "skimage:camera"),
    DemoImage("skimage_coffee.jpg", "skimage:coffee"),
    DemoImage("skimage_motorcycle_left.jpg", "skimage:stereo_motorcycle/left"),
    DemoImage("skimage_motorcycle_right.jpg", "skimage:stereo_motorcycle/right"),
    DemoImage("sklearn_china.jpg", "sklearn:china.jpg"),
    DemoImage("sklearn_china_lake.jpg", "sklearn:china.jpg", crop=(330, 110, 640, 427)),
    DemoImage("skimage_hubble_deep_field.jpg", "skimage:hubble_deep_field"),
    DemoImage("skimage_hubble_spiral.jpg", "skimage:hubble_deep_field", crop=(0, 250, 320, 570)),
    DemoImage("skimage_retina.jpg", "skimage:retina"),
    DemoImage("skimage_retina_optic_disc.jpg", "skimage:retina", crop=(0, 380, 560, 940)),
    DemoImage("skimage_immunohistochemistry.jpg", "skimage:immunohistochemistry"),
    DemoImage("skimage_page.jpg", "skimage:page"),
    DemoImage("skimage_grass.jpg", "skimage:grass"),
    DemoImage("skimage_horse.jpg", "skimage:horse"),
    DemoImage("skimage_logo.jpg", "skimage:logo"),
    DemoImage("skimage_moon.jpg", "skimage:moon"),
    DemoImage("skimage_text.jpg", "skimage:text"),
    DemoImage("skimage_brick.jpg", "skimage:brick"),
    DemoImage("skimage_cell.jpg", "skimage:cell"),
    DemoImage("mpl_gift_box.jpg", "matplotlib:Minduka_Present_Blue_Pack.png"),
    DemoImage("skimage_chelsea.jpg", "skimage:chelsea"),
    DemoImage("skimage_rocket.jpg", "skimage:rocket"),
    DemoImage("sklearn_flower.jpg", "sklearn:flower.jpg"),
    DemoImage("skimage_coins.jpg", "skimage:coins"),
    DemoImage("skimage_gravel.jpg", "skimage:gravel"),
    DemoImage("mpl_grace_hopper.jpg", "matplotlib:grace_hopper.jpg"),
)
# what a build writes into (pipeline/store/ownership.py): a directory holding nothing but demo photos
DEMO_PHOTOS = Output("the demo's photos", directory=True, names=frozenset(i.filename for i in DEMO_IMAGES))

# skimage.data loaders whose files ship inside the scikit-image wheel (no download).
_SKIMAGE_LOCAL = {
    "astronaut",
    "camera",
    "coffee",
    "chelsea",
    "rocket",
    "coins",
    "moon",
    "page",
    "text",
    "brick",
    "grass",
    "gravel",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "horse",
    "logo",
    "cell",
    "stereo_motorcycle",
}


def _to_rgb(array: np.ndarray) -> Image.Image:
    """Any package image array (bool, gray, RGB, RGBA) -> an RGB PIL image; transparency over white."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        raise InputError(f"unexpected image dtype {array.dtype} from a package loader")
    if array.ndim == 2:
        return Image.fromarray(array, "L").convert("RGB")
    if array.ndim == 3 and array.shape[2] == 4:
        rgba = Image.fromarray(array, "RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if array.ndim == 3 and array.shape[2] == 3:
        return Image.fromarray(array, "RGB")
    raise InputError(f"unexpected image shape {array.shape} from a package loader")


def _missing(package: str, pip_name: str) -> InputError:
    return InputError(
        f"the demo images need the package {pip_name} ({package} is not installed); "
        "install the demo extras: pip install -e '.[demo]'"
    )


def load_source(source: str) -> Image.Image:
    """The full-size RGB image of a `DemoImage.source`, read from its installed package (no network)."""
    package, _, name = source.partition(":")
    if package == "skimage":
        try:
            import skimage.data
        except ImportError:
            raise _missing("skimage", "scikit-image") from None
        loader, _, view = name.partition("/")
        if loader not in _SKIMAGE_LOCAL:
            raise InputError(f"{source}: not one of the scikit-image images that ship in the package")
        data = getattr(skimage.data, loader)()
        if loader == "stereo_motorcycle":
            data = data[{"left": 0, "right": 1}[view]]
        return _to_rgb(np.asarray(data))
    if package == "sklearn":
        try:
            from sklearn.datasets import load_sample_image
        except ImportError:
            raise _missing("sklearn", "scikit-learn") from None
        return _to_rgb(np.asarray(load_sample_image(name)))
    if package == "matplotlib":
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "sample_data" / name
        if not path.is_file():
            raise InputError(f"{path}: matplotlib's sample data file is missing")
        with Image.open(path) as im:
            im.load()
            return _to_rgb(np.asarray(im.convert("RGBA") if im.mode in ("RGBA", "LA", "P") else im.convert("RGB")))
    raise InputError(f"{source}: unknown demo image source (expected skimage:, sklearn: or matplotlib:)")


def render(image: DemoImage) -> Image.Image:
    """The RGB image of one demo entry (its source, cropped if it is a crop)."""
    im = load_source(image.source)
    if image.crop is not None:
        left, top, right, bottom = image.crop
        if not (0 <= left < right <= im.width and 0 <= top < bottom <= im.height):
            raise InputError(f"{image.filename}: crop {image.crop} outside its {im.width}x{im.height} source")
        im = im.crop(image.crop)
    return im


def encode_jpeg(image: Image.Image) -> bytes:
    """Deterministic JPEG bytes: RGB, fixed quality, 4:4:4, baseline, no metadata."""
    buf = io.BytesIO()
    image.convert("RGB").save(
        buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False, progressive=False
    )
    return buf.getvalue()


def build_demo_images(out_dir: Path = DEMO_IMAGE_DIR, images: tuple[DemoImage, ...] = DEMO_IMAGES) -> list[Path]:
    """Write every demo image into `out_dir` as `<filename>` (JPEG); returns the files written, in order.

    Each file is written atomically (temporary file, then rename); files already there are replaced, in a
    directory that holds nothing but demo images."""
    out_dir = Path(out_dir)
    claim(out_dir, DEMO_PHOTOS)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for image in images:
        data = encode_jpeg(render(image))
        target = out_dir / image.filename
        write_file_durably(target, data)
        written.append(target)
    return written


__all__ = [
    "DemoImage",
    "DEMO_IMAGES",
    "DEMO_DIR",
    "DEMO_JSON",
    "DEMO_IMAGE_DIR",
    "JPEG_QUALITY",
    "build_demo_images",
    "load_source",
    "render",
    "encode_jpeg",
]
