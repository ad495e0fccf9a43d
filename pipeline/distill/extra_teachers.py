"""The other teachers' rows of a batch (`distill.loss.teachers`: the feature store's teachers/<name>/ stores, one
per extra teacher of extract): the `TeacherRows` of `pipeline.distill.losses.Knowledge.extra`, gathered as the
built terms ask (`DistillLoss.extra_rows`), each in that teacher's own dimension D_m:

    pairs       t_v = image_emb_m[the pairs' image rows], t_t = text_emb_m[their caption rows]        [G, D_m]
    queue       queue_v / queue_t = the rows of the main queue's entries (the whole bank when queue_size = 0)
    candidates  cand_v = image_emb_m[text_to_image/rows[r]]   [G, K, D_m]   (the main teacher's mined lists)
                cand_t = text_emb_m[image_to_text/rows[i]]    [G, K', D_m]

Each teacher's bank is placed as the main one (`TeacherBank`: on the device when it fits, else the loader
threads gather its rows from the memory maps). The rows are looked up by index from the position's rows only,
so the batch of (epoch, step) is the same whenever it is built: resume stays exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipeline.distill.knowledge import MinedLists
from pipeline.distill.losses import TeacherRows

Host = list[dict[str, torch.Tensor]]  # per teacher: the rows a loader thread gathered (empty: on the device)


class ExtraTeachers:
    """The banks of `names` (TeacherBank-like: image [N, D_m], text [M, D_m], on_device), read per `what` (a
    subset of {"pairs", "queue", "candidates"}); `mined`: the main teacher's lists (for "candidates")."""

    def __init__(self, names: list[str], banks: list[Any], what: frozenset[str], mined: MinedLists | None) -> None:
        if "candidates" in what and mined is None:
            raise ValueError("the other teachers' candidate rows need the main teacher's mined lists")
        self.names, self.banks, self.what, self.mined = list(names), list(banks), frozenset(what), mined

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.banks)

    def host_rows(
        self, global_rows: np.ndarray, text_image: np.ndarray, queue_rows: np.ndarray | None, take: Callable
    ) -> Host | None:
        """The rows of the memory-mapped banks, flat, gathered by a loader thread (buffers are reused by shape);
        None when every bank is on the device."""
        if all(b.on_device for b in self.banks):
            return None
        out: Host = []
        images = text_image[global_rows]
        for bank in self.banks:
            rows: dict[str, torch.Tensor] = {}
            if not bank.on_device:
                rows["t_v"], rows["t_t"] = take(bank.image, images), take(bank.text, global_rows)
                if "queue" in self.what and queue_rows is not None:
                    rows["queue_v"] = take(bank.image, text_image[queue_rows])
                    rows["queue_t"] = take(bank.text, queue_rows)
                if "candidates" in self.what:
                    rows["cand_v"] = take(bank.image, self.mined.t2i_np[global_rows].reshape(-1))
                    rows["cand_t"] = take(bank.text, self.mined.i2t_np[images].reshape(-1))
            out.append(rows)
        return out

    def rows(
        self,
        grows: torch.Tensor,
        image_ids: torch.Tensor,
        queue: tuple[torch.Tensor | None, torch.Tensor | None] | None,
        host: Host | None,
    ) -> tuple[TeacherRows, ...]:
        """One TeacherRows per teacher for the global batch: caption rows `grows` [G] and image rows `image_ids`
        [G] (device tensors); `queue` = (image rows, caption rows) of the main queue's entries, (None, None) for
        the whole bank, None when no queue is read."""
        got = host if host is not None else [{} for _ in self.banks]
        return tuple(self._teacher_rows(b, g, grows, image_ids, queue) for b, g in zip(self.banks, got))

    def _teacher_rows(self, bank, got: dict[str, torch.Tensor], grows, image_ids, queue) -> TeacherRows:
        """One teacher's rows: those a loader thread gathered (`got`), else looked up in its bank on the device."""

        def rows(key: str, table, index: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
            x = got[key].to(bank.device, non_blocking=True) if key in got else table[index.reshape(-1)]
            return x if shape is None else x.view(*shape, x.shape[-1])

        r = TeacherRows(t_v=rows("t_v", bank.image, image_ids), t_t=rows("t_t", bank.text, grows))
        if "queue" in self.what and queue is not None:
            q_images, q_captions = queue
            if q_images is None:  # the whole bank
                r.queue_v, r.queue_t = bank.image, bank.text
            else:
                r.queue_v, r.queue_t = rows("queue_v", bank.image, q_images), rows("queue_t", bank.text, q_captions)
        if "candidates" in self.what:
            t2i, i2t = self.mined.t2i[grows], self.mined.i2t[image_ids]  # [G, K], [G, K']
            r.cand_v = rows("cand_v", bank.image, t2i, tuple(t2i.shape))
            r.cand_t = rows("cand_t", bank.text, i2t, tuple(i2t.shape))
        return r


__all__ = ["ExtraTeachers"]
