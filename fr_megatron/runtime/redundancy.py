"""Copies of unique state, held by peers in other failure domains.

A rank needs copies only where its own snapshot cannot cover a fault (``failure_domains``): when
the snapshot lives in process memory, and, on a job of several nodes, against the loss of its
node. Then every commit sends the step's unique tensors and meta to the rank's holders, straight
from the snapshot slot (``transfer``); when an optimizer instance on another node already holds
the same shard (redundancy by computation), only the meta (RNG, counters: a few KB) travels.

The exchange runs on a background thread over the runtime's own gloo group while the next step
runs; the runtime waits for it before the next commit (``wait``). A commit's exchange ends with
every rank of the job agreeing that the step is durable everywhere (``agree``: each rank's
snapshot sealed, each copy sealed by its holder): ranks are not in lockstep (plain data
parallelism syncs only in the gradient all-reduce), and without it a rank could commit step N+1,
and drop step N-1 from its ring of two, while a lost rank's snapshot or copy of step N was still
on its way; no step would then be left that every rank could go back to. A fault voids the
exchange in flight (``abandon``) without waiting for it: gloo leaves a send or receive whose
message was cut in the middle (a peer killed or cut off while hundreds of MB stream) waiting
until the group's timeout, so the recovery must not depend on it ending. A holder keeps the last
``depth`` versions of each ward's copy in slots of its own, in the node's shared memory when
there is one: a holder that dies does not take its wards' copies with it, and its replacement on
the same node finds them there.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, wait as wait_for
from typing import Callable, Optional

import torch.distributed as dist

from . import transfer
from .background import Worker
from .errors import RecoveryRequested
from .snapshot import SnapshotRing

log = logging.getLogger("fr_megatron.redundancy")


# how long a fault waits for the exchange in flight to end by itself (see ``abandon``): once the
# abort has cut the group's sockets no transfer moves any more, so this only lets an exchange whose
# transfers were done seal its copy, and one that the cut failed return its error
ABANDON_GRACE_S = 0.05


def held_ring(depth: int, directory: Optional[str], holder: int, ward: int,
              parts: tuple[str, ...]) -> SnapshotRing:
    """Where ``holder`` keeps ``ward``'s copies (found again by a replacement of ``holder``)."""
    return SnapshotRing(depth, directory, f"held{holder}.ward{ward}", parts=parts)


class CopyExchange:
    """``parts_of[r]``: the tensor regions rank ``r`` copies to its holders (the meta always
    travels); ``holders``/``wards``: this rank's, from ``failure_domains.copy_plan``;
    ``interrupted()``: a fault plan arrived, so a wait for the exchange in flight gives up;
    ``agree``: a commit's exchange ends in the agreement of every rank of ``group`` (module
    doc), on every rank of the job or on none; ``names[r]``: the job rank of ``group``'s rank
    ``r``, which names the copies kept in shared memory (default: the same)."""

    def __init__(self, rank: int, holders: list[int], wards: list[int], parts_of: dict,
                 group, depth: int, directory: Optional[str],
                 interrupted: Callable[[], bool] = lambda: False, agree: bool = False,
                 names: Optional[list[int]] = None):
        self.rank, self.holders, self.wards, self.group = rank, holders, wards, group
        self.interrupted, self.agree = interrupted, agree
        self.names = list(names) if names is not None else None
        name = self.job_rank
        self.parts = tuple(parts_of.get(rank, ()))
        self.held = {w: held_ring(depth, directory, name(rank), name(w), tuple(parts_of[w]))
                     for w in wards}
        self._pending: Optional[Future] = None
        self._void = threading.Event()  # set: the exchange in flight seals nothing any more
        self._exchanger = Worker("fr-copies")

    @property
    def active(self) -> bool:
        """Whether a commit has an exchange to run."""
        return bool(self.holders or self.wards or self.agree)

    def start(self, step: int, ring: SnapshotRing, to: Optional[list[int]] = None,
              wards: Optional[list[int]] = None) -> None:
        """Send this rank's copy of ``step`` from ``ring`` (to ``to``, default every holder) and
        take the copies of ``wards`` (default every ward), in the background. A commit's
        exchange (``to`` and ``wards`` left out), which every rank runs, ends in the agreement."""
        if self._pending is not None:
            self.wait()
        agree = self.agree and to is None and wards is None
        to = self.holders if to is None else to
        wards = self.wards if wards is None else wards
        if to or wards or agree:
            self._void = threading.Event()
            self._pending = self._exchanger.submit(self._exchange, step, ring, to, wards,
                                                   self._void, agree)

    def wait(self) -> None:
        """Wait for the exchange in flight; ``RecoveryRequested`` once ``interrupted()`` (a fault
        plan arrived: the exchange may never end, see the module doc)."""
        fut = self._pending
        if fut is None:
            return
        while not wait_for([fut], timeout=0.05).done:
            if self.interrupted():
                raise RecoveryRequested("a fault plan arrived while copies were in flight")
        self._pending = None
        fut.result()

    def abandon(self) -> None:
        """A fault, after the abort cut this process's group sockets: an exchange whose transfers
        were done seals its copy, one whose transfer the cut failed ends with an error, both within
        ``ABANDON_GRACE_S``; one that gloo leaves waiting is void from then on and is not waited
        for. If its thread ever returns, it seals nothing (the recovery sends holders what they
        lack again)."""
        fut, self._pending = self._pending, None
        if fut is None:
            return
        if not wait_for([fut], timeout=ABANDON_GRACE_S).done:
            self._void.set()  # gloo left it waiting: if it ever returns, it seals nothing

    def _exchange(self, step: int, ring: SnapshotRing, to: list[int], wards: list[int],
                  void: threading.Event, agree: bool) -> None:
        _delay_for_tests(step, self.rank)
        works = []
        if to:
            ring.wait(start=False)  # sealed: its checksums exist (started by the training thread)
            slot = ring.slot(step)
            for h in to:
                works += transfer.send([(slot, self.parts, True)], h, self.group)
        for w in wards:
            (got,) = transfer.recv_headers(w, self.group)
            if void.is_set():
                return
            slot = self.held[w].take(got.step)
            slot.ensure(got.layout)
            transfer.recv_bodies(w, self.group, [got], slot)
            if void.is_set():
                return
            slot.seal({"step": got.step, "layout": got.layout.to_json(), "sums": got.sums,
                       "meta": got.meta})
        transfer.wait_all(works)
        if agree:
            ring.settle(start=False)  # this rank's own snapshot of the step, sealed or failed
            dist.barrier(group=self.group)

    def held_steps(self) -> dict[int, list[int]]:
        return {w: r.steps() for w, r in self.held.items()}

    def nbytes(self) -> int:
        return sum(r.nbytes() for r in self.held.values())

    def job_rank(self, rank: int) -> int:
        return self.names[rank] if self.names is not None else rank

    def adopt(self, old: "CopyExchange") -> None:
        """Keep the copies ``old`` held for wards this rank still holds (a rebuild of groups),
        matched by job rank: the world's ranks change when the job shrinks."""
        mine = {self.job_rank(w): w for w in self.held}
        for w, ring in old.held.items():
            now = mine.get(old.job_rank(w))
            if now is not None:
                self.held[now].close()
                self.held[now] = ring


def _delay_for_tests(step: int, rank: int) -> None:
    """``FR_TEST_COPY_DELAY=STEP:SECONDS[:RANK]``: hold the exchange of that step back (on that
    rank only, or on every rank), so that a test can make a fault land while it is in flight;
    a replacement that redoes the step is not held back."""
    spec = os.environ.get("FR_TEST_COPY_DELAY")
    if spec and os.environ.get("FR_REPLACEMENT") != "1":
        at, seconds, *only = spec.split(":")
        if int(at) == step and (not only or int(only[0]) == rank):
            time.sleep(float(seconds))
