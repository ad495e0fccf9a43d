"""The student directory's README.md: what it was distilled from, how, how well, and how to load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _metrics_table(metrics: dict[str, Any]) -> list[str]:
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
    rows = [name for name, v in metrics.items() if isinstance(v, dict) and "rsum" in v]
    if not rows:
        return ["No metrics_detail.json next to this student yet (run `kdpipe evaluate`)."]
    lines = [
        f"{metrics.get('dataset', '?')}, split {metrics.get('split', '?')}: {metrics.get('n_images', '?')} images, "
        f"{metrics.get('n_captions', '?')} captions; recalls in percent.",
        "",
        "| model | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    lines += [
        f"| {name} | " + " | ".join(f"{metrics[name].get(k, float('nan')):.2f}" for k in keys) + " |" for name in rows
    ]
    return lines


def model_card(
    student_dir: Path, *, store_attrs: dict[str, Any] | None, metrics_path: Path | None, hf: bool, onnx: bool
) -> str:
    """Markdown for `<student_dir>/README.md` from the files that are there (and the store's attrs, if given)."""
    meta = _json(student_dir / "student_config.json") or {}
    summary = _json(student_dir / "train_summary.json") or {}
    metrics = _json(metrics_path) if metrics_path else None
    teacher = (store_attrs or {}).get("teacher") or {}
    dataset = (store_attrs or {}).get("dataset") or {}
    recipe = (
        (student_dir / "distill_config.yaml").read_text() if (student_dir / "distill_config.yaml").is_file() else ""
    )
    cfg = meta.get("config", {})
    lines = [
        "# kdpipe student",
        "",
        f"A dual encoder distilled by kdpipe: image tower `{cfg.get('image', {}).get('backend', '?')}` "
        f"({cfg.get('image', {}).get('pooling', '?')} pooling), text tower `{cfg.get('text', {}).get('backend', '?')}` "
        f"({cfg.get('text', {}).get('pooling', '?')} pooling), each projected to {meta.get('dim', '?')} dimensions "
        "and L2-normalized; similarity is the dot product.",
        "",
        "## Teacher and data",
        f"- teacher: `{json.dumps(teacher, sort_keys=True) if teacher else 'unknown (no feature store given)'}`",
        f"- dataset: `{dataset.get('name', '?')}`, index fingerprint `{dataset.get('fingerprint', '?')}`",
        "",
        "## Recipe",
        f"- epochs {summary.get('epochs', '?')}, best epoch {summary.get('best_epoch', '?')}, "
        f"loss terms {', '.join(summary.get('loss_terms', [])) or '?'}, baseline {summary.get('baseline', '?')}",
    ]
    if recipe:
        lines += ["", "```yaml", recipe.rstrip(), "```"]
    lines += ["", "## Metrics", "", *(_metrics_table(metrics) if metrics else ["No metrics_detail.json given."])]
    lines += ["", "## How to load", "", *_loading(meta, hf=hf, onnx=onnx)]
    return "\n".join(lines) + "\n"


def _loading(meta: dict[str, Any], *, hf: bool, onnx: bool) -> list[str]:
    image = meta.get("image", {})
    out = [
        "With kdpipe: `pipeline.towers.student.load_student(DIR)`, then `encode_images(uint8 [B, H, W, 3])` and "
        "`encode_texts(list_of_str)`.",
        "",
        f"Images: {image.get('input', 'uint8 RGB')}, size {image.get('size', '?')}, mean {image.get('mean')}, "
        f"std {image.get('std')}. Texts: at most {meta.get('text', {}).get('max_tokens', '?')} tokens.",
    ]
    if hf:
        out += [
            "",
            "With transformers alone (`hf/`, a stock `VisionTextDualEncoderModel`):",
            "",
            "```python",
            "import torch, torch.nn.functional as F",
            "from transformers import AutoImageProcessor, AutoTokenizer, VisionTextDualEncoderModel",
            'model = VisionTextDualEncoderModel.from_pretrained("DIR/hf").eval()',
            'tok, proc = AutoTokenizer.from_pretrained("DIR/hf"), AutoImageProcessor.from_pretrained("DIR/hf")',
            f"t = tok(texts, padding=True, truncation=True, max_length={meta.get('text', {}).get('max_tokens', 30)}, "
            "return_tensors='pt')",
            "bias = torch.tensor(model.config.kdpipe_text_projection_bias)  # the text projection's bias (see below)",
            "text = F.normalize(model.get_text_features(**t).pooler_output + bias, dim=-1)",
            "image = F.normalize(model.get_image_features(**proc(images, return_tensors='pt')).pooler_output, dim=-1)",
            "```",
            "",
            "The image projection and its bias live in the ViT's pooler (a linear pooler) and `visual_projection` "
            "selects its first rows, so image features are exact. A bias-free `text_projection` after BERT's tanh "
            "pooler cannot hold the text bias: it is `config.kdpipe_text_projection_bias`, added as above. "
            "`AutoImageProcessor` resizes with PIL; kdpipe's cache resizes the shorter side and center-crops first.",
        ]
    if onnx:
        out += [
            "",
            "With ONNX Runtime (`onnx/`): `image.onnx` takes uint8 `images` [B, S, S, 3] at the size above; "
            "`text.onnx` takes int64 `input_ids` and `attention_mask` [B, L] from the tokenizer in `text_tower/`; "
            "both return L2-normalized `embedding` [B, dim].",
        ]
    return out
