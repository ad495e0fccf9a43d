"""The student as one stock transformers `VisionTextDualEncoderModel` (loads with transformers alone).

kdpipe's student is `normalize(W_v . pool(ViT(x)) + b_v)` and `normalize(W_t . pool(BERT(t)) + b_t)`. The
stock dual encoder computes `visual_projection(vit.pooler_output)` and `text_projection(bert.pooler_output)`
with bias-free projections, so the mapping is:

- image side, exact: ViT's pooler is configurable (`pooler_output_size`, `pooler_act`), so the pooler becomes
  the student's projection *with its bias* (dense rows [W_v; 0], bias [b_v; 0], activation "linear") and
  `visual_projection` the selection [I_dim 0] (multiplying by 1 and adding zeros: bit-exact in fp32). This
  needs dim <= the ViT's hidden size and CLS pooling (ViT's pooler reads the CLS token only).
- text side: BERT's pooler (dense + tanh, hard-wired) is the DSMD student's `pooler` pooling itself and
  `text_projection` is W_t. The bias b_t has no place after a tanh in a bias-free projection, so it is stored
  in config.json as `kdpipe_text_projection_bias` (transformers keeps unknown config keys as attributes) and
  the model card's recipe adds it: `get_text_features(...).pooler_output + config.kdpipe_text_projection_bias`.
  When b_t is all zeros (`text_bias_is_zero`) the stock call alone is exact.

Other towers (EfficientNet, timm, mean/cls text pooling) have no stock transformers equivalent: export refuses
them with one line, and the student directory's own format (image_tower/, text_tower/) remains the way out.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.errors import InputError
from pipeline.store.durable import atomic_dir
from pipeline.towers.student import DualEncoderStudent

TEXT_BIAS_KEY = "kdpipe_text_projection_bias"


def check_exportable(model: DualEncoderStudent) -> None:
    """One InputError naming what does not fit the stock dual encoder, else nothing."""
    cfg = model.config
    reasons = []
    if cfg.image.backend != "hf_vit" or cfg.image.pooling != "cls":
        reasons.append(f"image tower {cfg.image.backend}/{cfg.image.pooling} (needs hf_vit with cls pooling)")
    if cfg.text.pooling != "pooler":
        reasons.append(f"text pooling {cfg.text.pooling} (needs BERT's pooler)")
    if model.dim > model.image_tower.out_dim:
        reasons.append(f"dim {model.dim} > the ViT's hidden size {model.image_tower.out_dim}")
    if reasons:
        raise InputError(
            "export --hf: this student has no stock transformers equivalent: "
            + "; ".join(reasons)
            + " (its image_tower/ and text_tower/ still load with transformers separately)"
        )


def text_bias_is_zero(model: DualEncoderStudent) -> bool:
    return bool(torch.count_nonzero(model.text_proj.bias) == 0)


def to_dual_encoder(model: DualEncoderStudent):
    """A `VisionTextDualEncoderModel` holding the student's weights (see the module docstring for the mapping)."""
    from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    check_exportable(model)
    model = getattr(model, "_orig_mod", model)
    vit, bert = model.image_tower.model, model.text_tower.model
    hidden, dim = vit.config.hidden_size, model.dim
    vision_cfg = vit.config.to_dict() | {"pooler_output_size": hidden, "pooler_act": "linear"}
    cfg = VisionTextDualEncoderConfig(
        vision_config=vision_cfg, text_config=bert.config.to_dict(), projection_dim=dim, logit_scale_init_value=0.0
    )
    setattr(cfg, TEXT_BIAS_KEY, [float(x) for x in model.text_proj.bias.detach().cpu()])
    dual = VisionTextDualEncoderModel(cfg).eval()
    missing, unexpected = dual.vision_model.load_state_dict(vit.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise InputError(f"export --hf: ViT weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    dual.text_model.load_state_dict(bert.state_dict(), strict=True)
    with torch.no_grad():
        w, b = model.image_proj.weight.detach().float(), model.image_proj.bias.detach().float()
        pool = dual.vision_model.pooler.dense
        pool.weight.zero_()
        pool.bias.zero_()
        pool.weight[:dim] = w  # [dim, hidden] in the first rows: pooler_output[:, :dim] = W_v cls + b_v
        pool.bias[:dim] = b
        dual.visual_projection.weight.zero_()
        dual.visual_projection.weight[:, :dim] = torch.eye(dim)  # picks those rows
        dual.text_projection.weight.copy_(model.text_proj.weight.detach().float())
    return dual


def save_dual_encoder(model: DualEncoderStudent, directory: Path | str) -> Path:
    """Write the transformers copy (config, weights, tokenizer, image processor) into `directory`."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dual = to_dual_encoder(model)  # first: a refused student leaves nothing behind
    with atomic_dir(directory) as tmp:  # swapped in whole: never a config beside another export's weights
        _write_dual_encoder(dual, model, tmp)
    return Path(directory)


def _write_dual_encoder(dual, model: DualEncoderStudent, directory: Path) -> None:
    dual.save_pretrained(directory)
    model.text_tower.tokenizer.save_pretrained(directory)
    size = model.image_size
    processor = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 2,  # bilinear (kdpipe resizes with antialiased bilinear on the device)
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(model.image_tower.mean),
        "image_std": list(model.image_tower.std),
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
