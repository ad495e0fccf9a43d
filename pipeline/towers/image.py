"""Image towers: normalized pixels [B, 3, S, S] -> pooled features [B, F].

Backends
- `hf_vit`: a transformers vision transformer from a local Hugging Face dir or a Hub id in the local cache:
  ViT, DINOv2, the vision half of a CLIP or SigLIP (a whole CLIP / SigLIP dir, or its vision model alone);
  or a random-init `ViTModel` from explicit sizes (ViT-B/16 by default). Pooling `cls` = the last layer's CLS
  token (as DSMD; SigLIP has none), `mean` = the mean of the patch tokens (CLS left out), `pooler` = the
  model's own pooled output (ViT's dense + tanh, CLIP's post-LayerNorm CLS, SigLIP's attention-pooling head,
  DINOv2's normalized CLS).
- `efficientnet_lite0`: the ImageNet EfficientNet-Lite0 that ships in a package (via
  `pipeline.pretrained_assets`); pooled 1280-d features of the last conv stage.
- `timm`: any timm model name, imported lazily (timm needs torchvision, which CPU-only machines here lack);
  weights from a local file or a random init, never from the hub.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from pipeline.errors import InputError
from pipeline.text_files import read_json
from pipeline.towers import load_pretrained_strict, offline_hub, reading_hf_dir, require_dir

# Named pixel normalizations, (mean, std) per RGB channel of pixels in [0, 1] (`pixel_norm`).
PIXEL_NORMS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    # The ImageNet-21k ViTs (google/vit-*-in21k, their preprocessor_config.json) were trained with this
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # torchvision's ImageNet statistics: what DSMD's code normalizes its in21k ViT's input with
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# Used when neither the config nor the tower's own preprocessing config says otherwise.
VIT_MEAN, VIT_STD = PIXEL_NORMS["half"]


@dataclass(frozen=True)
class ImageTowerConfig:
    """Section `distill.student.image`."""

    backend: Literal["hf_vit", "efficientnet_lite0", "timm"] = "hf_vit"
    # hf_vit: a local Hugging Face model dir; timm: a local weights file (.safetensors / .pth / .bin);
    # None: random init. efficientnet_lite0 ignores it (its weights ship in a package; see `pretrained`).
    path: Path | None = None
    pretrained: bool = True  # efficientnet_lite0: load the package-shipped ImageNet weights
    timm_name: str = ""  # timm: the model name, e.g. "vit_base_patch16_224"
    pooling: Literal["cls", "mean", "pooler"] = "cls"
    image_size: int = 224  # input resolution of the tower; cached images of another size are resized on the device
    # Pixel normalization: `half` (0.5 / 0.5) or `imagenet` (ImageNet mean / std), or `auto`: the tower's own
    # preprocessing config, i.e. what its weights were trained with: hf_vit the model dir's
    # preprocessor_config.json (image_mean / image_std; google/vit-*-in21k: half), timm the model's
    # pretrained_cfg mean / std, efficientnet_lite0 the constants of its packaged weights (half); half where
    # there is none (a random init, or a dir without preprocessor_config.json).
    pixel_norm: Literal["auto", "half", "imagenet"] = "auto"
    # Explicit constants instead of a named pixel_norm (each, when given, overrides the resolved value).
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    # hf_vit random-init sizes (ignored when `path` is given); defaults: ViT-B/16.
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    patch_size: int = 16

    def __post_init__(self) -> None:
        if self.backend == "timm" and not self.timm_name:
            raise ValueError("backend timm needs timm_name (e.g. vit_base_patch16_224)")
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.pixel_norm != "auto" and (self.mean is not None or self.std is not None):
            raise ValueError(f"pixel_norm {self.pixel_norm!r} and explicit mean/std: give one of the two")


def resolve_pixel_norm(cfg: ImageTowerConfig, own_mean, own_std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a tower: explicit mean/std, else the named pixel_norm, else the tower's own (`auto`)."""
    mean, std = PIXEL_NORMS[cfg.pixel_norm] if cfg.pixel_norm != "auto" else (own_mean, own_std)
    mean = cfg.mean if cfg.mean is not None else mean
    std = cfg.std if cfg.std is not None else std
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


class ImageTower(nn.Module):
    """Base: `forward(pixels) -> [B, out_dim]`; `mean`/`std` are the resolved normalization constants."""

    out_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def save(self, directory: Path) -> None:
        raise NotImplementedError


# -- hf_vit ------------------------------------------------------------------------------------------
class HFViTTower(ImageTower):
    def __init__(self, cfg: ImageTowerConfig, *, key: str, weights: bool = True) -> None:
        super().__init__()
        from transformers import AutoConfig, ViTConfig, ViTModel

        from pipeline.towers.hf_models import image_model

        self.pooling = cfg.pooling
        mean, std = VIT_MEAN, VIT_STD
        if cfg.path is not None:
            offline_hub()
            path = require_dir(cfg.path, f"{key}.path", "a local Hugging Face model dir with a ViT (config.json)")
            with reading_hf_dir(path, f"{key}.path"):
                config = AutoConfig.from_pretrained(path, local_files_only=True)
            how = image_model(config, f"{key}.path", cfg.pooling)
            if weights:
                self.model = load_pretrained_strict(
                    how.cls, path, f"{key}.path", ignorable_prefixes=how.ignorable, **how.kwargs
                )
            else:
                self.model = how.build()
            self.prefix_tokens = how.prefix_tokens
            pre = path / "preprocessor_config.json"
            if pre.is_file():
                meta = read_json(pre)
                if not isinstance(meta, dict):
                    raise InputError(f"{pre}: expected a JSON object (an image processor's settings)")
                mean = tuple(meta.get("image_mean", mean))
                std = tuple(meta.get("image_std", std))
        else:
            if cfg.pooling == "pooler":
                raise InputError(f"{key}.pooling: `pooler` needs pretrained weights (path); use cls or mean")
            vit_cfg = ViTConfig(
                hidden_size=cfg.hidden_size,
                num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads,
                intermediate_size=cfg.intermediate_size,
                image_size=cfg.image_size,
                patch_size=cfg.patch_size,
            )
            self.model = ViTModel(vit_cfg, add_pooling_layer=False)
            self.prefix_tokens = 1
        self.mean, self.std = resolve_pixel_norm(cfg, mean, std)
        self.out_dim = self.model.config.hidden_size
        # DINOv2 interpolates its positions by itself (no argument); the others on request
        self.interpolate = "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters and (
            self.model.config.image_size != cfg.image_size
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels, **({"interpolate_pos_encoding": True} if self.interpolate else {}))
        if self.pooling == "pooler":
            return out.pooler_output  # [B, H]
        hidden = out.last_hidden_state  # [B, prefix + patches, H] (ViT, DINOv2, SigLIP: after the final norm)
        return hidden[:, 0] if self.pooling == "cls" else hidden[:, self.prefix_tokens :].mean(1)

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory)
        size = self.model.config.image_size
        # So that AutoImageProcessor (and a user) see the normalization this tower was trained with.
        (Path(directory) / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "image_processor_type": "ViTImageProcessor",
                    "do_resize": True,
                    "size": {"height": size, "width": size},
                    "resample": 2,
                    "do_rescale": True,
                    "rescale_factor": 1 / 255,
                    "do_normalize": True,
                    "image_mean": list(self.mean),
                    "image_std": list(self.std),
                },
                indent=2,
            )
            + "\n"
        )


# -- efficientnet_lite0 ------------------------------------------------------------------------------
class EfficientNetLite0Tower(ImageTower):
    def __init__(self, cfg: ImageTowerConfig, *, key: str, weights: bool = True) -> None:
        super().__init__()
        from pipeline import pretrained_assets as assets

        if cfg.image_size != assets.EFFICIENTNET_LITE0_IMAGE_SIZE:
            raise InputError(
                f"{key}.image_size: EfficientNet-Lite0 needs {assets.EFFICIENTNET_LITE0_IMAGE_SIZE} "
                f"(its convolution padding is fixed for that size), got {cfg.image_size}"
            )
        self.model = assets.efficientnet_lite0(pretrained=cfg.pretrained and weights)
        # The 1000-way classifier is not part of the tower: drop it so that no parameter is left without a gradient.
        self.model.net._fc = nn.Identity()
        self.model.net._dropout = nn.Identity()
        self.mean, self.std = resolve_pixel_norm(cfg, assets.EFFICIENTNET_LITE0_MEAN, assets.EFFICIENTNET_LITE0_STD)
        self.out_dim = assets.EFFICIENTNET_LITE0_FEATURE_DIM

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.features(pixels)  # [B, 1280], global average of the last conv stage

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.model.state_dict().items()}, str(Path(directory) / "model.safetensors")
        )
        (Path(directory) / "config.json").write_text(
            json.dumps(
                {
                    "backend": "efficientnet_lite0",
                    "library": "efficientnet_lite_pytorch",
                    "note": "keys are pipeline.pretrained_assets.EfficientNetLite0's (net. = efficientnet_lite_pytorch's "
                    "EfficientNet.from_name('efficientnet-lite0') without _fc); features = "
                    "net.extract_features(x).mean((2, 3))",
                    "image_mean": list(self.mean),
                    "image_std": list(self.std),
                },
                indent=2,
            )
            + "\n"
        )


# -- timm --------------------------------------------------------------------------------------------
def import_timm(key: str):
    try:
        import timm  # noqa: PLC0415 - optional, needs torchvision
    except Exception as err:  # ImportError, or torchvision failing to load next to this torch
        raise InputError(
            f"{key}: backend timm needs the timm package, which cannot be imported here "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "install kdpipe[timm] on a machine with a matching torchvision"
        ) from None
    return timm


class TimmTower(ImageTower):
    def __init__(self, cfg: ImageTowerConfig, *, key: str, weights: bool = True) -> None:
        super().__init__()
        timm = import_timm(f"{key}.backend")
        offline_hub()
        kwargs = {"num_classes": 0}
        if cfg.pooling == "mean":
            kwargs["global_pool"] = "avg"
        if cfg.path is not None and weights:
            path = Path(cfg.path).expanduser()
            if not path.is_file():
                raise InputError(
                    f"{key}.path: {path} is not a file; expected a local timm weights file "
                    "(kdpipe never downloads weights)"
                )
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        try:
            self.model = timm.create_model(cfg.timm_name, **kwargs)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise InputError(f"{key}.timm_name: {cfg.timm_name!r} is not a timm model name") from None
            raise
        self.timm_name = cfg.timm_name
        pcfg = getattr(self.model, "pretrained_cfg", {}) or {}
        self.mean, self.std = resolve_pixel_norm(cfg, pcfg.get("mean", VIT_MEAN), pcfg.get("std", VIT_STD))
        self.out_dim = self.model.num_features

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.model.state_dict().items()}, str(Path(directory) / "model.safetensors")
        )
        (Path(directory) / "config.json").write_text(
            json.dumps(
                {
                    "backend": "timm",
                    "timm_name": self.timm_name,
                    "num_classes": 0,
                    "image_mean": list(self.mean),
                    "image_std": list(self.std),
                    "load": f"timm.create_model({self.timm_name!r}, num_classes=0, pretrained=True, "
                    "pretrained_cfg_overlay={'file': 'model.safetensors'})",
                },
                indent=2,
            )
            + "\n"
        )


BACKENDS = {"hf_vit": HFViTTower, "efficientnet_lite0": EfficientNetLite0Tower, "timm": TimmTower}


def build_image_tower(cfg: ImageTowerConfig, *, key: str = "distill.student.image", weights: bool = True) -> ImageTower:
    """`weights=False` builds the architecture only (load_student then loads the saved state)."""
    return BACKENDS[cfg.backend](cfg, key=key, weights=weights)
