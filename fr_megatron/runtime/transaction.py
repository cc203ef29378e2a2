"""The step transaction of one rank: commit a step's state, keep it durable, put it back.

``commit(step, live)`` starts copying the state into the snapshot ring (``snapshot``; in the node's
shared memory, where it outlives the process) and, where a copy is needed (``failure_domains``),
sending the unique state to its holders (``redundancy``). Both run in the background during the
next step: the snapshot must have read the state before that step's optimizer changes it
(``before_optimizer``; on a GPU the optimizer's kernels wait for the copy on the device); the
copies, and every rank's agreement that the step is durable everywhere, before the next commit
(``wait_durable``). A step counts as finished for a recovery
once its snapshot is sealed. With the snapshot in process memory the commit itself waits: there
the copy is the step's only protection against a process fault.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any, Callable, Optional

import torch.distributed as dist

from ..config import FlashRecoveryConfig
from . import failure_domains, rng
from .integration import Integration, RankState
from .layout import Layout
from .redundancy import CopyExchange
from .snapshot import SnapshotRing, rank_ring

log = logging.getLogger("fr_megatron.transaction")


def capture(integration: Integration, step: int) -> RankState:
    """The live state, with what the runtime itself restores (the process's RNG) in its meta."""
    live = integration.capture()
    live.meta["fr/rng"] = rng.capture()
    live.meta["fr/step"] = step
    return live


def restore(integration: Integration, state: RankState, old_shards=None) -> None:
    """``old_shards``: when the data-parallel size changed, every old shard of this rank's model
    position (``reshard_exchange``), from which the integration takes its unique state."""
    if old_shards is None:
        integration.restore(state)
    else:
        integration.restore(state, old_shards=old_shards)
    if "fr/rng" in state.meta:
        rng.restore(state.meta["fr/rng"])


def model_replicas(replica_of: list[list[int]]) -> list[list[int]]:
    """The data-parallel replicas: the ranks that hold one copy of the model together, found
    from each rank's data-parallel peers (``replica_of[r]``, r among them): the ranks at the
    same position among their peers form one replica."""
    out: dict[int, list[int]] = {}
    for r, peers in enumerate(replica_of):
        out.setdefault(sorted(peers).index(r), []).append(r)
    return [out[i] for i in sorted(out)]


def _median(values: list[float]) -> Optional[float]:
    return round(sorted(values)[len(values) // 2], 5) if values else None


class StepTransaction:
    def __init__(self, rank: int, cfg: FlashRecoveryConfig, snapshot_dir: Optional[str],
                 handover_dir: Optional[str] = None):
        self.rank, self.cfg = rank, cfg
        # the node agent's shared-memory directory: a replacement finds its predecessor's
        # snapshots there under the same name
        self.snapshot_dir = snapshot_dir if cfg.snapshot_dir else None
        self.ring = rank_ring(cfg.snapshot_depth, self.snapshot_dir, rank)
        # where a rank whose snapshots are in process memory leaves them when it leaves as
        # faulty (``hand_over``), and its replacement takes them from
        self.handover_dir = handover_dir
        if handover_dir:
            self.ring.take_over(handover_dir)
        self.copies: Optional[CopyExchange] = None
        # snapshots of ranks that left the world (a shrink), by job rank: the copies this rank
        # held for them, the rings they left in the node's shared memory; kept until a step of
        # the new partition is durable everywhere (``reshard_exchange``)
        self.departed: dict[int, SnapshotRing] = {}
        self._departed_until = -1
        self.plan: Optional[failure_domains.CopyPlan] = None
        self.replica_of: list[list[int]] = []
        self.shard_replicas_of: list[list[int]] = []
        self.committed = -1
        # whether the live tensors may have changed since the last commit: the guarded
        # optimizers' step is the first thing of a step to change them (``guard``); where no
        # optimizer is guarded, nothing says when they change (``live_is``)
        self.guarded = False
        self.live_changed = True
        self.durable_step = -1   # the newest step whose snapshot and copies are all in place
        self.commit_blocked_s: list[float] = []  # training-thread seconds per commit
        # a GPU snapshot's device-to-host copy waits until the next step's first forward is
        # queued (``start_copy``): while the host prepares that step's first batch and the GPU
        # waits for it, a copy of gigabytes into host memory slows the host down. The
        # integration sets this where it reports that moment. A copy on the host itself
        # starts at once: it is the host's own work and needs all the time there is.
        self.defer_copy = False
        # whether a fault plan has arrived: a wait for copies in flight gives up then
        self.interrupted: Callable[[], bool] = lambda: False

    def configure(self, integration: Integration, group, members: list[int], world_rank: int,
                  nproc: int, has_state: bool) -> Optional[dict]:
        """Who copies what to whom, the same on every rank (from every rank's replicas and
        whether its snapshot is in shared memory), over the runtime's ``group``, whose ranks are
        the job ranks ``members`` (a rank's failure domain is the node of its job rank). Returns
        the job's redundancy summary on the first configuration, else None."""
        if not self.ring.steps() and has_state:
            self.ring.reserve(capture(integration, self.committed))
        mine = (integration.replica_ranks(), integration.shard_replica_ranks(),
                self.ring.in_shared_memory)
        world_size = len(members)
        every: list = [None] * world_size
        dist.all_gather_object(every, mine, group=group)
        self.replica_of = [e[0] for e in every]
        self.shard_replicas_of = [e[1] for e in every]
        self.plan = failure_domains.copy_plan(world_size, nproc, self.replica_of,
                                              self.shard_replicas_of, [e[2] for e in every],
                                              self.cfg.replicas,
                                              nodes=[failure_domains.node_of(m, nproc)
                                                     for m in members])
        old = self.copies
        self.copies = CopyExchange(world_rank, self.plan.holders[world_rank],
                                   self.plan.wards(world_rank), self.plan.parts, group,
                                   self.cfg.snapshot_depth, self.snapshot_dir,
                                   interrupted=lambda: self.interrupted(),
                                   agree=world_size > 1, names=members)
        if old is None and self.handover_dir:
            for ring in self.copies.held.values():
                ring.take_over(self.handover_dir)
        if old is not None:
            self.copies.adopt(old)
            self.departed.update({old.job_rank(w): ring for w, ring in old.held.items()
                                  if old.job_rank(w) not in members})
            old.abandon()  # an exchange of the old groups, if any, is void
            return None
        in_shm = [e[2] for e in every]
        return {"snapshots": "shared memory" if all(in_shm) else
                "process memory" if not any(in_shm) else "mixed",
                "instances": max(len(r) for r in self.shard_replicas_of), **self.plan.summary(),
                "replicas": [[members[r] for r in rep]
                             for rep in model_replicas(self.replica_of)],
                "shrink": integration.shrinkable}

    def commit(self, step: int, live: RankState) -> None:
        t0 = time.perf_counter()
        # the last step must be durable on every rank before this one takes the ring's oldest
        # slot: a rank lost meanwhile can then still be put back at it (``redundancy``)
        self.wait_durable()
        if self.departed and self.durable_step > self._departed_until:
            for ring in self.departed.values():  # a later step is durable on every rank
                ring.close(remove=True)
            self.departed = {}
        on_gpu = any(t.is_cuda for part in (live.replicated, live.unique) for t in part.values())
        self.ring.write(step, live, defer=self.defer_copy and on_gpu)
        if self.copies is not None and self.copies.active:
            self.copies.start(step, self.ring)
        self.committed = step
        self.live_changed = False
        if not self.ring.in_shared_memory:
            self.wait_durable()
        self.commit_blocked_s.append(time.perf_counter() - t0)

    def start_copy(self) -> None:
        """The step's first work is queued: a deferred snapshot copy may start."""
        self.ring.start()

    def wait_durable(self) -> float:
        """Wait until the last commit's snapshot is sealed and its copies are in place; the
        seconds waited."""
        t0 = time.perf_counter()
        self.ring.wait()  # also a snapshot written outside a commit (a checkpoint fallback's)
        if self.durable_step < self.committed:
            if self.copies is not None:
                self.copies.wait()
            self.durable_step = self.committed
        return time.perf_counter() - t0

    def before_optimizer(self) -> None:
        """The state is about to change: the last commit's snapshot, which reads it, must be
        read (counted as time the training thread spent on that commit). Its checksums, its
        copies and the agreement that the step is durable everywhere run on until the next
        commit."""
        self.live_changed = True
        if self.commit_blocked_s:
            t0 = time.perf_counter()
            self.ring.wait_read()
            self.commit_blocked_s[-1] += time.perf_counter() - t0

    def wait_snapshot(self) -> None:
        """Wait until the last commit's snapshot is sealed (or failed to: then it is not in the
        ring); its copies to holders may still be in flight."""
        try:
            self.ring.wait()
        except Exception as e:  # noqa: BLE001 - the step is simply not in the ring
            log.warning("rank=%d step=%d snapshot not sealed: %s", self.rank, self.committed, e)

    def hand_over(self) -> int:
        """Leave this rank's snapshots and the copies it holds, where they are in process
        memory, for its replacement (a rank that leaves as faulty is still alive to do so).
        Returns the bytes written."""
        if not self.handover_dir:
            return 0
        rings = [self.ring, *(self.copies.held.values() if self.copies else ())]
        written = 0
        for ring in rings:
            try:
                written += ring.hand_over(self.handover_dir)
            except OSError as e:  # a full disk: the replacement restores from peers instead
                log.warning("rank=%d step=%d could not hand over %s: %s", self.rank,
                            self.committed, ring.name, e)
        return written

    def guard(self, optimizers) -> None:
        """Before each of ``optimizers``' steps changes the state, wait for the last commit
        (the training script may mark its optimizer phase only after the step, or not at all)."""
        # weakly: through the hook, the framework's optimizer must not reach the runtime's own
        # groups (the rebuild's walk would find them stale) nor keep this transaction alive
        optimizers = list(optimizers)
        self.guarded = self.guarded or bool(optimizers)
        wait = weakref.WeakMethod(self.before_optimizer)

        def before_step(*_):
            method = wait()
            if method is not None:
                method()
        for opt in optimizers:
            opt.register_step_pre_hook(before_step)

    def abandon(self) -> None:
        """A fault: let the last commit's snapshot seal before the recovery reads the ring or
        restores the live tensors (a snapshot that failed to seal is simply not in the ring).
        Its copies in flight are void, not waited for (``redundancy``): the recovery sends what
        holders lack again."""
        self.wait_snapshot()
        if self.copies is not None:
            self.copies.abandon()

    def settled(self, point: int) -> None:
        """The rank stands at ``point`` again, its snapshot of it durable."""
        self.committed = self.durable_step = point
        self.live_changed = False
        self._departed_until = point

    def live_is(self, step: int) -> bool:
        """Whether the live tensors are still, bit for bit, those of ``step``: it is the last
        step committed (or restored) and no guarded optimizer has stepped since."""
        return self.guarded and not self.live_changed and self.committed == step

    def resend(self, point: int, to: list[int], wards: list[int]) -> None:
        """Send this rank's copy of ``point`` to ``to`` and take ``wards``' copies, now."""
        if to or wards:
            self.copies.start(point, self.ring, to=to, wards=wards)
            self.copies.wait()

    def stats(self, integration: Optional[Integration], step_times: list[float]) -> dict[str, Any]:
        """What this rank's redundancy costs it: bytes of state, of its snapshots and of the
        copies it holds; training-thread seconds per commit and per step (medians)."""
        layout = Layout.of(integration.capture() if integration else RankState())
        return {"state_bytes": layout.nbytes("replicated") + layout.nbytes("unique")
                + (integration.left_out_bytes() if integration else 0),
                "replicated_bytes": layout.nbytes("replicated"),
                "unique_bytes": layout.nbytes("unique"),
                "snapshot_bytes": self.ring.nbytes(),
                "snapshots_in_shared_memory": self.ring.in_shared_memory,
                "held_copy_bytes": self.copies.nbytes() if self.copies else 0,
                "commit_blocked_s_p50": _median(self.commit_blocked_s[1:]),
                "step_s_p50": _median(step_times)}

    def close(self) -> None:
        """The job's end: the last commit's snapshot sealed (its thread, inside a copy or a
        checksum, must not outlive the interpreter: it would abort the process as it exits)
        and its copies complete (every peer takes part)."""
        self.ring.settle()
        if self.copies is not None:
            self.copies.wait()
