"""The student as an open_clip model directory: `open_clip_config.json` + `open_clip_model.safetensors` + the
text tower's tokenizer and config, which `open_clip.create_model_and_transforms("local-dir:DIR")` and
`open_clip.get_tokenizer("local-dir:DIR")` load (open_clip >= 2.31; so do the tools built on them, such as
CLIP_benchmark's `--model local-dir:DIR`).

The mapping, checked against open_clip 3.3's source (model.py `_build_vision_tower` / `_build_text_tower` /
`CustomTextCLIP`, transformer.py `VisionTransformer`, hf_model.py `HFTextEncoder`, factory.py `create_model`):

image tower: transformers' ViT -> open_clip's `VisionTransformer`
- `conv1` has no bias: ViT's patch-embedding bias is added to the positional embedding of every patch position
  (conv(x) + b + pos_i = conv1(x) + (b + pos_i)); the CLS position keeps cls + pos_0 in `class_embedding` and
  a zero positional row (both computed by transformers' own embedding layer on a zero image, so a ViT run at
  another resolution than its config's gets its own interpolated positions).
- no `ln_pre` (ViT has none: `no_ln_pre`); blocks are pre-LN with q, k, v stacked into `in_proj_weight` /
  `in_proj_bias`, the output projection `out_proj`, the MLP `c_fc`, GELU (exact, `nn.GELU()`; tanh-approximate
  and QuickGELU map to `act_kwargs` / `quick_gelu`), `c_proj`; heads = width // `head_width`.
- ViT's final LayerNorm is `ln_post`, applied before pooling (`final_ln_after_pool: false`), and every
  LayerNorm takes ViT's eps (`norm_kwargs`; torch's default 1e-5 is not ViT's 1e-12).
- pooling: `tok` = the CLS token (kdpipe `cls`), `avg` = the mean of tokens 1: (the patches, kdpipe `mean`).
- `proj` = W_v^T, bias-free: a student with an image projection bias is refused.
text tower: open_clip's `HFTextEncoder` over the same transformers model
- `hf_model_name` names where `AutoConfig` finds the text model's config: this directory (config.json is
  written beside the weights); the weights come from the safetensors file (`hf_model_pretrained` is switched
  off by open_clip when a checkpoint is loaded).
- `hf_pooler_type`: `mean_pooler` (kdpipe `mean`), `cls_last_hidden_state_pooler` (`cls`), `cls_pooler`
  (`pooler`: BERT's pooler output, built because open_clip passes add_pooling_layer for it only).
- the attention mask is `input_ids != config.pad_token_id`: the tokenizer's padding id must be the config's.
- `hf_proj_type: linear` = `nn.Linear(width, dim, bias=False)`: a text projection bias is refused.
- the tokenizer (`hf_tokenizer_name`, read from this directory under `local-dir:`) pads and truncates to
  `context_length` = the student's max_tokens, as kdpipe does; it first cleans the text (ftfy, HTML unescape,
  whitespace), which kdpipe does not: texts that cleaning changes (e.g. curly quotes) tokenize differently.
- `logit_scale` = ln(1 / T) of the training temperature.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from pipeline.deploy.hf import has_bias, save_tokenizer, tower_kind
from pipeline.deploy.pixels import StudentPixels, open_clip_preprocess
from pipeline.deploy.scale import LogitScale
from pipeline.errors import InputError
from pipeline.store.durable import atomic_dir
from pipeline.store.ownership import Output
from pipeline.towers.student import DualEncoderStudent

CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_model.safetensors"
# open_clip's HF text towers (hf_configs.arch_dict) that are encoders
TEXT_TYPES = ("bert", "roberta", "xlm-roberta")
POOLERS = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler", "pooler": "cls_pooler"}
# transformers' activation names -> (open_clip's quick_gelu flag, act_kwargs for nn.GELU)
ACTIVATIONS = {
    "gelu": (False, None),
    "gelu_new": (False, {"approximate": "tanh"}),
    "gelu_pytorch_tanh": (False, {"approximate": "tanh"}),
    "quick_gelu": (True, None),
}
# transformers 4.x ViT key names -> the 5.x ones this module reads (both are found in saved students)
_VIT_4X = (
    (r"^encoder\.layer\.(\d+)\.", r"layers.\1."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
)


def check_open_clip(model: DualEncoderStudent) -> None:
    """One InputError naming everything open_clip cannot compute exactly, else nothing."""
    cfg, reasons = model.config, []
    image_kind = tower_kind(model.image_tower, cfg.image.backend)
    if image_kind != "vit":
        reasons.append(f"image tower {image_kind} (needs a transformers ViT)")
    else:
        act = model.image_tower.model.config.hidden_act
        if act not in ACTIVATIONS:
            reasons.append(f"ViT activation {act!r} (open_clip has {', '.join(ACTIVATIONS)})")
    text_kind = tower_kind(model.text_tower, cfg.text.backend)
    if text_kind not in TEXT_TYPES:
        reasons.append(f"text tower {text_kind} (open_clip's HF text towers: {', '.join(TEXT_TYPES)})")
    pad = model.text_tower.tokenizer.pad_token_id
    if pad is None or pad != getattr(model.text_tower.model.config, "pad_token_id", None):
        reasons.append(f"tokenizer padding id {pad} is not the text config's pad_token_id (open_clip's mask)")
    for side, proj in (("image", model.image_proj), ("text", model.text_proj)):
        if has_bias(proj):
            reasons.append(
                f"a bias in the {side} projection (open_clip's projections have none; train with "
                "distill.student.proj_bias: false)"
            )
    if reasons:
        raise InputError("export --open-clip: open_clip cannot compute this student exactly: " + "; ".join(reasons))


def vision_tower(model: DualEncoderStudent) -> tuple[dict, dict[str, torch.Tensor], bool]:
    """(open_clip `vision_cfg`, `visual.*` state, its model-level `quick_gelu`) of the student's ViT and image
    projection."""
    vit = model.image_tower.model
    c = vit.config
    quick, act_kwargs = ACTIVATIONS[c.hidden_act]
    mlp_ratio = c.intermediate_size / c.hidden_size  # open_clip's MLP width is int(width * mlp_ratio)
    if c.hidden_size % c.num_attention_heads or int(c.hidden_size * mlp_ratio) != c.intermediate_size:
        raise InputError(
            f"export --open-clip: ViT sizes {c.hidden_size} / {c.num_attention_heads} heads / "
            f"{c.intermediate_size} do not fit open_clip's head_width and mlp_ratio"
        )
    size = model.image_size
    with torch.no_grad():  # [1 + patches, width]: cls + pos_0, then b + pos_i (interpolated to `size` if needed)
        zeros = torch.zeros(1, 3, size, size, dtype=vit.embeddings.cls_token.dtype)
        start = vit.embeddings(zeros, interpolate_pos_encoding=c.image_size != size)[0]
    sd = {_canonical(k): v for k, v in vit.state_dict().items()}
    out = {
        "visual.conv1.weight": sd.pop("embeddings.patch_embeddings.projection.weight"),
        "visual.class_embedding": start[0].clone(),
        "visual.positional_embedding": torch.cat([torch.zeros_like(start[:1]), start[1:]]),
        "visual.ln_post.weight": sd.pop("layernorm.weight"),
        "visual.ln_post.bias": sd.pop("layernorm.bias"),
        "visual.proj": model.image_proj.weight.detach().T.contiguous(),
    }
    for k in ("embeddings.cls_token", "embeddings.position_embeddings", "embeddings.patch_embeddings.projection.bias"):
        sd.pop(k)  # in `start`
    for i in range(c.num_hidden_layers):
        p, q = f"layers.{i}.", f"visual.transformer.resblocks.{i}."
        qkv = [f"{p}attention.{n}_proj" for n in "qkv"]
        out[q + "attn.in_proj_weight"] = torch.cat([sd.pop(f"{n}.weight") for n in qkv])
        biases = [sd.pop(f"{n}.bias", None) for n in qkv]  # qkv_bias: false -> open_clip's bias stays zero
        out[q + "attn.in_proj_bias"] = torch.cat([b if b is not None else torch.zeros(c.hidden_size) for b in biases])
        for ours, theirs in (
            ("attention.o_proj", "attn.out_proj"),
            ("layernorm_before", "ln_1"),
            ("layernorm_after", "ln_2"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ):
            for t in ("weight", "bias"):
                out[f"{q}{theirs}.{t}"] = sd.pop(f"{p}{ours}.{t}")
    if sd:  # a ViT layout this mapping does not know: never a silently dropped weight
        raise InputError(f"export --open-clip: ViT weights not mapped to open_clip: {sorted(sd)[:3]}")
    cfg = {
        "image_size": size,
        "patch_size": c.patch_size,
        "width": c.hidden_size,
        "layers": c.num_hidden_layers,
        "head_width": c.hidden_size // c.num_attention_heads,
        "mlp_ratio": mlp_ratio,
        "no_ln_pre": True,
        "pool_type": "tok" if model.config.image.pooling == "cls" else "avg",
        "final_ln_after_pool": False,
        "norm_kwargs": {"eps": c.layer_norm_eps},
    }
    if act_kwargs:
        cfg["act_kwargs"] = act_kwargs
    return cfg, {k: v.detach().float().contiguous() for k, v in out.items()}, quick


def _canonical(key: str) -> str:
    for pattern, repl in _VIT_4X:
        key = re.sub(pattern, repl, key)
    return key


def text_tower(model: DualEncoderStudent, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(open_clip `text_cfg`, `text.*` state); `name`: where AutoConfig will find the text config."""
    text = model.text_tower.model
    cfg = {
        "hf_model_name": name,
        "hf_tokenizer_name": name,
        "hf_proj_type": "linear",
        "hf_pooler_type": POOLERS[model.config.text.pooling],
        "context_length": model.text_tower.max_tokens,
        "vocab_size": text.config.vocab_size,
    }
    state = {f"text.transformer.{k}": v for k, v in text.state_dict().items()}
    state["text.proj.weight"] = model.text_proj.weight.detach()
    return cfg, {k: v.detach().float().contiguous() for k, v in state.items()}


# what save_open_clip replaces: a directory it wrote (it lists its files, pipeline/store/ownership.py)
OPEN_CLIP_DIR = Output("an open_clip copy of a student", directory=True, marker=True)


def save_open_clip(
    model: DualEncoderStudent, directory: Path, pixels: StudentPixels, scale: LogitScale, *, final: Path | None = None
) -> Path:
    """Write the open_clip directory into `directory`; `final`: where it will be read from (default: there),
    named absolute in `hf_model_name` (AutoConfig resolves a relative name against the working directory)."""
    from safetensors.torch import save_file

    model = getattr(model, "_orig_mod", model)
    check_open_clip(model)
    preprocess = open_clip_preprocess(pixels)  # may refuse too: before anything is written
    vision_cfg, state, quick = vision_tower(model)
    text_cfg, text_state = text_tower(model, str(Path(final or directory).resolve()))
    state |= text_state
    state["logit_scale"] = torch.tensor(scale.log_scale, dtype=torch.float32)
    config = {
        "model_cfg": {
            "embed_dim": model.dim,
            "quick_gelu": quick,
            "init_logit_scale": scale.log_scale,
            "vision_cfg": vision_cfg,
            "text_cfg": text_cfg,
            "custom_text": True,
        },
        "preprocess_cfg": preprocess,
    }
    with atomic_dir(directory, OPEN_CLIP_DIR) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        model.text_tower.model.config.save_pretrained(tmp)  # config.json: hf_model_name's AutoConfig
        save_tokenizer(model, tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory
