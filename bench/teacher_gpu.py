"""BEiT-3 teacher throughput on one GPU, model only (random weights, inputs already on the device):
images/s and captions/s for `giant` at 224 px and `large` at 384 px under bf16 autocast, as the extract
stage runs them (BEiT3Teacher.encode_image_batch / encode_text_batch).

    python bench/teacher_gpu.py                          # both configs
    python bench/teacher_gpu.py --config giant-224 --image-batch 256 --text-batch 1024

Without CUDA it says so and exits 0. Targets (shared/reference/performance.md, one H100, end to end):
giant at 224 px >= 800 images/s and >= 3,500 captions/s; model-only ceilings ~890 / ~3,760.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIGS = {"giant-224": ("giant", 224), "large-384": ("large", 384)}
CAPTION_TOKENS = (64, 20)  # the official fixed padding, and a typical bucketed caption length


def _rate(fn, items: int, sync, seconds: float = 10.0, warmup: int = 3) -> float:
    """Items per second of fn() (one batch of `items`), measured over about `seconds`."""
    for _ in range(warmup):
        fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if n % 4 == 0:
            sync()
            if time.perf_counter() - t0 > seconds:
                break
    sync()
    return n * items / (time.perf_counter() - t0)


def run(
    config: str, image_batch: int, text_batch: int, seconds: float, dtype: torch.dtype, device: str = "cuda", dims=None
) -> dict:
    """`device` / `dims` other than the defaults only to smoke-test this script on a CPU."""
    from pipeline.teachers.beit3 import BEiT3Teacher
    from pipeline.teachers.beit3_model import BEIT3_PRESETS, BEiT3ForRetrieval

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if dims is None:
        preset, size = CONFIGS[config]
        dims = BEIT3_PRESETS[preset].with_image_size(size)
    with torch.device(device):  # default init, directly on the GPU (a 2B-parameter CPU init takes minutes)
        model = BEiT3ForRetrieval(dims)
    teacher = BEiT3Teacher.from_model(model, None, device=device, dtype=dtype if cuda else torch.float32)
    out = {
        "config": config,
        "params": sum(p.numel() for p in model.parameters()),
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": str(teacher.dtype).replace("torch.", ""),
        "image_batch": image_batch,
        "text_batch": text_batch,
    }
    pixels = torch.randn(image_batch, 3, dims.image_size, dims.image_size, device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out["images_per_s"] = _rate(lambda: teacher.encode_image_batch(pixels), image_batch, sync, seconds)
    out["image_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
    for n_tok in CAPTION_TOKENS:
        ids = torch.randint(4, min(64000, dims.vocab_size), (text_batch, n_tok), device=device)
        ids[:, 0], ids[:, -1] = 0, 2
        tokens = {"input_ids": ids, "padding_mask": torch.zeros_like(ids, dtype=torch.bool)}
        out[f"captions_per_s_{n_tok}tok"] = _rate(lambda: teacher.encode_text_batch(tokens), text_batch, sync, seconds)
    del model, teacher
    if cuda:
        torch.cuda.empty_cache()
    return out


def agreement(dims, dtype: torch.dtype, device: str = "cuda", n_images: int = 32, n_captions: int = 128) -> dict:
    """How far `dtype` autocast (the extract stage's compute on a GPU) moves the teacher's embeddings from float32:
    the same random weights and inputs encoded both ways; per row, the cosine between the two unit embeddings
    (min and mean), for images and for captions (CAPTION_TOKENS[1] tokens)."""
    from pipeline.teachers.beit3_model import BEiT3ForRetrieval

    torch.manual_seed(0)
    with torch.device(device):
        model = BEiT3ForRetrieval(dims).eval()
    pixels = torch.randn(n_images, 3, dims.image_size, dims.image_size, device=device)
    ids = torch.randint(4, min(64000, dims.vocab_size), (n_captions, CAPTION_TOKENS[1]), device=device)
    ids[:, 0], ids[:, -1] = 0, 2
    mask = torch.zeros_like(ids, dtype=torch.bool)
    out = {"dtype": str(dtype).replace("torch.", ""), "n_images": n_images, "n_captions": n_captions}
    precision, tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")  # the reference in float32 proper, not TF32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            for kind, encode in (
                ("image", lambda: model.encode_image(pixels)),
                ("text", lambda: model.encode_text(ids, mask)),
            ):
                full = torch.nn.functional.normalize(encode().float(), dim=-1)
                with torch.autocast(torch.device(device).type, dtype=dtype):
                    low = torch.nn.functional.normalize(encode().float(), dim=-1)
                cos = (full * low).sum(-1)
                out[f"{kind}_min_cos"], out[f"{kind}_mean_cos"] = cos.min().item(), cos.mean().item()
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = tf32
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), action="append")
    ap.add_argument("--image-batch", type=int, default=256)
    ap.add_argument("--text-batch", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=10.0, help="measuring time per figure")
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("teacher_gpu: skipped, no CUDA GPU on this machine")
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    for config in args.config or ["giant-224", "large-384"]:
        r = run(config, args.image_batch, args.text_batch, args.seconds, getattr(torch, args.dtype))
        print(f"[{config}] {r['params'] / 1e6:,.0f}M parameters, {r['gpu']}, {r['dtype']} autocast, model only")
        print(f"  images:   {r['images_per_s']:8,.0f} /s  (batch {r['image_batch']}, peak {r['image_peak_gb']:.1f} GB)")
        for n_tok in CAPTION_TOKENS:
            print(f"  captions: {r[f'captions_per_s_{n_tok}tok']:8,.0f} /s  ({n_tok} tokens, batch {r['text_batch']})")


if __name__ == "__main__":
    main()
