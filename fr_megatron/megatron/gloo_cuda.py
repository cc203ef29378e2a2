"""megatron-core's collectives on a gloo world whose tensors are on a GPU.

Ranks that share a GPU cannot use NCCL (it refuses two ranks on one device) but can use gloo,
which moves CUDA tensors through pinned host memory for all-reduce, broadcast, all-gather and
reduce-scatter. Not for coalesced collectives: megatron-core's DDP buckets run their gradient
reduce-scatter and the distributed optimizer's parameter all-gather inside
``torch.distributed._coalescing_manager``, which on gloo becomes ``allgather_into_tensor_coalesced``
(no CUDA path: gloo's worker thread reads a device pointer and crashes, pytorch/pytorch#152645) or
``allreduce_coalesced`` (CPU only). ``install`` makes those buckets run each collective on its own.
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _one_by_one(group=None, device=None, async_ops=False):
    """``_coalescing_manager`` for synchronous collectives: they run as they are called."""
    if async_ops:
        raise RuntimeError("gloo with CUDA tensors runs megatron-core's bucket collectives one by "
                           "one and synchronously: leave --overlap-grad-reduce and "
                           "--overlap-param-gather off (or use NCCL, one GPU per rank)")
    yield None  # megatron-core keeps the manager only as the handle of an asynchronous op


def install(backend: str) -> bool:
    """Run megatron-core's bucket collectives one by one where ``backend`` is gloo and the job's
    tensors are on a GPU; nothing otherwise. Returns whether it did."""
    if backend != "gloo" or not torch.cuda.is_available():
        return False
    from megatron.core.distributed import param_and_grad_buffer

    param_and_grad_buffer._coalescing_manager = _one_by_one
    log.info("gloo with CUDA tensors: megatron-core's bucket collectives run one by one")
    return True
