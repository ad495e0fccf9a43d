"""BEiT-3 teacher forward on the CPU: our model vs the naive eager reference (tests/beit3_reference.py,
the official torchscale math written out: separate q/k/v, per-head loops, explicit masking), same weights,
same inputs, both in float32. Prints ms per batch, the speed ratio and the max abs feature difference.

    python bench/teacher_cpu.py                       # tiny and base-width configs
    python bench/teacher_cpu.py --config base --depth 12 --repeat 3

A benchmark prints figures; it never fails on speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from beit3_reference import reference_image_features, reference_text_features  # noqa: E402

from pipeline.teachers.beit3_model import BEIT3_PRESETS, BEiT3Dims, BEiT3ForRetrieval  # noqa: E402

CONFIGS = {
    # name: (dims, image batch, text batch, caption tokens)
    "tiny": (
        BEiT3Dims(embed_dim=64, depth=2, num_heads=4, ffn_dim=256, patch_size=8, image_size=64, vocab_size=1000),
        16,
        64,
        24,
    ),
    "base": (BEIT3_PRESETS["base"], 4, 32, 24),  # base width at 224 px (depth from --depth)
}


def _time_pair(a, b, repeat: int, warmup: int = 1) -> tuple[float, float]:
    """Median seconds of a() and of b(), runs interleaved (a, b, a, b, ...) so that load from other
    processes on the machine hits both alike."""
    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for _ in range(repeat):
        for fn, times in ((a, ta), (b, tb)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def run(name: str, depth: int | None = None, repeat: int = 5, seed: int = 0) -> dict:
    dims, n_img, n_txt, n_tok = CONFIGS[name]
    if depth is not None:
        dims = BEiT3Dims(**{**dims.__dict__, "depth": depth})
    g = torch.Generator().manual_seed(seed)
    model = BEiT3ForRetrieval(dims).init_random(seed).eval()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    pixels = torch.rand(n_img, 3, dims.image_size, dims.image_size, generator=g) * 2 - 1
    # captions of mixed lengths (padded to the longest), like a bucket of real captions
    lengths = torch.randint(n_tok // 2, n_tok + 1, (n_txt,), generator=g)
    lengths[0] = n_tok
    ids = torch.randint(4, min(dims.vocab_size, 64000), (n_txt, n_tok), generator=g)
    ids[:, 0] = 0
    pad = torch.arange(n_tok)[None] >= lengths[:, None]
    ids[torch.arange(n_txt), lengths - 1] = 2
    ids[pad] = 1

    out = {"config": name, "dims": dims.__dict__, "threads": torch.get_num_threads()}
    with torch.inference_mode():
        ours_img = model.encode_image(pixels)
        ref_img = reference_image_features(sd, pixels, dims.num_heads, dtype=torch.float32)
        ours_txt = model.encode_text(ids, pad)
        ref_txt = reference_text_features(sd, ids, pad, dims.num_heads, dtype=torch.float32)
        out["image_max_abs_diff"] = (ours_img - ref_img).abs().max().item()
        out["text_max_abs_diff"] = (ours_txt - ref_txt).abs().max().item()
        img = _time_pair(
            lambda: model.encode_image(pixels),
            lambda: reference_image_features(sd, pixels, dims.num_heads, dtype=torch.float32),
            repeat,
        )
        txt = _time_pair(
            lambda: model.encode_text(ids, pad),
            lambda: reference_text_features(sd, ids, pad, dims.num_heads, dtype=torch.float32),
            repeat,
        )
        out["image_ours_ms"], out["image_ref_ms"] = 1e3 * img[0], 1e3 * img[1]
        out["text_ours_ms"], out["text_ref_ms"] = 1e3 * txt[0], 1e3 * txt[1]
    out.update(n_images=n_img, n_texts=n_txt, tokens=n_tok)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), action="append")
    ap.add_argument("--depth", type=int, default=None, help="layers (default: tiny 2, base 4)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    for name in args.config or ["tiny", "base"]:
        depth = args.depth if args.depth is not None else (4 if name == "base" else None)
        r = run(name, depth=depth, repeat=args.repeat)
        d = r["dims"]
        print(
            f"[{name}] D={d['embed_dim']} depth={d['depth']} heads={d['num_heads']} FFN={d['ffn_dim']} "
            f"patch={d['patch_size']} image={d['image_size']}  ({r['threads']} threads, float32)"
        )
        print(
            f"  images  x{r['n_images']:<3}: ours {r['image_ours_ms']:8.1f} ms   naive reference "
            f"{r['image_ref_ms']:8.1f} ms   ratio {r['image_ref_ms'] / r['image_ours_ms']:.2f}x   "
            f"max |diff| {r['image_max_abs_diff']:.2e}"
        )
        print(
            f"  captions x{r['n_texts']:<3} ({r['tokens']} tokens, padded): ours {r['text_ours_ms']:8.1f} ms   "
            f"naive reference {r['text_ref_ms']:8.1f} ms   ratio {r['text_ref_ms'] / r['text_ours_ms']:.2f}x   "
            f"max |diff| {r['text_max_abs_diff']:.2e}"
        )


if __name__ == "__main__":
    main()
