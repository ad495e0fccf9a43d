"""Which transformers class makes a tower out of a checkpoint directory, by its config's model_type.

A text tower is any encoder transformers' AutoModel knows (BERT, MiniLM, RoBERTa, DistilBERT, ModernBERT, ...)
or the text half of a CLIP / SigLIP; an image tower is a ViT, DINOv2, or the vision half of a CLIP / SigLIP.
A whole dual model (TinyCLIP-like: a CLIP dir for both towers) gives each tower its half: the other half's
weights and the dual model's heads are the checkpoint keys the tower deliberately leaves out.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from pipeline.errors import InputError

# checkpoint keys of a dual model that a tower built from one of its halves leaves out
_OTHER_HALF = {
    ("clip", "text"): ("vision_model.", "visual_projection.", "text_projection.", "logit_scale"),
    ("clip", "image"): ("text_model.", "visual_projection.", "text_projection.", "logit_scale"),
    ("siglip", "text"): ("vision_model.", "logit_scale", "logit_bias"),
    ("siglip", "image"): ("text_model.", "logit_scale", "logit_bias"),
}
# image towers: model_type -> (class name, tokens before the patches: CLS (+ registers); 0 = none)
IMAGE_TYPES = {
    "vit": ("ViTModel", 1),
    "dinov2": ("Dinov2Model", 1),
    "clip": ("CLIPVisionModel", 1),
    "clip_vision_model": ("CLIPVisionModel", 1),
    "siglip": ("SiglipVisionModel", 0),
    "siglip_vision_model": ("SiglipVisionModel", 0),
}


@dataclass(frozen=True)
class TowerModel:
    """How to build one tower: `cls.from_pretrained(path, **kwargs)` (or `cls(config, **kwargs)` without
    weights), keys under `ignorable` left out on purpose."""

    cls: type
    config: Any  # the tower's own config (a dual model's half)
    kwargs: dict
    ignorable: tuple[str, ...]
    prefix_tokens: int = 0  # image towers: tokens before the patches (CLS, registers)

    def build(self):
        return self.cls(self.config, **self.kwargs)


def _accepts(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters


def text_model(config, key: str, pooling: str) -> TowerModel:
    """The text tower's class for `config` (AutoConfig of the tower's directory) and `pooling`."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    kind = config.model_type
    if kind in ("clip", "siglip"):
        cls = getattr(transformers, "CLIPTextModel" if kind == "clip" else "SiglipTextModel")
        return TowerModel(cls, config.text_config, {}, _OTHER_HALF[(kind, "text")])
    cls = MODEL_MAPPING.get(type(config), None)
    if cls is None or getattr(config, "is_encoder_decoder", False):
        raise InputError(f"{key}: model_type {kind!r} is not a text encoder transformers' AutoModel knows")
    kwargs, ignorable = {}, ()
    if _accepts(cls, "add_pooling_layer"):  # BERT-like: no dead pooler parameters when it is not used
        kwargs["add_pooling_layer"] = pooling == "pooler"
        ignorable = () if pooling == "pooler" else ("pooler.",)
    elif pooling == "pooler" and kind not in ("clip_text_model", "siglip_text_model"):
        raise InputError(f"{key}: pooling `pooler`: a {kind} model has no pooler; use cls or mean")
    return TowerModel(cls, config, kwargs, ignorable)


def image_model(config, key: str, pooling: str) -> TowerModel:
    """The image tower's class for `config` and `pooling` (one line for anything unsupported)."""
    import transformers

    kind = config.model_type
    if kind not in IMAGE_TYPES:
        raise InputError(
            f"{key}: image model_type {kind!r} is not supported (supported: {', '.join(IMAGE_TYPES)}); "
            "or use backend timm"
        )
    name, prefix = IMAGE_TYPES[kind]
    if pooling == "cls" and prefix == 0:
        raise InputError(f"{key}: pooling `cls`: a {kind} model has no CLS token; use mean or pooler")
    cls = getattr(transformers, name)
    own = config.vision_config if kind in ("clip", "siglip") else config
    kwargs, ignorable = {}, _OTHER_HALF.get((kind, "image"), ())
    if _accepts(cls, "add_pooling_layer"):  # ViT: its pooler (dense + tanh) only when pooling with it
        kwargs["add_pooling_layer"] = pooling == "pooler"
        ignorable += () if pooling == "pooler" else ("pooler.",)
    return TowerModel(cls, own, kwargs, ignorable, prefix)


def dual_projections(cfg, dim: int):
    """(visual_projection, text_projection) weights [dim, width] of a whole CLIP that is both towers, each pooled
    with CLIP's own pooler, when its projection_dim is the student's `dim`: the student then starts as that CLIP
    (TinyCLIP's starting point). None otherwise (the projections keep their random init)."""
    from safetensors import safe_open

    from pipeline.towers import require_dir

    paths = (cfg.image.path, cfg.text.path)
    if None in paths or (cfg.image.pooling, cfg.text.pooling) != ("pooler", "pooler") or cfg.image.backend != "hf_vit":
        return None
    where = [require_dir(p, "distill.student", "a local Hugging Face model dir").resolve() for p in paths]
    weights = where[0] / "model.safetensors"
    if where[0] != where[1] or not weights.is_file():
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(where[0], local_files_only=True)
    if config.model_type != "clip" or config.projection_dim != dim:
        return None
    with safe_open(str(weights), framework="pt") as f:
        return f.get_tensor("visual_projection.weight"), f.get_tensor("text_projection.weight")
