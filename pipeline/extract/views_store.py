"""`kdpipe views`: write the views store (format `kdpipe-views` v1: pipeline/extract/views.py; its reader:
pipeline/store/views.py). Each view's store is an extract run of its own (`run_extract` with a `ViewTeacher`): resumable chunk by
chunk like any extraction, its identity the teacher's plus the view's, so a changed setting redoes only what it
changes."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.index import DatasetIndex
from pipeline.data.pixels import PixelRecipe
from pipeline.errors import InputError
from pipeline.extract.config import ExtractConfig
from pipeline.extract.views import ViewsConfig, ViewTeacher, view_boxes, views_extract_config
from pipeline.store.durable import write_file_durably
from pipeline.store.features_writer import clear_store_dir
from pipeline.store.ownership import claim
from pipeline.store.views import FORMAT, VERSION, VIEWS_STORE, store_path

log = logging.getLogger(__name__)


@dataclass
class ViewsResult:
    path: Path
    count: int
    images: dict[str, int]  # split -> images
    seconds: float

    def summary(self) -> str:
        sizes = ", ".join(f"{s} {n:,} images" for s, n in self.images.items())
        return f"views: wrote {self.path} ({self.count} views of {sizes}) in {self.seconds:.1f} s"


def run_views(
    index: DatasetIndex,
    extract_cfg: ExtractConfig,
    cfg: ViewsConfig,
    recipe: PixelRecipe,
    out: Path | str,
    teacher: Any = None,
    *,
    features: Path | str | None = None,
    fresh: bool = False,
) -> ViewsResult:
    """The teacher's features of `cfg.count` views of every image of `cfg.splits` into `out` (module doc).
    `teacher`: an already built teacher (tests); by default extract's, built once for every view. `features`: the
    main feature store, whose caption rows each view's store takes instead of computing them again (the views
    change the images only), where it is complete and of the same teacher."""
    from pipeline.extract.run import run_extract  # the extract stage's own machinery, per view
    from pipeline.teachers import build_teacher

    t0 = time.perf_counter()
    out = Path(out)
    for s in cfg.splits:
        if s not in index.splits:
            raise InputError(f"views.splits: dataset {index.name} has no split {s!r}; it has {', '.join(index.splits)}")
    claim(out, VIEWS_STORE)
    boxes = {s: view_boxes(cfg, range(index.split(s).n_images)) for s in cfg.splits}
    head = {
        "format": FORMAT,
        "version": VERSION,
        **cfg.describe(),
        "splits": list(cfg.splits),
        "pixels": recipe.describe(),
        "dataset": {"name": index.name, "fingerprint": index.fingerprint},
    }
    _begin(out, head, boxes, fresh)
    if teacher is None:
        from pipeline.devices import resolve_device
        from pipeline.extract.config import COMPUTE_DTYPES, resolve_compute_dtype

        device = resolve_device(extract_cfg.device, "extract.device", 0)
        dtype = COMPUTE_DTYPES[resolve_compute_dtype(extract_cfg.compute_dtype, device)]
        teacher = build_teacher(extract_cfg.teacher, device=device, dtype=dtype)
    sub_cfg = views_extract_config(extract_cfg, cfg)
    texts = _main_store(features)
    for v in range(cfg.count):
        log.info(f"{out}: view {v} of {cfg.count}")
        view = ViewTeacher(teacher, recipe, cfg, v, boxes)
        run_extract(index, sub_cfg, store_path(out, v), view, fresh=fresh, source=texts)
    _write_group(out, {**head, "complete": True})
    return ViewsResult(out, cfg.count, {s: len(b) for s, b in boxes.items()}, time.perf_counter() - t0)


def _main_store(path: Path | str | None) -> Any:
    """The main feature store at `path`, opened, if it is there and complete (else None: texts are computed)."""
    from pipeline.store.features import is_feature_store_dir, open_store, read_attrs

    if path is None or not is_feature_store_dir(path) or (read_attrs(path) or {}).get("complete") is not True:
        return None
    return open_store(path)


def _begin(out: Path, head: dict[str, Any], boxes: dict[str, np.ndarray], fresh: bool) -> None:
    """The group with complete=false and its boxes; views' stores a changed setting leaves out are removed
    (ours: inside our store). The views' own stores are kept: each resumes or restarts on its own identity."""
    import zarr

    out.mkdir(parents=True, exist_ok=True)
    if fresh:
        clear_store_dir(out)
    _write_group(out, {**head, "complete": False})
    keep = {str(v) for v in range(int(head["count"]))} | {"boxes", "zarr.json"}
    for entry in sorted(out.iterdir()):
        if entry.name not in keep and entry.is_dir() and entry.name.isdigit():
            log.info(f"{out}: removing the store of view {entry.name}, which views.count no longer has")
            clear_store_dir(entry)
            entry.rmdir()
    root = zarr.open_group(str(out), mode="r+")
    for split, b in boxes.items():
        key = f"boxes/{split}"
        if key in root and np.array_equal(root[key][...], b):
            continue
        root.create_array(
            key,
            shape=b.shape,
            chunks=b.shape,
            dtype="float32",
            compressors=None,
            fill_value=0.0,
            overwrite=True,
            dimension_names=("image", "view", "box"),
        )[...] = b
    for stale in sorted(set(root.group_keys()) & {"boxes"}):
        for split in sorted(set(root[stale].array_keys()) - set(boxes)):
            del root[f"{stale}/{split}"]


def _write_group(out: Path, attrs: dict[str, Any]) -> None:
    """The group's zarr.json, durably (its `complete` flag is what a reader trusts)."""
    doc = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
    write_file_durably(out / "zarr.json", json.dumps(doc, indent=2).encode())
