"""The `store` section of params.yaml, shared by the two stages that read the feature store (distill, evaluate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import from_dict


def verify_if_asked(raw: dict[str, Any], store: Path) -> None:
    """With store.verify: true, read and check every chunk of `store` first (one line naming a bad chunk)."""
    from pipeline.store.verify import StoreConfig, require_verified

    if from_dict(StoreConfig, raw.get("store"), "store").verify:
        require_verified(store)
