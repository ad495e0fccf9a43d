"""The knowledge terms' inputs for a batch (`pipeline.distill.losses.Knowledge`): the teacher's mined candidates of
each pair, as stored teacher rows, and the cross-encoder's scores of them.

For the global batch's caption rows `r` [G] and their image rows `i` = text_image[r]:
    cand_v  = image_emb[text_to_image/rows[r]]          [G, K, D]    each caption's K mined images
    cand_t  = text_emb[image_to_text/rows[i]]           [G, K', D]   the K' mined captions of each pair's image
    ce_t2i  = text_to_image/ce_scores[r]                [G, 1 + K]   column 0 the caption's own image
    ce_i2t  = [ce_t2i[:, 0], image_to_text/ce_scores[i]] [G, 1 + K'] column 0 the pair itself (the same pair
                                                                     as ce_t2i's column 0), then the K' captions
The mined arrays (int32 rows, float32 scores: 20 MB per array for Flickr30K's captions) go to the device once;
the candidates' teacher rows are gathered like the pairs' (`TeacherBank`): on the device when the bank is
there, else by the loader threads from the memory maps. Everything is looked up by index from the position's
rows, so the batch of (epoch, step) is the same whenever it is built: resume stays exact.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pipeline.distill.losses import Knowledge


class MinedLists:
    """One split's mined arrays (pipeline/store/mined.py's MinedSplit) as distill reads them."""

    def __init__(self, mined_split, bank, *, cross_encoder: bool) -> None:
        t2i, i2t = mined_split.text_to_image, mined_split.image_to_text
        self.bank, self.device = bank, bank.device
        self.t2i_np = np.asarray(t2i.rows, np.int64)  # [M, K] store image rows
        self.i2t_np = np.asarray(i2t.rows, np.int64)  # [N, K'] store caption rows
        self.t2i = torch.from_numpy(self.t2i_np).to(self.device)
        self.i2t = torch.from_numpy(self.i2t_np).to(self.device)
        self.ce_t2i = self.ce_i2t = None
        if cross_encoder:
            self.ce_t2i = torch.from_numpy(np.asarray(t2i.ce_scores, np.float32)).to(self.device)  # [M, 1 + K]
            self.ce_i2t = torch.from_numpy(np.asarray(i2t.ce_scores, np.float32)).to(self.device)  # [N, K']

    def host_rows(self, global_rows: np.ndarray, take: Callable) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cand_v [G x K, D], cand_t [G x K', D]) gathered from the memory maps by a loader thread, flat (the
        loader's buffers are reused by shape); None when the bank is on the device (gathered there instead)."""
        if self.bank.on_device:
            return None
        images = self.bank.text_image_np[global_rows]
        v_rows, t_rows = self.t2i_np[global_rows], self.i2t_np[images]  # [G, K], [G, K']
        return take(self.bank.image, v_rows.reshape(-1)), take(self.bank.text, t_rows.reshape(-1))

    def knowledge(self, rows: torch.Tensor, image_ids: torch.Tensor, host: tuple | None) -> Knowledge:
        """The batch's Knowledge from its global caption rows [G] and image rows [G] (device tensors)."""
        if host is None:
            cand_v, cand_t = self.bank.image[self.t2i[rows]], self.bank.text[self.i2t[image_ids]]
        else:
            g = rows.shape[0]
            cand_v, cand_t = (x.to(self.device, non_blocking=True).view(g, -1, x.shape[-1]) for x in host)
        k = Knowledge(cand_v=cand_v, cand_t=cand_t)
        if self.ce_t2i is not None:
            k.ce_t2i = self.ce_t2i[rows]
            k.ce_i2t = torch.cat([k.ce_t2i[:, :1], self.ce_i2t[image_ids]], dim=1)
        return k
