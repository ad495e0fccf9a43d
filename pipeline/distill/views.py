"""View-matched targets in training (`distill.teacher_views`; the store: pipeline/extract/views.py).

Each step, every image of the batch (pairs and unpaired rows) is seen through one of its A stored views: the
student gets that box of its cached frame (`crop_boxes`, on the device) and every teacher image row of the step
that stands for the image (the positives of the contrastive terms, the L1 / cosine targets, the relation
terms' rows) is the teacher's feature of the same view. The negatives (the bank or queue, the mined
candidates) stay the teacher's view-0 rows: they stand for other images, which the student does not see.

Which view an image gets is `view_of(seed, epoch, row)`, a hash of the three: no state, the same whenever the
step is built, so a resumed run replays every view exactly. Every view is equally likely; an image sees a new
one each epoch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: every output bit depends on every input bit (uint64 arrays, wrapping)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def view_of(seed: int, epoch: int, rows: np.ndarray, count: int) -> np.ndarray:
    """int64 [len(rows)]: the view (0..count-1) image row `rows[i]` is seen through in `epoch` of a run seeded
    `seed`: a pure function of (seed, epoch, row)."""
    with np.errstate(over="ignore"):
        key = _mix(_mix(np.array([seed], np.uint64) + _GOLDEN) + np.uint64(epoch))
        x = _mix(key + np.asarray(rows, np.uint64) * _GOLDEN)
    return (x % np.uint64(count)).astype(np.int64)


def crop_boxes(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] -> [B, 3, H, W]: box i (x0, y0, w, h, flip; fractions of the frame) of image i,
    resampled bilinearly to the frame's size and mirrored where flip is 1. A whole, unmirrored box returns the
    image itself, exactly (view 0: the student's evaluation input)."""
    b = boxes.to(torch.float64).cpu()
    x0, y0, w, h, flip = b.unbind(1)
    theta = torch.zeros(len(b), 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = torch.where(flip > 0.5, -w, w)
    theta[:, 0, 2] = 2 * x0 + w - 1  # the box's centre in [-1, 1] coordinates
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * y0 + h - 1
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    whole = ((x0 == 0) & (y0 == 0) & (w == 1) & (h == 1) & (flip < 0.5)).to(x.device)
    return torch.where(whole[:, None, None, None], x, out)


class ViewChoice:
    """The views of one training split for a run (`targets`: pipeline/store/views.py ViewTargets): which
    view each image row gets in an epoch, its box and its teacher row. `emb` [A, N, D] goes to `device` once."""

    def __init__(self, targets, seed: int, device: torch.device) -> None:
        self.count, self.seed = targets.count, int(seed)
        self.boxes = np.ascontiguousarray(targets.boxes, np.float32)  # [N, A, 5]
        self.emb = torch.from_numpy(np.ascontiguousarray(targets.emb)).to(device)  # [A, N, D]

    def views(self, epoch: int, rows: np.ndarray) -> np.ndarray:
        return view_of(self.seed, epoch, rows, self.count)

    def boxes_of(self, epoch: int, rows: np.ndarray) -> torch.Tensor:
        """float32 [len(rows), 5] (CPU): the box of each image row's view in `epoch`."""
        rows = np.asarray(rows, np.int64)
        return torch.from_numpy(self.boxes[rows, self.views(epoch, rows)])

    def teacher_rows(self, epoch: int, rows: np.ndarray, ids: torch.Tensor) -> torch.Tensor:
        """[len(rows), D] on the device: the teacher's feature of each image row's view in `epoch` (`ids`: the same
        rows, on the device)."""
        v = torch.from_numpy(self.views(epoch, np.asarray(rows, np.int64))).to(self.emb.device)
        return self.emb[v, ids]
