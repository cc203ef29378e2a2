"""How far this process has got in its communication, per group: what hang blame compares.

A hung rank stops before a collective; its peers block inside it. Step and phase cannot tell
them apart (all report the same), but the collectives entered can: the culprit has entered one
fewer on the group its peers wait in. The runtime wraps the operation methods of torch's
``ProcessGroup`` class once per process (``install``). Every collective and point-to-point call
reaches one of them, whoever makes it: megatron-core (including the functions it binds at import
time, such as ``dist_all_gather_func``), DeepSpeed's ``deepspeed.comm``, the runtime's own
transfers. Per key (``protocol.progress``: a group, or an ordered pair of ranks in it for
point-to-point) the wrapper counts the operations entered and keeps a weak reference to the
newest one's ``Work``. The rank is *inside* that key while the Work has not completed
(``Work.is_completed``: gloo completes a work when its op is done, NCCL when its kernel is,
which is the state NCCL's flight recorder keeps too). That covers a blocking call, whose Work
its caller waits on, ``async_op=True`` waited on later, and batched isend/irecv alike; a
blocking call that returns no Work (``monitored_barrier``) is inside while it runs. gloo marks a
point-to-point Work complete only when it is waited on, so a rank holding an isend or irecv it
has not waited on yet counts as inside (megatron's pipeline waits at once, unless it overlaps
its p2p communication).

torch's own per-group sequence numbers (``_get_sequence_number_for_group``) are not used: on gloo
they count point-to-point operations too, so the members of a pipeline group do not agree on
them, and they cannot say whether an operation is still in flight.

Not seen: operations issued from C++ (torch's DDP reducer, functional collectives under
``torch.compile``); the controller then judges by step and phase alone.

The hot path is a dictionary lookup and a counter update per operation; counters start at zero
on every generation (``reset``, called when the world is destroyed), as the groups do.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Callable, Optional

import torch.distributed as dist

from ..protocol import progress

log = logging.getLogger("fr_megatron.comm_progress")

# ProcessGroup methods that run one collective over the whole group
COLLECTIVES = ("allreduce", "allreduce_coalesced", "allgather", "allgather_coalesced",
               "allgather_into_tensor_coalesced", "all_gather_single",
               "all_gather_single_coalesced", "_allgather_base", "reduce_scatter",
               "reduce_scatter_single", "reduce_scatter_single_coalesced",
               "reduce_scatter_tensor_coalesced", "_reduce_scatter_base", "broadcast", "reduce",
               "gather", "scatter", "alltoall", "alltoall_base", "all_to_all_single", "barrier",
               "monitored_barrier")

_RUNNING = object()  # in place of a Work while a call that may block runs


class _Armed:
    """An injection waiting for the ``nth`` operation on one of ``groups`` during ``phase``;
    it fires before the operation, or, ``inside``, once the operation is done but before the
    rank leaves it."""

    def __init__(self, groups: list, phase: str, nth: int, fire: Callable[[], None],
                 inside: bool = False):
        self.groups, self.phase, self.left, self.fire = groups, phase, nth, fire
        self.inside = inside


class _Group:
    """One group's records: its collectives', and its point-to-point channels' by (peer, sending).
    Keys are made once per group and channel, not per operation."""

    __slots__ = ("name", "ranks", "collective", "channels")

    def __init__(self, name: str, ranks: tuple):
        self.name, self.ranks = name, ranks
        self.collective: Optional[list] = None
        self.channels: dict[tuple, list] = {}


class Progress:
    """The counters of one process (``TRACKER``)."""

    def __init__(self):
        self.records: dict[str, list] = {}   # key -> [count, weakref to Work | _RUNNING | None]
        self._groups = weakref.WeakKeyDictionary()  # ProcessGroup -> _Group, or None: not counted
        self._coalescing: dict = {}          # ProcessGroup -> records entered while coalescing
        self.rank: Optional[int] = None
        self.armed: list[_Armed] = []
        self.current_phase: Callable[[], str] = lambda: ""
        self._main = threading.main_thread().ident
        # the training thread's newest operation: (record, its count then)
        self._main_op: Optional[tuple] = None

    def reset(self) -> None:
        """Forget every group and count: the world they belonged to is gone."""
        self.records = {}
        self._groups = weakref.WeakKeyDictionary()
        self._coalescing = {}
        self.rank = None
        self._main_op = None

    def main_inside(self) -> Optional[tuple]:
        """The operation the training thread is inside, as a value that stays the same while it
        is the same operation (its key and count), or None when it is inside none; safe to call
        from another thread."""
        op = self._main_op
        if op is None:
            return None
        rec, count = op
        return (id(rec), count) if rec[0] == count and _inside(rec[1]) else None

    def main_key(self) -> Optional[str]:
        """The key (``protocol.progress``) of the training thread's newest operation, if any."""
        op = self._main_op
        return None if op is None else \
            next((k for k, rec in list(self.records.items()) if rec is op[0]), None)

    def report(self) -> dict[str, list]:
        """{key: [count, 1 if inside now else 0]}; safe to call from another thread."""
        return {k: [n, int(_inside(w))] for k, (n, w) in list(self.records.items())}

    # ---- the hot path ------------------------------------------------------------------
    def _group(self, pg) -> Optional[_Group]:
        g = self._groups.get(pg, False)
        if g is False:
            try:
                g = _Group(pg.group_name, tuple(dist.get_process_group_ranks(pg)))
            except Exception:  # not a group of this world's registry: not counted
                g = None
            self._groups[pg] = g
        return g

    def _record(self, key: str) -> list:
        return self.records.setdefault(key, [0, None])

    def collective(self, pg) -> Optional[list]:
        """The record of ``pg``'s collectives, or None when the group is not counted."""
        g = self._group(pg)
        if g is None:
            return None
        if g.collective is None:
            g.collective = self._record(progress.collective_key(g.name, g.ranks))
        return g.collective

    def channel(self, pg, peer, sending: bool) -> Optional[list]:
        """The record of this rank's sends to (or receives from) group rank ``peer``."""
        g = self._group(pg)
        if g is None:
            return None
        rec = g.channels.get((peer, sending))
        if rec is None:
            if not isinstance(peer, int) or not 0 <= peer < len(g.ranks):
                return None
            if self.rank is None:
                self.rank = dist.get_rank()
            other = g.ranks[peer]
            src, dst = (self.rank, other) if sending else (other, self.rank)
            rec = g.channels[(peer, sending)] = self._record(
                progress.channel_key(g.name, src, dst))
        return rec

    def enter(self, pg, rec: list) -> Optional[Callable[[], None]]:
        """Count an operation entered; returns an injection to fire once it is done, if any."""
        after = self._check_armed(pg) if self.armed else None
        rec[0] += 1
        rec[1] = _RUNNING
        if threading.get_ident() == self._main:
            self._main_op = (rec, rec[0])
        if self._coalescing and pg in self._coalescing:
            self._coalescing[pg].append(rec)
        return after

    # ---- injections at the nth operation of a group ------------------------------------
    def arm(self, groups: list, phase: str, nth: int, fire: Callable[[], None],
            inside: bool = False) -> None:
        self.armed.append(_Armed(groups, phase, nth, fire, inside))

    def disarm(self) -> list[_Armed]:
        left, self.armed = self.armed, []
        return left

    def _check_armed(self, pg) -> Optional[Callable[[], None]]:
        if threading.get_ident() != self._main:
            return None  # the runtime's own background traffic is not the training step's
        phase = self.current_phase()
        for a in list(self.armed):
            if a.phase == phase and any(pg is g for g in a.groups):
                a.left -= 1
                if a.left <= 0:
                    self.armed.remove(a)
                    if a.inside:
                        return a.fire
                    a.fire()  # before the operation: this rank never enters it
        return None


def _inside(w) -> bool:
    if w is None:
        return False
    if w is _RUNNING:
        return True
    work = w()
    if work is None:
        return False  # its caller let it go: nobody waits on it
    try:
        return not work.is_completed()
    except Exception:
        return False


TRACKER = Progress()


def _done(rec: list, work) -> None:
    try:
        rec[1] = weakref.ref(work) if work is not None else None
    except TypeError:
        rec[1] = None


def _tracked(pg, rec: Optional[list], call: Callable):
    """Run one operation, counted on ``rec`` (None: not counted) while it is in flight."""
    if rec is None:
        return call()
    after = TRACKER.enter(pg, rec)
    try:
        work = call()
        if after is not None:  # an injection inside the operation: its peers are through it
            if work is not None:
                work.wait()
            after()
    except BaseException:
        rec[1] = None
        raise
    _done(rec, work)
    return work


def _wrap_collective(orig):
    def op(pg, *args, **kwargs):
        return _tracked(pg, TRACKER.collective(pg), lambda: orig(pg, *args, **kwargs))
    op.__wrapped__ = orig
    return op


def _wrap_p2p(orig, sending: bool):
    def op(pg, tensors, peer=None, *args, **kwargs):
        if peer is None:
            peer = kwargs.pop("dstRank" if sending else "srcRank", None)
        return _tracked(pg, TRACKER.channel(pg, peer, sending),
                        lambda: orig(pg, tensors, peer, *args, **kwargs))
    op.__wrapped__ = orig
    return op


def _wrap_start_coalescing(orig):
    def start(pg, *args, **kwargs):
        TRACKER._coalescing[pg] = []
        return orig(pg, *args, **kwargs)
    start.__wrapped__ = orig
    return start


def _wrap_end_coalescing(orig):
    def end(pg, *args, **kwargs):
        recs = TRACKER._coalescing.pop(pg, [])
        work = orig(pg, *args, **kwargs)
        for rec in recs:  # one Work stands for every operation of the batch
            _done(rec, work)
        return work
    end.__wrapped__ = orig
    return end


_installed = False


def install() -> None:
    """Wrap ``ProcessGroup``'s operation methods; once per process, before any group is used."""
    global _installed
    if _installed:
        return
    pg_cls = dist.ProcessGroup
    for name in COLLECTIVES:
        orig = getattr(pg_cls, name, None)
        if orig is not None:
            setattr(pg_cls, name, _wrap_collective(orig))
    for name, sending in (("send", True), ("recv", False)):
        setattr(pg_cls, name, _wrap_p2p(getattr(pg_cls, name), sending))
    if hasattr(pg_cls, "_start_coalescing"):
        pg_cls._start_coalescing = _wrap_start_coalescing(pg_cls._start_coalescing)
        pg_cls._end_coalescing = _wrap_end_coalescing(pg_cls._end_coalescing)
    _installed = True
    log.debug("counting collectives per group: %d ProcessGroup methods wrapped",
              len(COLLECTIVES) + 2)
