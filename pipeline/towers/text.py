"""Text tower: token ids [B, L] + attention mask -> pooled features [B, F], and its tokenizer.

Backend `hf_bert`: any transformers text encoder from a local Hugging Face dir or a Hub id in the local cache
(what AutoModel builds: BERT-base uncased for DSMD, all-MiniLM-L6-v2 for the demo, RoBERTa, DistilBERT,
ModernBERT, ...; or the text half of a whole CLIP / SigLIP dir), or a random-init `BertModel` from explicit
sizes. Pooling `pooler` (the model's pooled output: DSMD's BERT pooler, CLIP's end-of-text token), `cls` (the
last layer's first token) or `mean` (masked mean over tokens, as sentence-transformers' MiniLM). The tokenizer
always comes from a local dir or the cache (lowercasing is the tokenizer's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from pipeline.errors import InputError
from pipeline.towers import load_pretrained_strict, offline_hub, reading_hf_dir, require_dir


@dataclass(frozen=True)
class TextTowerConfig:
    """Section `distill.student.text`."""

    backend: Literal["hf_bert", "minilm"] = "hf_bert"  # minilm: hf_bert from the package-shipped all-MiniLM-L6-v2
    # local Hugging Face model dir, or a Hub id found in the local cache; None: random init from the sizes below
    path: Path | None = None
    tokenizer: Path | None = None  # local tokenizer dir (or cached Hub id); None: `path` (required when path is None)
    pooling: Literal["pooler", "cls", "mean"] = "pooler"
    max_tokens: int = 30
    # Keep the tower's weights as loaded (no gradient, always in eval mode: no dropout); only the student's
    # text projection trains. A frozen pretrained text tower is what lets a small student match captions it
    # never saw; distill then computes the tower's features of every caption once per run, not every step.
    freeze: bool = False
    # random-init sizes (ignored when `path` is given); defaults: BERT-base. The vocabulary size is the tokenizer's.
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512

    def __post_init__(self) -> None:
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2 (CLS and SEP), got {self.max_tokens}")


def load_tokenizer(path: Path | str, key: str):
    from transformers import AutoTokenizer

    offline_hub()
    p = require_dir(path, key, "a local tokenizer dir (vocab.txt / tokenizer.json, tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError) as err:
        raise InputError(f"{key}: {p} holds no loadable tokenizer ({str(err).splitlines()[0]})") from None


class HFTextTower(nn.Module):
    def __init__(self, cfg: TextTowerConfig, *, key: str, weights: bool = True) -> None:
        super().__init__()
        from transformers import AutoConfig, BertConfig, BertModel

        from pipeline.towers.hf_models import text_model

        path = cfg.path
        if cfg.backend == "minilm":
            from pipeline import pretrained_assets

            path = path or pretrained_assets.minilm_dir()
        tok_path = cfg.tokenizer or path
        if tok_path is None:
            raise InputError(
                f"{key}: set path (a local BERT dir) or tokenizer (a local tokenizer dir); "
                "a random-init text tower still needs a vocabulary"
            )
        self.tokenizer = load_tokenizer(tok_path, f"{key}.tokenizer" if cfg.tokenizer else f"{key}.path")
        self.pooling = cfg.pooling
        self.max_tokens = cfg.max_tokens
        add_pooler = cfg.pooling == "pooler"  # no dead pooler parameters when it is not used
        if path is not None:
            offline_hub()
            p = require_dir(path, f"{key}.path", "a local Hugging Face model dir with a text encoder (config.json)")
            with reading_hf_dir(p, f"{key}.path"):
                config = AutoConfig.from_pretrained(p, local_files_only=True)
            how = text_model(config, f"{key}.path", cfg.pooling)
            if weights:
                # a checkpoint's pooler (or a dual model's other half) is what a tower may deliberately leave out
                self.model = load_pretrained_strict(
                    how.cls, p, f"{key}.path", ignorable_prefixes=how.ignorable, **how.kwargs
                )
            else:
                self.model = how.build()
        else:
            bert_cfg = BertConfig(
                vocab_size=len(self.tokenizer),
                hidden_size=cfg.hidden_size,
                num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads,
                intermediate_size=cfg.intermediate_size,
                max_position_embeddings=cfg.max_position_embeddings,
                pad_token_id=self.tokenizer.pad_token_id or 0,
            )
            self.model = BertModel(bert_cfg, add_pooling_layer=add_pooler)
        if len(self.tokenizer) > self.model.config.vocab_size:
            raise InputError(
                f"{key}: the tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary "
                f"only {self.model.config.vocab_size}"
            )
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions is not None and cfg.max_tokens > positions:
            raise InputError(f"{key}.max_tokens: {cfg.max_tokens} > the model's {positions} positions")
        self.out_dim = self.model.config.hidden_size
        self.frozen = cfg.freeze
        if self.frozen:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> HFTextTower:
        """A frozen tower stays in eval mode (its features must not depend on dropout or on the step)."""
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Captions -> input_ids / attention_mask int64 [B, max_tokens] on the CPU (fixed length: one shape
        for torch.compile; padding is masked, so features do not depend on it)."""
        enc = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.pooling == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state  # [B, L, H]
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)  # AutoTokenizer.from_pretrained(<dir>) works on its own


def build_text_tower(cfg: TextTowerConfig, *, key: str = "distill.student.text", weights: bool = True) -> HFTextTower:
    return HFTextTower(cfg, key=key, weights=weights)
