"""GatherRows (distill's differentiable all-gather) against a hand-computed gradient and against torch's own
`torch.distributed.nn.functional.all_gather` (open_clip's choice), on 2 CPU processes with gloo; and
`average_gradients` (the learned temperature's gradient, outside DDP) against the mean over the ranks.

GatherRows stays hand-written: torch 2.13 deprecates torch.distributed.nn.functional.all_gather (a
FutureWarning that points to the private torch.distributed._functional_collectives); this test shows the two
agree bit for bit, so switching later is a one-line change."""

import os
import socket
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.nn.functional import all_gather

        from pipeline.distill.distributed import GatherRows

        g = torch.Generator().manual_seed(0)
        xs, w = torch.randn(WORLD, 3, 4, generator=g), torch.randn(WORLD * 3, 4, generator=g)
        out = {}
        for name, gather in (("ours", GatherRows.apply), ("torch", lambda x: torch.cat(all_gather(x)))):
            x = xs[rank].clone().requires_grad_()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                y = gather(x)  # [WORLD x 3, 4], rank order
            ((w * y).sum() + 0.1 * (y**2).sum()).backward()  # every rank: the same loss of the global batch
            out[name] = (y.detach(), x.grad)
        # oracle: dL/dx_r = w_r + 0.2 x_r on every rank; the backward sums it over the WORLD ranks
        expected = WORLD * (w[rank * 3 : rank * 3 + 3] + 0.2 * xs[rank])
        # average_gradients: a parameter whose gradient differs per rank ends with the mean on every rank; one
        # without a gradient is left alone
        from pipeline.distill.distributed import average_gradients

        p, idle = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
        grads = torch.randn(WORLD, 3, generator=g)
        p.grad = grads[rank].clone()
        average_gradients([p, idle], WORLD)
        results.put(
            (
                rank,
                torch.equal(out["ours"][0], xs.reshape(-1, 4)),
                torch.allclose(out["ours"][1], expected),
                torch.equal(out["ours"][0], out["torch"][0]),
                torch.equal(out["ours"][1], out["torch"][1]),
                torch.allclose(p.grad, grads.mean(0)) and idle.grad is None,
            )
        )
        # both ranks past their last collective before either tears gloo down: a rank that closes its pairs
        # while the other still reads from them makes gloo abort the reader
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's and libtorch's teardown. Twice in full CI runs (never in 80 runs of this
    # test alone nor in 4 local full suites, idle or loaded) rank 0 died with only "terminate called without an
    # active exception" on stderr: a C++ thread object destroyed unjoined, which is what happens when gloo's
    # threads outlive the interpreter's finalization (pytorch/pytorch#179291). That teardown is torch's, not
    # what this test checks; an exception above still exits non-zero through mp.spawn.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_gather_rows_matches_the_oracle_and_torch_all_gather():
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank, args=(_free_port(), results), nprocs=WORLD)
    got = sorted(results.get() for _ in range(WORLD))
    assert got == [(r, True, True, True, True, True) for r in range(WORLD)]
