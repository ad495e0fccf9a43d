"""The image pass: decode and preprocess the images of this rank's image units in loader processes, embed
them with the teacher, commit each unit; a bad image stops the run or is recorded in the unit's marker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.data.image_file import BadImage, read_rgb
from pipeline.data.image_source import ImageFiles, ImageRef
from pipeline.data.index import SplitView
from pipeline.errors import InputError
from pipeline.extract.config import ExtractConfig
from pipeline.extract.passes import Committer, Lag, data_loader, progress_bar
from pipeline.extract.units import Unit
from pipeline.store.features_writer import StoreWriter
from pipeline.teachers import Teacher


class _ImageItems(torch.utils.data.Dataset):
    """Item i -> (pixels [3, S, S], error message or ""); a bad image gives `blank` and its message.

    `preprocess_row` (a teacher that sees each row its own way, pipeline/extract/views.py) is given the image with
    its (split, row), `where[i]`; else `preprocess` the image alone."""

    def __init__(
        self,
        images: list[ImageRef],
        preprocess: Callable[[Image.Image], torch.Tensor],
        blank: torch.Tensor,
        draft_size: int | None,
        exif: str,
        preprocess_row: Callable[[Image.Image, str, int], torch.Tensor] | None = None,
        where: list[tuple[str, int]] | None = None,
    ) -> None:
        self.images, self.preprocess, self.blank, self.draft_size = images, preprocess, blank, draft_size
        self.exif, self.preprocess_row, self.where = exif, preprocess_row, where
        self.files: ImageFiles | None = None  # made in each worker process (its open shard is its own)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        if self.files is None:
            self.files = ImageFiles()
        try:
            image = read_rgb(self.images[i], self.draft_size, self.exif, self.files)  # pipeline/data/image_file.py
        except BadImage as err:
            return self.blank.clone(), err.reason
        if self.preprocess_row is not None:
            return self.preprocess_row(image, *self.where[i]), ""
        return self.preprocess(image), ""


def extract_images(
    units: list[Unit],
    views: dict[str, SplitView],
    teacher: Teacher,
    cfg: ExtractConfig,
    writer: StoreWriter,
    work: Path,
    workers: int,
    device: torch.device,
    show: bool,
    tag: str,
    exif: str,
) -> None:
    # A teacher may offer the resize alone as uint8 (normalized on the device by encode_image_batch):
    # 4x fewer bytes through worker IPC, pinned memory and the host-to-device copy.
    preprocess = getattr(teacher, "preprocess_image_uint8", None) or teacher.preprocess_image
    blank = torch.zeros_like(preprocess(Image.new("RGB", (32, 32))))  # [3, S, S]
    draft = int(blank.shape[-1]) if cfg.jpeg_draft else None
    images: list[ImageRef] = []
    where: list[tuple[str, int]] = []  # (split, row) of each item
    batches: list[list[int]] = []
    batch_of: list[tuple[int, int]] = []  # batch -> (unit number, first row inside the unit)
    for k, u in enumerate(units):
        base = len(images)
        images.extend(views[u.split].image_ref[u.start : u.stop])
        where.extend((u.split, r) for r in range(u.start, u.stop))
        for b in range(0, u.rows, cfg.image_batch_size):
            batches.append(list(range(base + b, base + min(u.rows, b + cfg.image_batch_size))))
            batch_of.append((k, b))
    loader = data_loader(
        _ImageItems(images, preprocess, blank, draft, exif, getattr(teacher, "preprocess_row", None), where),
        workers,
        device.type == "cuda",
        cfg.prefetch_factor,
        batch_sampler=batches,
    )

    buffers: dict[int, np.ndarray] = {}
    filled: dict[int, int] = {}
    bad: dict[int, list[dict[str, Any]]] = {}
    total = sum(u.rows for u in units)
    with progress_bar(show, f"images{tag}", total, "img") as bar:
        batch_iter = iter(loader)  # worker processes fork here, before the commit thread starts
        committer = Committer(writer, work)
        lag = Lag()
        try:
            for n, (pixels, errors) in enumerate(batch_iter):
                k, first = batch_of[n]
                u = units[k]
                for j, message in enumerate(errors):
                    if message:
                        bad.setdefault(k, []).append(_bad_record(views[u.split], u.start + first + j, message))
                        if cfg.on_bad_image == "error":
                            row = u.start + first + j
                            raise InputError(
                                f"{views[u.split].image_ref[row].describe()}: cannot read image ({message}); "
                                "set extract.on_bad_image=skip to leave such images out"
                            )
                out = teacher.encode_image_batch(pixels.to(device, non_blocking=True))

                def place(rows: np.ndarray, k: int = k, first: int = first) -> None:
                    unit = units[k]
                    if k not in buffers:
                        buffers[k], filled[k] = np.empty((unit.rows, teacher.dim), np.float32), 0
                    buffers[k][first : first + len(rows)] = rows
                    filled[k] += len(rows)
                    bar.advance(len(rows))
                    if filled[k] == unit.rows:
                        committer.put(unit, buffers.pop(k), {"bad": bad.pop(k, []), "images": unit.content})

                lag.push(out, place)
            lag.flush()
        finally:
            committer.close()


def _bad_record(view: SplitView, row: int, message: str) -> dict[str, Any]:
    return {"row": int(row), "reason": message.replace(str(view.image_path[row]), "<file>")}
