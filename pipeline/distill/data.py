"""The data path of distill: caption pairs -> (images, tokens, teacher rows, negatives) on the device.

Everything is looked up BY INDEX from memory-mapped arrays, never by batch position:
- images: prepare's uint8 cache [N, H, W, 3] (1 byte per pixel crosses to the device; conversion,
  augmentation and normalization run there);
- tokens: every caption of the split tokenized once at start-up, int32 [M, L], kept on the device;
- teacher rows: the feature store's text_emb [M, D] and image_emb [N, D] (fp16 on disk). The bank goes
  to the device when it fits (`TeacherBank`), else the rows of each batch and its negatives are gathered
  from the memory map by the loader threads, in pinned memory.
Loader threads only copy bytes (no randomness), so the batch of (epoch, step) is the same whatever the
number of threads and whenever it is built: resume is exact.

Unpaired rows (`Unpaired`, off unless distill.unpaired_*_per_step > 0) ride along each batch: images without
captions (their uint8 pixels for the student, their image_emb rows for the teacher) and texts without an image
(their tokens, and rows of the store's unpaired_text_emb), drawn by `UnpairedSampler`s.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.distill.extra_teachers import ExtraTeachers
from pipeline.distill.knowledge import MinedLists
from pipeline.distill.losses import Knowledge, UnpairedRows
from pipeline.distill.sampler import EpochSampler, UnpairedSampler
from pipeline.distill.views import ViewChoice


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A zero-copy CPU tensor over a (read-only) numpy array or memmap; nothing ever writes to it.
    (A store array of several chunk files, `ChunkedRows`, is copied into one array first.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(np.asarray(array))


def tokenize_all(tokenize, texts, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Every caption -> (input_ids, attention_mask) int32 [M, L] (the model's fixed max_tokens)."""
    ids, mask = [], []
    for i in range(0, len(texts), chunk):
        tok = tokenize([str(t) for t in texts[i : i + chunk]])
        ids.append(tok["input_ids"].to(torch.int32))
        mask.append(tok["attention_mask"].to(torch.int32))
    return torch.cat(ids), torch.cat(mask)


class TeacherBank:
    """The teacher rows of one split: `text` [M, D], `image` [N, D], `text_image` [M] (image row of each caption).

    On the device when `on_device` (a GPU copy, or on the CPU the memory map itself, without a copy);
    otherwise (`placement` memmap, or auto with a bank over `max_bytes` on a GPU) `text`/`image` stay
    memory-mapped numpy arrays and the loader threads gather the rows of each batch."""

    def __init__(
        self,
        image_emb: np.ndarray,
        text_emb: np.ndarray,
        text_image: np.ndarray,
        device: torch.device,
        *,
        placement: str = "auto",
        max_bytes: float = 4 * 2**30,
        unpaired_text_emb: np.ndarray | None = None,
    ) -> None:
        self.device = device
        self.dim = int(text_emb.shape[1])
        self.n_images, self.n_texts = int(image_emb.shape[0]), int(text_emb.shape[0])
        unpaired = unpaired_text_emb if unpaired_text_emb is not None else np.empty((0, self.dim), text_emb.dtype)
        self.nbytes = int(image_emb.nbytes + text_emb.nbytes + unpaired.nbytes)
        self.text_image_np = np.asarray(text_image, dtype=np.int64)
        if device.type == "cpu":  # the memory map is CPU memory already: a tensor over it, no copy
            self.on_device = placement != "memmap"
        else:
            self.on_device = placement == "device" or (placement == "auto" and self.nbytes <= max_bytes)
        if self.on_device:
            self.text = as_tensor(text_emb).to(device)
            self.image = as_tensor(image_emb).to(device)
            self.unpaired_text = as_tensor(unpaired).to(device)  # [U, D] texts without an image
        else:
            self.text, self.image, self.unpaired_text = text_emb, image_emb, unpaired
        self.text_image = torch.from_numpy(self.text_image_np).to(device)


@dataclass
class HostBatch:
    """What a loader thread prepares for one step (CPU side)."""

    epoch: int
    step: int
    rows: np.ndarray  # [B] this rank's caption rows
    global_rows: np.ndarray  # [G] caption rows of every rank (the in-batch terms see the global batch)
    images: torch.Tensor  # uint8 [B, H, W, 3] (pinned on CUDA)
    queue_rows: np.ndarray | None  # [K] caption rows of the negatives (None: none or the whole bank)
    t_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # (t_v, t_t) [G, D] when the bank is not on the device
    queue: tuple[torch.Tensor, torch.Tensor] | None = None  # (queue_v, queue_t) [K, D] idem
    # unpaired rows (None: not drawn): images [G_v] store image rows, texts [G_t] unpaired_text_emb rows
    u_image_rows: np.ndarray | None = None
    u_images: torch.Tensor | None = None  # uint8 [B_v, H, W, 3] this rank's unpaired images
    u_text_rows: np.ndarray | None = None
    u_text_local: np.ndarray | None = None  # [B_t] this rank's unpaired texts (rows of the unpaired tokens)
    u_t_rows: dict[str, torch.Tensor] = field(default_factory=dict)  # "v"/"t": teacher rows when not on device
    candidates: tuple[torch.Tensor, torch.Tensor] | None = None  # mined (cand_v, cand_t) when not on device
    extra: list[dict[str, torch.Tensor]] | None = None  # the other teachers' rows when not on device
    image_boxes: torch.Tensor | None = None  # float32 [B, 5] the view of each image (distill.teacher_views)
    u_image_boxes: torch.Tensor | None = None  # float32 [B_v, 5] idem, this rank's unpaired images


@dataclass
class DeviceBatch:
    epoch: int
    step: int
    rows: np.ndarray
    images: torch.Tensor  # uint8 [B, H, W, 3] on the device
    input_ids: torch.Tensor  # int64 [B, L]
    attention_mask: torch.Tensor  # int64 [B, L]
    t_v: torch.Tensor  # [G, D] teacher image rows of the global batch's pairs
    t_t: torch.Tensor  # [G, D] teacher text rows
    image_ids: torch.Tensor  # int64 [G] image row of each pair of the global batch
    queue_v: torch.Tensor | None = None
    queue_t: torch.Tensor | None = None
    queue_v_ids: torch.Tensor | None = None
    queue_t_ids: torch.Tensor | None = None
    u_images: torch.Tensor | None = None  # uint8 [B_v, H, W, 3] this rank's unpaired images
    u_input_ids: torch.Tensor | None = None  # int64 [B_t, L] this rank's unpaired texts
    u_attention_mask: torch.Tensor | None = None
    unpaired: UnpairedRows | None = None  # teacher rows and ids of the global unpaired batch (student rows: later)
    knowledge: Knowledge | None = None  # the knowledge terms' inputs for the global batch (losses/__init__.py)
    # the view each image is seen through (pipeline/distill/views.py), pairs then unpaired images; None: whole frames
    image_boxes: torch.Tensor | None = None  # float32 [B, 5] on the device
    u_image_boxes: torch.Tensor | None = None  # float32 [B_v, 5]


@dataclass(frozen=True)
class Unpaired:
    """What to draw beside the pairs: unpaired images (a sampler over `image_rows`, the store image rows that no
    caption names) and / or unpaired texts (a sampler over the rows of unpaired_text_emb, with their tokens)."""

    images: UnpairedSampler | None = None
    image_rows: np.ndarray | None = None  # int64 [N_u] store image row of each pool entry
    texts: UnpairedSampler | None = None
    tokens: tuple[torch.Tensor, torch.Tensor] | None = None  # int32 [U, L] the unpaired texts tokenized


class BatchLoader:
    """Builds the batches of (epoch, step) ahead of the training loop with `num_workers` threads.

    `queue_size` K > 0: the K pairs preceding the batch in the epoch order (EpochSampler.queue_rows);
    K = 0: the whole bank (every image row and every caption row of the split) as negatives."""

    def __init__(
        self,
        images: np.ndarray,
        bank: TeacherBank,
        tokens: tuple[torch.Tensor, torch.Tensor],
        sampler: EpochSampler,
        *,
        queue_size: int,
        use_queue: bool,
        num_workers: int = 2,
        prefetch: int = 4,
        cache_rows: np.ndarray | None = None,
        unpaired: Unpaired | None = None,
        mined: MinedLists | None = None,
        extra: ExtraTeachers | None = None,
        views: ViewChoice | None = None,
    ) -> None:
        self.images, self.bank, self.sampler = images, bank, sampler
        self.views = views  # view-matched targets (pipeline/distill/views.py), when used
        self.mined = mined  # the knowledge terms' candidate lists (pipeline/distill/knowledge.py), when used
        self.extra = extra  # the other teachers' banks (pipeline/distill/extra_teachers.py), when used
        self.unpaired = unpaired or Unpaired()
        # image cache row of each store image row (identity unless extract skipped images)
        self.image_cache_row = None if cache_rows is None else np.asarray(cache_rows, np.int64)
        # image cache row of each caption (the store may lack images that extract skipped)
        self.caption_cache_row = (
            bank.text_image_np if cache_rows is None else np.asarray(cache_rows, np.int64)[bank.text_image_np]
        )
        self.queue_size, self.use_queue = int(queue_size), bool(use_queue)
        self.num_workers, self.prefetch = int(num_workers), max(1, int(prefetch))
        self.pin = bank.device.type == "cuda"
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        device = bank.device
        self.input_ids, self.attention_mask = tokens[0].to(device), tokens[1].to(device)
        if self.use_queue and self.queue_size == 0:
            # whole bank: constant for the run, built once
            self.all_image_ids = torch.arange(bank.n_images, device=device)
            self.all_text_ids = bank.text_image
        if self.unpaired.tokens is not None:
            self.u_input_ids, self.u_attention_mask = (t.to(device) for t in self.unpaired.tokens)

    # -- CPU side (loader threads) --------------------------------------------------------------------
    def _buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An output buffer: pinned on CUDA (torch's caching host allocator reuses those and tracks the copies
        in flight); on the CPU one given back by `release`, so that a batch does not page-fault fresh memory."""
        if not self.pin:
            with self._lock:
                free = self._free.get((shape, dtype))
                if free:
                    return free.pop()
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def _take(self, array: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        """array[rows] into a buffer. Large rows (images) one memcpy each, which releases the GIL so the loader
        threads overlap; small rows (teacher features) in one np.take."""
        dtype = torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype
        out = self._buffer((len(rows),) + tuple(array.shape[1:]), dtype)
        dst = out.numpy()
        if array[:1].nbytes >= 1 << 16:
            for i, r in enumerate(rows.tolist()):
                dst[i] = array[r]
        else:
            np.take(array, rows, axis=0, out=dst)
        return out

    def release(self, hb: HostBatch) -> None:
        """The step is done with `hb` (and the device batch made from it): its CPU buffers may be reused."""
        if self.pin:
            return
        tensors = [hb.images, *(hb.t_rows or ()), *(hb.queue or ()), *hb.u_t_rows.values(), *(hb.candidates or ())]
        tensors += [t for rows in hb.extra or () for t in rows.values()]
        tensors += [hb.u_images] if hb.u_images is not None else []
        with self._lock:
            for t in tensors:
                self._free.setdefault((tuple(t.shape), t.dtype), []).append(t)

    def host_batch(self, epoch: int, step: int) -> HostBatch:
        s, bank = self.sampler, self.bank
        rows, global_rows = s.rows(epoch, step), s.global_rows(epoch, step)
        images = self._take(self.images, self.caption_cache_row[rows])
        queue_rows = s.queue_rows(epoch, step, self.queue_size) if self.use_queue and self.queue_size > 0 else None
        hb = HostBatch(epoch, step, rows, global_rows, images, queue_rows)
        if self.views is not None:
            hb.image_boxes = self.views.boxes_of(epoch, bank.text_image_np[rows])
        if not bank.on_device:
            hb.t_rows = (self._take(bank.image, bank.text_image_np[global_rows]), self._take(bank.text, global_rows))
            if queue_rows is not None:
                hb.queue = (self._take(bank.image, bank.text_image_np[queue_rows]), self._take(bank.text, queue_rows))
        self._host_unpaired(hb)
        if self.mined is not None:
            hb.candidates = self.mined.host_rows(global_rows, self._take)
        if self.extra is not None:
            hb.extra = self.extra.host_rows(global_rows, bank.text_image_np, queue_rows, self._take)
        return hb

    def _host_unpaired(self, hb: HostBatch) -> None:
        """The unpaired rows of (epoch, step): this rank's pixels / token rows, the global teacher rows' indices
        (and the teacher rows themselves when the bank is memory-mapped)."""
        u, bank = self.unpaired, self.bank
        if u.images is not None:
            hb.u_image_rows = u.image_rows[u.images.global_rows(hb.epoch, hb.step)]
            mine = u.image_rows[u.images.rows(hb.epoch, hb.step)]
            hb.u_images = self._take(self.images, mine if self.image_cache_row is None else self.image_cache_row[mine])
            if self.views is not None:
                hb.u_image_boxes = self.views.boxes_of(hb.epoch, mine)
            if not bank.on_device:
                hb.u_t_rows["v"] = self._take(bank.image, hb.u_image_rows)
        if u.texts is not None:
            hb.u_text_rows = u.texts.global_rows(hb.epoch, hb.step)
            hb.u_text_local = u.texts.rows(hb.epoch, hb.step)
            if not bank.on_device:
                hb.u_t_rows["t"] = self._take(bank.unpaired_text, hb.u_text_rows)

    def iterate(self, epoch: int, start: int, stop: int) -> Iterator[HostBatch]:
        """Host batches of steps start..stop-1 of `epoch`, in order, prepared ahead by the threads."""
        if self.num_workers <= 0:
            for step in range(start, stop):
                yield self.host_batch(epoch, step)
            return
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="kdpipe-loader") as pool:
            pending = []
            nxt = start
            try:
                while nxt < stop or pending:
                    while nxt < stop and len(pending) < self.prefetch:
                        pending.append(pool.submit(self.host_batch, epoch, nxt))
                        nxt += 1
                    yield pending.pop(0).result()
            finally:
                for f in pending:
                    f.cancel()

    # -- device side (main thread) --------------------------------------------------------------------
    def to_device(self, hb: HostBatch) -> DeviceBatch:
        bank, dev = self.bank, self.bank.device
        rows = torch.from_numpy(hb.rows).to(dev, non_blocking=True)
        grows = torch.from_numpy(hb.global_rows).to(dev, non_blocking=True)
        image_ids = bank.text_image[grows]
        if hb.t_rows is None:
            t_v, t_t = bank.image[image_ids], bank.text[grows]
        else:
            t_v, t_t = (x.to(dev, non_blocking=True) for x in hb.t_rows)
        if self.views is not None:  # the teacher's feature of the view each image is seen through
            t_v = self.views.teacher_rows(hb.epoch, bank.text_image_np[hb.global_rows], image_ids)
        batch = DeviceBatch(
            epoch=hb.epoch,
            step=hb.step,
            rows=hb.rows,
            images=hb.images.to(dev, non_blocking=True),
            input_ids=self.input_ids[rows].long(),
            attention_mask=self.attention_mask[rows].long(),
            t_v=t_v,
            t_t=t_t,
            image_ids=image_ids,
        )
        if hb.image_boxes is not None:
            batch.image_boxes = hb.image_boxes.to(dev)
        if hb.u_image_rows is not None or hb.u_text_rows is not None:
            self._device_unpaired(hb, batch)
        queue = self._device_queue(hb, batch) if self.use_queue else None
        if self.mined is not None:
            batch.knowledge = self.mined.knowledge(grows, image_ids, hb.candidates)
        if self.extra is not None:
            batch.knowledge = batch.knowledge or Knowledge()
            batch.knowledge.extra = self.extra.rows(grows, image_ids, queue, hb.extra)
        return batch

    def _device_queue(self, hb: HostBatch, batch: DeviceBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The negatives (queue_v/t and their image ids) into `batch`; returns the (image rows, caption rows) of the
        queue's entries, (None, None) for the whole bank."""
        bank, dev = self.bank, self.bank.device
        if self.queue_size == 0:
            batch.queue_v, batch.queue_t = bank.image, bank.text
            batch.queue_v_ids, batch.queue_t_ids = self.all_image_ids, self.all_text_ids
            return None, None
        qrows = torch.from_numpy(hb.queue_rows).to(dev, non_blocking=True)
        batch.queue_v_ids = bank.text_image[qrows]
        batch.queue_t_ids = batch.queue_v_ids
        if hb.queue is None:
            batch.queue_v, batch.queue_t = bank.image[batch.queue_v_ids], bank.text[qrows]
        else:
            batch.queue_v, batch.queue_t = (x.to(dev, non_blocking=True) for x in hb.queue)
        return batch.queue_v_ids, qrows

    def _device_unpaired(self, hb: HostBatch, batch: DeviceBatch) -> None:
        bank, dev = self.bank, self.bank.device
        batch.unpaired = UnpairedRows()
        if hb.u_image_rows is not None:
            ids = torch.from_numpy(hb.u_image_rows).to(dev, non_blocking=True)
            batch.u_images = hb.u_images.to(dev, non_blocking=True)
            batch.unpaired.t_v = bank.image[ids] if "v" not in hb.u_t_rows else hb.u_t_rows["v"].to(dev)
            batch.unpaired.v_ids = ids  # the image's own row: masked where a whole-bank queue holds it
            if self.views is not None:
                batch.unpaired.t_v = self.views.teacher_rows(hb.epoch, hb.u_image_rows, ids)
                batch.u_image_boxes = hb.u_image_boxes.to(dev)
        if hb.u_text_rows is not None:
            rows = torch.from_numpy(hb.u_text_rows).to(dev, non_blocking=True)
            local = torch.from_numpy(hb.u_text_local).to(dev, non_blocking=True)
            batch.u_input_ids = self.u_input_ids[local].long()
            batch.u_attention_mask = self.u_attention_mask[local].long()
            batch.unpaired.t_t = bank.unpaired_text[rows] if "t" not in hb.u_t_rows else hb.u_t_rows["t"].to(dev)
            batch.unpaired.t_ids = -1 - rows  # no image has a negative id, and no two texts share one


# -- augmentation (on the device) -------------------------------------------------------------------------
def random_resized_crop(
    x: torch.Tensor,
    size: int,
    generator: torch.Generator,
    *,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> torch.Tensor:
    """float [B, 3, H, W] -> [B, 3, size, size]: per image a random crop of `scale` of the area with aspect
    ratio in `ratio` (clipped to the image), resized bilinearly, mirrored with probability 0.5.

    One affine grid_sample for the whole batch; the random numbers come from `generator` (CPU), so the
    result depends only on its seed."""
    b = x.shape[0]
    u = torch.rand(b, 5, generator=generator, dtype=torch.float64)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # fraction of the width
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (2 * u[:, 2] - 1) * (1 - w)  # crop centre in [-1, 1] coordinates, inside the image
    cy = (2 * u[:, 3] - 1) * (1 - h)
    sx = torch.where((u[:, 4] < 0.5) & flip, -w, w)
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
