"""The recovery procedure on one rank, once a plan has opened a new generation.

``rebuild``: the framework lets go of its groups, the old world is destroyed, the new
generation's world is joined on its own store prefix, the framework's groups are built again with
the same topology (every cached reference rebound, none to an old group left), and the runtime's
own group and copy plan after them.

``sync``: every rank reports what it holds (``recovery_point.RankReport``); from the same reports
every rank decides the recovery point and where each lost rank's state comes from
(``recovery_point.decide``); the sources send it (``transfer``), each lost rank pulling from all its
sources at once; every rank restores the point in place, checksums verified first, and the holders
that lack a copy of it get it again before training resumes. When no step can be assembled, every
rank falls back to the framework's disk checkpoint, or the job stops with the reason.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Optional

import torch.distributed as dist

from . import recovery_point, reshard_exchange, transaction, transfer
from .errors import RecoveryImpossible, RecoveryRequested
from .integration import RankState
from .layout import ChecksumError, Layout
from .state_machine import State

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("fr_megatron.runtime")


class Recovery:
    def __init__(self, session: "Session"):
        self.s = session
        self.last: dict = {}  # what the last sync found, for the recovery report

    def rebuild(self, plan: dict) -> None:
        s = self.s
        s.sm.to(State.REBUILDING, s.generation, s.step)
        t = [time.monotonic()]
        if s.integration:
            s.integration.teardown()  # the framework lets go of its groups first
        old_groups = s.comms.destroy_world() if s.comms else []
        t.append(time.monotonic())
        s.enter_generation(plan)
        s.comms.init_world(s.generation, s.superseded)
        t.append(time.monotonic())
        if s.integration:
            if s.integration.rebuild():  # built again at a new data-parallel size
                s.tx.guard(s.integration.optimizers())
            stale = s.integration.old_group_references(old_groups)
            if stale:
                raise RecoveryImpossible(f"{stale} references to old groups survived the rebuild")
        t.append(time.monotonic())
        s.build_runtime_groups()
        t.append(time.monotonic())
        log.info("rank=%d generation=%d step=%d phase=rebuild teardown %.3fs world %.3fs "
                 "framework groups %.3fs runtime groups %.3fs", s.rank, s.generation, s.step,
                 *(b - a for a, b in zip(t, t[1:])))
        s.sm.to(State.SYNCING, s.generation, s.step)

    # ---- agreeing on the point and restoring it ------------------------------------------
    def sync(self, plan: dict) -> int:
        """Agree on the recovery point, restore every rank to it, return the step to redo."""
        s, tx = self.s, self.s.tx
        me = s.world_rank  # reports, sources and transfers are in ranks of the new world
        s.phase_name = "restore"
        me_lost = s.rank in plan["replaced"] or not s.has_state
        mine = recovery_point.RankReport(
            lost=me_lost, ring=tx.ring.steps(), held=tx.copies.held_steps(),
            committed=-1 if me_lost else tx.committed,
            refused=self._check_inherited() if me_lost else [],
            fresh=s.fresh and not s.has_state)
        wire: list = [None] * s.world_size
        dist.all_gather_object(wire, mine.to_wire(), group=s.group)
        reports = [recovery_point.RankReport.from_wire(w) for w in wire]
        lost = {r for r, rep in enumerate(reports) if rep.lost}
        offers = self._offer_old_shards(me_lost, lost)
        decision = recovery_point.decide(reports, tx.replica_of, tx.shard_replicas_of, tx.plan,
                                         allowed=offers.allowed if offers else None)
        if decision is None:
            return self._no_live_state(reports, lost)
        point = decision.point
        if offers and offers.needed(point) and offers.finished is not None:
            decision.steps_lost = min(decision.steps_lost, max(0, offers.finished - point))
        if me in decision.sources:
            tx.ring.drop_after(point)
        t_move = time.perf_counter()
        self._transfer(decision)
        if lost:  # what the steps up to the point returned, for the lost ranks too
            self._share_history(point, lost)
        # every rank now restores the state that ends step ``point``, to redo ``point + 1``
        # (injections at phase "restore" fire here: a replacement lost while it restores)
        s.step = point + 1
        s.injector.at_phase(s.step, s.phase_name)
        try:
            old_shards = offers.exchange(point, decision) if offers else None
            kept = not me_lost and old_shards is None and tx.live_is(point)
            transaction.restore(s.integration, self._live_state(point) if kept else
                                tx.ring.get(point, verify=s.cfg.verify_checksums), old_shards)
            moved = (tx.ring.slot(point).layout.total, time.perf_counter() - t_move)
        except ChecksumError as e:
            s.link.send("fatal", reason=str(e), step=point, last_good_step=point)
            log.error("rank=%d generation=%d step=%d phase=restore %s", s.rank, s.generation,
                      point, e)
            raise
        tx.ring.drop_after(point)
        s.history = {k: v for k, v in s.history.items() if k <= point}
        restored = None
        if me in decision.sources:  # where its state came from, in job ranks
            sources = {part: s.members[src] for part, src in decision.sources[me].items()}
            restored = {"from": sources, "bytes": moved[0], "seconds": round(moved[1], 4)}
        # after a re-partition the ring keeps the point in the old partition, as every rank's
        # does, until a step of the new one is durable everywhere (``StepTransaction.commit``)
        self._settle(point, decision.steps_lost, lost, decision.resend, restored=restored,
                     kept_live=kept)
        log.info("rank=%d generation=%d step=%d phase=restore recovered to step %d%s",
                 s.rank, s.generation, point, point,
                 " from its predecessor's snapshot" if decision.sources.get(me, {})
                 .get("unique") == me else "")
        return point + 1

    def _live_state(self, point: int) -> RankState:
        """What a rank whose live tensors are still those of ``point`` restores (the fault came
        before its optimizer stepped again, as in a forward or a backward): those tensors, onto
        themselves (copies that do nothing), with the meta (RNG, counters, scheduler) of the
        point's snapshot. The snapshot is still checked, as every rank's is at a recovery: a
        later fault, or a peer it serves now, may need it. No copy of the state; the restore's
        collectives it runs as every rank does. Every other rank restores the snapshot itself."""
        s = self.s
        slot = s.tx.ring.slot(point)
        if s.cfg.verify_checksums:
            slot.verify(s.tx.ring.parts)
        live = s.integration.capture()
        return RankState(live.replicated, live.unique, slot.meta())

    def _offer_old_shards(self, me_lost: bool, lost: set) -> Optional["_OldShards"]:
        """For a job whose unique state is partitioned by the data-parallel size and can change
        it (a shrink or grow): what every rank offers of older partitions
        (``reshard_exchange``), else None. Every rank takes the same branch."""
        s, tx = self.s, self.s.tx
        if s.integration is None or not s.integration.shrinkable or \
                s.integration.shard_layout() is None:  # computed once per partition
            return None
        gone = [r for r in range(s.job_size) if r not in s.members]
        tx.departed.update(reshard_exchange.rings_left_behind(
            tx.snapshot_dir, s.cfg.snapshot_depth, [r for r in gone if r not in tx.departed]))
        rings = dict(tx.departed)
        own = None if me_lost or s.fresh else s.rank
        if own is not None:
            rings[own] = tx.ring
        offers = reshard_exchange.announce(rings, s.integration.shard_layout(), own, s.group,
                                           s.world_size)
        return _OldShards(self, offers, rings, sorted(lost), gone)

    def _check_inherited(self) -> list[str]:
        """A replacement offers what its predecessor left in shared memory only once checked;
        returns what it refused, and why."""
        s, tx = self.s, self.s.tx
        refused = [f"rank {s.rank}'s snapshot of step {step}: {why}"
                   for step, why in tx.ring.validate()]
        for ward, ring in tx.copies.held.items():
            refused += [f"the copy of rank {s.members[ward]} held by rank {s.rank}, step "
                        f"{step}: {why}" for step, why in ring.validate()]
        for why in refused:
            log.warning("rank=%d generation=%d step=%d phase=restore refused %s", s.rank,
                        s.generation, s.step, why)
        return refused

    def _transfer(self, decision: recovery_point.RecoveryPlan) -> None:
        """Send and receive the lost ranks' state of the point, every source in parallel,
        straight from the sources' slots into the lost rank's slot of the point (laid out as
        the sources announce: a replacement's own optimizer may not have its state yet)."""
        s, tx = self.s, self.s.tx
        me = s.world_rank
        point, works, pulls = decision.point, [], []
        for (src, dst), messages in decision.transfers(tx.plan).items():
            if src == me:
                works += transfer.send(
                    [(tx.ring.slot(point) if origin == "ring" else
                      tx.copies.held[dst].slot(point),
                      tuple(p for p in parts if p != "meta"), "meta" in parts)
                     for origin, parts in messages], dst, s.group)
            elif dst == me:
                pulls.append(src)
        if pulls:
            with ThreadPoolExecutor(len(pulls), thread_name_prefix="fr-pull") as pool:
                announced = dict(zip(pulls, pool.map(
                    lambda src: transfer.recv_headers(src, s.group), pulls)))
                got = [g for gs in announced.values() for g in gs]
                slot = tx.ring.take(point)
                slot.ensure(Layout.assemble(tx.ring.parts, {
                    part: g.layout for g in got for part in g.parts}))
                list(pool.map(lambda src: transfer.recv_bodies(src, s.group, announced[src],
                                                               slot), pulls))
            slot.seal({"step": point, "layout": slot.layout.to_json(),
                       "sums": {k: v for g in got for k, v in g.sums.items()},
                       "meta": next((g.meta for g in got if g.meta_len), b"")})
        transfer.wait_all(works)

    def _share_history(self, upto: int, lost: set) -> None:
        """What the steps up to ``upto`` returned, from the first survivor to every rank."""
        s = self.s
        survivors = sorted(set(range(s.world_size)) - lost)
        history = [{k: v for k, v in s.history.items() if k <= upto}]
        if survivors:
            dist.broadcast_object_list(history, src=survivors[0], group=s.group)
        s.history = history[0]

    def _no_live_state(self, reports: list, lost: set) -> int:
        """No step can be assembled for every lost rank from live peers: fall back to the disk
        checkpoint when there is one, else stop the job with the reason."""
        s = self.s
        reason = (f"ranks {sorted(lost)} and every holder of their copies are lost; "
                  "no consistent state among live peers")
        refused = [why for rep in reports for why in rep.refused]
        if refused:
            reason += "; refused: " + "; ".join(refused)
        if s.cfg.checkpoint_dir:  # every rank takes this branch: the reports are the same
            resume = self._fall_back_to_checkpoint(reports, lost)
            if resume is not None:
                return resume
            reason += f", and {s.cfg.checkpoint_dir} holds no checkpoint to fall back to"
        good = min((rep.committed for rep in reports if not rep.lost), default=-1)
        if s.cfg.shrink != "never" and s.integration.shrinkable and len(lost) < len(reports):
            # the job can go on without them: the controller removes their replicas, and
            # every rank, theirs too, waits for that plan (``launcher.shrink``)
            if s.world_rank == min(set(range(len(reports))) - lost):
                s.link.send("state_lost", ranks=sorted(s.members[r] for r in lost),
                            generation=s.generation, step=s.step, reason=reason)
            log.warning("rank=%d generation=%d step=%d phase=restore %s: waiting for the job to "
                        "go on without them", s.rank, s.generation, s.step, reason)
            raise RecoveryRequested(reason)
        s.link.send("fatal", reason=reason, step=s.step, last_good_step=good)
        raise RecoveryImpossible(reason)

    def _fall_back_to_checkpoint(self, reports: list, lost: set) -> Optional[int]:
        """No live copy of a lost rank's state: every rank loads the framework's latest disk
        checkpoint instead, and the steps since it are redone (and reported as lost)."""
        s, tx = self.s, self.s.tx
        step = s.integration.load_checkpoint(s.cfg.checkpoint_dir)
        if step is None:
            return None
        finished = [rep.committed for rep in reports if not rep.lost]
        steps_lost = max(0, min(finished) - step) if finished else 0
        self._share_history(step, lost)
        tx.ring.drop_after(-1)
        tx.ring.write(step, transaction.capture(s.integration, step))
        everyone = {r: hs for r, hs in tx.plan.holders.items() if hs}
        self._settle(step, steps_lost, lost, everyone, fallback=True)
        log.warning("rank=%d generation=%d step=%d phase=restore no live copy of ranks %s: fell "
                    "back to the checkpoint of step %d in %s (%d steps redone)", s.rank,
                    s.generation, step, sorted(lost), step, s.cfg.checkpoint_dir, steps_lost)
        if s.world_rank == 0:
            s.event("fallback_to_checkpoint", checkpoint_step=step, steps_lost=steps_lost,
                    lost=sorted(lost), directory=s.cfg.checkpoint_dir)
        return step + 1

    def _settle(self, point: int, steps_lost: int, lost: set, resend: dict[int, list[int]],
                fallback: bool = False, restored: Optional[dict] = None,
                kept_live: bool = False) -> None:
        """Every rank stands at ``point`` now: its counters, its copies, what it will report (a
        lost rank: where its state came from, how many bytes, how long from the decision to
        the state restored in place). Holders that lack a copy of the point (a replaced holder,
        a copy that was in flight) get it again before training resumes."""
        s = self.s
        s.step = point
        s.tx.settled(point)
        s.has_state = True
        me = s.world_rank
        to = resend.get(me, [])
        s.tx.resend(point, to, sorted(r for r, hs in resend.items() if me in hs))
        if to:
            log.info("rank=%d generation=%d step=%d phase=restore copy of step %d sent again "
                     "to holders %s", s.rank, s.generation, point, point, to)
        self.last = {"recovery_point": point, "steps_lost": steps_lost, "lost": sorted(lost),
                     "restored_t": time.monotonic(), **({"fallback": True} if fallback else {}),
                     **({"restored": restored} if restored else {}),
                     **({"kept_live_state": True} if kept_live else {})}


class _OldShards:
    """The older partitions' snapshots on offer during one recovery (``reshard_exchange``)."""

    def __init__(self, recovery: Recovery, offers, rings: dict, lost: list[int],
                 gone: list[int]):
        self.r, self.offers, self.rings, self.lost = recovery, offers, rings, lost
        # the newest step kept of each rank that left the world: like a lost rank, one that
        # left had finished no step past it
        newest = [max(st) for o in gone if (st := {s for offered in offers.steps
                                                   for s in offered.get(o, {})})]
        self.finished = min(newest, default=None)

    def needed(self, point: int) -> bool:
        """Whether ``point`` is held in another partition than the live one somewhere."""
        return any(point in stale for stale in self.offers.stale)

    def allowed(self, point: int) -> bool:
        """A point held in an old partition needs that whole partition on offer, the
        snapshots of ranks that left the world included."""
        return not self.needed(point) or self.offers.complete(point, self.lost)

    def exchange(self, point: int, decision) -> Optional[list]:
        """The old shards of this rank's position at ``point``, or None when no rank needs a
        re-partition there. A lost rank offers what its sources sent it."""
        if not self.needed(point):
            return None
        s = self.r.s
        for x in decision.sources:
            if x not in decision.fresh:
                self.offers.add(s.members[x], x, point)
        if s.world_rank in decision.sources and s.world_rank not in decision.fresh:
            self.rings[s.rank] = s.tx.ring
        t0 = time.perf_counter()
        got = reshard_exchange.exchange(self.offers, self.rings, point, s.world_rank, s.group,
                                        verify=s.cfg.verify_checksums)
        log.info("rank=%d generation=%d step=%d phase=restore %d snapshots of the old partition "
                 "gathered in %.3fs", s.rank, s.generation, point, len(got),
                 time.perf_counter() - t0)
        return got
