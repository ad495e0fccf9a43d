"""A tiny work directory for the deployment tests: index, image cache, teacher store, student and baseline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.config import write_resolved
from pipeline.data.index import DatasetIndex
from pipeline.data.pixels import ResizeConfig
from pipeline.distill.config import DistillConfig
from pipeline.distill.losses import LossConfig
from pipeline.paths import ArtifactPaths
from pipeline.store.features_writer import write_store
from pipeline.store.image_cache import write_image_cache
from pipeline.towers.image import ImageTowerConfig
from pipeline.towers.student import DualEncoderStudent, StudentConfig, build_student, save_student
from pipeline.towers.text import TextTowerConfig

WORDS = "a the dog cat man woman red blue runs sits on in with photo of".split()  # conftest's tokenizer
DIM, SIZE = 16, 16


def tiny_student_config(
    tokenizer_dir: Path, image_size: int = SIZE, *, proj_bias: bool = False, image_pooling: str = "cls", **text
) -> StudentConfig:
    """A 1-layer ViT / BERT student's config, over the conftest tokenizer."""
    return StudentConfig(
        proj_bias=proj_bias,
        image=ImageTowerConfig(
            image_size=image_size,
            patch_size=8,
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            intermediate_size=64,
            pooling=image_pooling,
        ),
        text=TextTowerConfig(
            tokenizer=tokenizer_dir,
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
            max_tokens=12,
            **text,
        ),
    )


def tiny_student(tokenizer_dir: Path, seed: int, biases: tuple[str, ...] = (), **cfg) -> DualEncoderStudent:
    """A 1-layer ViT / BERT student in eval mode whose every weight is random, none at its init value (a
    patch-embedding bias or a LayerNorm at 0 / 1 would hide a dropped one); `biases`: the projections ("image",
    "text") given a random bias (the others bias-free, or a zero bias with proj_bias)."""
    torch.manual_seed(seed)
    model = build_student(tiny_student_config(tokenizer_dir, proj_bias=bool(biases), **cfg), DIM).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("proj.bias"):
                p.add_(0.05 * torch.randn_like(p))
        for side in biases:
            getattr(model, f"{side}_proj").bias.normal_()
    return model


def finished_run(student_dir: Path, model: DualEncoderStudent, *, temperature: float = 0.05) -> None:
    """The files a finished `kdpipe distill` run leaves beside the student (what export reads its temperature from)."""
    write_resolved(
        DistillConfig(student=model.config, loss=LossConfig(pair_contrastive=1.0, pair_temperature=temperature)),
        student_dir / "distill_config.yaml",
        "distill",
    )
    (student_dir / "train_summary.json").write_text(
        json.dumps({"epochs": 1, "best_epoch": 1, "baseline": False, "loss_terms": ["pair_contrastive_loss"]})
    )


def squash(crop: int = SIZE) -> dict:
    """An image cache's `resize` attrs: prepare's squash to `crop` px."""
    return {"resize": ResizeConfig(mode="squash", crop=crop).describe()}


def tiny_workdir(
    root: Path, tokenizer_dir: Path, captions: dict[int, str] | None = None, styles: tuple[str, ...] = ()
) -> ArtifactPaths:
    """train 4 + test 9 images with 1-3 captions each (`captions` replaces test captions by position); with
    `styles`, image ids are `<style>/<name>`, the styles taking turns (galleries by directory)."""
    rng = np.random.default_rng(1)
    images, caps = [], []
    for split, n in (("train", 4), ("test", 9)):
        for i in range(n):
            name = f"{styles[i % len(styles)]}/{split}{i}.jpg" if styles else f"{split}{i}.jpg"
            images.append((name, name, split))
            for _ in range(int(rng.integers(1, 4))):
                caps.append((" ".join(rng.choice(WORDS, size=int(rng.integers(2, 7)))), len(images) - 1))
    test_rows = [j for j, (_, r) in enumerate(caps) if images[r][2] == "test"]
    for pos, text in (captions or {}).items():
        caps[test_rows[pos]] = (text, caps[test_rows[pos]][1])
    index = DatasetIndex.from_lists("toy", root / "data", images, caps)
    paths = ArtifactPaths(root / "work")
    index.save(paths.index_dir)
    pixels = {s: rng.integers(0, 256, (index.split(s).n_images, SIZE, SIZE, 3), dtype=np.uint8) for s in index.splits}
    write_image_cache(paths.images, pixels, fingerprint=index.fingerprint, meta=squash())
    splits = {}
    for s in index.splits:
        v = index.split(s)
        img = rng.standard_normal((v.n_images, DIM)).astype(np.float32)
        splits[s] = {
            "image_emb": img,
            "text_emb": img[v.text_image] + 0.5 * rng.standard_normal((v.n_captions, DIM)),
            "text_image": v.text_image,
            "image_id": list(v.image_id),
        }
    write_store(
        paths.features,
        splits,
        teacher={"name": "tiny-teacher"},
        dataset={"name": "toy", "fingerprint": index.fingerprint},
    )
    for seed, directory in enumerate((paths.student, paths.workdir / "baseline")):
        model = tiny_student(tokenizer_dir, seed)
        save_student(model, directory)
        finished_run(directory, model)
    return paths
