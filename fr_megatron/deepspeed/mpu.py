"""Megatron-core's ``parallel_state`` as a DeepSpeed mpu, and the callback that rebuilds it.

DeepSpeed takes a Megatron-style "model parallel unit" (``mpu``) and asks it for groups and sizes.
``megatron.core.parallel_state`` has almost every call DeepSpeed makes, but not
``get_model_parallel_world_size`` / ``get_model_parallel_rank`` (in Megatron-LM they came from the old
``mpu`` module) nor ``get_data_parallel_group_ranks``. :class:`MegatronCoreMPU` adds those three and
forwards everything else to ``parallel_state`` *at call time*, so after ``parallel_state`` has been
re-initialised on a new world the same mpu object hands out the new groups.

On a new world generation the survivors must recreate ``parallel_state``'s groups with the same
topology before DeepSpeed's groups are rebound: pass :func:`parallel_state_rebuilder` (or any callback
that runs ``destroy_model_parallel`` and then ``initialize_model_parallel`` with the arguments of the
first call) as ``rebuild_mpu`` to :func:`fr_megatron.deepspeed.initialize`.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["MegatronCoreMPU", "parallel_state_rebuilder", "CopyToTP", "ReduceFromTP"]


def _ps():
    from megatron.core import parallel_state

    return parallel_state


class MegatronCoreMPU:
    """``megatron.core.parallel_state`` with the calls DeepSpeed's engine expects of an mpu.

    Holds no group itself (every call is forwarded), so the runtime's group rebinding has nothing to
    rewrite here.
    """

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(_ps(), name)

    def get_model_parallel_world_size(self) -> int:
        ps = _ps()
        return ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size()

    def get_model_parallel_rank(self) -> int:
        ps = _ps()
        return (ps.get_pipeline_model_parallel_rank() * ps.get_tensor_model_parallel_world_size()
                + ps.get_tensor_model_parallel_rank())

    def get_data_parallel_group_ranks(self) -> list[int]:
        import torch.distributed as dist

        return dist.get_process_group_ranks(_ps().get_data_parallel_group())

    def __repr__(self) -> str:
        return "MegatronCoreMPU(megatron.core.parallel_state)"


def parallel_state_rebuilder(**initialize_kwargs) -> Callable[[], None]:
    """A ``rebuild_mpu`` callback: ``destroy_model_parallel()`` then
    ``initialize_model_parallel(**initialize_kwargs)``.

    Give it the arguments of the script's own ``initialize_model_parallel`` call: a replacement process
    runs that call from the top, and the survivors' groups must be created in the same order and with
    the same topology (group names come from a counter, see the design notes).
    """

    def rebuild() -> None:
        ps = _ps()
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(**initialize_kwargs)

    return rebuild


def _tp_group():
    # looked up at call time: the group is rebuilt on every new generation
    return _ps().get_tensor_model_parallel_group()


def _autograd_functions():
    import torch
    import torch.distributed as dist

    class CopyToTP(torch.autograd.Function):
        """Identity forward, all-reduce of the gradient over the TP group (a column-parallel input)."""

        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, g):
            g = g.clone()
            dist.all_reduce(g, group=_tp_group())
            return g

    class ReduceFromTP(torch.autograd.Function):
        """All-reduce forward over the TP group, identity backward (a row-parallel output)."""

        @staticmethod
        def forward(ctx, x):
            x = x.clone()
            dist.all_reduce(x, group=_tp_group())
            return x

        @staticmethod
        def backward(ctx, g):
            return g

    return CopyToTP, ReduceFromTP


CopyToTP, ReduceFromTP = _autograd_functions()
