"""Which gallery each query is ranked in, and what a random ranking scores there.

`evaluate.gallery`:
- `split`: one gallery, the whole split (the protocol of BEiT-3 / CLIP_benchmark / LAVIS).
- `by_directory`: images are grouped by the first path component of their `image_id` (`twemoji/1f600.png` ->
  `twemoji`); each caption is ranked only among its image's group and each image only against its group's
  captions. For a set that holds the same items drawn in several styles, a pooled gallery would make the other
  styles' copies of an item near-duplicate negatives (no model can tell "grinning face" twemoji from openmoji by
  its caption), so each style is a gallery of its own; the pooled figure is then every query of every group
  together (queries keep their group's rank). Image ids without a '/' form the group "" (the whole set).
"""

from __future__ import annotations

from math import comb
from typing import Any, Literal

import numpy as np

from pipeline.evaluate.retrieval import RECALL_KS, RetrievalRanks, recall_metrics, retrieval_ranks

GalleryMode = Literal["split", "by_directory"]


def image_groups(image_id: Any, mode: GalleryMode) -> dict[str, np.ndarray]:
    """{group name: image rows, ascending} in order of first appearance; `split`: one group named ""."""
    ids = [str(i) for i in np.asarray(image_id).tolist()]
    if mode == "split":
        return {"": np.arange(len(ids))}
    if mode != "by_directory":
        raise ValueError(f"gallery mode {mode!r}; expected 'split' or 'by_directory'")
    names = [i.split("/", 1)[0] if "/" in i else "" for i in ids]
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        groups.setdefault(name, []).append(row)
    return {g: np.asarray(rows, dtype=np.int64) for g, rows in groups.items()}


def grouped_ranks(
    image_emb: Any, text_emb: Any, text_image: np.ndarray, groups: dict[str, np.ndarray], **kwargs: Any
) -> RetrievalRanks:
    """Ranks of every query within its own group's gallery, in the split's image and caption order.

    One group covering the split is `retrieval_ranks` itself (no copy of the embeddings); kwargs go to it."""
    ti = np.asarray(text_image, dtype=np.int64)
    if len(groups) == 1:
        return retrieval_ranks(image_emb, text_emb, ti, **kwargs)
    n = int(image_emb.shape[0])
    i2t = np.empty(n, dtype=np.int64)
    t2i = np.empty(len(ti), dtype=np.int64)
    local = np.empty(n, dtype=np.int64)  # an image's row inside its group
    for rows in groups.values():
        local[rows] = np.arange(len(rows))
        caps = np.flatnonzero(np.isin(ti, rows))
        r = retrieval_ranks(
            image_emb[_index(image_emb, rows)], text_emb[_index(text_emb, caps)], local[ti[caps]], **kwargs
        )
        i2t[rows], t2i[caps] = r.i2t, r.t2i
    return RetrievalRanks(i2t=i2t, t2i=t2i)


def _index(x: Any, rows: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(rows).to(x.device) if isinstance(x, torch.Tensor) else rows


def group_metrics(ranks: RetrievalRanks, text_image: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, dict]:
    """recall_metrics of each group's queries alone (empty when there is only one group)."""
    if len(groups) == 1:
        return {}
    ti = np.asarray(text_image)
    out = {}
    for g, rows in groups.items():
        caps = np.isin(ti, rows)
        out[g] = recall_metrics(RetrievalRanks(i2t=np.asarray(ranks.i2t)[rows], t2i=np.asarray(ranks.t2i)[caps]))
    return out


def chance_curves(text_image: np.ndarray, groups: dict[str, np.ndarray], ks: Any) -> dict[str, np.ndarray]:
    """Expected recall@K (percent) of a uniformly random ranking of each query's gallery, for each K in ks:
    {"i2t": [len(ks)], "t2i": [len(ks)]}.

    t2i: a caption's image is among the first K of its group's N_g images with probability min(K, N_g) / N_g.
    i2t: an image with c captions among its group's M_g finds none of them in the first K with probability
    C(M_g - c, K) / C(M_g, K) (K of M_g drawn without replacement)."""
    ti = np.asarray(text_image, dtype=np.int64)
    per_image = np.bincount(ti, minlength=int(ti.max()) + 1 if len(ti) else 0)
    i2t, t2i = np.zeros(len(ks)), np.zeros(len(ks))
    for rows in groups.values():
        n_g = len(rows)
        c = per_image[rows]
        m_g = int(c.sum())
        for j, k in enumerate(ks):
            kk = min(k, m_g)  # a gallery smaller than K: every caption is within K
            i2t[j] += sum(1.0 - comb(m_g - int(ci), kk) / comb(m_g, kk) for ci in c)
            t2i[j] += m_g * min(k, n_g) / n_g
    return {"i2t": 100.0 * i2t / len(per_image), "t2i": 100.0 * t2i / len(ti)}


def chance_metrics(text_image: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, float]:
    """R@1/5/10 per direction and RSUM of a random ranking (chance_curves at K = 1, 5, 10)."""
    curves = chance_curves(text_image, groups, RECALL_KS)
    out = {f"{d}_r{k}": float(curves[d][j]) for d in ("i2t", "t2i") for j, k in enumerate(RECALL_KS)}
    out["rsum"] = float(sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS))
    return out


__all__ = ["GalleryMode", "image_groups", "grouped_ranks", "group_metrics", "chance_curves", "chance_metrics"]
