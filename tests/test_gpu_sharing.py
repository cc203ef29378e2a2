"""Ranks that share a GPU: the device each takes, and megatron-core's bucket collectives on gloo.

The CUDA side runs in ``benchmarks/cuda_checks.py`` on a GPU (four ranks on one device, gloo);
here, without one, what the choice and the switch do and that they leave a CPU job alone.
"""

import pytest
import torch

from fr_megatron.megatron import gloo_cuda
from fr_megatron.megatron.training_hooks import local_cuda_device

pytestmark = pytest.mark.timeout(60)


def test_ranks_beyond_the_gpus_of_a_node_share_them_round_robin(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [local_cuda_device(r) for r in range(5)] == [0, 1, 0, 1, 0]
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_cuda_device() == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert local_cuda_device() == 3  # a GPU per rank: its own


def test_bucket_collectives_run_one_by_one_only_for_gloo_with_cuda(monkeypatch):
    from megatron.core.distributed import param_and_grad_buffer

    before = param_and_grad_buffer._coalescing_manager
    assert not torch.cuda.is_available()
    assert gloo_cuda.install("gloo") is False  # CPU tensors: gloo's coalesced path works
    assert param_and_grad_buffer._coalescing_manager is before
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gloo_cuda.install("nccl") is False
    monkeypatch.setattr(param_and_grad_buffer, "_coalescing_manager", before)  # undone after
    assert gloo_cuda.install("gloo") is True
    manager = param_and_grad_buffer._coalescing_manager
    ran = []
    with manager(group=None, async_ops=False) as handle:
        ran.append(1)  # each collective runs as it is called, synchronously
    assert ran == [1] and handle is None
    with pytest.raises(RuntimeError, match="--overlap-grad-reduce"):
        with manager(group=None, async_ops=True):
            pass
