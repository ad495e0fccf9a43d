"""BEiT-3 model: the architecture's parameter counts, features equal to the naive reference (fp32 ~1e-5),
padding invariance, expert separation, and the official eval transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from beit3_fixtures import *  # noqa: F401,F403  (fixtures)
from beit3_fixtures import BASE_STYLE, LARGE_STYLE
from beit3_reference import reference_image_features, reference_text_features
from PIL import Image

from pipeline.errors import InputError
from pipeline.teachers.beit3 import BEiT3Teacher, normalize_pixels
from pipeline.teachers.beit3_model import BEIT3_PRESETS, BEiT3Dims, BEiT3ForRetrieval, count_parameters

CAPTIONS = [
    "A man riding a bike on the street.",
    "Two dogs playing in the park with a red ball near the water, while children sit on a bench!",
    "Cat.",
    "UPPER lower MiXeD Case 漢字",
]
STYLES = {"base": ("base_style_ckpt", BASE_STYLE), "large": ("large_style_ckpt", LARGE_STYLE)}


def _teacher(request, style, tiny_spm, **kw):
    fixture, spec = STYLES[style]
    path, sd = request.getfixturevalue(fixture)
    return BEiT3Teacher.from_checkpoint(path, tokenizer=tiny_spm, num_heads=spec.num_heads, **kw), sd, spec


# -- architecture --------------------------------------------------------------------------------------
def test_parameter_counts_on_meta_device():
    counts = {name: count_parameters(dims) for name, dims in BEIT3_PRESETS.items()}
    counts["base-384"] = count_parameters(BEIT3_PRESETS["base"].with_image_size(384))
    counts["large-384"] = count_parameters(BEIT3_PRESETS["large"].with_image_size(384))
    print("BEiT-3 retrieval-model parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    # shared/reference/beit3.md: itc 222M / 674M, retrieval fine-tunes (384) 222M / 675M
    assert 221.5e6 < counts["base"] < 222.5e6 and 221.5e6 < counts["base-384"] < 223e6
    assert 674e6 < counts["large"] < 675.5e6 and 674.5e6 < counts["large-384"] < 675.5e6
    # giant: 1408 x 40 layers with duplicated (multiway) attention and FFN, at 224 px
    assert counts["giant"] == 2_117_957_633


def test_giant_is_built_on_meta_without_allocating():
    with torch.device("meta"):
        model = BEiT3ForRetrieval(BEIT3_PRESETS["giant"])
    assert all(p.is_meta for p in model.parameters())
    assert model.beit3.vision_embed.proj.weight.shape == (1408, 3, 14, 14)
    assert model.beit3.encoder.embed_positions.A.weight.shape == (16 * 16 + 3, 1408)


def test_dims_validation():
    with pytest.raises(ValueError, match="divisible"):
        BEiT3Dims(embed_dim=30, depth=1, num_heads=4, ffn_dim=8, patch_size=4, image_size=8)
    with pytest.raises(ValueError, match="multiple"):
        BEiT3Dims(embed_dim=32, depth=1, num_heads=4, ffn_dim=8, patch_size=5, image_size=8)


# -- equality with the naive reference (fp32, ~1e-5) ---------------------------------------------------
@pytest.mark.parametrize("style", ["base", "large"])
def test_image_features_match_reference(request, tiny_spm, style):
    teacher, sd, spec = _teacher(request, style, tiny_spm)
    pixels = torch.rand(8, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = teacher.encode_image_batch(pixels)
    ref = reference_image_features(sd, pixels, spec.num_heads)
    assert ours.dtype == torch.float32 and ours.shape == (8, spec.embed_dim)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=0)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(8), atol=1e-6)


@pytest.mark.parametrize("style", ["base", "large"])
def test_text_features_match_reference_with_padding(request, tiny_spm, style):
    teacher, sd, spec = _teacher(request, style, tiny_spm)
    tokens = teacher.tokenize(CAPTIONS)
    assert tokens["padding_mask"].any()  # the batch really has padding
    ours = teacher.encode_text_batch(tokens)
    ref = reference_text_features(sd, tokens["input_ids"], tokens["padding_mask"], spec.num_heads)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=0)
    # the official padding (to max_len = 64) gives the same features
    full = teacher.tokenize(CAPTIONS, pad_to_max_len=True)
    assert full["input_ids"].shape == (len(CAPTIONS), 64)
    ref_full = reference_text_features(sd, full["input_ids"], full["padding_mask"], spec.num_heads)
    torch.testing.assert_close(teacher.encode_text_batch(full).double(), ref_full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("style", ["base", "large"])
def test_float64_math_is_identical_to_reference(request, tiny_spm, style):
    """In float64 the only differences left are rounding: ~1e-15. The fp32 tests above are then about
    precision, not about the math."""
    teacher, sd, spec = _teacher(request, style, tiny_spm)
    model = BEiT3ForRetrieval(teacher.dims)
    model.load_state_dict({k: v.double() for k, v in teacher.model.state_dict().items()}, assign=True)
    pixels = (
        torch.rand(
            2, 3, spec.image_size, spec.image_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
        )
        * 2
        - 1
    )
    torch.testing.assert_close(
        model.encode_image(pixels), reference_image_features(sd, pixels, spec.num_heads), atol=1e-12, rtol=0
    )
    tok = teacher.tokenize(CAPTIONS)
    torch.testing.assert_close(
        model.encode_text(tok["input_ids"], tok["padding_mask"]),
        reference_text_features(sd, tok["input_ids"], tok["padding_mask"], spec.num_heads),
        atol=1e-12,
        rtol=0,
    )


def test_padding_invariance(request, tiny_spm):
    teacher, _, _ = _teacher(request, "base", tiny_spm)
    short = "A dog on the grass."
    alone = teacher.encode_texts([short])
    batched = teacher.encode_texts([short, CAPTIONS[1], CAPTIONS[3]])
    padded = teacher.encode_text_batch(teacher.tokenize([short], pad_to_max_len=True))
    torch.testing.assert_close(batched[0:1], alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(padded, alone, atol=1e-6, rtol=0)


def test_experts_are_separate(tiny_spm):
    """Images use only the A experts, captions only the B experts (and each its own head)."""
    dims = BEiT3Dims(embed_dim=32, depth=2, num_heads=4, ffn_dim=64, patch_size=8, image_size=16, vocab_size=130)
    model = BEiT3ForRetrieval(dims).init_random(seed=3)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[0, 10, 11, 12, 2], [0, 20, 2, 1, 1]])
    mask = ids == 1
    img0, txt0 = model.encode_image(pixels), model.encode_text(ids, mask)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".B." in name or name.startswith("beit3.text_embed") or name == "language_head.weight":
                p.add_(1.0)
    torch.testing.assert_close(model.encode_image(pixels), img0, atol=0, rtol=0)
    txt1 = model.encode_text(ids, mask)
    assert not torch.allclose(txt1, txt0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".A." in name or name.startswith("beit3.vision_embed") or name == "vision_head.weight":
                p.add_(1.0)
    torch.testing.assert_close(model.encode_text(ids, mask), txt1, atol=0, rtol=0)
    assert not torch.allclose(model.encode_image(pixels), img0)


def test_random_teacher_identity(tiny_spm):
    dims = BEiT3Dims(embed_dim=32, depth=1, num_heads=4, ffn_dim=64, patch_size=8, image_size=16, vocab_size=130)
    a = BEiT3Teacher.random(dims, tiny_spm, seed=5)
    b = BEiT3Teacher.random(dims, tiny_spm, seed=5)
    torch.testing.assert_close(a.encode_texts(["a dog"]), b.encode_texts(["a dog"]), atol=0, rtol=0)
    ident = a.identity()
    assert ident["checkpoint"] is None and ident["random_init_seed"] == 5
    assert ident == b.identity()
    assert BEiT3Teacher.random(dims, tiny_spm, seed=6).identity()["weights_sha256"] != ident["weights_sha256"]
    with pytest.raises(InputError, match="without a tokenizer"):
        BEiT3Teacher.random(dims, None).tokenize(["a dog"])
    assert ident["dims"]["embed_dim"] == 32 and ident["dtype"] == "float32" and ident["max_text_len"] == 64
    assert a.name == "beit3-d32x1-16" and a.dim == 32


def test_cpu_half_dtype_falls_back_to_float32(tiny_spm):
    dims = BEiT3Dims(embed_dim=32, depth=1, num_heads=4, ffn_dim=64, patch_size=8, image_size=16, vocab_size=130)
    with pytest.warns(UserWarning, match="float32"):
        t = BEiT3Teacher.random(dims, tiny_spm, dtype="bf16")
    assert t.identity()["dtype"] == "float32"
    with pytest.raises(InputError, match="float32, bfloat16 or float16"):
        BEiT3Teacher.random(dims, tiny_spm, dtype=torch.int8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_close_to_fp32_on_cuda(request, tiny_spm):
    cpu, _, spec = _teacher(request, "base", tiny_spm)
    gpu, _, _ = _teacher(request, "base", tiny_spm, device="cuda", dtype=torch.bfloat16)
    pixels = torch.rand(4, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    cos = (cpu.encode_image_batch(pixels) * gpu.encode_image_batch(pixels).cpu()).sum(-1)
    assert cos.min() > 0.99
    cos = (cpu.encode_texts(CAPTIONS) * gpu.encode_texts(CAPTIONS)).sum(-1)
    assert cos.min() > 0.99


# -- the official eval transform -------------------------------------------------------------------------
def _hand_preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """torchvision Resize((S, S), BICUBIC) on PIL + ToTensor + Normalize(0.5, 0.5), written by hand."""
    rgb = image.convert("RGB").resize((size, size), resample=Image.BICUBIC)
    arr = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)  # [S, S, 3]
    arr = (arr - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def test_preprocessing_matches_hand_written_pil(request, tiny_spm):
    teacher, sd, spec = _teacher(request, "base", tiny_spm)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (23, 57, 3), dtype=np.uint8)),  # wide, squashed
        Image.fromarray(rng.integers(0, 256, (70, 31), dtype=np.uint8), mode="L"),  # grayscale
        Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8), mode="RGBA"),
    ]
    for im in images:
        ours = teacher.preprocess_image(im)
        hand = _hand_preprocess(im, spec.image_size)
        assert ours.shape == (3, spec.image_size, spec.image_size) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, hand, atol=0, rtol=0)
        # the uint8 path (normalized on the device) is the same
        torch.testing.assert_close(normalize_pixels(teacher.preprocess_image_uint8(im)), hand, atol=0, rtol=0)
    # encode_images end to end = the reference on hand-preprocessed pixels
    ours = teacher.encode_images(images)
    ref = reference_image_features(
        sd, torch.stack([_hand_preprocess(im, spec.image_size) for im in images]), spec.num_heads
    )
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=0)
    uint8 = torch.stack([teacher.preprocess_image_uint8(im) for im in images])
    torch.testing.assert_close(teacher.encode_image_batch(uint8), ours, atol=1e-6, rtol=0)
