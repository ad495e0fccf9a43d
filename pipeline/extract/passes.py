"""What the image and the text pass share: DataLoader worker processes, fetching a batch's result from the
device one batch late (`Lag`), rank 0's progress bar, and the background thread that commits each finished
unit, its chunk file first and then its marker (`Committer`)."""

from __future__ import annotations

import json
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.extract.units import Unit
from pipeline.progress import progress
from pipeline.store.durable import naming, write_file_durably
from pipeline.store.features_writer import StoreWriter


def data_loader(dataset: torch.utils.data.Dataset, workers: int, pin: bool, prefetch: int, **kw: Any):
    """A DataLoader over `dataset` with `workers` forked worker processes (0: in this process)."""
    extra: dict[str, Any] = {}
    if workers > 0:
        extra["prefetch_factor"] = prefetch
        if sys.platform.startswith("linux"):
            extra["multiprocessing_context"] = "fork"  # workers inherit the teacher; nothing is pickled
    return torch.utils.data.DataLoader(dataset, num_workers=workers, pin_memory=pin, **kw, **extra)


class Committer:
    """A background thread that commits finished units: the chunk file (durably), then its marker with the
    chunk's checksum. An error in the thread is raised in the caller at the next `put` or at `close`."""

    def __init__(self, writer: StoreWriter, work: Path) -> None:
        self.writer, self.work = writer, work
        self._queue: queue.Queue = queue.Queue(maxsize=2)  # bounds the finished units held in memory
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="extract-commit", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            unit, rows, record = item
            try:
                # the chunk's checksum rides in its marker: rank 0 records them all at finalization
                with naming(self.writer.chunk_path(unit.split, unit.array, unit.index)):
                    digest = self.writer.write_chunk(unit.split, unit.array, unit.index, rows)
                record = {**record, "sha256": digest}
                write_file_durably(self.work / "done" / unit.marker, json.dumps(record).encode())
            except BaseException as err:  # noqa: BLE001 -- re-raised in the main thread
                self._error = err

    def put(self, unit: Unit, rows: np.ndarray, record: dict[str, Any]) -> None:
        self._check()
        self._queue.put((unit, rows, record))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error


class Lag:
    """Fetch a batch's result from the device only after the next batch has been queued (keeps the GPU fed)."""

    def __init__(self) -> None:
        self._pending: tuple[torch.Tensor, Callable[[np.ndarray], None]] | None = None

    def push(self, out: torch.Tensor, then: Callable[[np.ndarray], None]) -> None:
        previous, self._pending = self._pending, (out, then)
        if previous is not None:
            previous[1](previous[0].float().cpu().numpy())

    def flush(self) -> None:
        previous, self._pending = self._pending, None
        if previous is not None:
            previous[1](previous[0].float().cpu().numpy())


@contextmanager
def progress_bar(show: bool, description: str, total: int, unit: str) -> Iterator[Any]:
    if show:
        with progress(description, total=total, unit=unit) as bar:
            yield bar
    else:

        class _Quiet:
            def advance(self, n: int = 1) -> None:
                pass

        yield _Quiet()
