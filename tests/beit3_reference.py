"""A naive, eager re-statement of the official BEiT-3 retrieval forward (unilm/beit3 on torchscale), the
oracle for our implementation. Deliberately independent of `pipeline.teachers.beit3_model`:

- works straight on an official-format state dict (key names as in the checkpoint files);
- patch embedding by explicit patch extraction and a matmul (not a convolution);
- positions looked up as `arange(2, L + 2)` in the table (fairseq), as torchscale's PositionalEmbedding;
- q scaled by head_dim**-0.5 *before* q k^T, one head at a time, padded keys set to -inf, softmax;
- LayerNorm and exact GELU written out; padded token embeddings zeroed as torchscale's Encoder does;
- computes in float64 by default (a stricter oracle than the float32 code under test).

Do not import torchscale or our model here.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-5


def _ln(x, sd, prefix):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + EPS) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def _linear(x, sd, prefix, bias=True):
    y = x @ sd[prefix + ".weight"].T
    return y + sd[prefix + ".bias"] if bias else y


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _attention(x, sd, prefix, e, num_heads, key_padding_mask):
    b, n, d = x.shape
    hd = d // num_heads
    q = _linear(x, sd, f"{prefix}.q_proj.{e}") * hd**-0.5
    k = _linear(x, sd, f"{prefix}.k_proj.{e}")
    v = _linear(x, sd, f"{prefix}.v_proj.{e}")
    heads = []
    for h in range(num_heads):
        sl = slice(h * hd, (h + 1) * hd)
        scores = q[:, :, sl] @ k[:, :, sl].transpose(1, 2)  # [B, L, L]
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        heads.append(weights @ v[:, :, sl])
    attn = torch.cat(heads, dim=-1)
    attn = _ln(attn, sd, f"{prefix}.inner_attn_ln.{e}")
    return _linear(attn, sd, f"{prefix}.out_proj.{e}")


def _encoder(x, sd, e, num_heads, key_padding_mask=None):
    """x: [B, L, D] token embeddings; e: "A" (vision) or "B" (language)."""
    n = x.shape[1]
    positions = torch.arange(2, n + 2)
    x = x + sd[f"beit3.encoder.embed_positions.{e}.weight"][positions][None]
    if key_padding_mask is not None:
        x = x * (1 - key_padding_mask.unsqueeze(-1).to(x.dtype))
    depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("beit3.encoder.layers."))
    for i in range(depth):
        p = f"beit3.encoder.layers.{i}"
        residual = x
        h = _ln(x, sd, f"{p}.self_attn_layer_norm.{e}")
        x = residual + _attention(h, sd, f"{p}.self_attn", e, num_heads, key_padding_mask)
        residual = x
        h = _ln(x, sd, f"{p}.final_layer_norm.{e}")
        h = _gelu(_linear(h, sd, f"{p}.ffn.{e}.fc1"))
        h = _ln(h, sd, f"{p}.ffn.{e}.ffn_layernorm")
        x = residual + _linear(h, sd, f"{p}.ffn.{e}.fc2")
    return _ln(x, sd, f"beit3.encoder.layer_norm.{e}")


def _as(sd, dtype):
    return {k: v.to(dtype) for k, v in sd.items()}


def reference_image_features(sd, pixels, num_heads, dtype=torch.float64):
    """pixels: [B, 3, S, S] normalized. Returns [B, D] L2-normalized, in `dtype`."""
    sd = _as(sd, dtype)
    w = sd["beit3.vision_embed.proj.weight"]  # [D, 3, P, P]
    d, _, p, _ = w.shape
    x = pixels.to(dtype)
    b, _, s, _ = x.shape
    g = s // p
    # [B,3,G,P,G,P] -> [B, G, G, 3, P, P]: patch (r, c) flattened like the conv weight (channel, row, col)
    patches = x.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * p * p)
    tokens = patches @ w.reshape(d, -1).T + sd["beit3.vision_embed.proj.bias"]
    cls = sd["beit3.vision_embed.cls_token"].expand(b, 1, d)
    x = torch.cat([cls, tokens], dim=1)
    out = _encoder(x, sd, "A", num_heads)
    f = out[:, 0] @ sd["vision_head.weight"].T
    return f / f.norm(dim=-1, keepdim=True)


def reference_text_features(sd, input_ids, padding_mask, num_heads, dtype=torch.float64):
    """input_ids: [B, L]; padding_mask: [B, L] bool, True on pads. Returns [B, D] L2-normalized."""
    sd = _as(sd, dtype)
    x = sd["beit3.text_embed.weight"][input_ids]
    out = _encoder(x, sd, "B", num_heads, padding_mask.bool())
    f = out[:, 0] @ sd["language_head.weight"].T
    return f / f.norm(dim=-1, keepdim=True)
