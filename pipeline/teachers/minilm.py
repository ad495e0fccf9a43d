"""all-MiniLM-L6-v2 as a frozen sentence encoder (the text side of the demo teachers).

The sentence embedding is the model's own definition: masked mean of the last hidden states over the
non-padding tokens, then L2 normalization (as sentence-transformers computes it).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from pipeline.pretrained_assets import minilm_dir

MAX_TEXT_LEN = 128  # MiniLM was trained on up to 128 word pieces; captions are far shorter


def load_minilm(device: torch.device):
    """(tokenizer, model) of the package-shipped MiniLM, the model frozen in eval mode on `device`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = minilm_dir()
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in a stage's output
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    return tokenizer, model.to(device).eval().requires_grad_(False)


def tokenize(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """Captions -> input_ids / attention_mask [B, L], padded to the longest of the batch (masked)."""
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=MAX_TEXT_LEN, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def sentence_embedding(model: torch.nn.Module, tokens: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """[B, 384] fp32, L2-normalized: masked mean pooling of the last hidden states (autocast is the caller's)."""
    ids = tokens["input_ids"].to(device)
    mask = tokens["attention_mask"].to(device)
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    m = mask.unsqueeze(-1).float()
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)


__all__ = ["load_minilm", "tokenize", "sentence_embedding", "MAX_TEXT_LEN"]
