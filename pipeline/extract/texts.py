"""The text pass: tokenize the captions (and unpaired texts) of this rank's text units in loader processes,
bucketed by length inside each unit, embed them with the teacher and commit each unit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.data.index import SplitView
from pipeline.extract.config import ExtractConfig
from pipeline.extract.passes import Committer, Lag, data_loader, progress_bar
from pipeline.extract.units import Unit
from pipeline.store.features import UNPAIRED_TEXT
from pipeline.store.features_writer import StoreWriter
from pipeline.teachers import Teacher


class _CaptionUnits(torch.utils.data.Dataset):
    """Item k -> the batches of caption unit k, bucketed by length: [(positions in the unit, TokenBatch)]."""

    def __init__(self, texts: list[list[str]], teacher: Teacher, batch_size: int) -> None:
        self.texts, self.teacher, self.batch_size = texts, teacher, batch_size

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, k: int) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        texts = self.texts[k]
        lengths = np.asarray(self.teacher.token_lengths(texts), dtype=np.int64)
        order = np.argsort(-lengths, kind="stable")  # longest first: a too-large batch fails at once
        out = []
        for b in range(0, len(texts), self.batch_size):
            pos = order[b : b + self.batch_size]
            out.append((torch.from_numpy(pos), self.teacher.tokenize([texts[j] for j in pos])))
        return out


def extract_texts(
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
) -> None:
    def column(u: Unit) -> np.ndarray:
        return views[u.split].unpaired_text if u.array == UNPAIRED_TEXT else views[u.split].caption_text

    texts = [column(u)[u.start : u.stop].tolist() for u in units]
    loader = data_loader(
        _CaptionUnits(texts, teacher, cfg.text_batch_size),
        workers,
        device.type == "cuda",
        cfg.prefetch_factor,
        batch_size=None,
    )
    total = sum(u.rows for u in units)
    with progress_bar(show, f"captions{tag}", total, "captions") as bar:
        unit_iter = iter(loader)
        committer = Committer(writer, work)
        lag = Lag()
        try:
            for u, batches in zip(units, unit_iter):
                buf = np.empty((u.rows, teacher.dim), np.float32)
                for pos, tokens in batches:
                    tokens = {key: t.to(device, non_blocking=True) for key, t in tokens.items()}
                    out = teacher.encode_text_batch(tokens)

                    def place(rows: np.ndarray, pos: torch.Tensor = pos, buf: np.ndarray = buf) -> None:
                        buf[pos.numpy()] = rows
                        bar.advance(len(rows))

                    lag.push(out, place)
                lag.flush()
                committer.put(u, buf, {})
        finally:
            committer.close()
