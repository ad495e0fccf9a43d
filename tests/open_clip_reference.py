"""A small reference loader for open_clip model directories (`open_clip_config.json` +
`open_clip_model.safetensors`), for machines where open_clip cannot be imported (it imports torchvision).

Written from open_clip 3.3's config semantics, read in its source (src/open_clip/):
- factory.py `create_model("local-dir:DIR")`: `model_cfg` builds `CustomTextCLIP` when the text tower is a
  Hugging Face one; the checkpoint loads strictly (`load_checkpoint(strict=True)`); `preprocess_cfg` merges
  over `PreprocessCfg`'s defaults. `get_tokenizer("local-dir:DIR")`: an `HFTokenizer` over DIR itself, padding
  and truncating to `text_cfg.context_length`, after `_clean_whitespace` (ftfy.fix_text, html.unescape twice,
  whitespace collapsed).
- model.py `_build_vision_tower`: heads = width // head_width; `norm_kwargs` / `act_kwargs` are partial()
  arguments of LayerNorm / nn.GELU (QuickGELU when `quick_gelu`).
- transformer.py `VisionTransformer`: conv1 without bias; [class_embedding, patches] + positional_embedding;
  ln_pre (Identity with `no_ln_pre`); pre-LN blocks x + attn(ln_1(x)), x + mlp(ln_2(x)) with
  nn.MultiheadAttention and mlp = c_fc, act, c_proj; then ln_post on every token and pooling (`tok`: token 0,
  `avg`: the mean of tokens 1:) or, with `final_ln_after_pool`, pooling then ln_post; then `@ proj`.
- hf_model.py `HFTextEncoder`: AutoConfig.from_pretrained(hf_model_name), AutoModel.from_config with
  add_pooling_layer only for `cls_pooler`; attention mask = input_ids != config.pad_token_id; MeanPooler
  (masked mean), ClsPooler (pooler_output), ClsLastHiddenStatePooler (token 0); `linear` proj without bias.
- transform.py `image_transform` (eval): `squash` Resize((s, s)), `shortest` Resize(s) + CenterCrop(s) (crop at
  int(round((side - s) / 2))), bilinear or bicubic (PIL's, through torchvision on PIL images); then RGB
  conversion, ToTensor (/ 255), Normalize.
Anything in a config this loader does not implement fails an assertion instead of being ignored. ftfy is not
applied (not installed here): the tests' texts are plain ASCII, which ftfy leaves unchanged.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

VISION_KEYS = {
    "image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio", "no_ln_pre", "pool_type",
    "final_ln_after_pool", "norm_kwargs", "act_kwargs",
}  # fmt: skip
TEXT_KEYS = {"hf_model_name", "hf_tokenizer_name", "hf_proj_type", "hf_pooler_type", "context_length", "vocab_size"}
MODEL_KEYS = {"embed_dim", "quick_gelu", "init_logit_scale", "vision_cfg", "text_cfg", "custom_text"}


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int, act: nn.Module, eps: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp))
        self.mlp.add_module("gelu", act)
        self.mlp.add_module("c_proj", nn.Linear(mlp, width))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Visual(nn.Module):
    def __init__(self, cfg: dict, embed_dim: int, quick_gelu: bool) -> None:
        super().__init__()
        assert set(cfg) <= VISION_KEYS, f"not implemented here: {set(cfg) - VISION_KEYS}"
        width, size, patch = cfg["width"], cfg["image_size"], cfg["patch_size"]
        eps = (cfg.get("norm_kwargs") or {}).get("eps", 1e-5)  # torch's LayerNorm default otherwise
        assert set(cfg.get("norm_kwargs") or {}) <= {"eps"}
        act_kwargs = cfg.get("act_kwargs") or {}
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros((size // patch) ** 2 + 1, width))
        self.ln_pre = nn.Identity() if cfg.get("no_ln_pre") else nn.LayerNorm(width, eps=eps)
        heads, mlp = width // cfg.get("head_width", 64), int(width * cfg.get("mlp_ratio", 4.0))
        blocks = [Block(width, heads, mlp, QuickGELU() if quick_gelu else nn.GELU(**act_kwargs), eps)]
        blocks += [Block(width, heads, mlp, QuickGELU() if quick_gelu else nn.GELU(**act_kwargs), eps)
                   for _ in range(cfg["layers"] - 1)]  # fmt: skip
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(blocks)
        self.ln_post = nn.LayerNorm(width, eps=eps)
        self.proj = nn.Parameter(torch.zeros(width, embed_dim))
        self.pool_type = cfg.get("pool_type", "tok")
        assert self.pool_type in ("tok", "avg")
        self.final_ln_after_pool = cfg.get("final_ln_after_pool", False)

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, patches, width]
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = block(x)
        if not self.final_ln_after_pool:
            x = self.ln_post(x)
        pooled = x[:, 0] if self.pool_type == "tok" else x[:, 1:].mean(1)
        if self.final_ln_after_pool:
            pooled = self.ln_post(pooled)
        return pooled @ self.proj


class Text(nn.Module):
    def __init__(self, cfg: dict, embed_dim: int) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        assert set(cfg) <= TEXT_KEYS, f"not implemented here: {set(cfg) - TEXT_KEYS}"
        assert cfg["hf_proj_type"] == "linear"
        self.config = AutoConfig.from_pretrained(cfg["hf_model_name"], local_files_only=True)
        self.pooler_type = cfg["hf_pooler_type"]
        assert self.pooler_type in ("mean_pooler", "cls_pooler", "cls_last_hidden_state_pooler")
        self.transformer = AutoModel.from_config(self.config, add_pooling_layer=self.pooler_type == "cls_pooler")
        self.proj = nn.Linear(self.config.hidden_size, embed_dim, bias=False)

    def forward(self, ids):
        mask = (ids != self.config.pad_token_id).long()
        out = self.transformer(input_ids=ids, attention_mask=mask)
        if self.pooler_type == "mean_pooler":
            pooled = (out.last_hidden_state * mask.unsqueeze(-1)).sum(1) / mask.sum(-1, keepdim=True)
        elif self.pooler_type == "cls_pooler":
            pooled = out.pooler_output
        else:
            pooled = out.last_hidden_state[:, 0]
        return self.proj(pooled)


class ReferenceOpenClip(nn.Module):
    """`encode_image(pixels)`, `encode_text(ids)` (normalized), `tokenize(texts)`, `preprocess(pil_image)`."""

    def __init__(self, directory: Path | str) -> None:
        super().__init__()
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        self.directory = Path(directory)
        doc = json.loads((self.directory / "open_clip_config.json").read_text())
        cfg = doc["model_cfg"]
        assert set(cfg) <= MODEL_KEYS, f"not implemented here: {set(cfg) - MODEL_KEYS}"
        assert cfg.get("custom_text") and cfg["text_cfg"].get("hf_model_name")
        self.visual = Visual(cfg["vision_cfg"], cfg["embed_dim"], cfg.get("quick_gelu", False))
        self.text = Text(cfg["text_cfg"], cfg["embed_dim"])
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.get("init_logit_scale", np.log(1 / 0.07)))))
        state = load_file(str(self.directory / "open_clip_model.safetensors"))
        self.load_state_dict(state, strict=True)  # every key used, none missing: as open_clip loads it
        self.eval()
        self.context_length = cfg["text_cfg"]["context_length"]
        self.tokenizer = AutoTokenizer.from_pretrained(self.directory, local_files_only=True)  # local-dir: DIR
        self.pre = doc.get("preprocess_cfg", {})
        assert set(self.pre) <= {"size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color"}

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        def clean(t: str) -> str:  # _clean_whitespace without ftfy
            return " ".join(html.unescape(html.unescape(t)).strip().split()).strip()

        return self.tokenizer(
            [clean(t) for t in texts],
            return_tensors="pt",
            max_length=self.context_length,
            padding="max_length",
            truncation=True,
        ).input_ids

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        size, mode = self.pre["size"], self.pre.get("resize_mode", "shortest")
        interp = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[
            self.pre.get("interpolation", "bicubic")
        ]
        if mode == "squash":
            img = img.resize((size, size), interp)
        else:
            assert mode == "shortest"
            w, h = img.size
            short, long = min(w, h), max(w, h)
            new = (size, int(size * long / short)) if w <= h else (int(size * long / short), size)
            img = img.resize(new, interp)
            left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
            img = img.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(self.pre["mean"]).view(3, 1, 1)
        std = torch.tensor(self.pre["std"]).view(3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(pixels), dim=-1)

    @torch.no_grad()
    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(ids), dim=-1)
