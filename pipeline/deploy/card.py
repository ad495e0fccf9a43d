"""The student directory's README.md: what it was distilled from, how, how well, how fast, and how to load it.

Metrics are this model's own: a student trained with several seeds (`distill.runs`) is one seed, whose figures
are in `metrics_detail.json`, evaluate's whole record (`<model>.seeds.<run name>`), beside each model's seed
means, shown as such.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.deploy.pixels import StudentPixels, hf_pixel_caveats, open_clip_pixel_caveats
from pipeline.deploy.scale import LogitScale
from pipeline.store.ownership import Output, text_with

TITLE = "# kdpipe student"
MODEL_CARD = Output("a model card", recognise=text_with(TITLE + "\n", within=len(TITLE) + 1))  # what a card replaces

KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


@dataclass
class CardInfo:
    """What the export computed that the card reports (None: not asked for)."""

    pixels: StudentPixels | None = None
    scale: LogitScale | None = None


def _json(path: Path | None) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def teacher_line(teacher: dict[str, Any]) -> str:
    """The teacher's store attrs as one readable line: its name, then each recorded fact, digests shortened."""
    if not teacher:
        return "unknown (no feature store given)"
    parts = []
    for key, value in teacher.items():
        if key == "name":
            continue
        if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
            value = value[:12] + "..."
        elif isinstance(value, (list, tuple)):
            value = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        elif isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        parts.append(f"{key.replace('_', ' ')} {value}")
    return f"**{teacher.get('name', '?')}**" + (": " + "; ".join(parts) if parts else "")


def own_metrics(metrics: dict[str, Any], run: str) -> tuple[str, dict] | None:
    """(model name, figures) of the run `run` (the student directory's name) in the record `metrics`
    (metrics_detail.json): its seed's figures, or the model's own row when that model is this run (no seeds)."""
    for name, entry in metrics.items():
        seeds = entry.get("seeds") if isinstance(entry, dict) else None
        if isinstance(seeds, dict) and isinstance(seeds.get(run), dict):
            return name, seeds[run]
    if isinstance(metrics.get(run), dict) and "rsum" in metrics[run] and "rsum_sd" not in metrics[run]:
        return run, metrics[run]
    return None


def metrics_table(metrics: dict[str, Any], run: str) -> list[str]:
    rows = [(name, v) for name, v in metrics.items() if isinstance(v, dict) and "rsum" in v]
    if not rows:
        return ["No metrics yet (run `kdpipe evaluate`)."]
    own = own_metrics(metrics, run)
    lines = [
        f"{metrics.get('dataset', '?')}, split {metrics.get('split', '?')}: {metrics.get('n_images', '?')} images, "
        f"{metrics.get('n_captions', '?')} captions; recalls in percent.",
        "",
    ]
    if own is None:
        lines += [f"This model ({run}) has no row of its own in these metrics; the models evaluated beside it:", ""]
    lines += ["| model | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]

    def row(label: str, v: dict) -> str:
        return f"| {label} | " + " | ".join(f"{v.get(k, float('nan')):.2f}" for k in KEYS) + " |"

    if own is not None:
        lines.append(row(f"**this model** ({run})", own[1]))
    for name, v in rows:
        seeds = len(v.get("seeds") or {})
        label = f"{name} (mean of {seeds} seeds)" if seeds > 1 else name
        lines.append(row(label, v))
    return lines


def speed_lines(metrics: dict[str, Any], own_name: str | None, meta: dict, teacher: dict) -> list[str]:
    """Latency per image and per caption against the teacher, and why a caption may be no faster."""
    latency = metrics.get("latency") or {}
    speedup = (latency.get("speedup") or {}).get(own_name or "", {})
    if not speedup:
        return []
    image, caption = speedup.get("image_s"), speedup.get("caption_s")
    out = [
        f"Against the teacher, measured by `kdpipe evaluate` (its `run_info.json` says how): {image:.1f}x per "
        f"image, {caption:.2f}x per caption (above 1: faster)."
    ]
    text = meta.get("config", {}).get("text", {})
    if caption is not None and caption < 1.5:
        why = f"its text tower (`{text.get('backend', '?')}`, {text.get('pooling', '?')} pooling) costs about what "
        why += "the teacher's text side costs"
        if text.get("backend") == "minilm" and "minilm" in str(teacher.get("text_model", "")).lower():
            why = (
                "the student's text tower is the same MiniLM-L6 that the teacher's text side runs (frozen: the "
                "student trains only its projection), so a caption costs the same transformer either way"
            )
        out[0] += f" Captions gain little because {why}; the gain is on images."
    return out


def model_card(
    student_dir: Path, *, store_attrs: dict[str, Any] | None, metrics_path: Path | None, info: CardInfo, shown: Path
) -> str:
    """Markdown for `<student_dir>/README.md` from the files that are there (and the store's attrs, if given);
    `shown`: the directory's final path (the one the loading snippets name)."""
    meta = _json(student_dir / "student_config.json") or {}
    summary = _json(student_dir / "train_summary.json") or {}
    metrics = _json(metrics_path)  # metrics_detail.json: evaluate's whole record
    teacher = (store_attrs or {}).get("teacher") or {}
    dataset = (store_attrs or {}).get("dataset") or {}
    recipe = (
        (student_dir / "distill_config.yaml").read_text() if (student_dir / "distill_config.yaml").is_file() else ""
    )
    cfg = meta.get("config", {})
    run = shown.name
    lines = [
        TITLE,
        "",
        f"A dual encoder distilled by kdpipe: image tower `{cfg.get('image', {}).get('backend', '?')}` "
        f"({cfg.get('image', {}).get('pooling', '?')} pooling), text tower `{cfg.get('text', {}).get('backend', '?')}` "
        f"({cfg.get('text', {}).get('pooling', '?')} pooling), each projected to {meta.get('dim', '?')} dimensions "
        f"({'with' if cfg.get('proj_bias', True) else 'without'} a bias) and L2-normalized; similarity is the "
        "dot product.",
        "",
        "## Teacher and data",
        f"- teacher: {teacher_line(teacher)}",
        f"- dataset: `{dataset.get('name', '?')}`, index fingerprint `{dataset.get('fingerprint', '?')}`",
        "",
        "## Recipe",
        f"- epochs {summary.get('epochs', '?')}, best epoch {summary.get('best_epoch', '?')}, "
        f"loss terms {', '.join(summary.get('loss_terms', [])) or '?'}, baseline {summary.get('baseline', '?')}",
    ]
    if info.scale is not None:
        lines.append(
            f"- logit scale of the exports: 1 / {info.scale.temperature:g} = "
            f"{1 / info.scale.temperature:g}, from {info.scale.source}"
        )
    if recipe:
        lines += ["", "```yaml", recipe.rstrip(), "```"]
    lines += ["", "## Metrics", ""]
    lines += metrics_table(metrics, run) if metrics else ["No metrics_detail.json given."]
    if metrics:
        own = own_metrics(metrics, run)
        lines += ["", *speed_lines(metrics, own[0] if own else None, meta, teacher)]
    lines += ["", "## How to load", "", *loading(meta, info, student_dir, shown)]
    return "\n".join(lines).rstrip() + "\n"


def loading(meta: dict[str, Any], info: CardInfo, written: Path, shown: Path) -> list[str]:
    """The loading recipes of the formats in `written` (the directory being exported, named `shown`)."""
    image, text = meta.get("image", {}), meta.get("text", {})
    pixels = (
        info.pixels.describe()
        if info.pixels is not None
        else (
            f"uint8 RGB at {image.get('size', '?')} px (as prepare made them), / 255, (x - mean) / std with mean "
            f"{image.get('mean')}, std {image.get('std')}"
        )
    )
    out = [
        "With kdpipe: `pipeline.towers.student.load_student(DIR)`, then `encode_images(uint8 [B, H, W, 3])` and "
        "`encode_texts(list_of_str)`.",
        "",
        f"Images: {pixels}. Texts: at most {text.get('max_tokens', '?')} tokens.",
    ]
    if info.pixels is not None:  # what hf/ and open_clip/ were written with, in this export
        out += _hf_lines(shown, info) if (written / "hf" / "config.json").is_file() else []
        out += _open_clip_lines(shown, info) if (written / "open_clip" / "open_clip_config.json").is_file() else []
    out += _sentence_lines(shown) if (written / "sentence_transformers" / "modules.json").is_file() else []
    if (written / "onnx" / "image.onnx").is_file():
        out += [
            "",
            "With ONNX Runtime (`onnx/`): `image.onnx` takes uint8 `images` [B, S, S, 3] at the size above; "
            "`text.onnx` takes int64 `input_ids` and `attention_mask` [B, L] from the tokenizer in `text_tower/`; "
            "both return L2-normalized `embedding` [B, dim].",
        ]
    return out


def _hf_lines(shown: Path, info: CardInfo) -> list[str]:
    caveats = hf_pixel_caveats(info.pixels)
    return [
        "",
        "With transformers alone (`hf/`, a stock `VisionTextDualEncoderModel`; the stock forward and the "
        "zero-shot pipeline give the student's probabilities, its logit scale being the training temperature's):",
        "",
        "```python",
        "import torch.nn.functional as F",
        "from transformers import AutoImageProcessor, AutoTokenizer, VisionTextDualEncoderModel",
        f'model = VisionTextDualEncoderModel.from_pretrained("{shown}/hf").eval()',
        f'tok = AutoTokenizer.from_pretrained("{shown}/hf")',
        f'proc = AutoImageProcessor.from_pretrained("{shown}/hf", backend="pil")  # the student\'s pixels',
        "text = F.normalize(model.get_text_features(**tok(texts, padding=True, truncation=True, "
        "return_tensors='pt')).pooler_output, dim=-1)",
        "image = F.normalize(model.get_image_features(**proc(images, return_tensors='pt')).pooler_output, dim=-1)",
        "```",
        "",
        "`preprocessor_config.json` makes the pixels above from image files with transformers' PIL backend (its "
        "torchvision backend resizes with another kernel)."
        + (" Where they can still differ from kdpipe's: " + "; ".join(caveats) + "." if caveats else ""),
    ]


def _open_clip_lines(shown: Path, info: CardInfo) -> list[str]:
    where = (shown / "open_clip").resolve()
    return [
        "",
        "With open_clip (`open_clip/`; also what CLIP_benchmark's `--model local-dir:...` and other tools built on "
        "`open_clip.create_model_and_transforms` load):",
        "",
        "```python",
        "import open_clip",
        f'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{where}")',
        f'tokenizer = open_clip.get_tokenizer("local-dir:{where}")',
        "image = model.encode_image(preprocess(pil_image).unsqueeze(0), normalize=True)",
        "text = model.encode_text(tokenizer(texts), normalize=True)",
        "```",
        "",
        f"`text_cfg.hf_model_name` in `open_clip_config.json` names this directory ({where}), where transformers "
        "finds the text model's config.json: after moving the directory, change it to the new path. open_clip's "
        "tokenizer cleans text first (ftfy, HTML unescape, whitespace): texts that cleaning changes (curly quotes, "
        "`&amp;`) tokenize differently from kdpipe. Its `preprocess` makes the pixels above from image files; "
        "where they can differ from kdpipe's: " + "; ".join(open_clip_pixel_caveats(info.pixels)) + ".",
    ]


def _sentence_lines(shown: Path) -> list[str]:
    return [
        "",
        "With sentence-transformers, the text side (`sentence_transformers/`): "
        f'`SentenceTransformer("{shown}/sentence_transformers").encode(texts)` gives the normalized text '
        "embeddings (the projection and its bias included); images need one of the formats above.",
    ]
