"""What the runtime raises, how it tells a communication failure from a rank's own fault, and
how a rank leaves.

A failure elsewhere reaches a rank as an exception from a collective (a peer died), from a
rendezvous (a newer generation cut it short) or from a phase marker (the controller opened a new
generation): the rank recovers. Any other exception is the rank's own fault: it reports it and
exits, and its agent replaces it.
"""

from __future__ import annotations

import logging
import os
import sys

import torch.distributed as dist

EXIT_FAULTY = 70  # a rank that found itself at fault exits with this code after reporting


class RecoveryRequested(RuntimeError):
    """Raised at a phase marker when the controller has opened a new generation."""


class RecoveryImpossible(RuntimeError):
    """No consistent state can be assembled from live peers."""


# gloo raises a plain RuntimeError when a peer is gone, a link is cut (by its peer or by this
# rank's own abort) or a rendezvous fails; its messages carry gloo's source path or one of these
# phrases. A group retired after a rebuild (``megatron.rebind.retire_groups``) says so too.
_GLOO_FAILURE = ("gloo/", "ProcessGroupGloo", "Connection closed by peer",
                 "Connection reset by peer", "Broken pipe", "Timed out", "connectFullMesh",
                 "group of a previous generation")


def is_communication_failure(exc: BaseException) -> bool:
    """A failure of communication, not of the rank itself: by type where torch gives one
    (``DistError``: backend, network and store errors; NCCL's aborted communicators), and for
    gloo, whose transport errors are plain ``RuntimeError``s, by their text."""
    if isinstance(exc, (RecoveryRequested, dist.DistError, ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _GLOO_FAILURE)


def exit_process(code: int) -> None:
    """End this process now. A training process has daemon threads blocked in C++ store calls,
    and interpreter shutdown with those aborts the process ("terminate called without an active
    exception") and loses the exit code; so the logs are flushed and the process leaves here."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
