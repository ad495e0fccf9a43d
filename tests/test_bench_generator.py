"""The benchmark's synthetic Flickr30K-shaped dataset: Karpathy file readable by the dataset reader, images
decode with Flickr's sizes, captions have the expected count, and generation is deterministic."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.readers import DatasetConfig, read_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))  # bench/ is scripts, not a package
import make_flickr_like as gen  # noqa: E402


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((directory / "images").glob("*.jpg")):
        h.update(p.name.encode() + p.read_bytes())
    h.update((directory / "dataset_flickr30k.json").read_bytes())
    return h.hexdigest()


def test_split_sizes_match_flickr30k_at_1x():
    assert gen.split_sizes(1.0) == {"train": 29_000, "val": 1_014, "test": 1_000, "restval": 769}
    assert sum(gen.split_sizes(0.1).values()) == 3_178


def test_tiny_dataset_reads_decodes_and_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    summary = gen.generate(a, n_images=12, seed=3, workers=1, quiet=True)
    gen.generate(b, n_images=12, seed=3, workers=2, quiet=True)  # other worker count, same bytes
    assert _digest(a) == _digest(b)

    assert summary["n_images"] == 12 and summary["n_captions"] == 60
    data = json.loads((a / "dataset_flickr30k.json").read_text())
    assert len(data["images"]) == 12
    assert {im["split"] for im in data["images"]} <= {"train", "restval", "val", "test"}
    for im in data["images"]:
        assert len(im["sentences"]) == 5 and all(s["raw"].strip() for s in im["sentences"])
        with Image.open(a / "images" / im["filename"]) as pic:
            assert pic.format == "JPEG" and max(pic.size) == 500 and min(pic.size) >= 281
            pixels = np.asarray(pic.convert("RGB"))
        assert pixels.std() > 10  # real content, not a flat image

    index = read_dataset(
        DatasetConfig(annotations=a / "dataset_flickr30k.json", image_root=a / "images", name="flickr_like")
    )
    assert index.n_images == 12 and index.n_captions == 60
    assert all(index.image_abspath(r).is_file() for r in range(index.n_images))
