"""The evaluate stage: exact retrieval metrics of the teacher (from the feature store) and of the students
(encoded from prepare's image cache and the index's captions) on one split, encode latency and parameter
counts, written as `metrics_detail.json` (the whole record: its layout in docs/evaluation.md, "The protocol and the record"),
`metrics.json` (its headline: each model's RSUM, one row of `dvc metrics show`) and `run_info.json` beside them
(where and how they were measured), plus `metrics.md` (the table), `ranks.npz` (every run's per-query ranks) and
plots/.

A model is one or more runs (training seeds, `distill.runs`): its block holds the seed means, the spread and
each seed's figures, and its paired-bootstrap difference to the reference model (pipeline.evaluate.summary).

Teacher and students are ranked over the very same gallery: the store's split, aligned with the dataset
index through `image_id` (a store written with `extract.on_bad_image: skip` lacks some images; the students
then skip them too). Metrics: `pipeline.evaluate.retrieval` (float32 scores, pessimistic ties).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.devices import resolve_device
from pipeline.environment import numerics_environment
from pipeline.errors import ConfigError, KdpipeError
from pipeline.evaluate.bootstrap import RECALL_KEYS
from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.galleries import chance_curves, grouped_ranks, image_groups
from pipeline.evaluate.outputs import (
    DETAIL_FILE,
    METRICS_FILE,
    RANKS,
    RUN_INFO_FILE,
    TABLE,
    TABLE_FILE,
    evaluate_outputs,
)
from pipeline.evaluate.retrieval import TIE_RULE, RetrievalRanks, recall_curves, recall_metrics, teacher_agreement
from pipeline.evaluate.summary import (
    chance_block,
    compare_to_references,
    headline,
    model_block,
    with_average,
    with_intervals,
)
from pipeline.paths import ArtifactPaths
from pipeline.progress import progress
from pipeline.store.alignment import align_store_split
from pipeline.store.ownership import Output, claim
from pipeline.teachers.base import teacher_record

log = logging.getLogger(__name__)

METRIC_KEYS = (*RECALL_KEYS, "rsum", "average_score", "i2t_medr", "t2i_medr")  # every model block has them


LATENCY_METHOD_KEYS = ("device", "dtype", "batch_size", "timed_batches", "measures", "teacher_reason")


# ---------------------------------------------------------------------------------------------------------
# Scoring embeddings
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ModelResult:
    name: str
    ranks: RetrievalRanks
    metrics: dict[str, float]
    curves: dict[str, np.ndarray]  # {"i2t": [K], "t2i": [K]} recall@K in percent, K = 1..curve_max_k
    seconds: dict[str, float] = field(default_factory=dict)  # encode / score wall times


def evaluate_embeddings(
    name: str,
    image_emb: Any,
    text_emb: Any,
    text_image: np.ndarray,
    cfg: EvaluateConfig,
    device: torch.device | None = None,
    groups: dict[str, np.ndarray] | None = None,
) -> ModelResult:
    """Exact ranks, metrics and recall curves of one model's embeddings (numpy, memory maps or tensors), each
    query ranked within its group's gallery (groups: galleries.image_groups; None: the whole split)."""
    t = time.perf_counter()
    groups = groups or {"": np.arange(int(image_emb.shape[0]))}
    ranks = grouped_ranks(
        image_emb, text_emb, text_image, groups, chunk_size=cfg.chunk_size, backend=cfg.backend, device=device
    )
    _sync(device)
    seconds = time.perf_counter() - t
    return ModelResult(
        name,
        ranks,
        with_average(recall_metrics(ranks)),
        recall_curves(ranks, cfg.curve_max_k),
        {"score_s": round(seconds, 3)},
    )


def evaluate_features(store_path: Path | str, split: str, cfg: EvaluateConfig) -> dict[str, Any]:
    """`kdpipe evaluate --features STORE`: the stored embeddings alone, under the name `teacher` (the whole record,
    as metrics_detail.json holds it)."""
    from pipeline.store.features import open_store
    from pipeline.store.verify import check_finite

    store = open_store(store_path)
    s = store.split(split)
    check_finite(store, split)  # names the chunk; the scorer's own check could not
    device = resolve_device(cfg.device, "evaluate.device")
    groups = image_groups(s.image_id, cfg.gallery)
    result = evaluate_embeddings("teacher", s.image_emb, s.text_emb, s.text_image, cfg, device, groups)
    return metrics_document(
        dataset=_dataset_name(store),
        split=split,
        n_images=s.n_images,
        n_captions=s.n_captions,
        models={"teacher": model_block([result], s.text_image, groups)},
        teacher_name=store.teacher.get("name"),
        tie_rule=TIE_RULE,
        gallery=cfg.gallery,
    )


def metrics_document(
    *, dataset: str, split: str, n_images: int, n_captions: int, models: dict[str, dict[str, float]], **extra: Any
) -> dict[str, Any]:
    """The whole record (metrics_detail.json): the architecture's keys first (dataset, split, sizes, then one block
    per model: teacher, student, ...), then extras (chance, params, latency, ...)."""
    missing = [(m, k) for m, block in models.items() for k in METRIC_KEYS if k not in block]
    if missing:
        raise ValueError(f"metrics of {missing[0][0]} lack {missing[0][1]}")
    return {
        "dataset": dataset,
        "split": split,
        "n_images": int(n_images),
        "n_captions": int(n_captions),
        **models,
        **extra,
    }


def write_json(doc: dict[str, Any], path: Path | str, replaces: Output) -> Path:
    """Write JSON atomically (temp file + rename) over nothing or an earlier `replaces`: an interrupted run leaves
    the previous file intact."""
    from pipeline.store.durable import write_file_durably

    path = Path(path)
    write_file_durably(path, (json.dumps(doc, indent=2) + "\n").encode(), replaces)
    return path


# ---------------------------------------------------------------------------------------------------------
# The gallery: the store's split, aligned with the dataset index and the image cache
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gallery:
    """The split as the teacher saw it, and where its images and captions are on the index side."""

    image_rows: np.ndarray | None  # rows of the index split (and image cache split) kept; None: all of them
    captions: list[str]  # [M] caption texts, in store order
    text_image: np.ndarray  # [M] int32, the store's text_image


def align_gallery(view: Any, store_split: Any, where: str) -> Gallery:
    """The index split `view` (a SplitView) as the store split holds it (pipeline/store/alignment.py)."""
    rows = align_store_split(view, store_split, where)
    return Gallery(
        image_rows=rows.image_rows,
        captions=list(view.caption_text[rows.caption_rows]),
        text_image=np.asarray(store_split.text_image),
    )


# ---------------------------------------------------------------------------------------------------------
# Students
# ---------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def encode_gallery(
    model: Any,
    images: np.ndarray,
    gallery: Gallery,
    batch_size: int,
    label: str,
    frozen_text: dict[str, list[torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A student's [N, D] image and [M, D] caption embeddings (fp32, on the model's device).

    images: the split's uint8 cache [N_index, H, W, 3] (a memory map), read batch by batch. Captions are
    encoded in order of length (less padding per batch) and put back in gallery order. `frozen_text`: the
    features of each caption batch by the frozen text towers met so far (keyed by their files' digests): the
    students that share one (the demo's nine share MiniLM) run it once, each then applying its own projection
    to the very same features, batch by batch, as encode_texts would."""
    rows = gallery.image_rows
    n = images.shape[0] if rows is None else len(rows)
    dev = model.device
    img = torch.empty(n, model.dim, device=dev)
    with progress(f"{label}: encode images", n, "img") as bar:
        for s in range(0, n, batch_size):
            e = min(s + batch_size, n)
            batch = np.array(images[s:e] if rows is None else images[rows[s:e]])  # copy out of the map
            img[s:e] = model.encode_images(torch.from_numpy(batch)).float()
            bar.advance(e - s)
    m = len(gallery.captions)
    order = np.argsort([len(c) for c in gallery.captions], kind="stable")
    txt = torch.empty(m, model.dim, device=dev)
    source = model.frozen_text_source() if frozen_text is not None else None
    key = f"{source.key} {model.config.text.pooling} {model.text_tower.max_tokens}" if source else None
    known = frozen_text.get(key) if key is not None else None
    features = known if known is not None else []
    with progress(f"{label}: encode captions", m, "cap") as bar:
        for j, s in enumerate(range(0, m, batch_size)):
            idx = order[s : s + batch_size]
            if known is None:  # encode_texts = project_text(text_features(tokenize(texts)))
                features.append(model.text_features(model.tokenize([gallery.captions[i] for i in idx])))
            txt[torch.from_numpy(idx).to(dev)] = model.project_text(features[j]).float()
            bar.advance(len(idx))
    if key is not None:
        frozen_text[key] = features
    return img, txt


def count_parameters(obj: Any) -> int | None:
    """Parameters of a module, or of every module held by an object (a Teacher); None when it holds none."""
    modules = (
        [obj] if isinstance(obj, torch.nn.Module) else [v for v in vars(obj).values() if isinstance(v, torch.nn.Module)]
    )
    seen: dict[int, int] = {}
    for mod in modules:
        for p in mod.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values()) if seen else None


# ---------------------------------------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------------------------------------
def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_item(fn: Callable[[Any], Any], batches: list[Any], device: torch.device) -> float:
    """Wall time per item of fn over batches[1:], after batches[0] as warm-up (synchronized on CUDA)."""
    fn(batches[0])
    _sync(device)
    items, t = 0, time.perf_counter()
    for b in batches[1:]:
        fn(b)
        items += len(b)
    _sync(device)
    return (time.perf_counter() - t) / max(items, 1)


def _autocast(device: torch.device, dtype_name: str):
    if dtype_name == "float32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.inference_mode()
def student_latency(model: Any, images: np.ndarray, captions: list[str], cfg: EvaluateConfig) -> dict[str, float]:
    """Seconds per image and per caption: images from the uint8 cache already on the device (the model's
    resize + normalization included), captions as strings (tokenization included)."""
    dev = model.device
    img_batches, txt_batches = _latency_batches(images, captions, cfg)
    img_batches = [torch.from_numpy(b).to(dev) for b in img_batches]
    with _autocast(dev, cfg.latency_dtype):
        return {
            "image_s": seconds_per_item(model.encode_images, img_batches, dev),
            "caption_s": seconds_per_item(model.encode_texts, txt_batches, dev),
        }


@torch.inference_mode()
def teacher_latency(teacher: Any, images: np.ndarray, captions: list[str], cfg: EvaluateConfig) -> dict[str, float]:
    """Same measurement for the teacher: its own preprocessing of the same images happens before timing (the
    student's resize + normalization is inside its timing, the teacher's is not: a bias in the teacher's favour);
    its tokenization is timed, as the student's."""
    from PIL import Image

    dev = teacher.device
    img_batches, txt_batches = _latency_batches(images, captions, cfg)
    pixels = [torch.stack([teacher.preprocess_image(Image.fromarray(x)) for x in b]).to(dev) for b in img_batches]

    def encode_texts(texts: list[str]) -> torch.Tensor:
        return teacher.encode_text_batch({k: v.to(dev) for k, v in teacher.tokenize(texts).items()})

    return {
        "image_s": seconds_per_item(teacher.encode_image_batch, pixels, dev),
        "caption_s": seconds_per_item(encode_texts, txt_batches, dev),
    }


def _latency_batches(images: np.ndarray, captions: list[str], cfg: EvaluateConfig) -> tuple[list, list]:
    """latency_batches + 1 batches of latency_batch_size (cycling through the split if it is small)."""
    b, k = cfg.latency_batch_size, cfg.latency_batches + 1
    n_img = min(len(images), b * k)
    img_rows = np.arange(b * k) % n_img
    img = np.array(images[:n_img])
    cap_rows = np.arange(b * k) % len(captions)
    return (
        [img[img_rows[i * b : (i + 1) * b]] for i in range(k)],
        [[captions[j] for j in cap_rows[i * b : (i + 1) * b]] for i in range(k)],
    )


def same_teacher(identity: dict[str, Any], stored: dict[str, Any]) -> bool:
    """Whether a built teacher (its `teacher_record`) is the one that computed the store (its compute dtype aside;
    a store written before the record named the logit scale matches without it)."""
    drop = ("dtype",) if "logit_scale" in stored else ("dtype", "logit_scale")
    return {k: v for k, v in identity.items() if k not in drop} == {k: v for k, v in stored.items() if k not in drop}


# ---------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------
@dataclass
class EvaluateOutput:
    document: dict[str, Any]  # the whole record: metrics_detail.json
    headline: dict[str, Any]  # metrics.json
    run_info: dict[str, Any]  # run_info.json
    results: dict[str, list[ModelResult]]  # every run of every model (teacher: one)
    metrics_path: Path
    detail_path: Path
    plots_dir: Path
    table: str  # the Markdown table (also in metrics.md)
    seconds: float

    def summary(self) -> str:
        names = ", ".join(f"{k} RSUM {self.document[k]['rsum']:.1f}" for k in self.results)
        return (
            f"evaluate: {self.document['split']} split, {self.document['n_images']:,} images / "
            f"{self.document['n_captions']:,} captions: {names}; wrote {self.metrics_path} (details: "
            f"{self.detail_path}) and {self.plots_dir}/ in {self.seconds:.1f} s"
        )


def default_runs(paths: ArtifactPaths, cfg: EvaluateConfig) -> dict[str, list[str]]:
    """Without `distill.runs`: evaluate.models, one run each in <workdir>/<model> (`student` required, the
    others when their directory exists)."""
    runs = {}
    for m in cfg.models:
        if m != "student" and not (paths.workdir / m / "student_config.json").is_file():
            log.info(f"evaluate: no {m} in {paths.workdir / m}; not evaluated")
            continue
        runs[m] = [m]
    return runs


def run_evaluate(
    paths: ArtifactPaths,
    cfg: EvaluateConfig,
    *,
    runs: dict[str, list[str]] | None = None,
    reference: str | Sequence[str] = "baseline",
    teacher_factory: Callable[[torch.device, torch.dtype], Any] | None = None,
    metrics_path: Path | None = None,
    out: ArtifactPaths | None = None,
) -> EvaluateOutput:
    """Evaluate the teacher (feature store) and the students on `cfg.split`; write metrics.json, run_info.json,
    metrics.md, ranks.npz and plots/.

    runs: {model: [its run directories, relative to the workdir (or absolute), one per seed]} (default:
    `default_runs`).
    reference: the model (or models, in this order) every other one is compared with (paired bootstrap), those
    of them that are evaluated.
    teacher_factory(device, dtype) builds the teacher model for the latency comparison (None, or a failure to
    build it: the teacher's latency is recorded as null with the reason).
    out: where the metrics and plots go (default: `paths`, which the data is read from; an ablation's own
    work directory)."""
    from pipeline.data.index import DatasetIndex
    from pipeline.store.features import open_store
    from pipeline.store.image_cache import open_image_cache
    from pipeline.store.verify import check_finite

    start = time.perf_counter()
    for path, kind in evaluate_outputs(paths, cfg.write_ranks, metrics_path).items():  # before any work
        claim(path, kind)
    device = resolve_device(cfg.device, "evaluate.device")
    index = DatasetIndex.load(paths.index_dir)
    store = open_store(paths.features, expect_fingerprint=index.fingerprint)
    s = store.split(cfg.split)
    check_finite(store, cfg.split)  # names the chunk; the scorer's own check could not
    gallery = align_gallery(index.split(cfg.split), s, str(paths.features))
    groups = image_groups(s.image_id, cfg.gallery)
    cache = open_image_cache(paths.images, expect_fingerprint=index.fingerprint)
    images = cache.split(cfg.split)
    runs = runs if runs is not None else default_runs(paths, cfg)
    evaluated = ["teacher", *runs, "chance"]
    # an image file replaced since extract or prepare ran? The fingerprints checked on opening cannot tell
    index.check_made_from(store.attrs.get("image_content"), str(paths.features), "extract", list(store.splits))
    index.check_made_from(cache.attrs.get("content"), str(paths.images), "prepare")
    if cfg.plot_models is not None and sorted(cfg.plot_models) != sorted(evaluated):
        raise ConfigError(f"evaluate.plot_models {list(cfg.plot_models)} must list exactly the models {evaluated}")

    results = {"teacher": [evaluate_embeddings("teacher", s.image_emb, s.text_emb, s.text_image, cfg, device, groups)]}
    students = {}  # model -> its first run's model, for latency and parameter counts (seeds share the architecture)
    frozen_text: dict[str, list[torch.Tensor]] = {}  # a frozen text tower's caption features, shared by students
    for model, dirs in runs.items():
        results[model], students[model] = _evaluate_student(
            paths, dirs, images, gallery, s, cfg, device, groups, frozen_text
        )

    params = {"teacher": None, **{m: count_parameters(model) for m, model in students.items()}}
    latency = _measure_latency(cfg, device, students, images, gallery, store.teacher, teacher_factory, params)
    references = (reference,) if isinstance(reference, str) else tuple(reference)
    docs = _documents(store, index, s, cfg, results, groups, references, params, latency, device)
    return _write_outputs(out or paths, cfg, *docs, results, s, groups, metrics_path, start)


def _evaluate_student(
    paths: ArtifactPaths,
    dirs: list[str],
    images: Any,
    gallery: Gallery,
    s: Any,
    cfg: EvaluateConfig,
    device,
    groups,
    frozen_text: dict[str, list[torch.Tensor]],
) -> tuple[list[ModelResult], Any]:
    """Every run (seed) of one model: encode the gallery, rank, agreement with the teacher (`frozen_text`: see
    encode_gallery)."""
    from pipeline.towers.student import load_student

    out, first = [], None
    for d in dirs:
        model = load_student(paths.workdir / d, device)
        name = Path(d).name
        t = time.perf_counter()
        img, txt = encode_gallery(model, images, gallery, cfg.batch_size, name, frozen_text)
        _sync(device)
        encode_s = time.perf_counter() - t
        result = evaluate_embeddings(name, img, txt, gallery.text_image, cfg, device, groups)
        result.seconds["encode_s"] = round(encode_s, 3)
        agreement = teacher_agreement(img, txt, s.image_emb, s.text_emb)
        result.metrics.update({k: round(v, 4) for k, v in agreement.items()})
        out.append(result)
        first = first or model
        del img, txt
    return out, first


def _documents(store, index, s, cfg, results, groups, references, params, latency, device) -> tuple[dict, ...]:
    """metrics_detail.json (the whole record: every model's seed means, spread, per seed, per group, intervals;
    chance, parameters, latency) and run_info.json (where, how, how long)."""
    ti = np.asarray(s.text_image)
    blocks = {m: model_block(rs, ti, groups) for m, rs in results.items()}
    blocks["chance"] = chance_block(ti, groups)
    intervals = compare_to_references(
        {m: [r.ranks for r in rs] for m, rs in results.items()},
        references,
        ti,
        cfg.bootstrap_resamples,
        cfg.bootstrap_seed,
    )
    blocks = with_intervals(blocks, intervals)
    chance = blocks.pop("chance")
    method = {k: latency.pop(k) for k in LATENCY_METHOD_KEYS if k in latency} if latency else None
    doc = metrics_document(
        dataset=_dataset_name(store, index.name),
        split=cfg.split,
        n_images=s.n_images,
        n_captions=s.n_captions,
        models=blocks,
        chance=chance,
        params=params,
        latency=latency,
    )
    run_info = {
        "teacher_name": store.teacher.get("name"),
        "tie_rule": TIE_RULE,
        "gallery": cfg.gallery,
        "groups": {g: len(rows) for g, rows in groups.items()},
        "runs": {m: [r.name for r in rs] for m, rs in results.items()},
        "bootstrap": {
            "references": list(intervals),  # those of the references that were evaluated, in their order
            "resamples": cfg.bootstrap_resamples,
            "seed": cfg.bootstrap_seed,
            "method": "images redrawn with their captions; seeds averaged per redraw; 95% percentile interval",
        },
        "latency_method": method,
        "timing_s": {r.name: r.seconds for rs in results.values() for r in rs},
        "environment": numerics_environment(device),
    }
    return doc, run_info


def _write_outputs(paths, cfg, doc, run_info, results, s, groups, metrics_path, start) -> EvaluateOutput:
    """metrics.json (the headline), metrics_detail.json (the whole record), run_info.json and metrics.md side by
    side, ranks.npz, and the curves in plots/."""
    from pipeline.evaluate.plots import write_curves, write_ranks
    from pipeline.evaluate.tables import markdown_table
    from pipeline.store.durable import write_file_durably

    table = markdown_table(doc, run_info)
    head = headline(doc)
    metrics_path = write_json(head, metrics_path or paths.metrics, METRICS_FILE)
    detail_path = write_json(doc, metrics_path.with_name(paths.metrics_detail.name), DETAIL_FILE)
    write_json(run_info, metrics_path.with_name(paths.run_info.name), RUN_INFO_FILE)
    write_file_durably(metrics_path.with_name(TABLE), table.encode(), TABLE_FILE)
    if cfg.write_ranks:
        write_ranks(metrics_path.with_name(RANKS), results, s.image_id, s.text_image)
    curves = {m: {d: np.mean([r.curves[d] for r in rs], axis=0) for d in ("i2t", "t2i")} for m, rs in results.items()}
    curves["chance"] = chance_curves(np.asarray(s.text_image), groups, range(1, cfg.curve_max_k + 1))
    curves = {m: curves[m] for m in cfg.plot_models or curves}
    title = f"{doc['dataset']} {doc['split']}: {doc['n_images']:,} images, {doc['n_captions']:,} captions"
    write_curves(paths.plots, curves, title)
    seconds = time.perf_counter() - start
    return EvaluateOutput(doc, head, run_info, results, metrics_path, detail_path, paths.plots, table, seconds)


def _measure_latency(
    cfg: EvaluateConfig,
    device: torch.device,
    students: dict[str, Any],
    images: np.ndarray,
    gallery: Gallery,
    stored_teacher: dict[str, Any],
    teacher_factory: Any,
    params: dict[str, int | None],
) -> dict[str, Any] | None:
    """Seconds per image and per caption of the teacher and each model (its first run), on `device`; the
    method's description (LATENCY_METHOD_KEYS) goes to run_info.json, the figures to metrics_detail.json."""
    if not cfg.latency:
        return None
    split_images = images if gallery.image_rows is None else images[gallery.image_rows[: cfg.latency_batch_size]]
    out: dict[str, Any] = {
        "device": str(device),
        "dtype": cfg.latency_dtype,
        "batch_size": cfg.latency_batch_size,
        "timed_batches": cfg.latency_batches,
        "measures": "seconds per item = batch time / batch size, after one warm-up batch; "
        "images: uint8 cache rows on the device (student: resize + normalize "
        "included; teacher: its preprocessing done before timing); captions: "
        "strings, tokenization included",
    }
    teacher, reason = None, None
    if teacher_factory is None:
        reason = "no teacher model (evaluated from the feature store only)"
    else:
        try:
            dtype = torch.float32 if cfg.latency_dtype == "float32" else torch.bfloat16
            teacher = teacher_factory(device, dtype)
        except (KdpipeError, OSError, ImportError) as err:
            reason = f"teacher model not available: {err}"
        else:
            if stored_teacher and not same_teacher(teacher_record(teacher), stored_teacher):
                reason = (
                    f"the configured teacher ({teacher.name}) is not the one that computed the feature store "
                    f"({stored_teacher.get('name')})"
                )
                teacher = None
    if teacher is not None:
        out["teacher"] = teacher_latency(teacher, split_images, gallery.captions, cfg)
        params["teacher"] = count_parameters(teacher)
        del teacher
    else:
        out["teacher"] = None
        out["teacher_reason"] = reason
    for m, model in students.items():
        out[m] = student_latency(model, split_images, gallery.captions, cfg)
    if out["teacher"] is not None and students:
        out["speedup"] = {  # teacher time / student time, per model
            m: {k: out["teacher"][k] / out[m][k] for k in ("image_s", "caption_s")} for m in students
        }
    return out


def _dataset_name(store: Any, fallback: str | None = None) -> str:
    return str(store.dataset.get("name") or fallback or Path(store.path).parent.name)


__all__ = [
    "EvaluateConfig",
    "ModelResult",
    "Gallery",
    "EvaluateOutput",
    "METRIC_KEYS",
    "evaluate_embeddings",
    "evaluate_features",
    "metrics_document",
    "align_gallery",
    "encode_gallery",
    "count_parameters",
    "student_latency",
    "teacher_latency",
    "run_evaluate",
    "default_runs",
    "write_json",
]
