"""Which of a step's micro-batches each data-parallel rank takes, whatever the data-parallel size.

A job is configured for ``total`` micro-batches per step (its configured data-parallel size times
the micro-batches of one rank). When it goes on with fewer replicas (a shrink), fewer ranks take
the same ``total``: each a contiguous run, the first ``total % size`` ranks one more than the
others. Each rank sums its micro-batches' gradients and the sum over ranks is divided by
``total``, so a step's gradient is the mean over the same samples as at the configured size; only
the order of the additions differs. At the configured size each rank takes exactly what it took
before. A script whose reduction averages over the data-parallel ranks instead (DDP) scales each
micro-batch's loss by ``loss_scale`` to the same effect.
"""

from __future__ import annotations


class BatchSplitError(ValueError):
    """The global batch cannot be spread over the data-parallel ranks."""


def micro_batches(total: int, dp_rank: int, dp_size: int) -> range:
    """The indices, among the step's ``total`` micro-batches, that ``dp_rank`` of ``dp_size``
    takes."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise BatchSplitError(f"data-parallel rank {dp_rank} is not in 0..{dp_size - 1}")
    if total < dp_size:
        raise BatchSplitError(
            f"{total} micro-batches per step cannot be spread over {dp_size} data-parallel "
            f"ranks: every rank needs at least one; use a global batch of at least {dp_size} "
            "micro-batches")
    base, extra = divmod(total, dp_size)
    start = dp_rank * base + min(dp_rank, extra)
    return range(start, start + base + (1 if dp_rank < extra else 0))


def loss_scale(total: int, dp_size: int) -> float:
    """The factor on each micro-batch's loss when gradients are averaged over the ``dp_size``
    data-parallel ranks (DDP): the step's gradient is then the mean over all ``total``
    micro-batches. 1/``micro-batches per rank`` at the configured size, as usual."""
    if dp_size < 1 or total < dp_size:
        raise BatchSplitError(f"{total} micro-batches per step cannot be spread over {dp_size} "
                              "data-parallel ranks")
    return dp_size / total
