"""Test material for the BEiT-3 teacher, made offline in a second: tiny official-format checkpoints (key
names written out from the official state dict, not taken from our model) and a tiny SentencePiece model.

Import the fixtures into a test module with `from beit3_fixtures import *`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# ---------------------------------------------------------------------------------------------------
# Official-format checkpoints
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinySpec:
    embed_dim: int
    depth: int
    num_heads: int
    ffn_dim: int
    patch_size: int
    image_size: int
    vocab_size: int = 130
    text_positions: int = 1024


# "base-style": like beit3_base_itc_patch16_224.pth (weights under "model", fp32, FFN ratio 4);
# "large-style": like the 384 retrieval fine-tunes (under "module", stored fp16, more layers, other grid).
BASE_STYLE = TinySpec(embed_dim=32, depth=2, num_heads=4, ffn_dim=128, patch_size=8, image_size=32)
LARGE_STYLE = TinySpec(embed_dim=48, depth=3, num_heads=6, ffn_dim=192, patch_size=16, image_size=48)


def official_key_shapes(spec: TinySpec, heads: bool = True) -> dict[str, tuple[int, ...]]:
    """The key names and shapes of an official BEiT-3 retrieval state dict (shared/reference/beit3.md), written out."""
    d, f, p = spec.embed_dim, spec.ffn_dim, spec.patch_size
    g = spec.image_size // p
    shapes: dict[str, tuple[int, ...]] = {
        "beit3.text_embed.weight": (spec.vocab_size, d),
        "beit3.vision_embed.proj.weight": (d, 3, p, p),
        "beit3.vision_embed.proj.bias": (d,),
        "beit3.vision_embed.cls_token": (1, 1, d),
        "beit3.vision_embed.mask_token": (1, 1, d),
        "beit3.encoder.embed_positions.A.weight": (g * g + 3, d),
        "beit3.encoder.embed_positions.B.weight": (spec.text_positions, d),
    }
    for i in range(spec.depth):
        layer = f"beit3.encoder.layers.{i}"
        for e in ("A", "B"):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes[f"{layer}.self_attn.{proj}.{e}.weight"] = (d, d)
                shapes[f"{layer}.self_attn.{proj}.{e}.bias"] = (d,)
            for ln in ("self_attn.inner_attn_ln", "self_attn_layer_norm", "final_layer_norm"):
                shapes[f"{layer}.{ln}.{e}.weight"] = (d,)
                shapes[f"{layer}.{ln}.{e}.bias"] = (d,)
            shapes[f"{layer}.ffn.{e}.fc1.weight"] = (f, d)
            shapes[f"{layer}.ffn.{e}.fc1.bias"] = (f,)
            shapes[f"{layer}.ffn.{e}.ffn_layernorm.weight"] = (f,)
            shapes[f"{layer}.ffn.{e}.ffn_layernorm.bias"] = (f,)
            shapes[f"{layer}.ffn.{e}.fc2.weight"] = (d, f)
            shapes[f"{layer}.ffn.{e}.fc2.bias"] = (d,)
    for e in ("A", "B"):
        shapes[f"beit3.encoder.layer_norm.{e}.weight"] = (d,)
        shapes[f"beit3.encoder.layer_norm.{e}.bias"] = (d,)
    if heads:
        shapes["vision_head.weight"] = (d, d)
        shapes["language_head.weight"] = (d, d)
        shapes["logit_scale"] = ()
    return shapes


def official_state_dict(
    spec: TinySpec, seed: int = 0, heads: bool = True, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random weights scaled so that activations stay O(1) and attention is far from uniform: every
    parameter matters (LayerNorm affines and biases are random too)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in official_key_shapes(spec, heads).items():
        if key == "logit_scale":
            t = torch.tensor(math.log(1 / 0.07))
        elif "norm" in key or "_ln" in key:
            t = (1.0 if key.endswith("weight") else 0.0) + 0.2 * torch.randn(shape, generator=g)
        elif key.endswith("bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("proj.weight") or ".fc" in key:  # projections (and the patch conv): ~1/sqrt(fan_in)
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) * (1.0 / math.sqrt(fan_in))
        elif "head" in key:
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        else:  # token / position embeddings, cls and mask tokens (std 0.3: trained tables are small too; at
            # std 1 they dominate the residual stream and fp32 rounding is amplified to ~5e-5 in the tails)
            t = 0.3 * torch.randn(shape, generator=g)
        sd[key] = t.to(dtype)
    return sd


def write_checkpoint(
    path: Path, sd: dict[str, torch.Tensor], wrapper: str | None = "model", extra: dict | None = None
) -> Path:
    obj = {wrapper: sd} if wrapper else dict(sd)
    if extra:
        obj.update(extra)
    torch.save(obj, path)
    return path


# ---------------------------------------------------------------------------------------------------
# A tiny SentencePiece model (unigram, like XLM-R's), trained on made-up captions
# ---------------------------------------------------------------------------------------------------
WORDS = (
    "a man woman dog cat riding bike on the street with red blue green hat playing ball in park two "
    "children sitting bench near water large small building people walking beach sunset camera holding "
    "black white shirt girl boy jumps over grass table food eating"
).split()


def tiny_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    sents = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))).capitalize() + rng.choice(".!?")
        for _ in range(n)
    ]
    return sents + ["Café naïve résumé, Über cool 123 456", "UPPER lower MiXeD Case", "It's 3:45 p.m. (late)"]


def train_tiny_spm(directory: Path, vocab_size: int = 120) -> Path:
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(tiny_corpus()), encoding="utf-8")
    prefix = directory / "tiny"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="unigram", minloglevel=2
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="session")
def tiny_spm(tmp_path_factory) -> Path:
    return train_tiny_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="session")
def base_style_ckpt(tmp_path_factory) -> tuple[Path, dict]:
    sd = official_state_dict(BASE_STYLE, seed=1)
    path = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "beit3_tiny_base_itc.pth", sd, "model")
    return path, sd


@pytest.fixture(scope="session")
def large_style_ckpt(tmp_path_factory) -> tuple[Path, dict]:
    sd = official_state_dict(LARGE_STYLE, seed=2, dtype=torch.float16)
    path = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "beit3_tiny_large_retrieval.pth", sd, "module")
    return path, sd


__all__ = [
    "TinySpec",
    "BASE_STYLE",
    "LARGE_STYLE",
    "official_key_shapes",
    "official_state_dict",
    "write_checkpoint",
    "train_tiny_spm",
    "tiny_corpus",
    "tiny_spm",
    "base_style_ckpt",
    "large_style_ckpt",
]
