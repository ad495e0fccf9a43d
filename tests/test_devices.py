"""resolve_device: config names to torch devices, and the one-line errors."""

import pytest
import torch

from pipeline.devices import resolve_device
from pipeline.errors import InputError


def test_cpu_and_auto_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_gpu_names_the_parameter(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match=rf"extract.device={name} but no CUDA GPU is available"):
        resolve_device(name, "extract.device")


def test_bad_names_are_refused():
    with pytest.raises(InputError, match="evaluate.device='gpu': not a device"):
        resolve_device("gpu", "evaluate.device")
    with pytest.raises(InputError, match="cpu or cuda"):
        resolve_device("meta", "distill.device")


def test_ranks_map_to_their_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(InputError, match="GPU 2 requested but this machine has 2"):
        resolve_device("cuda", "extract.device")
