"""Dual-encoder teachers from transformers: `extract.teacher.kind: hf` (CLIP, SigLIP, SigLIP2, BLIP's ITC).

The model is a local directory or a hub id from the local Hugging Face cache (pipeline/teachers/hf_loading.py:
never downloaded), loaded by its `model_type` into the class that computes its embeddings:

| model_type | class        | image input                                    | text padding                            |
|------------|--------------|------------------------------------------------|-----------------------------------------|
| clip       | CLIPModel    | its image processor: resize, crop, normalize   | to the batch's longest, attention mask  |
| siglip     | SiglipModel  | its image processor: resize, normalize         | to max_length (64), no mask: as trained |
| siglip2    | Siglip2Model | NaFlex patches (pixel_values, mask, shapes)    | to max_length (64), no mask: as trained |
| blip       | BlipForImageTextRetrieval (its ITC half) | its image processor | to the batch's longest, attention mask |

Each model's own conventions, as its processor and model card use them: CLIP pools the end-of-text token
under an attention mask, so padding to the batch's longest caption changes nothing; SigLIP pools the LAST
position and was trained on captions padded to max_length without a mask, so a caption padded to another
length gets another feature: SigLIP is always padded to `max_text_len`. Image processors run with the PIL
backend (`backend="pil"`): the torchvision one rounds differently, and a store's rows must not depend on
whether torchvision happens to be installed.

Embeddings: `get_image_features` / `get_text_features`, whose `pooler_output` is the PROJECTED embedding in
transformers 5 (an output object; a plain tensor in older releases, accepted too), then L2-normalized in
float32. BLIP's retrieval checkpoints have no such methods: its image-text contrastive (ITC) embeddings are
`vision_proj` of the vision model's [CLS] state and `text_proj` of the text encoder's (unimodal) [CLS] state,
exactly what BlipForImageTextRetrieval(use_itm_head=False) multiplies into its scores (tested against it);
its ITM head, a cross-encoder, is not a dual encoder's and is not used here. The identity recorded in the store (`identity()`) holds the sha256 of config.json, of every weights
file and of the tokenizer and processor files, the class, the text length and padding rule, and the model's
`logit_scale` (exp of the learned log scale, a float) and, for SigLIP, `logit_bias`: what a student's
contrastive loss or a report may want to reuse.

SigLIP2 NaFlex inputs travel through the extract loader as ONE float32 tensor per image, [P, 3 p^2 + 3]:
the P patches, then the patch mask and the (height, width) patch grid in the last three columns (exact in
float32: counts below 2^24). `encode_image_batch` unpacks it; the Teacher interface stays one tensor per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.image_file import to_rgb
from pipeline.errors import InputError
from pipeline.teachers import HFTeacherConfig
from pipeline.teachers.base import Teacher, TokenBatch
from pipeline.teachers.hf_loading import load_auto, load_model, model_identity, resolve_model_dir

KEY = "extract.teacher.hf.path"
MODEL_CLASSES = {
    "clip": "CLIPModel",
    "siglip": "SiglipModel",
    "siglip2": "Siglip2Model",
    "blip": "BlipForImageTextRetrieval",
}
PAD_TO_MAX = {"siglip", "siglip2"}  # trained on max_length-padded captions, pooled at the last position


def projected(output: Any) -> torch.Tensor:
    """The projected embedding of get_*_features: `pooler_output` of transformers 5's output object."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


class HFTeacher(Teacher):
    """A transformers dual encoder behind the Teacher interface (see the module doc)."""

    def __init__(
        self, directory: Path, spec: str, *, max_text_len: int | None = None, device="cpu", dtype=torch.float32
    ):
        import transformers

        config = load_auto("AutoConfig", directory, KEY)
        model_type = getattr(config, "model_type", None)
        if model_type not in MODEL_CLASSES:
            raise InputError(
                f"{KEY}: {directory} is a {model_type!r} model; the hf teacher runs {', '.join(MODEL_CLASSES)} "
                "(other models: extract.teacher.kind plugin)"
            )
        architectures = getattr(config, "architectures", None) or []
        if model_type == "blip" and MODEL_CLASSES["blip"] not in architectures:
            raise InputError(
                f"{KEY}: {directory} is a BLIP {architectures or 'model'}; the hf teacher runs BLIP's retrieval "
                "checkpoints (BlipForImageTextRetrieval, e.g. Salesforce/blip-itm-base-coco)"
            )
        self.model_type = model_type
        self.model = load_model(getattr(transformers, MODEL_CLASSES[model_type]), directory, KEY).to(device)
        self.tokenizer = load_auto("AutoTokenizer", directory, KEY)
        self.processor = load_auto("AutoImageProcessor", directory, KEY, backend="pil")
        limit = int(config.text_config.max_position_embeddings)
        self.max_text_len = int(max_text_len or limit)
        if self.max_text_len > limit:
            raise InputError(
                f"extract.teacher.hf.max_text_len: {self.max_text_len} exceeds the model's {limit} positions"
            )
        self.device = torch.device(device)
        self.dtype = dtype
        self.directory, self.spec = Path(directory), spec
        self.dim = int(self._probe_dim())
        self.name = f"{model_type}:{spec if not Path(spec).is_dir() else Path(spec).name}"
        self._identity: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, cfg: HFTeacherConfig, device="cpu", dtype=torch.float32) -> HFTeacher:
        directory = resolve_model_dir(cfg.path, KEY)
        return cls(directory, cfg.path, max_text_len=cfg.max_text_len, device=device, dtype=dtype)

    def _probe_dim(self) -> int:
        with torch.inference_mode():
            return int(self.encode_text_batch(self.tokenize(["a"])).shape[1])

    # -- identity -------------------------------------------------------------------------------------
    def logit_parameters(self) -> dict[str, float | None]:
        """{"logit_scale": exp(learned log scale), "logit_bias": SigLIP's learned bias or None}."""
        scale = getattr(self.model, "logit_scale", None)
        bias = getattr(self.model, "logit_bias", None)
        return {
            "logit_scale": None if scale is None else float(scale.detach().float().exp().reshape(-1)[0]),
            "logit_bias": None if bias is None else float(bias.detach().float().reshape(-1)[0]),
        }

    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            self._identity = {
                "name": self.name,
                "kind": "hf",
                "model_type": self.model_type,
                "class": type(self.model).__name__,
                "dim": self.dim,
                **model_identity(self.directory),
                "image_processor": f"{type(self.processor).__name__} (PIL backend)",
                "max_text_len": self.max_text_len,
                "text_padding": "max_length" if self.model_type in PAD_TO_MAX else "longest, masked",
                "dtype": str(self.dtype).replace("torch.", ""),
                **self.logit_parameters(),
            }
        return dict(self._identity)

    # -- CPU side (loader workers) ---------------------------------------------------------------------
    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        out = self.processor(images=[to_rgb(image)], return_tensors="pt")
        if self.model_type != "siglip2":
            return out["pixel_values"][0].float()  # [3, S, S]
        patches = out["pixel_values"][0].float()  # [P, 3 p^2]
        mask = out["pixel_attention_mask"][0].float()[:, None]  # [P, 1]
        shape = out["spatial_shapes"][0].float().expand(patches.shape[0], 2)  # [P, 2], (h, w) on every row
        return torch.cat([patches, mask, shape], dim=1)

    def tokenize(self, texts: list[str]) -> TokenBatch:
        if self.model_type in PAD_TO_MAX:
            enc = self.tokenizer(
                list(texts), padding="max_length", truncation=True, max_length=self.max_text_len, return_tensors="pt"
            )
            return {"input_ids": enc["input_ids"]}
        enc = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_text_len, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def token_lengths(self, texts: list[str]) -> list[int]:
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_text_len)
        return [len(ids) for ids in enc["input_ids"]]

    # -- device side ------------------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast(device_type=self.device.type, dtype=self.dtype)
        return torch.autocast(device_type=self.device.type, enabled=False)

    def encode_image_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device)
        if self.model_type == "siglip2":
            d = pixels.shape[-1] - 3
            inputs = {
                "pixel_values": pixels[..., :d],
                "pixel_attention_mask": pixels[..., d].round().long(),
                "spatial_shapes": pixels[:, 0, d + 1 :].round().long(),
            }
        else:
            inputs = {"pixel_values": pixels}
        with self._autocast():
            if self.model_type == "blip":
                states = self.model.vision_model(pixel_values=pixels).last_hidden_state  # [B, 1 + patches, H]
                out = self.model.vision_proj(states[:, 0, :])
            else:
                out = projected(self.model.get_image_features(**inputs))
        return F.normalize(out.float(), dim=-1)

    def encode_text_batch(self, tokens: TokenBatch) -> torch.Tensor:
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        with self._autocast():
            if self.model_type == "blip":
                states = self.model.text_encoder(**tokens).last_hidden_state  # [B, L, H], no image: unimodal
                out = self.model.text_proj(states[:, 0, :])
            else:
                out = projected(self.model.get_text_features(**tokens))
        return F.normalize(out.float(), dim=-1)


__all__ = ["HFTeacher", "projected", "MODEL_CLASSES"]
