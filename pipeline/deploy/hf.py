"""The student as one stock transformers `VisionTextDualEncoderModel` (loads with transformers alone).

kdpipe's student is `normalize(W_v . pool(ViT(x)) + b_v)` and `normalize(W_t . pool(text(t)) + b_t)`. The
stock dual encoder computes `visual_projection(vit.pooler_output)` and `text_projection(text.pooler_output)`
with bias-free projections, then `logit_scale.exp() * cos` for its logits, so the mapping is:

- image side, exact: ViT's pooler is configurable (`pooler_output_size`, `pooler_act`), so the pooler becomes
  the student's projection *with its bias* (dense rows [W_v; 0], bias [b_v; 0], activation "linear") and
  `visual_projection` the selection [I_dim 0] (multiplying by 1 and adding zeros: bit-exact in fp32). This
  needs dim <= the ViT's hidden size and CLS pooling (ViT's pooler reads the CLS token only).
- text side: the text model's pooler output (BERT's dense + tanh: the DSMD student's `pooler` pooling) and
  `text_projection` = W_t. A bias b_t has no place after the pooler in a bias-free projection: a student whose
  b_t is not zero is refused (train with `distill.student.proj_bias: false`, kdpipe's default).
- `logit_scale` = ln(1 / T) of the training temperature (`pipeline.deploy.scale`), so that the stock forward
  and the zero-shot pipeline give the probabilities the student was trained to give.
- `preprocessor_config.json`: the student's own pixels (`pipeline.deploy.pixels`).

Other towers (EfficientNet, timm, mean-pooled images, cls/mean-pooled texts) have no stock equivalent: refused
in one line; `--open-clip`, `--sentence-transformers` and `--onnx` cover them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.deploy.pixels import StudentPixels, hf_image_processor
from pipeline.deploy.scale import LogitScale
from pipeline.errors import InputError
from pipeline.store.durable import atomic_dir
from pipeline.store.ownership import Output
from pipeline.towers import quiet_transformers
from pipeline.towers.student import DualEncoderStudent


def has_bias(proj: torch.nn.Linear) -> bool:
    """A projection whose bias is not all zeros (a bias-free one, or one still at its zero init, has none)."""
    return proj.bias is not None and bool(torch.count_nonzero(proj.bias))


def tower_kind(tower: torch.nn.Module, backend: str) -> str:
    """The transformers model_type of a tower (`vit`, `bert`, ...), else its kdpipe backend name."""
    return getattr(getattr(getattr(tower, "model", None), "config", None), "model_type", None) or backend


def check_exportable(model: DualEncoderStudent) -> None:
    """One InputError naming what does not fit the stock dual encoder, else nothing."""
    cfg = model.config
    reasons = []
    image_kind = tower_kind(model.image_tower, cfg.image.backend)
    if image_kind != "vit" or cfg.image.pooling != "cls":
        reasons.append(f"image tower {image_kind}/{cfg.image.pooling} (needs a ViT with cls pooling)")
    if cfg.text.pooling != "pooler":
        reasons.append(f"text pooling {cfg.text.pooling} (needs the text model's pooler)")
    if model.dim > model.image_tower.out_dim:
        reasons.append(f"dim {model.dim} > the ViT's hidden size {model.image_tower.out_dim}")
    if has_bias(model.text_proj):
        reasons.append(
            "a text projection bias (transformers' text_projection after the pooler has none; train with "
            "distill.student.proj_bias: false)"
        )
    if reasons:
        raise InputError(
            "export --hf: this student has no exact stock transformers equivalent: "
            + "; ".join(reasons)
            + " (--open-clip, --sentence-transformers or --onnx may fit)"
        )


def to_dual_encoder(model: DualEncoderStudent, scale: LogitScale):
    """A `VisionTextDualEncoderModel` holding the student's weights (see the module docstring for the mapping)."""
    from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    check_exportable(model)
    model = getattr(model, "_orig_mod", model)
    vit, text = model.image_tower.model, model.text_tower.model
    hidden, dim = vit.config.hidden_size, model.dim
    vision_cfg = vit.config.to_dict() | {"pooler_output_size": hidden, "pooler_act": "linear"}
    cfg = VisionTextDualEncoderConfig(
        vision_config=vision_cfg,
        text_config=text.config.to_dict(),
        projection_dim=dim,
        logit_scale_init_value=scale.log_scale,
    )
    dual = VisionTextDualEncoderModel(cfg).eval()
    missing, unexpected = dual.vision_model.load_state_dict(vit.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise InputError(f"export --hf: ViT weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    dual.text_model.load_state_dict(text.state_dict(), strict=True)
    with torch.no_grad():
        w = model.image_proj.weight.detach().float()
        pool = dual.vision_model.pooler.dense
        pool.weight.zero_()
        pool.bias.zero_()
        pool.weight[:dim] = w  # [dim, hidden] in the first rows: pooler_output[:, :dim] = W_v cls + b_v
        if model.image_proj.bias is not None:
            pool.bias[:dim] = model.image_proj.bias.detach().float()
        dual.visual_projection.weight.zero_()
        dual.visual_projection.weight[:, :dim] = torch.eye(dim)  # picks those rows
        dual.text_projection.weight.copy_(model.text_proj.weight.detach().float())
    return dual


# what save_dual_encoder replaces: a directory it wrote (it lists its files, pipeline/store/ownership.py)
HF_COPY = Output("a transformers copy of a student", directory=True, marker=True)


def save_dual_encoder(
    model: DualEncoderStudent, directory: Path | str, pixels: StudentPixels, scale: LogitScale
) -> Path:
    """Write the transformers copy (config, weights, tokenizer, image processor) into `directory`."""
    dual = to_dual_encoder(model, scale)  # first: a refused student leaves nothing behind
    # swapped in whole: never a config beside another export's weights
    with atomic_dir(directory, HF_COPY) as tmp, quiet_transformers():
        dual.save_pretrained(tmp)
        save_tokenizer(model, tmp)
        (tmp / "preprocessor_config.json").write_text(json.dumps(hf_image_processor(pixels), indent=2) + "\n")
    return Path(directory)


def save_tokenizer(model: DualEncoderStudent, directory: Path) -> None:
    """The student's tokenizer, truncating at its max_tokens by default (`truncation=True` alone then cuts where
    the student was trained to)."""
    tok = model.text_tower.tokenizer
    limit = tok.model_max_length
    tok.model_max_length = model.text_tower.max_tokens
    try:
        tok.save_pretrained(directory)
    finally:
        tok.model_max_length = limit
