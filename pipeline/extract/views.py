"""View-matched teacher targets (issue 20 §1; MobileCLIP's DataCompDR): the teacher's features of A views of
every training image, stored with the views' geometry, so that the student can be given the very view its
target was computed on.

The views of an image are boxes in the STUDENT'S FRAME: the region of the source image that prepare's recipe
(`prepare.image`, pipeline/data/pixels.py) turns into the student's cached uint8 row. View 0 is that whole
frame, the student's own evaluation view; views 1..A-1 are random resized crops of it (area `scale`, aspect
`ratio`, as torchvision's RandomResizedCrop draws them) mirrored with probability 1/2 when `flip`. A box is
(x0, y0, w, h, flip) in fractions of the frame, float32; both sides read the same float32 numbers:

- the teacher (`render_view`): the box mapped back into source pixels, resampled (bicubic) into a square
  image whose side is the box's longer side in source pixels (no detail lost), mirrored, then the teacher's own
  preprocessing. A square image is whole after every kdpipe teacher's resize + centre crop, so the teacher sees
  exactly the box, squashed to a square; for view 0 of a square image in `squash` mode that is the image
  itself (the main store's features, bit for bit);
- the student (pipeline/distill/views.py `crop_boxes`): the same box of its cached frame, resampled
  (bilinear) to its input size, mirrored.

Each image's boxes depend only on (views.seed, its row): `view_boxes` draws them from a generator seeded with
both, so the views of a row never change when other rows are added. They are not the student's cache: the crops
lie inside the frame the cache holds, so the cache needs nothing more (its disk is unchanged); the views cost
the store A x N x D more rows (Flickr30K's 29,000 training images, A = 4, D = 1024, float16: 238 MB).

The store (`kdpipe views`, `<workdir>/views.zarr`, format `kdpipe-views` v1): a zarr group whose attrs record
the views' settings, the recipe, the dataset fingerprint and `complete`; `boxes/<split>` float32 [N, A, 5]; and
`0/` .. `A-1/`, each a complete feature store (format v1, readable as any other: image_emb [N, D] of view v,
text_emb the teacher's caption features, unchanged by views) of the configured splits only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.pixels import PixelRecipe, ResizeConfig

BOX_FIELDS = ("x0", "y0", "w", "h", "flip")  # the last axis of a box array: fractions of the student's frame
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many (area, ratio) draws, then takes the whole frame


@dataclass(frozen=True)
class ViewsConfig:
    """params.yaml section `views` (`kdpipe views`)."""

    count: int = 4  # A views per image: view 0 the student's own, 1..A-1 random resized crops of it
    splits: tuple[str, ...] = ("train",)  # the splits a student trains on; the others keep their one view
    scale: tuple[float, float] = (0.35, 1.0)  # a crop's area, as a fraction of the frame's
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)  # a crop's aspect ratio (width / height)
    flip: bool = True  # mirror a crop with probability 1/2
    seed: int = 0  # the boxes of row r come from a generator seeded with (seed, r)

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"count must be at least 1 (view 0 is the student's own view), got {self.count}")
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits must name each split once and at least one, got {list(self.splits)}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {list(self.scale)}")
        if not 0 < self.ratio[0] <= self.ratio[1] or not all(map(math.isfinite, self.ratio)):
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {list(self.ratio)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def describe(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "scale": list(self.scale),
            "ratio": list(self.ratio),
            "flip": self.flip,
            "seed": self.seed,
        }


def view_boxes(cfg: ViewsConfig, rows: np.ndarray | range) -> np.ndarray:
    """float32 [len(rows), A, 5]: the boxes (x0, y0, w, h, flip) of each row's views; view 0 the whole frame."""
    out = np.zeros((len(rows), cfg.count, 5), np.float64)
    out[:, 0] = (0.0, 0.0, 1.0, 1.0, 0.0)
    log_lo, log_hi = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
    for i, row in enumerate(rows):
        rng = np.random.default_rng([cfg.seed, int(row)])
        u = rng.random((cfg.count - 1, CROP_ATTEMPTS + 1, 4))  # every draw made, used or not: a fixed stream
        for v in range(1, cfg.count):
            box = (0.0, 0.0, 1.0, 1.0)  # no attempt fitted: the whole frame
            for a in range(CROP_ATTEMPTS):
                area = cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * u[v - 1, a, 0]
                aspect = math.exp(log_lo + (log_hi - log_lo) * u[v - 1, a, 1])
                w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
                if w <= 1.0 and h <= 1.0:
                    box = ((1.0 - w) * u[v - 1, a, 2], (1.0 - h) * u[v - 1, a, 3], w, h)
                    break
            flip = float(cfg.flip and u[v - 1, CROP_ATTEMPTS, 0] < 0.5)
            out[i, v] = (*box, flip)
    boxes = out.astype(np.float32)
    # float32 rounding must not push a box past the frame's edge
    boxes[..., 2:4] = np.minimum(boxes[..., 2:4], 1.0)
    boxes[..., 0] = np.minimum(boxes[..., 0], np.float32(1.0) - boxes[..., 2])
    boxes[..., 1] = np.minimum(boxes[..., 1], np.float32(1.0) - boxes[..., 3])
    return boxes


def frame_in_source(recipe: ResizeConfig, width: int, height: int) -> tuple[float, float, float, float]:
    """(left, top, width, height) in source pixels of the region prepare's recipe turns into the student's
    frame: the whole image (`squash`), or the centre crop's window mapped back through the resize."""
    (rw, rh), (left, top, right, bottom) = recipe.geometry(width, height)
    fx, fy = width / rw, height / rh
    return left * fx, top * fy, (right - left) * fx, (bottom - top) * fy


def render_view(image: Image.Image, recipe: ResizeConfig, box: np.ndarray) -> Image.Image:
    """The teacher's input image of one view: `box` (x0, y0, w, h, flip; float32 fractions of the student's
    frame) cut from the source `image`, squashed to a square of its longer side, mirrored if flip."""
    fl, ft, fw, fh = frame_in_source(recipe, *image.size)
    x0, y0, w, h, flip = (float(b) for b in box)
    left, top = fl + x0 * fw, ft + y0 * fh
    width, height = w * fw, h * fh
    side = max(1, round(max(width, height)))
    view = image.resize((side, side), Image.Resampling.BICUBIC, box=(left, top, left + width, top + height))
    return view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else view


class ViewTeacher:
    """A teacher seen through view `view` of every image: its own preprocessing of `render_view`, row by row
    (the image pass asks `preprocess_row`); everything else, text included, is the wrapped teacher's. Its identity
    is the teacher's plus the view, so a store of one view is never resumed as another."""

    def __init__(
        self, teacher: Any, recipe: PixelRecipe, cfg: ViewsConfig, view: int, boxes: dict[str, np.ndarray]
    ) -> None:
        self.teacher, self.recipe, self.cfg, self.view, self.boxes = teacher, recipe, cfg, view, boxes
        self._preprocess = getattr(teacher, "preprocess_image_uint8", None) or teacher.preprocess_image

    def __getattr__(self, name: str) -> Any:  # the wrapped teacher's attributes and methods
        if "teacher" not in self.__dict__:  # half-built (a copy being made): nothing to delegate to yet
            raise AttributeError(name)
        return getattr(self.__dict__["teacher"], name)

    def identity(self) -> dict[str, Any]:
        return {**self.teacher.identity(), "view": self.view_record()}

    def view_record(self) -> dict[str, Any]:
        return {"index": self.view, **self.cfg.describe(), "pixels": self.recipe.describe()}

    def preprocess_row(self, image: Image.Image, split: str, row: int) -> Any:
        """The teacher's input for `image`, row `row` of `split`, seen through this view."""
        return self._preprocess(render_view(image, self.recipe.image, self.boxes[split][row, self.view]))


def views_extract_config(extract_cfg: Any, cfg: ViewsConfig) -> Any:
    """The extract settings of a view's store: the main store's, over the views' splits, with no other teacher."""
    return replace(extract_cfg, splits=tuple(cfg.splits), extra_teachers={})
