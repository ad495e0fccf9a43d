"""The frozen text tower's features of a split's captions, computed once per machine, not once per run.

Every run of `distill.runs` (the demo: 3 variants x 3 seeds) encodes the same captions with the same frozen
tower: ~20% of a demo run's CPU time, the same numbers each time. The first run stores them in
`<workdir>/.kdpipe/text_features/<key>.safetensors` (per machine, not a DVC output) and the others read them.

The key is the SHA-256 of everything the numbers depend on: the tower's files (their digests), its pooling and
token length, the tokens themselves, the batch size, the precision, and the numerics environment (CPU model and
instruction set, kernels, thread count, torch version: pipeline/environment.py); so a stored entry is exactly
what the run would compute, bit for bit. Only a tower referenced by digest is cached (a random-init frozen
tower's weights are not identified by files).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from pipeline.distill.validation import frozen_text_features
from pipeline.store.durable import atomic_path
from pipeline.towers.student import DualEncoderStudent

log = logging.getLogger(__name__)


def cache_key(model: DualEncoderStudent, tokens: tuple[torch.Tensor, torch.Tensor], batch_size: int, bf16: bool) -> str:
    from pipeline.environment import numerics_environment

    source = model.frozen_text_source()
    h = hashlib.sha256()
    for t in tokens:
        h.update(t.to(torch.int32).contiguous().cpu().numpy().tobytes())
    what = {
        "tower": source.files if source is not None else None,
        "pooling": model.config.text.pooling,
        "max_tokens": model.text_tower.max_tokens,
        "tokens": h.hexdigest(),
        "rows": len(tokens[0]),
        "batch_size": batch_size,
        "bf16": bf16,
        "environment": numerics_environment(model.device),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def cached_text_features(
    model: DualEncoderStudent,
    tokens: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
    autocast,
    *,
    cache_dir: Path | None,
    bf16: bool,
) -> torch.Tensor:
    """frozen_text_features(model, tokens, batch_size, autocast), read from `cache_dir` when an earlier run stored
    them there (else computed and stored). `cache_dir` None, or a tower not referenced by digest: computed."""
    if cache_dir is None or model.frozen_text_source() is None:
        return frozen_text_features(model, tokens, batch_size, autocast)
    from safetensors.torch import load_file, save_file

    path = Path(cache_dir) / f"{cache_key(model, tokens, batch_size, bf16)}.safetensors"
    expected = (len(tokens[0]), model.text_tower.out_dim)
    if path.is_file():
        try:
            features = load_file(str(path))["features"]
        except Exception as err:  # noqa: BLE001 - a damaged entry is recomputed and replaced
            log.info(f"distill: {path} is unreadable ({type(err).__name__}); computing the text features again")
        else:
            if tuple(features.shape) == expected and features.dtype == torch.float32:
                return features.to(model.device)
    features = frozen_text_features(model, tokens, batch_size, autocast)
    with atomic_path(path) as tmp:
        save_file({"features": features.cpu().contiguous()}, str(tmp))
    return features
