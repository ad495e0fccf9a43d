"""Official-format BEiT-3 checkpoints: key-for-key loading, refusals by key name, dims inference, position
interpolation (against a hand-written bicubic), the memory cost of loading, and the teacher's clear errors."""

from __future__ import annotations

import argparse
import hashlib
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from beit3_fixtures import *  # noqa: F401,F403  (fixtures)
from beit3_fixtures import BASE_STYLE, LARGE_STYLE, TinySpec, official_key_shapes, official_state_dict, write_checkpoint
from beit3_reference import reference_image_features

from pipeline.errors import InputError
from pipeline.hashing import sha256_file
from pipeline.teachers import BEiT3TeacherConfig, TeacherConfig, build_teacher
from pipeline.teachers.beit3 import BEiT3Teacher
from pipeline.teachers.beit3_checkpoint import (
    infer_dims,
    interpolate_vision_positions,
    load_beit3_checkpoint,
    read_checkpoint,
)
from pipeline.teachers.beit3_model import BEIT3_PRESETS, BEiT3Dims

STYLES = {"base": ("base_style_ckpt", BASE_STYLE), "large": ("large_style_ckpt", LARGE_STYLE)}


@pytest.mark.parametrize("style", ["base", "large"])
def test_loads_key_for_key(request, style):
    fixture, spec = STYLES[style]
    path, sd = request.getfixturevalue(fixture)
    loaded = load_beit3_checkpoint(path, num_heads=spec.num_heads)
    ours = loaded.model.state_dict()
    assert set(ours) == set(official_key_shapes(spec)) == set(sd)  # zero missing, zero unexpected
    for k, v in sd.items():
        assert ours[k].dtype == torch.float32
        assert torch.equal(ours[k], v.float()), k
    assert loaded.dims == BEiT3Dims(
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        ffn_dim=spec.ffn_dim,
        patch_size=spec.patch_size,
        image_size=spec.image_size,
        vocab_size=spec.vocab_size,
        text_positions=spec.text_positions,
    )
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())


def test_fp32_weights_stay_memory_mapped(base_style_ckpt):
    """assign=True: the parameters are the tensors torch.load mapped from the file (no second copy)."""
    path, _ = base_style_ckpt
    model = load_beit3_checkpoint(path, num_heads=BASE_STYLE.num_heads).model
    mapped = torch.load(path, map_location="cpu", mmap=True, weights_only=True)["model"]
    # a mapped tensor's storage is not resizable (it is backed by the file), a freshly allocated one is
    assert not model.beit3.text_embed.weight.untyped_storage().resizable()
    assert not mapped["beit3.text_embed.weight"].untyped_storage().resizable()


def test_refuses_unexpected_and_missing_keys_by_name(tmp_path):
    sd = official_state_dict(BASE_STYLE)
    extra = dict(sd, **{"beit3.encoder.layers.0.self_attn.rel_pos.weight": torch.zeros(3)})
    with pytest.raises(InputError, match=r"1 unexpected key\(s\): beit3\.encoder\.layers\.0\.self_attn\.rel_pos"):
        load_beit3_checkpoint(write_checkpoint(tmp_path / "extra.pth", extra), num_heads=4)
    missing = {k: v for k, v in sd.items() if k not in ("beit3.encoder.layers.1.ffn.B.fc2.bias", "logit_scale")}
    with pytest.raises(InputError, match=r"2 missing key\(s\): .*beit3\.encoder\.layers\.1\.ffn\.B\.fc2\.bias"):
        load_beit3_checkpoint(write_checkpoint(tmp_path / "missing.pth", missing), num_heads=4)


def test_refuses_shape_mismatch(tmp_path):
    sd = official_state_dict(BASE_STYLE)
    sd["beit3.encoder.layers.1.ffn.A.fc1.weight"] = torch.zeros(64, 32)
    with pytest.raises(InputError, match=r"layers\.1\.ffn\.A\.fc1\.weight \(64, 32\) \(expected \(128, 32\)\)"):
        load_beit3_checkpoint(write_checkpoint(tmp_path / "shape.pth", sd), num_heads=4)


def test_refuses_pretrain_only_checkpoint(tmp_path):
    sd = official_state_dict(BASE_STYLE, heads=False)
    sd["mlm_head.weight"] = torch.zeros(130, 32)
    path = write_checkpoint(tmp_path / "beit3_tiny_pretrain.pth", sd)
    with pytest.raises(InputError, match=r"pretrain-only.*vision_head\.weight.*itc.*mlm_head\.weight"):
        load_beit3_checkpoint(path, num_heads=4)


def test_unwraps_plain_and_ddp_state_dicts_and_ignores_training_args(tmp_path):
    sd = official_state_dict(BASE_STYLE)
    plain = write_checkpoint(tmp_path / "plain.pth", sd, wrapper=None)
    ddp = write_checkpoint(tmp_path / "ddp.pth", {f"module.{k}": v for k, v in sd.items()}, wrapper=None)
    with_args = write_checkpoint(
        tmp_path / "args.pth", sd, "model", extra={"args": argparse.Namespace(lr=1e-4, model="beit3_base"), "epoch": 9}
    )
    for path in (plain, ddp, with_args):
        model = load_beit3_checkpoint(path, num_heads=4).model
        assert torch.equal(model.vision_head.weight, sd["vision_head.weight"])


def test_refuses_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="checkpoint file not found"):
        load_beit3_checkpoint(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(InputError, match="junk.pth: not a PyTorch checkpoint"):
        load_beit3_checkpoint(junk)
    # random bytes that start like a pickle: said to be no checkpoint, not "objects other than tensors"
    noise = tmp_path / "noise.pth"
    noise.write_bytes(b"\x80\x82" + np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError, match=r"noise\.pth: not a PyTorch checkpoint .*starts with bytes 80 82 "):
        load_beit3_checkpoint(noise)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(InputError, match="not a PyTorch checkpoint .*the file is empty"):
        load_beit3_checkpoint(tmp_path / "empty.pth")
    # both torch.save formats pass the check (the legacy one is read without memory mapping)
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": official_state_dict(BASE_STYLE)}, legacy, _use_new_zipfile_serialization=False)
    assert set(read_checkpoint(legacy)) == set(official_state_dict(BASE_STYLE))

    class Evil:  # noqa: E306
        def __reduce__(self):
            return (print, ("code ran",))

    evil = tmp_path / "evil.pth"
    torch.save({"model": official_state_dict(BASE_STYLE), "hook": Evil()}, evil)
    with pytest.raises(InputError, match="cannot be loaded safely"):
        load_beit3_checkpoint(evil, num_heads=4)


# -- dims inference ------------------------------------------------------------------------------------
def _meta_state(dims: BEiT3Dims) -> dict[str, torch.Tensor]:
    spec = TinySpec(
        dims.embed_dim,
        dims.depth,
        dims.num_heads,
        dims.ffn_dim,
        dims.patch_size,
        dims.image_size,
        dims.vocab_size,
        dims.text_positions,
    )
    return {k: torch.empty(s, device="meta") for k, s in official_key_shapes(spec).items()}


@pytest.mark.parametrize("name,size", [("base", 224), ("base", 384), ("large", 384), ("giant", 224)])
def test_infer_dims_of_presets_from_shapes(name, size):
    dims = BEIT3_PRESETS[name].with_image_size(size)
    assert infer_dims(_meta_state(dims)) == dims  # heads from the preset table, by width


def test_infer_dims_tiny_needs_heads():
    spec = LARGE_STYLE
    state = {k: torch.empty(s, device="meta") for k, s in official_key_shapes(spec).items()}
    with pytest.raises(InputError, match="width 48 matches no preset.*pass num_heads"):
        infer_dims(state)
    with pytest.raises(InputError, match="does not divide"):
        infer_dims(state, num_heads=5)
    assert infer_dims(state, num_heads=6).num_heads == 6
    with pytest.raises(InputError, match="preset width with 12 heads"):
        infer_dims(_meta_state(BEIT3_PRESETS["base"]), num_heads=8)
    with pytest.raises(InputError, match="not a BEiT-3 checkpoint"):
        infer_dims({"encoder.weight": torch.empty(3, 3, device="meta")})


# -- position interpolation ----------------------------------------------------------------------------
def _cubic(t: float, a: float = -0.75) -> list[float]:
    """Keys cubic-convolution weights of the 4 taps at distances 1+t, t, 1-t, 2-t (PyTorch: a = -0.75)."""
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731  |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731  1 < |x| < 2
    return [far(1 + t), near(t), near(1 - t), far(2 - t)]


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Rows: output samples; half-pixel centres (align_corners=False), edge taps clamped."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        f = math.floor(src)
        for k, w in zip(range(f - 1, f + 3), _cubic(src - f)):
            m[i, min(max(k, 0), n_in - 1)] += w
    return m


def test_position_interpolation_matches_hand_bicubic(base_style_ckpt, tiny_spm):
    path, sd = base_style_ckpt
    table = sd["beit3.encoder.embed_positions.A.weight"]  # [3 + 4*4, 32]
    loaded = load_beit3_checkpoint(path, num_heads=4, image_size=48)  # grid 4 -> 6
    new = loaded.model.beit3.encoder.embed_positions.A.weight
    assert loaded.dims.image_size == 48 and loaded.checkpoint_image_size == 32
    assert new.shape == (3 + 36, 32)
    assert torch.equal(new[:3], table[:3])  # 2 unused fairseq rows + [CLS] kept as they are
    m = _bicubic_matrix(4, 6)
    grid = table[3:].double().numpy().reshape(4, 4, 32)
    hand = np.einsum("ir,rcd,jc->ijd", m, grid, m).reshape(36, 32)
    np.testing.assert_allclose(new[3:].double().numpy(), hand, atol=1e-5, rtol=0)
    # and a shrink (grid 4 -> 3), through the function directly
    small = interpolate_vision_positions(table, 3)
    m3 = _bicubic_matrix(4, 3)
    np.testing.assert_allclose(
        small[3:].double().numpy(), np.einsum("ir,rcd,jc->ijd", m3, grid, m3).reshape(9, 32), atol=1e-5, rtol=0
    )
    # the resized model still computes the reference math with the resized table
    teacher = BEiT3Teacher.from_checkpoint(path, tokenizer=tiny_spm, num_heads=4, image_size=48)
    pixels = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref_sd = dict(sd, **{"beit3.encoder.embed_positions.A.weight": new.detach().clone()})
    torch.testing.assert_close(
        teacher.encode_image_batch(pixels).double(), reference_image_features(ref_sd, pixels, 4), atol=1e-5, rtol=0
    )
    assert teacher.identity()["checkpoint"]["image_size"] == 32 and teacher.identity()["image_size"] == 48
    with pytest.raises(InputError, match="multiple of the patch size 8"):
        load_beit3_checkpoint(path, num_heads=4, image_size=50)


# -- the teacher's identity and clear errors -------------------------------------------------------------
def test_sha256_streamed(base_style_ckpt):
    path, _ = base_style_ckpt
    assert sha256_file(path, chunk_bytes=1000) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_teacher_identity_and_config(base_style_ckpt, tiny_spm):
    path, _ = base_style_ckpt
    cfg = TeacherConfig(
        kind="beit3", beit3=BEiT3TeacherConfig(checkpoint=path, tokenizer=tiny_spm, num_heads=4, max_text_len=32)
    )
    teacher = build_teacher(cfg)
    ident = teacher.identity()
    assert ident["checkpoint"] == {"file": path.name, "sha256": sha256_file(path), "image_size": 32}
    assert ident["tokenizer"]["sha256"] == sha256_file(tiny_spm)
    assert ident["preset"] is None and ident["dims"]["depth"] == 2 and ident["dims"]["num_heads"] == 4
    assert (ident["image_size"], ident["max_text_len"], ident["dtype"]) == (32, 32, "float32")
    assert teacher.dim == 32 and teacher.name == "beit3-d32x2-32"
    feats = teacher.encode_texts(["a dog", "two cats on a bench"])
    assert feats.shape == (2, 32) and feats.dtype == torch.float32


def test_teacher_clear_errors(base_style_ckpt, tiny_spm, tmp_path):
    path, _ = base_style_ckpt
    with pytest.raises(InputError, match="checkpoint file not found"):
        BEiT3Teacher.from_checkpoint(tmp_path / "missing.pth", tokenizer=tiny_spm, num_heads=4)
    with pytest.raises(InputError, match="tokenizer file.*not found"):
        BEiT3Teacher.from_checkpoint(path, tokenizer=tmp_path / "beit3.spm", num_heads=4)
    with pytest.raises(InputError, match="does not match preset 'large'.*embed_dim 32 \\(preset: 1024\\)"):
        BEiT3Teacher.from_checkpoint(path, tokenizer=tiny_spm, num_heads=4, preset="large")
    with pytest.raises(InputError, match="^extract.teacher.beit3.checkpoint is not set"):  # the params.yaml key
        BEiT3Teacher.from_config(BEiT3TeacherConfig(tokenizer=tiny_spm))
    with pytest.raises(InputError, match="^extract.teacher.beit3.tokenizer is not set"):
        BEiT3Teacher.from_config(BEiT3TeacherConfig(checkpoint=path))
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            BEiT3Teacher.from_checkpoint(path, tokenizer=tiny_spm, num_heads=4, device="cuda")
    # a tokenizer with more ids than the text embedding has rows does not match the checkpoint
    small_vocab = official_state_dict(TinySpec(32, 1, 4, 64, 8, 16, vocab_size=50))
    with pytest.raises(InputError, match="tokenizer and checkpoint do not match"):
        BEiT3Teacher.from_checkpoint(write_checkpoint(tmp_path / "v.pth", small_vocab), tokenizer=tiny_spm, num_heads=4)


def test_loading_costs_one_copy_of_the_checkpoint(tmp_path):
    """Peak RSS while loading and touching every weight stays well under twice the file size (a plain
    torch.load + load_state_dict into an allocated model needs two copies). Measured in a fresh process
    whose peak-RSS counter is reset after warming up the imports (the first meta-device build imports
    ~80 MB of modules, a fixed cost unrelated to the checkpoint)."""
    spec = TinySpec(embed_dim=256, depth=1, num_heads=4, ffn_dim=512, patch_size=16, image_size=32, vocab_size=64010)
    path = write_checkpoint(tmp_path / "big.pth", official_state_dict(spec))  # ~72 MB, mostly text_embed
    size = path.stat().st_size
    script = textwrap.dedent(f"""
        import sys, torch
        from pipeline.teachers.beit3_checkpoint import load_beit3_checkpoint
        from pipeline.teachers.beit3_model import BEiT3Dims, BEiT3ForRetrieval
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        with torch.device("meta"):  # warm-up
            BEiT3ForRetrieval(BEiT3Dims(8, 1, 2, 8, 4, 8, vocab_size=8, text_positions=8))
        try:
            open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter (VmHWM)
        except OSError:
            print("unsupported"); sys.exit(0)
        before = status("VmRSS:")
        model = load_beit3_checkpoint({str(path)!r}, num_heads=4).model
        total = sum(float(p.sum()) for p in model.parameters())  # touch every page of every weight
        print(status("VmHWM:") - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    last = out.stdout.strip().splitlines()[-1]
    if last == "unsupported":
        pytest.skip("/proc/self/clear_refs not writable here")
    grown = int(last)
    print(f"checkpoint {size / 1e6:.1f} MB, peak RSS growth while loading {grown / 1e6:.1f} MB")
    assert 0.8 * size < grown < 1.3 * size
