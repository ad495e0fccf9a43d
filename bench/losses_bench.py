"""The full distillation loss, forward + backward, at training size: how much of a step the losses cost.

    python bench/losses_bench.py                 # CPU, then CUDA when available (skipped cleanly otherwise)
    python bench/losses_bench.py --device cuda   # one device only
    python bench/losses_bench.py --quick         # CPU: only the K = 8192 queue (the bank takes seconds a step)

Batch 256 pairs, D = 1024 (BEiT-3 large), the default loss (contrastive + L1 + cosine + triplet, same-image
masking on), with the contrastive negatives either a K = 8192 queue of teacher rows per modality or the
whole bank of a Flickr30K-sized store (31,783 image rows, 158,915 caption rows, 5 captions per image).
Variants: intra-modal only (the paper) and with the cross-modal terms. Student rows are fp32 leaves;
the queue / bank is held as the trainer would hold it on the device (fp16 on a GPU, as stored; fp32 on the
CPU), and the loss upcasts it. Prints ms per forward+backward and, on CUDA, the peak memory the loss adds.

Then each knowledge term alone (pipeline/distill/losses/: response, response_queue, intra_relation, dcd, mcad_kl,
mcad_feature), and with a second teacher (D = 768) where it joins the distributions: the same batch, the K = 8192
queue, K_c = 32 mined candidates per caption and per image ([B, 32, D] teacher rows per direction, as
distill/knowledge.py gathers them) and cross-encoder scores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import Report, timeit  # noqa: E402

from pipeline.distill.losses import KNOWLEDGE_TERMS, DistillLoss, Knowledge, LossConfig, TeacherRows  # noqa: E402

B, D, K = 256, 1024, 8192
K_CAND, D2 = 32, 768  # mined candidates per query; a second teacher's dimension
N_IMAGES, CAPTIONS_PER_IMAGE = 31_783, 5  # Flickr30K: 158,915 captions


def make_inputs(device: torch.device, bank: bool, bank_dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g), dim=-1)  # noqa: E731
    image_ids = torch.randint(0, N_IMAGES, (B,), generator=g)
    inputs = {
        "s_v": unit(B, D).to(device).requires_grad_(True),
        "s_t": unit(B, D).to(device).requires_grad_(True),
        "t_v": unit(B, D).to(device),
        "t_t": unit(B, D).to(device),
        "image_ids": image_ids.to(device),
    }
    if bank:
        n_img, n_txt = N_IMAGES, N_IMAGES * CAPTIONS_PER_IMAGE
        qv_ids, qt_ids = torch.arange(n_img), torch.arange(n_txt) // CAPTIONS_PER_IMAGE
    else:
        n_img = n_txt = K
        qv_ids, qt_ids = torch.randint(0, N_IMAGES, (K,), generator=g), torch.randint(0, N_IMAGES, (K,), generator=g)
    inputs.update(
        queue_v=unit(n_img, D).to(device, bank_dtype),
        queue_t=unit(n_txt, D).to(device, bank_dtype),
        queue_v_image_ids=qv_ids.to(device),
        queue_t_image_ids=qt_ids.to(device),
    )
    return inputs


def step(loss: DistillLoss, inputs: dict) -> None:
    inputs["s_v"].grad = inputs["s_t"].grad = None
    out = loss(**inputs)
    sum(out.values()).backward()


def bench_device(rep: Report, device: torch.device, quick: bool) -> None:
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    bank_dtype = torch.float16 if cuda else torch.float32
    repeat, warmup = (20, 3) if cuda else (3, 1)
    where = "CUDA" if cuda else f"CPU {torch.get_num_threads()} threads"
    for bank in [False] if quick else [False, True]:
        negatives = "F30K bank 31.8k img + 158.9k txt rows" if bank else f"queue K={K}"
        inputs = make_inputs(device, bank, bank_dtype)
        for cross_modal in (False, True):
            loss = DistillLoss(LossConfig(cross_modal=cross_modal)).to(device)
            if cuda:
                step(loss, inputs)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            best, median = timeit(lambda: step(loss, inputs), repeat=repeat, warmup=warmup, sync=sync)
            name = f"loss fwd+bwd, B={B} D={D}, {negatives}, {'intra+cross' if cross_modal else 'intra'}, {where}"
            rep.add("distill", name, median * 1e3, "ms", note=f"best {best * 1e3:.2f} ms of {repeat}")
            if cuda:
                extra = (torch.cuda.max_memory_allocated() - base) / 2**20
                rep.add("distill", name.replace("fwd+bwd", "peak extra memory"), extra, "MiB")
        del inputs
        if cuda:
            torch.cuda.empty_cache()


def knowledge_inputs(device: torch.device, bank_dtype: torch.dtype, seed: int = 1) -> tuple[dict, Knowledge]:
    """The batch above with a K = 8192 queue, plus the mined candidates and a second teacher's rows."""
    inputs = make_inputs(device, bank=False, bank_dtype=bank_dtype, seed=seed)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g), dim=-1).to(device, bank_dtype)  # noqa: E731
    extra = TeacherRows(
        t_v=unit(B, D2), t_t=unit(B, D2), queue_v=unit(K, D2), queue_t=unit(K, D2),
        cand_v=unit(B, K_CAND, D2), cand_t=unit(B, K_CAND, D2),
    )  # fmt: skip
    ce = lambda: torch.randn(B, 1 + K_CAND, generator=g).to(device)  # noqa: E731
    knowledge = Knowledge(
        cand_v=unit(B, K_CAND, D), cand_t=unit(B, K_CAND, D), ce_t2i=ce(), ce_i2t=ce(), extra=(extra,)
    )
    return inputs, knowledge


def bench_knowledge(rep: Report, device: torch.device) -> None:
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    repeat, warmup = (20, 3) if cuda else (5, 1)
    where = "CUDA" if cuda else f"CPU {torch.get_num_threads()} threads"
    inputs, knowledge = knowledge_inputs(device, torch.float16 if cuda else torch.float32)
    zero = {name: 0.0 for name in ("contrastive", "l1", "cosine", "triplet")}
    for term in KNOWLEDGE_TERMS:
        for teachers in [()] if term == "intra_relation" else [(), ("second",)]:
            cfg = LossConfig(**zero, **{term: 1.0}, teachers=teachers, learn_student_temperature=term in
                             ("response", "response_queue", "mcad_kl"))  # fmt: skip
            loss = DistillLoss(cfg, teacher_scales=(100.0, 50.0)[: 1 + len(teachers)]).to(device)
            best, median = timeit(lambda: step(loss, {**inputs, "knowledge": knowledge}), repeat=repeat,
                                  warmup=warmup, sync=sync)  # fmt: skip
            who = "2 teachers" if teachers else "1 teacher"
            name = f"{term} fwd+bwd, B={B} D={D}, queue K={K}, {K_CAND} candidates, {who}, {where}"
            rep.add("distill", name, median * 1e3, "ms", note=f"best {best * 1e3:.2f} ms of {repeat}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="CPU: skip the whole-bank case")
    args = ap.parse_args(argv)
    rep = Report.for_this_machine()
    print(f"# {rep.info['device']}, torch {rep.info.get('torch')}")
    if args.device in ("cpu", "all"):
        bench_device(rep, torch.device("cpu"), args.quick)
        bench_knowledge(rep, torch.device("cpu"))
    if args.device in ("cuda", "all"):
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = False  # the loss math is meant to be fp32
            bench_device(rep, torch.device("cuda"), quick=False)
            bench_knowledge(rep, torch.device("cuda"))
        else:
            rep.skip("distill", "losses on CUDA: no CUDA device")


if __name__ == "__main__":
    main()
