"""What the loop reads: the train and val splits of the index, the image cache and the feature store, aligned
row by row and checked (`PairSplit`), and the training split's sampler, teacher bank and batch loader."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from pipeline.data.index import DatasetIndex, SplitView
from pipeline.distill.config import DistillConfig
from pipeline.distill.data import BatchLoader, TeacherBank, Unpaired, tokenize_all
from pipeline.distill.extra_teachers import ExtraTeachers
from pipeline.distill.knowledge import MinedLists
from pipeline.distill.losses import LIST_TERMS, DistillLoss, LossConfig, resolve_teacher_scales
from pipeline.distill.sampler import CandidateSampler, EpochSampler, UnpairedSampler
from pipeline.distill.views import ViewChoice
from pipeline.errors import InputError
from pipeline.store.alignment import align_store_split
from pipeline.store.features import FeatureStore, StoreSplit
from pipeline.store.image_cache import ImageCache
from pipeline.store.verify import check_finite
from pipeline.towers.student import DualEncoderStudent


@dataclass(frozen=True)
class PairSplit:
    """One split in the feature store's row order: caption texts, image cache rows, teacher rows."""

    name: str
    captions: np.ndarray  # object [M] caption of each store text row
    images: np.ndarray  # uint8 [N_cache, H, W, 3] memory map of the split's image cache
    cache_rows: np.ndarray | None  # int64 [N] cache row of each store image row (None: identity)
    store: StoreSplit | None  # teacher rows (None: a split the store lacks, e.g. val for recall only)
    text_image: np.ndarray  # int64 [M] image row of each caption (store order)
    unpaired_text: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))  # [U] texts, no image
    image_id: np.ndarray | None = None  # [N] id of each image (store order; its galleries: evaluate.galleries)


def align_split(view: SplitView, images: np.ndarray, store: StoreSplit | None, where: str) -> PairSplit:
    """Match a split of the index and the image cache with the feature store's rows.

    The store may lack images that extract skipped (`on_bad_image: skip`), with their captions; rows are
    matched by image id and the captions of the kept images must be exactly the store's, in order."""
    if len(images) != view.n_images:
        raise InputError(
            f"{where}: the image cache has {len(images)} images in split {view.name!r}, the dataset "
            f"index {view.n_images}; rerun `kdpipe prepare`"
        )
    if store is not None and store.n_unpaired_texts != len(view.unpaired_text):
        raise InputError(
            f"{where}: the feature store has {store.n_unpaired_texts} texts without an image in split "
            f"{view.name!r}, the dataset index {len(view.unpaired_text)}; rerun `kdpipe extract`"
        )
    split = _align_pairs(view, images, store, where)
    return replace(split, unpaired_text=view.unpaired_text)


def _align_pairs(view: SplitView, images: np.ndarray, store: StoreSplit | None, where: str) -> PairSplit:
    if store is None:
        ti = view.text_image.astype(np.int64)
        return PairSplit(view.name, view.caption_text, images, None, None, ti, image_id=np.asarray(view.image_id))
    rows = align_store_split(view, store, where)
    return PairSplit(
        view.name,
        view.caption_text[rows.caption_rows],
        images,
        rows.image_rows,
        store,
        rows.text_image,
        image_id=np.asarray(store.image_id),
    )


def open_split(index: DatasetIndex, cache: ImageCache, store: FeatureStore | None, name: str, what: str) -> PairSplit:
    if name not in index.splits:
        raise InputError(f"distill.{what}: the dataset has no split {name!r}; it has {', '.join(index.splits)}")
    view = index.split(name)
    if store is not None:
        check_finite(store, name)  # one pass over the teacher rows: a NaN chunk would poison every loss term
    return align_split(
        view,
        cache.split(name),
        store.split(name) if store is not None else None,
        f"{cache.path} / {store.path if store else ''}".rstrip(" /"),
    )


def open_inputs(
    cfg: DistillConfig, index: DatasetIndex, store: FeatureStore, cache: ImageCache
) -> tuple[PairSplit, PairSplit | None]:
    """The training split (with its teacher rows) and the validation split (teacher rows when the store has them)."""
    if cfg.teacher_dim is not None and store.dim != cfg.teacher_dim:
        raise InputError(f"{store.path}: feature dimension {store.dim}, expected distill.teacher_dim={cfg.teacher_dim}")
    train = open_split(index, cache, store, cfg.train_split, "train_split")
    val = None
    if cfg.val_split and cfg.eval_every_epochs:
        val_store = store if cfg.val_split in store.splits else None
        val = open_split(index, cache, val_store, cfg.val_split, "val_split")
    return train, val


def teacher_scales(cfg: LossConfig, store: FeatureStore) -> tuple[float, ...] | None:
    """The logit scale of the store's teacher and of each of `cfg.teachers` (its store under teachers/<name>/;
    None: no built term reads one); a teacher that records none, with no distill.loss.teacher_temperature, is
    one clear line."""
    if not cfg.uses_teacher_scale:
        return None
    stores = [store] + [store.teacher_store(name) for name in cfg.teachers]
    try:
        records = [s.teacher or {} for s in stores]
        names = [str(t.get("name", "main")) for t in records]
        return resolve_teacher_scales(cfg, [t.get("logit_scale") for t in records], names)
    except ValueError as err:
        raise InputError(f"{store.path}: {err}") from None


def extra_teachers(
    cfg: DistillConfig, store: FeatureStore, loss_fn: DistillLoss, bank: TeacherBank, mined: MinedLists | None
) -> ExtraTeachers | None:
    """The banks of distill.loss.teachers' stores (teachers/<name>/, checked to hold the same rows), placed as the
    main bank, when a built term reads them (`DistillLoss.extra_rows`); else None."""
    if not loss_fn.extra_rows:
        return None
    banks = []
    for name in loss_fn.cfg.teachers:
        sp = store.teacher_store(name).split(cfg.train_split)
        banks.append(
            TeacherBank(
                sp.image_emb,
                sp.text_emb,
                bank.text_image_np,
                bank.device,
                placement=cfg.bank_placement,
                max_bytes=cfg.bank_max_gib * 2**30,
            )
        )
        if "queue" in loss_fn.extra_rows and loss_fn.cfg.queue_size == 0 and not banks[-1].on_device:
            raise InputError(
                f"distill.loss.queue_size=0 (the whole bank) needs teacher {name!r}'s bank on the device "
                f"({banks[-1].nbytes / 2**30:.2f} GiB; raise distill.bank_max_gib or set a queue_size)"
            )
    return ExtraTeachers(list(loss_fn.cfg.teachers), banks, loss_fn.extra_rows, mined)


def build_sampler(
    cfg: DistillConfig, train: PairSplit, loss_fn: DistillLoss, mined, world: int, rank: int
) -> EpochSampler:
    """The order of the pairs: a uniform permutation per epoch, or candidate-aware batches (`batch_neighbours`,
    from the mined store's text_to_image/rows of the split). The baseline (no teacher term) never gets the
    teacher's neighbours: its batches stay uniform."""
    n = len(train.captions)
    if not cfg.batch_neighbours or not loss_fn.needs_teacher:
        return EpochSampler(n, cfg.batch_size, cfg.seed, world_size=world, rank=rank)
    if mined is None:
        raise InputError(
            f"distill.batch_neighbours={cfg.batch_neighbours}: candidate-aware batches need the teacher's mined "
            "neighbours (run `kdpipe mine`), or set it to 0"
        )
    rows = mined.split(cfg.train_split).text_to_image.rows  # int32 [M, K] store image rows, own image excluded
    if cfg.batch_neighbours > rows.shape[1]:
        raise InputError(
            f"distill.batch_neighbours={cfg.batch_neighbours}: {mined.path} holds {rows.shape[1]} mined images per "
            "caption (mine.k); lower it or mine more"
        )
    return CandidateSampler(
        n,
        cfg.batch_size,
        cfg.seed,
        neighbours=rows,
        text_image=train.text_image,
        group=cfg.batch_neighbours,
        world_size=world,
        rank=rank,
    )


def input_digests(store: FeatureStore, cache: ImageCache, splits: list[str]) -> dict[str, str]:
    """SHA-256s naming what a run reads: the store's arrays of `splits` (their zarr.json, which records every
    chunk's checksum) and the image cache's attributes (its source images' content, the resize, the sizes).
    A checkpoint is resumed only on the very inputs it was trained on."""
    h = hashlib.sha256()
    for split in splits:
        if split not in store.splits:
            continue
        for meta in sorted((store.path / split).glob("*/zarr.json")):
            h.update(f"{split}/{meta.parent.name}\n".encode() + meta.read_bytes())
    attrs = json.dumps(cache.attrs, sort_keys=True, default=str).encode()
    return {"store": h.hexdigest(), "image_cache": hashlib.sha256(attrs).hexdigest()}


def build_data(
    cfg: DistillConfig,
    train: PairSplit,
    model: DualEncoderStudent,
    loss_fn: DistillLoss,
    world: int,
    rank: int,
    *,
    store: FeatureStore,
    mined=None,
    views=None,
) -> tuple[EpochSampler, BatchLoader, int]:
    """The pair sampler, the teacher bank and the batch loader of the training split; optimizer steps per epoch.
    `mined`: the mined store (pipeline/store/mined.py), when a setting reads it; `store`: the feature store (its
    other teachers' stores, when distill.loss.teachers is read)."""
    sampler = build_sampler(cfg, train, loss_fn, mined, world, rank)
    opt_steps_per_epoch = sampler.steps_per_epoch // cfg.grad_accum
    if opt_steps_per_epoch == 0:
        raise InputError(
            f"split {cfg.train_split!r} has {len(train.captions)} pairs: fewer than one optimizer step "
            f"of {sampler.global_batch * cfg.grad_accum} (batch_size x grad_accum x processes)"
        )
    queue_size = loss_fn.cfg.queue_size
    if loss_fn.needs_queue and queue_size > len(train.captions) - sampler.global_batch:
        raise InputError(
            f"distill.loss.queue_size={queue_size}: the split {cfg.train_split!r} has only "
            f"{len(train.captions)} pairs, so at most {len(train.captions) - sampler.global_batch} "
            "negatives fit beside a batch; lower it, or use 0 for the whole bank"
        )
    st = train.store
    device = next(model.parameters()).device
    unpaired = build_unpaired(cfg, train, model, loss_fn, sampler)
    bank = TeacherBank(
        st.image_emb,
        st.text_emb,
        train.text_image,
        device,
        placement=cfg.bank_placement,
        max_bytes=cfg.bank_max_gib * 2**30,
        unpaired_text_emb=st.unpaired_text_emb if unpaired is not None and unpaired.texts is not None else None,
    )
    if loss_fn.needs_queue and queue_size == 0 and not bank.on_device:
        raise InputError(
            f"distill.loss.queue_size=0 (the whole bank) needs the teacher bank on the device "
            f"({bank.nbytes / 2**30:.2f} GiB; raise distill.bank_max_gib or set a queue_size)"
        )
    tokens = tokenize_all(model.tokenize, train.captions)
    lists = mined_lists(cfg, loss_fn, mined, bank) if loss_fn.needs_candidates else None
    others = extra_teachers(cfg, store, loss_fn, bank, lists) if loss_fn.extra_rows else None
    loader = BatchLoader(
        train.images,
        bank,
        tokens,
        sampler,
        queue_size=queue_size,
        use_queue=loss_fn.needs_queue,
        num_workers=cfg.num_workers,
        cache_rows=train.cache_rows,
        unpaired=unpaired,
        mined=lists,
        extra=others,
        views=view_choice(cfg, views, device),
    )
    return sampler, loader, opt_steps_per_epoch


def view_choice(cfg: DistillConfig, views, device: torch.device) -> ViewChoice | None:
    """The stored views of the training split as the loader uses them (distill.teacher_views), else None."""
    if not cfg.teacher_views:
        return None
    if views is None:
        raise InputError("distill.teacher_views: no views store was given; run `kdpipe views` first")
    return ViewChoice(views, cfg.seed, device)


def mined_lists(cfg: DistillConfig, loss_fn: DistillLoss, mined, bank: TeacherBank) -> MinedLists:
    """The training split's mined candidates (and cross-encoder scores) for the candidate-list terms."""
    terms = ", ".join(sorted(n for n in loss_fn.terms if n in LIST_TERMS))
    if mined is None:
        raise InputError(f"distill.loss: {terms} need the teacher's mined candidates; run `kdpipe mine` first")
    split = mined.split(cfg.train_split)
    if loss_fn.needs_cross_encoder and (split.text_to_image.ce_scores is None or split.image_to_text.ce_scores is None):
        raise InputError(
            f"{mined.path}: mined without a cross-encoder, and distill.loss.mcad_ce_weight="
            f"{loss_fn.cfg.mcad_ce_weight} reads its scores; mine with one, or set mcad_ce_weight: 0"
        )
    return MinedLists(split, bank, cross_encoder=loss_fn.needs_cross_encoder)


def build_unpaired(
    cfg: DistillConfig, train: PairSplit, model: DualEncoderStudent, loss_fn: DistillLoss, pairs: EpochSampler
) -> Unpaired | None:
    """The samplers of the unpaired images and texts to draw beside the pairs (None: none are drawn, because
    the counts are 0 or no loss term uses a teacher, as in the baseline)."""
    if not loss_fn.needs_teacher or not (cfg.unpaired_images_per_step or cfg.unpaired_texts_per_step):
        return None
    st, world, rank = train.store, pairs.world_size, pairs.rank

    def sampler(what: str, n: int, per_step: int, stream: int) -> UnpairedSampler:
        if per_step * world > n:
            raise InputError(
                f"distill.unpaired_{what}_per_step={per_step}: the split {cfg.train_split!r} has {n} {what} "
                f"without {'captions' if what == 'images' else 'an image'}, fewer than one step draws "
                f"({per_step} x {world} processes); lower it, or 0 to draw none"
            )
        return UnpairedSampler(n, per_step, cfg.seed, pairs.steps_per_epoch, stream=stream, world_size=world, rank=rank)

    images = image_rows = texts = tokens = None
    if cfg.unpaired_images_per_step:
        image_rows = st.unpaired_image
        images = sampler("images", len(image_rows), cfg.unpaired_images_per_step, stream=1)
    if cfg.unpaired_texts_per_step:
        texts = sampler("texts", st.n_unpaired_texts, cfg.unpaired_texts_per_step, stream=2)
        tokens = tokenize_all(model.tokenize, train.unpaired_text)
    return Unpaired(images=images, image_rows=image_rows, texts=texts, tokens=tokens)
