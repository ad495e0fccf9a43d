"""BEiT-3 (multiway Transformer) for retrieval features, in plain PyTorch.

Same math and the same parameter names as Microsoft's `unilm/beit3` code on `torchscale` (Encoder with
`multiway=True`), so the official retrieval checkpoints load key for key (`beit3_checkpoint.py`). Only
what retrieval features need is built: each modality runs alone through its own experts -- images through
the `A` (vision) experts, captions through the `B` (language) experts -- and the [CLS] / <s> output goes
through `vision_head` / `language_head`. The fused vision-language mode of the pretraining code (one
sequence split between A and B at `multiway_split_position`) is not needed here and is not built.

Reading order: dims and presets -> Multiway -> embeddings -> attention -> FFN -> layer -> encoder ->
BEiT3 (the `beit3.` prefix of the checkpoint) -> BEiT3ForRetrieval (heads, encode_image / encode_text).

Shapes: B batch, L tokens, D width, H heads, F FFN width, P patch, S image size, G = S // P grid side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LN_EPS = 1e-5  # torchscale's layernorm_eps default, used by every LayerNorm of BEiT-3
FIRST_POSITION = 2  # fairseq convention: position ids start at 2, rows 0 and 1 of each table are unused
VISION, LANGUAGE = "A", "B"  # the multiway expert names, as in the state-dict keys


# ---------------------------------------------------------------------------------------------------
# Dimensions and presets (data, not classes)
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BEiT3Dims:
    embed_dim: int  # D
    depth: int  # number of layers
    num_heads: int  # H
    ffn_dim: int  # F
    patch_size: int  # P
    image_size: int  # S (square images)
    vocab_size: int = 64010  # rows of text_embed (the tokenizer uses 64002 of them)
    text_positions: int = 1024  # rows of embed_positions.B (fairseq max_source_positions)

    def __post_init__(self):
        for name in (
            "embed_dim",
            "depth",
            "num_heads",
            "ffn_dim",
            "patch_size",
            "image_size",
            "vocab_size",
            "text_positions",
        ):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"BEiT3Dims.{name} must be positive, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid_size(self) -> int:  # G
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def vision_positions(self) -> int:
        """Rows of embed_positions.A: 2 unused (fairseq) + [CLS] + one per patch."""
        return self.num_patches + 1 + FIRST_POSITION

    @property
    def max_text_len(self) -> int:
        """Longest caption (in tokens, <s> and </s> included) the text position table can hold."""
        return self.text_positions - FIRST_POSITION

    def with_image_size(self, image_size: int) -> BEiT3Dims:
        return replace(self, image_size=int(image_size))


# The published configurations (shared/reference/beit3.md). Image size is the pretrain/itc default; the retrieval
# fine-tunes use 384, which the checkpoint loader reads from the position table.
BEIT3_PRESETS: dict[str, BEiT3Dims] = {
    "base": BEiT3Dims(embed_dim=768, depth=12, num_heads=12, ffn_dim=3072, patch_size=16, image_size=224),
    "large": BEiT3Dims(embed_dim=1024, depth=24, num_heads=16, ffn_dim=4096, patch_size=16, image_size=224),
    "giant": BEiT3Dims(embed_dim=1408, depth=40, num_heads=16, ffn_dim=6144, patch_size=14, image_size=224),
}


def preset_of(dims: BEiT3Dims) -> str | None:
    """The preset whose architecture `dims` is (image size and table sizes aside), else None."""
    for name, p in BEIT3_PRESETS.items():
        if (p.embed_dim, p.depth, p.num_heads, p.ffn_dim, p.patch_size) == (
            dims.embed_dim,
            dims.depth,
            dims.num_heads,
            dims.ffn_dim,
            dims.patch_size,
        ):
            return name
    return None


# ---------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------
class Multiway(nn.Module):
    """Two copies of a module: `A` for vision tokens, `B` for language tokens (torchscale MultiwayWrapper)."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.A = a
        self.B = b

    def expert(self, modality: str) -> nn.Module:
        return self.A if modality == VISION else self.B

    def forward(self, x: Tensor, modality: str) -> Tensor:
        return self.expert(modality)(x)


def multiway(make) -> Multiway:
    """Two independently initialised copies of `make()`."""
    return Multiway(make(), make())


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LN_EPS)


class VisionEmbedding(nn.Module):
    """Non-overlapping patches -> D, with a learned [CLS] prepended. `mask_token` is only used by masked
    image modeling in pretraining; it is kept so the checkpoint loads key for key."""

    def __init__(self, dims: BEiT3Dims):
        super().__init__()
        d, p = dims.embed_dim, dims.patch_size
        self.proj = nn.Conv2d(3, d, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.proj(pixels).flatten(2).transpose(1, 2)  # [B,3,S,S] -> [B,G*G,D], patches in row-major order
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)  # [B, 1 + G*G, D] (promotes to fp32 under autocast, as torchscale)


class MultiwayAttention(nn.Module):
    """torchscale MultiheadAttention with subln: q/k/v/out projections and the Sub-LN before `out_proj`
    exist once per expert. softmax(q k^T / sqrt(head_dim)) v through the fused SDPA kernel."""

    def __init__(self, dims: BEiT3Dims):
        super().__init__()
        d = dims.embed_dim
        self.num_heads = dims.num_heads
        self.q_proj = multiway(lambda: nn.Linear(d, d))
        self.k_proj = multiway(lambda: nn.Linear(d, d))
        self.v_proj = multiway(lambda: nn.Linear(d, d))
        self.out_proj = multiway(lambda: nn.Linear(d, d))
        self.inner_attn_ln = multiway(lambda: layer_norm(d))

    def forward(self, x: Tensor, modality: str, attn_mask: Tensor | None) -> Tensor:
        b, n, d = x.shape

        def heads(t: Tensor) -> Tensor:  # [B, L, D] -> [B, H, L, D/H]
            return t.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

        q = heads(self.q_proj(x, modality))
        k = heads(self.k_proj(x, modality))
        v = heads(self.v_proj(x, modality))
        # attn_mask: [B,1,1,L] bool, True = this key may be attended (padded keys are False), or None.
        # The official code scales q before q k^T; SDPA scales the product -- equal up to rounding.
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B,H,L,d/H]
        o = o.transpose(1, 2).reshape(b, n, d)
        return self.out_proj(self.inner_attn_ln(o, modality), modality)


class FeedForward(nn.Module):
    """fc1 -> exact GELU -> Sub-LN (`ffn_layernorm`) -> fc2. One per expert."""

    def __init__(self, dims: BEiT3Dims):
        super().__init__()
        self.fc1 = nn.Linear(dims.embed_dim, dims.ffn_dim)
        self.ffn_layernorm = layer_norm(dims.ffn_dim)
        self.fc2 = nn.Linear(dims.ffn_dim, dims.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        # torchscale computes gelu(x.float()).type_as(x); PyTorch's GELU kernels already compute in fp32
        # for half inputs and round once, so the result is the same without the extra casts.
        return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x))))


class EncoderLayer(nn.Module):
    """Pre-LN layer: x + Attn(LN(x)), then x + FFN(LN(x)); every LayerNorm and sub-module per expert."""

    def __init__(self, dims: BEiT3Dims):
        super().__init__()
        d = dims.embed_dim
        self.self_attn_layer_norm = multiway(lambda: layer_norm(d))
        self.self_attn = MultiwayAttention(dims)
        self.final_layer_norm = multiway(lambda: layer_norm(d))
        self.ffn = multiway(lambda: FeedForward(dims))

    def forward(self, x: Tensor, modality: str, attn_mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x, modality), modality, attn_mask)
        return x + self.ffn(self.final_layer_norm(x, modality), modality)


class Encoder(nn.Module):
    """Learned absolute positions (A: vision, B: text; ids from 2), the layers, a final multiway LN."""

    def __init__(self, dims: BEiT3Dims):
        super().__init__()
        d = dims.embed_dim
        self.embed_positions = Multiway(nn.Embedding(dims.vision_positions, d), nn.Embedding(dims.text_positions, d))
        self.layers = nn.ModuleList(EncoderLayer(dims) for _ in range(dims.depth))
        self.layer_norm = multiway(lambda: layer_norm(d))

    def forward(self, x: Tensor, modality: str, padding_mask: Tensor | None = None) -> Tensor:
        """x: [B,L,D] token embeddings; padding_mask: [B,L] bool, True on padded tokens (text only)."""
        n = x.shape[1]
        table = self.embed_positions.expert(modality).weight
        if n + FIRST_POSITION > table.shape[0]:
            raise ValueError(
                f"sequence of {n} tokens is longer than the position table allows ({table.shape[0] - FIRST_POSITION})"
            )
        x = x + table[FIRST_POSITION : FIRST_POSITION + n]  # positions 2..L+1, broadcast over the batch
        attn_mask = None
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)  # as torchscale: padded rows zeroed
            attn_mask = ~padding_mask[:, None, None, :]  # [B,1,1,L]: padded keys are never attended
        for layer in self.layers:
            x = layer(x, modality, attn_mask)
        return self.layer_norm(x, modality)


class BEiT3(nn.Module):
    """The `beit3.` part of the checkpoint: text and vision embeddings and the multiway encoder."""

    def __init__(self, dims: BEiT3Dims):
        super().__init__()
        self.dims = dims
        self.text_embed = nn.Embedding(dims.vocab_size, dims.embed_dim)
        self.vision_embed = VisionEmbedding(dims)
        self.encoder = Encoder(dims)

    def forward_image(self, pixels: Tensor) -> Tensor:
        """[B,3,S,S] normalized pixels -> [B, 1 + G*G, D], vision experts only."""
        return self.encoder(self.vision_embed(pixels), VISION)

    def forward_text(self, input_ids: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """[B,L] token ids (<s> first) and [B,L] bool padding mask -> [B,L,D], language experts only."""
        return self.encoder(self.text_embed(input_ids), LANGUAGE, padding_mask)


def _l2_normalize(x: Tensor) -> Tensor:
    """Rows to unit length, in float32 at least (half-precision heads under autocast are upcast first)."""
    return F.normalize(x if x.dtype == torch.float64 else x.float(), dim=-1)


class BEiT3ForRetrieval(nn.Module):
    """BEiT-3 with the retrieval heads of the itc / retrieval fine-tuned checkpoints."""

    def __init__(self, dims: BEiT3Dims):
        super().__init__()
        self.dims = dims
        d = dims.embed_dim
        self.beit3 = BEiT3(dims)
        self.vision_head = nn.Linear(d, d, bias=False)
        self.language_head = nn.Linear(d, d, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # unused for features

    def encode_image(self, pixels: Tensor) -> Tensor:
        """[B,3,S,S] -> [B,D] L2-normalized: vision_head on the [CLS] output."""
        cls = self.beit3.forward_image(pixels)[:, 0]
        return _l2_normalize(self.vision_head(cls))

    def encode_text(self, input_ids: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """[B,L] ids + [B,L] bool mask (True on pads; None: no padding) -> [B,D] L2-normalized."""
        if padding_mask is not None and not bool(padding_mask.any()):
            padding_mask = None  # no padding in this batch: the unmasked (flash) attention path
        cls = self.beit3.forward_text(input_ids, padding_mask)[:, 0]
        return _l2_normalize(self.language_head(cls))

    # -- random weights (tests, benchmarks) ---------------------------------------------------------
    @torch.no_grad()
    def init_random(self, seed: int = 0, std: float = 0.02) -> BEiT3ForRetrieval:
        """Deterministic random weights: N(0, std) matrices and embeddings, small random biases and
        LayerNorm affines (so that tests exercise every parameter)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name == "logit_scale":
                p.fill_(math.log(1 / 0.07))
            elif "layer_norm" in name or "_ln" in name or "layernorm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
        return self


def count_parameters(dims: BEiT3Dims) -> int:
    """Parameters of the retrieval model, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = BEiT3ForRetrieval(dims)
    return sum(p.numel() for p in model.parameters())
