"""Phase markers inside a megatron-core training step.

The runtime needs to know where in a step each rank is (heartbeats, hang blame, fault injection
at a phase): forward (each micro-batch), backward (when gradients reach a micro-batch's output),
grad_reduce (megatron's ``finalize_model_grads``: data-parallel reduction, layernorm and embedding
all-reduces), optimizer (after the inner Adam has updated this rank's shard and *before* the
DistributedOptimizer all-gathers the updated parameters: a fault there leaves ranks with a partial
update, which the rollback undoes).
"""

from __future__ import annotations

from typing import Callable

from .integration import sub_optimizers


def wrap_forward_step(forward_step: Callable, mark: Callable[[str], None],
                      issued: Callable[[], None] = lambda: None) -> Callable:
    """``issued``: called once a micro-batch's forward is queued (its batch read, its kernels
    launched)."""
    def forward_step_with_marks(data_iterator, model, *args, **kwargs):
        mark("forward")
        output, loss_func = forward_step(data_iterator, model, *args, **kwargs)
        issued()
        if getattr(output, "requires_grad", False):
            def on_backward(grad):
                mark("backward")
                return grad
            output.register_hook(on_backward)
        return output, loss_func
    return forward_step_with_marks


def install(config, optimizer, mark: Callable[[str], None]) -> None:
    """Mark grad_reduce and optimizer phases on a TransformerConfig and a megatron optimizer."""
    finalize = config.finalize_model_grads_func
    if finalize is not None and not getattr(finalize, "_fr_marked", False):
        def finalize_with_mark(*args, **kwargs):
            mark("grad_reduce")
            return finalize(*args, **kwargs)
        finalize_with_mark._fr_marked = True
        config.finalize_model_grads_func = finalize_with_mark
    for opt in sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            inner.register_step_post_hook(lambda *_: mark("optimizer"))

