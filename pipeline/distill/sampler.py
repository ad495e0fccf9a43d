"""The order in which distill visits caption pairs, and the teacher rows it uses as contrastive negatives.

Every epoch is a fresh permutation of the M caption rows of the training split, a pure function of
(seed, epoch): nothing is consumed from a shared random stream, so the position (epoch, step) is the whole
sampler state and a resumed run sees exactly the batches an uninterrupted run would.

Step s of an epoch covers the global batch `perm[s*G : (s+1)*G]` (G = batch_size x world size; the last
incomplete batch is dropped, so every step has the same shape); rank r takes its slice of B rows.

The contrastive "queue" is momentum-free: the K pairs that precede the global batch in this epoch's order,
`perm[s*G - K : s*G]` taken cyclically (at the start of an epoch it wraps to the end of the same epoch's
order). These are the teacher rows of the previous K/G batches, as DSMD's queue would hold, but read from
the feature store by index, with no enqueue state. They never overlap the current batch while K <= M - G.

Unpaired rows (`UnpairedSampler`: images without captions, texts without images) are drawn beside the
pairs, `per_step` per rank per step. An epoch stays one pass over the PAIRS; the unpaired pool is read
cyclically and independently of epochs: the j-th unpaired row drawn in the run (counting every rank's
rows, step after step) is `perm_c[j mod n]` of cycle `c = j // n`, where `perm_c` is a fresh permutation
seeded by (seed, stream, c). So a pool larger than what an epoch draws is still covered (every row once per
cycle, cycles continue across epochs), a small pool is repeated, and the rows of (epoch, step) are again a
pure function of the position: resume stays exact. A global batch that straddles two cycles may hold a row
twice (at most min(G, n) rows apart in the order); harmless for the per-row terms it feeds.

Candidate-aware batches (`CandidateSampler`, DCD's hard samples in the batch): the epoch's order is built so
that each anchor caption is followed by one caption of each of its first `group` teacher-mined images (the
mined store's text_to_image/rows). Every caption still appears exactly once per epoch, the order is still a
pure function of (seed, epoch), and everything above (steps, ranks, the queue) reads it unchanged.
"""

from __future__ import annotations

import numpy as np


class EpochSampler:
    def __init__(
        self, n: int, batch_size: int, seed: int, *, world_size: int = 1, rank: int = 0, shuffle: bool = True
    ) -> None:
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler geometry: batch_size={batch_size}, world_size={world_size}, rank={rank}")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.world_size, self.rank, self.shuffle = int(world_size), int(rank), bool(shuffle)
        self.global_batch = self.batch_size * self.world_size
        self.steps_per_epoch = self.n // self.global_batch
        self._cached: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """int64 [n]: the caption rows of the split in the order of `epoch` (cached for the current epoch)."""
        if self._cached is None or self._cached[0] != epoch:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            else:
                perm = np.arange(self.n)
            self._cached = (epoch, perm.astype(np.int64))
        return self._cached[1]

    def global_rows(self, epoch: int, step: int) -> np.ndarray:
        """[G] caption rows of the global batch of (epoch, step), every rank's slice in rank order."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside 0..{self.steps_per_epoch - 1}")
        start = step * self.global_batch
        return self.permutation(epoch)[start : start + self.global_batch]

    def rows(self, epoch: int, step: int) -> np.ndarray:
        """[B] caption rows of this rank's part of the batch."""
        lo = self.rank * self.batch_size
        return self.global_rows(epoch, step)[lo : lo + self.batch_size]

    def queue_rows(self, epoch: int, step: int, k: int) -> np.ndarray:
        """[k] caption rows that precede the global batch in the epoch's order (cyclically)."""
        if k > self.n - self.global_batch:
            raise ValueError(f"queue of {k} rows does not fit beside a batch of {self.global_batch} in {self.n} pairs")
        start = step * self.global_batch
        return self.permutation(epoch)[(np.arange(start - k, start) % self.n)]


class UnpairedSampler:
    """`per_step` rows per rank per step of a pool of n unpaired rows, cycling through per-cycle permutations.

    `steps_per_epoch` is the pair sampler's (the position of (epoch, step) in the run); `stream` separates
    pools drawn with the same seed (images 1, texts 2)."""

    def __init__(
        self, n: int, per_step: int, seed: int, steps_per_epoch: int, *, stream: int, world_size: int = 1, rank: int = 0
    ) -> None:
        if n <= 0 or per_step <= 0 or steps_per_epoch <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad unpaired sampler: n={n}, per_step={per_step}, steps={steps_per_epoch}, rank={rank}")
        self.n, self.per_step, self.seed, self.stream = int(n), int(per_step), int(seed), int(stream)
        self.steps_per_epoch, self.world_size, self.rank = int(steps_per_epoch), int(world_size), int(rank)
        self.global_batch = self.per_step * self.world_size
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, cycle: int) -> np.ndarray:
        """int64 [n]: the pool in the order of `cycle`. Neighbouring cycles stay cached (a batch may straddle
        two); the cache is replaced, never mutated, because loader threads call this concurrently."""
        perms = self._perms
        perm = perms.get(cycle)
        if perm is None:
            perm = np.random.default_rng([self.seed, self.stream, cycle]).permutation(self.n).astype(np.int64)
            self._perms = {**{c: p for c, p in perms.items() if abs(c - cycle) <= 1}, cycle: perm}
        return perm

    def global_rows(self, epoch: int, step: int) -> np.ndarray:
        """[G] pool rows of (epoch, step), every rank's slice in rank order."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside 0..{self.steps_per_epoch - 1}")
        first = (epoch * self.steps_per_epoch + step) * self.global_batch
        j = np.arange(first, first + self.global_batch, dtype=np.int64)
        cycles = j // self.n
        out = np.empty(self.global_batch, dtype=np.int64)
        for c in np.unique(cycles).tolist():
            sel = cycles == c
            out[sel] = self.permutation(c)[j[sel] % self.n]
        return out

    def rows(self, epoch: int, step: int) -> np.ndarray:
        """[per_step] pool rows of this rank's part."""
        lo = self.rank * self.per_step
        return self.global_rows(epoch, step)[lo : lo + self.per_step]


def candidate_order(
    anchors: np.ndarray, caption_order: np.ndarray, text_image: np.ndarray, neighbours: np.ndarray, group: int
) -> np.ndarray:
    """int64 [M]: every caption once, each anchor followed by its hard neighbours.

    Walk `anchors` (a permutation of the M captions); an anchor not yet placed is placed, then for each of its
    `neighbours` [M, K] (image rows, best first; < 0 = no candidate) until `group` are placed: the image's next
    caption in `caption_order` (a permutation: the order in which each image's captions are taken) that is not
    placed yet, if any. An image all of whose captions are placed is skipped (the next neighbour is tried)."""
    m = len(anchors)
    # each image's captions as a run of `caps`, in the epoch's caption order: sort by (image, rank in that order)
    rank = np.empty(m, dtype=np.int64)
    rank[caption_order] = np.arange(m)
    text_image = np.asarray(text_image, dtype=np.int64)
    caps = np.lexsort((rank, text_image)).tolist()
    n_images = int(text_image.max()) + 1 if m else 0
    ends = np.cumsum(np.bincount(text_image, minlength=n_images)).tolist()
    cursor = [0, *ends[:-1]]  # per image: where its first caption not yet placed may be (nothing before is free)
    placed = bytearray(m)
    out: list[int] = []
    for a in anchors.tolist():
        if placed[a]:
            continue
        placed[a] = 1
        out.append(a)
        taken = 0
        for img in neighbours[a].tolist():  # one row at a time: the whole [M, K] as lists would be GBs on COCO
            if taken == group:
                break
            if not 0 <= img < n_images:  # padding (< 0), or an image without captions in the split
                continue
            i, end = cursor[img], ends[img]
            while i < end and placed[caps[i]]:
                i += 1
            cursor[img] = i
            if i < end:
                placed[caps[i]] = 1
                out.append(caps[i])
                taken += 1
    return np.asarray(out, dtype=np.int64)


class CandidateSampler(EpochSampler):
    """An EpochSampler whose epoch order groups each anchor with its hard neighbours (`candidate_order`).

    `neighbours` int [M, K]: the image rows of each caption's mined images (the store's text_to_image/rows of
    the split, own image excluded, < 0 for padding); `text_image` [M]: each caption's image row; `group`: the
    neighbours each anchor brings. Both random orders come from a generator seeded by (seed, epoch)."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        *,
        neighbours: np.ndarray,
        text_image: np.ndarray,
        group: int,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(n, batch_size, seed, world_size=world_size, rank=rank, shuffle=True)
        if neighbours.ndim != 2 or len(neighbours) != self.n or len(text_image) != self.n:
            raise ValueError(
                f"candidate sampler: expected neighbours [{self.n}, K] and text_image [{self.n}], got "
                f"{tuple(neighbours.shape)} and {tuple(np.shape(text_image))}"
            )
        if group <= 0:
            raise ValueError(f"candidate sampler: group must be positive, got {group}")
        self.neighbours, self.text_image, self.group = neighbours, np.asarray(text_image, np.int64), int(group)

    def permutation(self, epoch: int) -> np.ndarray:
        cached = self._cached
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            anchors, caption_order = rng.permutation(self.n), rng.permutation(self.n)
            order = candidate_order(anchors, caption_order, self.text_image, self.neighbours, self.group)
            cached = self._cached = (epoch, order)  # replaced whole: loader threads read it concurrently
        return cached[1]
