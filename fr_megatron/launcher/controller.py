"""The job's controller: hosts the store, watches every rank, decides, opens new generations.

One per job. It owns the TCPStore that every rank and agent rendezvous on (so the store
outlives any rank), reads heartbeats, takes fault reports from agents and workers, and for each
fault: fixes which ranks are replaced, or removed with their data-parallel replicas
(``shrink``), bumps the generation and publishes the signed plan that wakes every survivor and
agent; once their own slots or a spare node are free it takes removed replicas back (a grow).
It writes the event journal and, at the end, the JSON report.

If the controller itself dies, agents see the store go away and stop their workers; the
journal keeps the last good step (see README, "Failure model").
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from ..config import FlashRecoveryConfig, parse_address
from ..events import Journal, WandbSink
from ..protocol import keys
from ..protocol.auth import AuthError, ReplayGuard, Signer, read_token
from ..protocol.store import connect, host_store
from ..runtime.inject import parse as parse_inject
from .detector import RankView, fault_time, find_hang
from .shrink import Shrink, ShrinkImpossible, shrink, shrinks

log = logging.getLogger("fr_megatron.controller")

FAULT_KINDS = ("crash", "segv", "exit", "exit0_early", "exception", "hang", "hang_gil", "stop",
               "node_lost", "stuck", "state_lost")
# what a rank reports about itself before it exits: more precise than its exit code
SELF_REPORTED = ("exception", "stuck")
DEBOUNCE_S = 0.03  # reports arriving this close together are decided as one fault
MAX_FAILED_RESTARTS = 3  # a rank replaced this often in a row without recovering is not again
# how a script fails, as opposed to how a process is lost: in its start-up (before it has
# committed its first training step, in the job's first generation) these stop the job at once,
# since a replacement would run into the same error; a crash, a hang or a lost node there is
# replaced as anywhere else
FAILURE_KINDS = ("exception", "exit", "exit0_early")


def startup_failure(kind: str, generation: int, committed: int) -> bool:
    """Whether a fault is a start-up failure (a bad flag, an import error, a script that
    exits): ``kind`` in ``FAILURE_KINDS``, in generation 0, before the rank committed step 1."""
    return kind in FAILURE_KINDS and generation == 0 and committed < 1


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _restored(r: Optional[dict]) -> dict:
    """A lost rank's restore in its fault's report entry: sources, bytes, seconds, GB/s."""
    if not r:
        return {"restored_from": None}
    return {"restored_from": r["from"], "restore_bytes": r["bytes"], "restore_s": r["seconds"],
            "restore_gb_s": round(r["bytes"] / r["seconds"] / 1e9, 3) if r["seconds"] else None}


def _sizes(members: list[int], replicas: Optional[list[list[int]]]) -> dict:
    """A world's size and data-parallel size (None before the ranks have said their replicas),
    as the report, the journal and wandb give them after a shrink or a grow."""
    return {"world_size": len(members),
            "data_parallel_size": len(replicas) if replicas is not None else None}


def _blame_fields(f: "Fault") -> dict:
    """What blamed a hang (``detector``): its evidence, and the operations its peers wait in."""
    return {k: f.detail[k] for k in ("evidence", "waits") if k in f.detail}


@dataclass
class Fault:
    rank: int
    kind: str
    step: int
    phase: str
    pid: int
    generation: int
    fault_t: float
    reported_t: float
    detail: dict = field(default_factory=dict)
    decision_t: Optional[float] = None
    new_generation: Optional[int] = None
    replacement: Optional[str] = None
    replacement_t: Optional[float] = None   # the agent handed the rank to a process
    replacement_pid: Optional[int] = None
    joined_t: Optional[float] = None        # that process joined the new generation's world
    action: str = "replace"                 # or "shrink": its data-parallel replica left
    after: dict = field(default_factory=dict)  # the world and data-parallel sizes after it


# what each kind of message a rank or an agent sends is handled by
_MESSAGE_KINDS = {"fault": "_on_fault", "stop_requested": "_on_stop_requested",
                  "saves_on_stop": "_on_saves_on_stop", "replaced": "_on_replaced",
                  "joined": "_on_joined", "recovered": "_on_recovered",
                  "finished": "_on_finished", "agent_started": "_on_agent_started",
                  "node_done": "_on_node_done", "fatal": "_on_fatal", "event": "_on_record",
                  "standby": "_on_standby", "state_lost": "_on_state_lost",
                  "ended_after_finishing": "_on_ended_after_finishing"}


@dataclass
class AgentView:
    """A node agent's liveness, by the controller's clock."""

    node: int
    spare: bool = False
    pid: Optional[int] = None
    seq: int = -1
    seen_t: float = 0.0
    lost: bool = False


@dataclass
class Recovery:
    """One generation change and what every rank said about it."""

    generation: int
    faults: list[Fault]
    decision_t: float
    survivor_pids: dict[int, int]
    members: list[int]                      # the job ranks of its generation's world
    grown: list[int] = field(default_factory=list)  # ranks taken back in (a grow, no fault)
    after: dict = field(default_factory=dict)       # a grow's world and data-parallel sizes
    prepare_s: Optional[float] = None               # a grow: its processes' start, trained over
    reports: dict[int, dict] = field(default_factory=dict)
    summary: Optional[dict] = None  # set once every rank reported its first step after it


class Controller:
    def __init__(self, world_size: int, nnodes: int, nproc_per_node: int, host: str, port: int,
                 token: bytes, cfg: FlashRecoveryConfig, report_path: Optional[str] = None,
                 run_name: str = "fr_megatron", inject: Optional[str] = None,
                 wandb_group: Optional[str] = None):
        self.world_size, self.nnodes, self.nproc = world_size, nnodes, nproc_per_node
        self.cfg = cfg
        self.signer = Signer(token, "controller")
        self.replay = ReplayGuard()
        self.store, self._sock = host_store(host, port)
        self.host, self.port = host, self._sock.getsockname()[1]
        self.journal = Journal(cfg.journal)
        self.report_path = report_path
        self.generation = 0
        # the job ranks of the current world: all of them until the job goes on with fewer
        # data-parallel replicas (``shrink``); ``views`` has exactly these
        self.members: list[int] = list(range(world_size))
        self.dp_replicas: Optional[list[list[int]]] = None  # from the ranks' redundancy event
        self.removed_replicas: list[list[int]] = []  # replicas a shrink took out, to grow back
        self.growing: Optional[dict] = None  # a grow whose processes are starting (``_grow``)
        self.views: dict[int, RankView] = {r: RankView(r) for r in range(world_size)}
        self.agents: dict[int, AgentView] = {}
        self.node_of: dict[int, int] = {r: r // nproc_per_node for r in range(world_size)}
        self.pending: dict[int, Fault] = {}
        self.recoveries: list[Recovery] = []
        self.rejected = 0
        self.done_nodes: set[int] = set()
        self.finished_ranks: set[int] = set()
        self.rank_stats: dict[int, dict] = {}   # what each rank said of itself at its end
        self.redundancy: Optional[dict] = None   # where snapshots live and who copies what
        self.fatal: Optional[str] = None
        self.restarts_without_progress: dict[int, int] = {}
        # ranks that failed too often in a row: their slot (device) takes no rank back on a grow
        self.broken_slots: set[int] = set()
        self.local_node: Optional[int] = None  # the node whose agent runs in this process
        self.plan_t = 0.0
        self.replaced_pids: set[int] = set()  # processes already decided on: later reports of
        # the same death (the agent's exit after the worker's own traceback) change nothing
        self.exit_code = 0
        self.failed_after_training: list[dict] = []  # ranks whose script failed after training
        self.injections = parse_inject(inject)
        # a stop by signal: {"signal", "by", "save", "force", "deadline", ...} (``request_stop``)
        self.stopping: Optional[dict] = None
        self.saving_ranks: set[int] = set()   # ranks that save a checkpoint on a stop signal
        self.exited_ranks: set[int] = set()   # ranks gone while the job stops
        # the newest step each rank is known to have committed, beside its heartbeats: from its
        # recovery and end reports, and its predecessor's beats when it was replaced
        self.rank_steps: dict[int, int] = {}
        self.checkpoints: list[dict] = []     # checkpoint_saved events
        self.startup_error: Optional[str] = None  # what the rank that failed in start-up wrote
        self._end_wake = None                 # where the job's end goes, when not the default
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # a fault reported: the serving loop times its decision
        self.wandb = WandbSink(cfg.wandb, run_name, {"world_size": world_size, "nnodes": nnodes},
                               group=wandb_group) if cfg.wandb.enabled else None
        self._shown_sizes: Optional[dict] = None  # the sizes the wandb run shows last
        self._publish_generation()

    # ---- the store protocol ------------------------------------------------------------
    def _publish_generation(self, plan: Optional[dict] = None, *, agents: bool = True,
                            ranks: bool = True):
        """The current generation's signed plan, for the agents (their wake key) and for the
        ranks (the plan key and the generation number); a grow publishes the two apart."""
        g = self.generation
        plan = plan or {"generation": g, "replaced": [], "faults": []}
        raw = self.signer.sign("plan", **plan)
        if ranks:
            self.store.set(keys.plan(g), raw)
        if agents:
            self.store.set(keys.agent_wake(g), raw)
        if ranks:
            self.store.set(keys.GENERATION, self.signer.sign("generation", generation=g))

    def _open_grow(self) -> None:
        """The prepared grow's generation opens for the ranks (``_grow``): its plan, which the
        grown processes wait for and which wakes every survivor."""
        growing, self.growing = self.growing, None
        g, plan = growing["generation"], growing["plan"]
        now = time.time()
        self.removed_replicas = [r for r in self.removed_replicas if r not in growing["back"]]
        survivors = {r: v.pid for r, v in self.views.items()}
        self.members, self.dp_replicas = plan["members"], growing["replicas"]
        self.node_of.update(growing["placement"])
        for r in plan["grown"]:
            self.views[r] = RankView(r, started_in=g)
        rec = Recovery(g, [], now, survivors, list(self.members), grown=plan["grown"],
                       after=_sizes(self.members, self.dp_replicas),
                       prepare_s=round(now - growing["decided_t"], 4))
        self.recoveries.append(rec)
        self.plan_t = now
        # the grow's generation is still the newest: a fault's or the end's comes after it
        self._publish_generation(plan, agents=False)
        self.journal.write("grow_opened", generation=g, ranks=plan["grown"],
                           prepare_s=rec.prepare_s, standby=sorted(growing["standby"]))

    def _receive(self, raw: bytes) -> Optional[dict]:
        try:
            body = self.signer.verify(raw)
            self.replay.check(body)
            return body
        except AuthError as e:
            self.rejected += 1
            self.journal.write("message_rejected", generation=self.generation, reason=str(e),
                               size=len(raw))
            return None

    # ---- threads -----------------------------------------------------------------------
    def serve(self) -> int:
        """Run until every node is done or the job is stopped; returns the job's exit code."""
        self.journal.write("controller_started", generation=0, address=f"{self.host}:{self.port}",
                           world_size=self.world_size, nnodes=self.nnodes)
        threads = [threading.Thread(target=self._events_loop, name="fr-events", daemon=True),
                   threading.Thread(target=self._heartbeat_loop, name="fr-heartbeats", daemon=True)]
        for t in threads:
            t.start()
        while not self._stop.is_set():
            self._wake.wait(self._until_next_decision())
            self._wake.clear()
            with self._lock:
                if self.fatal or (self.stopping and self._stop_complete(time.time())):
                    break  # a job that is stopping opens no new generation
                if self.stopping:
                    continue
                if self.pending and time.time() - min(f.reported_t for f in self.pending.values()) \
                        >= DEBOUNCE_S:
                    self._decide()
                elif self.removed_replicas and not self.pending:
                    self._grow()
                if self._all_nodes_done() or self._finished_while_growing() or self.fatal:
                    break
        self._finish()
        return self.exit_code

    def _all_nodes_done(self) -> bool:
        """Every node that hosts a rank of the world has seen all its ranks finish."""
        return {self.node_of[r] for r in self.members} <= self.done_nodes

    def _finished_while_growing(self) -> bool:
        """Every rank of the world finished while a grow's ranks were still starting: its
        generation never opens (``_on_standby``), and a node that hosts a grown rank would wait
        for it for ever. The job ends; its end tells the agents to stop the grown ranks."""
        return self.growing is not None and set(self.members) <= self.finished_ranks

    def _until_next_decision(self, tick: float = 0.05) -> float:
        """How long the serving loop may sleep: until the first pending fault has waited
        ``DEBOUNCE_S`` for others to join it, at most ``tick``."""
        with self._lock:
            first = min((f.reported_t for f in self.pending.values()), default=None)
        return tick if first is None else min(tick, max(0.0, first + DEBOUNCE_S - time.time()))

    def _events_loop(self):
        client = connect(self.host, self.port)
        client.set_timeout(datetime.timedelta(days=1))
        while not self._stop.is_set():
            try:
                raw = client.queue_pop(keys.EVENTS)
            except Exception as e:
                if self._stop.is_set():
                    return
                log.warning("event queue: %s", e)
                time.sleep(0.05)
                continue
            body = self._receive(raw)
            if body is not None:
                try:
                    self._on_event(body)
                except Exception:
                    log.exception("bad event %s", body.get("kind"))

    def _heartbeat_loop(self):
        """Sweep every node's beat (its agent's liveness and its ranks' newest heartbeats, see
        ``protocol.node_beats``); judge hangs and lost nodes.

        A sweep costs one multi_get of one key per node, and signature checks only for the node
        beats that changed since the last sweep; it never runs more often than it takes."""
        client = connect(self.host, self.port)
        last_raw: dict[str, bytes] = {}
        interval = max(0.02, self.cfg.heartbeat_interval / 4)
        took = 0.0
        while not self._stop.wait(max(interval, took)):
            t0 = time.monotonic()
            nodes = sorted(set(range(self.nnodes)) | set(self.agents))
            # a key, once written, stays: only the nodes not heard of yet are probed one by one
            present = [k for k in map(keys.agent, nodes) if k in last_raw or client.check([k])]
            values = client.multi_get(present) if present else []
            read_t = time.time()  # what this read saw is at least this old, however long the
            # signature checks below take
            beats = []
            for k, raw in zip(present, values):
                if last_raw.get(k) == raw:
                    continue  # not beaten since the last sweep
                last_raw[k] = raw
                try:
                    beats.append((k, self.signer.verify(raw)))
                except AuthError as e:
                    beats.append((k, e))
            now = time.time()
            with self._lock:
                for k, hb in beats:
                    if isinstance(hb, AuthError):
                        self.rejected += 1
                        self.journal.write("message_rejected", generation=self.generation,
                                           reason=f"node heartbeat {k}: {hb}")
                        continue
                    self._on_node_beat(int(k.rsplit("/", 1)[1]), hb, read_t)
                self._find_lost_nodes(now)
                if not self.pending:
                    self._judge_hangs(now)
            took = time.monotonic() - t0

    def _on_node_beat(self, node: int, hb: dict, now: float):
        if hb.get("node") != node:
            self.rejected += 1
            self.journal.write("message_rejected", generation=self.generation,
                               reason=f"node heartbeat of node {hb.get('node')} under node {node}")
            return
        a = self.agents.get(node)
        if a is not None:
            seq = hb.get("seq", -1)
            if hb.get("pid") == a.pid and seq <= a.seq:
                return  # an old beat played again says nothing about now
            a.pid, a.seq, a.seen_t = hb.get("pid"), seq, now
        ranks = hb.get("ranks")
        for r, rank_hb in (ranks.items() if isinstance(ranks, dict) else ()):
            rank = int(r)
            if (self.node_of.get(rank) != node or not isinstance(rank_hb, dict)
                    or rank_hb.get("rank") != rank or rank not in self.views):
                continue  # a node speaks only for the ranks it hosts
            if rank_hb.get("pid") in self.replaced_pids:
                continue  # the last beat of a replaced process says nothing of its rank
            self.views[rank].update(rank_hb, now)

    def _judge_hangs(self, now: float):
        blame = find_hang(self.views, self.generation, now, self.plan_t)
        if blame:
            v = self.views[blame.rank]
            detail = {"hang_timeout": v.hang_timeout, "evidence": blame.evidence}
            if blame.waits:
                detail["waits"] = blame.waits
            log.warning("rank=%d generation=%d step=%d phase=%s blamed for a %s: %s %s",
                        blame.rank, v.generation, v.step, v.phase, blame.kind,
                        ", ".join(blame.evidence), blame.waits or "")
            self._report_fault(Fault(blame.rank, blame.kind, v.step, v.phase, v.pid,
                                     v.generation, fault_t=fault_time(v.extra.get("inject_t"),
                                                                       v.progress_t, now),
                                     reported_t=now, detail=detail))

    # ---- node liveness -----------------------------------------------------------------
    def _find_lost_nodes(self, now: float):
        """A node whose agent has been silent for the node timeout is lost with all its ranks."""
        for a in self.agents.values():
            if a.lost or a.node in self.done_nodes or now - a.seen_t <= self.cfg.node_timeout:
                continue
            a.lost = True
            if self.growing is not None and a.node in self.growing["placement"].values():
                self._open_grow()  # its grown ranks are the world's now, and lost with it
            ranks = sorted(r for r, n in self.node_of.items() if n == a.node and r in self.views)
            self.journal.write("node_lost", generation=self.generation, node=a.node,
                               ranks=ranks, silent_s=round(now - a.seen_t, 3))
            for r in ranks:
                v = self.views[r]
                self._report_fault(Fault(r, "node_lost", v.step, v.phase, v.pid, v.generation,
                                         fault_t=a.seen_t, reported_t=now,
                                         detail={"node": a.node}))

    def _place(self, faults: list[Fault]) -> tuple[dict[int, int], dict[int, str]]:
        """Where the ranks of lost nodes go: one live, unused spare node per lost node; and the
        ranks that cannot be placed, with why."""
        moved: dict[int, int] = {}
        unplaced: dict[int, str] = {}
        lost_nodes = sorted({self.node_of[f.rank] for f in faults if f.kind == "node_lost"})
        free = sorted(n for n, a in self.agents.items() if a.spare and not a.lost
                      and n not in self.node_of.values())
        for node in lost_nodes:
            ranks = [r for r, n in self.node_of.items() if n == node and r in self.views]
            if not free:
                unplaced.update(dict.fromkeys(ranks, (
                    f"node {node} is lost and no spare node is left to take its ranks: start "
                    "one with `fr-megatron run --spare-node --node-rank K --controller "
                    "HOST:PORT ...`, or restart the job")))
                continue
            target = free.pop(0)
            for r in ranks:
                moved[r] = target
        return moved, unplaced

    def _shrink(self, lost: list[int]) -> tuple[Optional[Shrink], str]:
        """The world without the data-parallel replicas of ``lost``, or None and why not."""
        red = self.redundancy or {}
        if not red.get("shrink") or self.dp_replicas is None:
            return None, ("this job cannot go on with fewer data-parallel replicas (its "
                          "framework integration does not re-partition its state)")
        try:
            return shrink(self.members, self.dp_replicas, lost), ""
        except ShrinkImpossible as e:
            return None, str(e)

    def _last_good_step(self) -> int:
        """The newest step every rank is known to have committed (from its heartbeats, and
        from its own reports)."""
        live = [max(v.committed, self.rank_steps.get(r, -1)) for r, v in self.views.items()]
        return min(live) if live else -1

    def _rank_committed(self, rank: int, step: int) -> None:
        self.rank_steps[rank] = max(self.rank_steps.get(rank, -1), step)

    # ---- events ------------------------------------------------------------------------
    def _on_event(self, ev: dict):
        """One verified message from a rank or an agent, handled by its kind."""
        name = _MESSAGE_KINDS.get(ev["kind"])
        handler = getattr(self, name) if name else None
        with self._lock:
            if handler is None:
                self.journal.write("unknown_message_ignored", generation=self.generation,
                                   kind=str(ev["kind"])[:64])
            else:
                handler(ev)

    def _on_fault(self, ev: dict) -> None:
        rank = int(ev["rank"])
        if self.stopping or ev.get("fault") == "stop_signal":
            if ev.get("fault") == "stop_signal":  # a rank ended by SIGINT / SIGTERM
                self.request_stop(ev.get("signal", "SIGTERM"), f"rank {rank} (pid {ev.get('pid')})")
            if rank not in self.exited_ranks and ev.get("pid") not in self.replaced_pids:
                self.exited_ranks.add(rank)
                self.journal.write("rank_exited", generation=self.generation, rank=rank,
                                   how=ev.get("fault"), pid=ev.get("pid"),
                                   **{k: ev[k] for k in ("signal", "exit_code") if k in ev})
            return
        if rank not in self.views:  # its replica left the world; its agent ends it
            self.journal.write("removed_rank_exited", generation=self.generation, rank=rank,
                               pid=ev.get("pid"), how=ev.get("fault"))
            return
        v = self.views[rank]
        if ev.get("pid") in self.replaced_pids or (
                ev.get("pid") and v.pid and ev["pid"] != v.pid and v.generation == self.generation):
            # a report about a process that has already been replaced
            self.journal.write("stale_fault_ignored", generation=self.generation, rank=rank,
                               pid=ev["pid"])
            return
        self._report_fault(Fault(rank, ev["fault"], ev.get("step", v.step),
                                 ev.get("phase", v.phase), ev.get("pid", v.pid),
                                 ev.get("generation", self.generation),
                                 fault_t=ev.get("fault_t", ev["ts"]), reported_t=time.time(),
                                 detail={k: ev[k] for k in ("traceback", "exit_code", "signal",
                                                            "node", "stderr", "committed",
                                                            "operation", "stack",
                                                            "handed_over_bytes")
                                         if k in ev}))

    def _on_stop_requested(self, ev: dict) -> None:
        self.request_stop(str(ev.get("signal", "SIGTERM")), str(ev.get("by", "?")))

    def _on_saves_on_stop(self, ev: dict) -> None:
        self.saving_ranks.add(int(ev["rank"]))

    def _on_replaced(self, ev: dict) -> None:
        """An agent handed a replaced rank to a process."""
        for f in self._faults_of(ev["generation"], ev["rank"]):
            f.replacement, f.replacement_t = ev["how"], ev["ts"]
            f.replacement_pid = ev.get("pid")
        self._learn_pid(int(ev["rank"]), ev.get("pid"), int(ev["generation"]), handed=True)
        self.journal.write("replacement_started", generation=ev["generation"], rank=ev["rank"],
                           how=ev["how"], pid=ev.get("pid"))

    def _learn_pid(self, rank: int, pid: Optional[int], generation: int, handed: bool) -> None:
        """Know a restarted rank's process before its first beat arrives, so that a fault
        decided in between counts it among the survivors by its pid: from the agent that
        ``handed`` it the rank in the generation that restarted it, or from its own report of
        resuming training in that generation or a later one."""
        v = self.views.get(rank)
        if v is None or v.pid or not pid:
            return
        if generation == v.started_in or (not handed and generation > v.started_in):
            v.pid = int(pid)

    def _on_joined(self, ev: dict) -> None:
        """A replacement joined its generation's world."""
        for f in self._faults_of(ev["generation"], ev["rank"]):
            f.joined_t = ev["ts"]

    def _on_state_lost(self, ev: dict) -> None:
        """The ranks found no state for ``ranks`` among live peers (each lost with every holder
        of its copies): they cannot be replaced, only removed with their replicas."""
        for rank in ev.get("ranks", []):
            if rank in self.views:
                v = self.views[rank]
                self._report_fault(Fault(rank, "state_lost", ev.get("step", v.step), "restore",
                                         v.pid, ev.get("generation", self.generation),
                                         fault_t=ev["ts"], reported_t=time.time(),
                                         detail={"reason": ev.get("reason", "")}))

    def _on_standby(self, ev: dict) -> None:
        """A grown rank's process has started and waits for its generation to open."""
        growing = self.growing
        if growing is None or ev.get("generation") != growing["generation"]:
            return
        growing["standby"].add(int(ev["rank"]))
        # a job whose ranks have begun to finish ends as it is
        if growing["standby"] >= set(growing["plan"]["grown"]) and not self.finished_ranks \
                and not self.stopping:
            self._open_grow()

    def _faults_of(self, generation: int, rank: int) -> list[Fault]:
        return [f for rec in self.recoveries if rec.generation == generation
                for f in rec.faults if f.rank == rank]

    def _on_recovered(self, ev: dict) -> None:
        """A rank committed its first step after a recovery; once every rank has, the recovery
        (and any earlier one a new fault cut short) is complete."""
        self._rank_committed(int(ev["rank"]), int(ev.get("recovery_point", -2)) + 1)
        self._learn_pid(int(ev["rank"]), ev.get("pid"), int(ev["generation"]), handed=False)
        for rec in self.recoveries:
            if rec.generation != ev["generation"]:
                continue
            rec.reports[int(ev["rank"])] = ev
            if not set(rec.members) <= set(rec.reports):
                continue
            for older in self.recoveries:
                if older.generation <= rec.generation and older.summary is None:
                    older.reports = rec.reports
                    # a survivor of the older plan that a later one replaced, or took out of
                    # the world with its replica (a shrink), did not stay alive through it
                    later = {f.rank for r in self.recoveries
                             if older.generation < r.generation <= rec.generation
                             for f in r.faults} | (set(older.survivor_pids) - set(rec.members))
                    self._recovery_complete(older, rec.generation, excused=later)
            self.restarts_without_progress.clear()

    def _on_finished(self, ev: dict) -> None:
        rank = int(ev["rank"])
        self.finished_ranks.add(rank)
        self._rank_committed(rank, int(ev.get("step", -1)))
        if ev.get("stats"):
            self.rank_stats[rank] = ev["stats"]

    def _on_ended_after_finishing(self, ev: dict) -> None:
        """A rank finished training, then its script ended with an error or a signal (its final
        save or evaluation failed): the job ends with exit code 1, its report says which."""
        entry = {"rank": int(ev["rank"]), "pid": ev.get("pid"), "kind": ev.get("fault"),
                 **{k: ev[k] for k in ("exit_code", "signal") if k in ev}}
        self.failed_after_training.append(entry)
        if not self.exit_code:
            self.exit_code = 1
        self.journal.write("rank_failed_after_training", generation=self.generation, **entry)

    def _on_agent_started(self, ev: dict) -> None:
        node = int(ev["node"])
        if ev.get("pid") == os.getpid():
            # the agent in the controller's own process: if its node goes, so does the
            # controller; a stall of this process must not read as a lost node
            self.local_node = node
            return
        self.agents[node] = AgentView(node, bool(ev.get("spare")), ev.get("pid"),
                                      seen_t=time.time())
        self.journal.write("agent_started", generation=self.generation, node=node,
                           spare=bool(ev.get("spare")), pid=ev.get("pid"))

    def _stop_job(self, reason: str, **fields) -> None:
        """The one way a job ends unrecovered: ``fatal`` says why (report, last line, agents'
        ``done``), exit code 1, a ``job_stopped`` event with where it stopped."""
        self.fatal = reason
        self.exit_code = 1
        self.journal.write("job_stopped", generation=self.generation, reason=reason, **fields)

    def _on_node_done(self, ev: dict) -> None:
        self.done_nodes.add(int(ev["node"]))

    def _on_fatal(self, ev: dict) -> None:
        if self.fatal:
            return  # every rank that finds the job unrecoverable says so; once is enough
        self._stop_job(ev.get("reason", "fatal error"), rank=ev.get("rank"), step=ev.get("step"),
                       last_good_step=ev.get("last_good_step"))

    def _on_record(self, ev: dict) -> None:
        """An event a rank reports (``Session.event``), journaled as it is."""
        if ev["event"] == "checkpoint_saved":
            self.checkpoints.append({"rank": ev.get("rank"), **ev.get("fields", {})})
        if ev["event"] == "redundancy":
            self.redundancy = ev.get("fields", {})
            if self.dp_replicas is None and self.redundancy.get("replicas"):
                self.dp_replicas = [list(r) for r in self.redundancy["replicas"]]
                self._show_sizes(0, _sizes(self.members, self.dp_replicas))
        self.journal.write(ev["event"], generation=ev.get("generation", self.generation),
                           rank=ev.get("rank"), step=ev.get("step"), phase=ev.get("phase"),
                           **ev.get("fields", {}))

    def _report_fault(self, f: Fault):
        if self.fatal or self.stopping:
            return  # the job is stopping: deaths from here on are its consequence
        if f.kind not in FAULT_KINDS:
            f.kind = "crash"
        committed = f.detail.pop("committed", self.views[f.rank].committed)
        if startup_failure(f.kind, f.generation, committed) and not self.recoveries:
            self._stop_startup(f)
            return
        old = self.pending.get(f.rank)
        if old is None:
            self.pending[f.rank] = f
            self._wake.set()  # decided DEBOUNCE_S from now, not at the next tick
            self.journal.write("fault_reported", generation=self.generation, rank=f.rank,
                               step=f.step, phase=f.phase, kind=f.kind, pid=f.pid,
                               **f.detail)
        elif f.kind in SELF_REPORTED and old.kind in ("exit", "crash"):
            f.fault_t = min(f.fault_t, old.fault_t)
            self.pending[f.rank] = f

    def _stop_startup(self, f: Fault) -> None:
        """A rank failed in its start-up: stop the job now, with its error, instead of
        replacing it again and again (its replacement would fail the same way)."""
        how = {"exception": "raised an exception", "exit0_early": "exited with code 0",
               "exit": f"exited with code {f.detail.get('exit_code')}"}[f.kind]
        error = f.detail.get("traceback") or f.detail.get("stderr") or ""
        lost = sorted(p.rank for p in self.pending.values() if p.kind not in FAILURE_KINDS)
        self.startup_error = error
        self.journal.write("fault_reported", generation=self.generation, rank=f.rank,
                           step=f.step, phase=f.phase, kind=f.kind, pid=f.pid, **f.detail)
        self._stop_job(f"rank {f.rank} {how} during start-up, before the job's first training "
                       f"step{f' (after rank(s) {lost} were lost)' if lost else ''}: "
                       f"{_last_line(error) or 'see its output above'}; a start-up error is "
                       "not retried: fix it and start the job again",
                       rank=f.rank, step=f.step, phase=f.phase, startup=True, last_good_step=-1)

    # ---- a stop by signal --------------------------------------------------------------
    def request_stop(self, signal_name: str, by: str, force: bool = False) -> None:
        """Stop the job (SIGINT / SIGTERM to a launcher or a rank). When its ranks save a
        checkpoint on a stop (Megatron-LM's ``--exit-signal-handler`` with ``--save``), each
        gets SIGTERM through its agent and the job ends once all have exited, or after the stop
        timeout; otherwise, or with ``force`` (a second signal), it ends now and the agents
        kill the ranks. Faults from here on only count ranks as gone."""
        with self._lock:
            now = time.time()
            if self.stopping is not None:
                if force and not self.stopping["force"]:
                    self.stopping["force"] = True
                    self.journal.write("stop_forced", generation=self.generation,
                                       signal=signal_name, by=by)
                return
            save = bool(self.saving_ranks) and not force and not self.fatal
            self.stopping = {"signal": signal_name, "by": by, "save": save, "force": force,
                             "t": now, "deadline": now + self.cfg.stop_timeout}
            if not self.fatal:
                self.exit_code = 128 + int(getattr(signal, signal_name, signal.SIGTERM))
            self.pending.clear()
            self.journal.write("stop_requested", generation=self.generation, signal=signal_name,
                               by=by, save=save, stop_timeout=self.cfg.stop_timeout,
                               last_good_step=self._last_good_step())
            if save:  # the agents wait at the next generation's key: the stop goes there
                g = self.generation + 1
                self.store.set(keys.agent_wake(g), self.signer.sign(
                    "stop", signal=signal_name, forward=True, timeout=self.cfg.stop_timeout))
                self._end_wake = g + 1

    def _stop_complete(self, now: float) -> bool:
        st = self.stopping
        gone = self.exited_ranks | self.finished_ranks
        return (not st["save"] or st["force"] or now >= st["deadline"]
                or set(self.members) <= gone or self._all_nodes_done())

    def _decide(self):
        """Replace every pending faulty rank, or remove its data-parallel replica (``shrink``),
        in one new generation, and publish the plan."""
        if self.growing is not None:
            # the grow's generation opens first (its ranks and the survivors wait for it); this
            # fault's generation follows at once, with the grown ranks in its world
            self._open_grow()
        faults = list(self.pending.values())
        self.pending.clear()
        now = time.time()
        # the new generation exists once its plan is published: a decision that stops the job
        # instead leaves the agents waiting at the next generation's wake key, where the job's
        # end is then written (``_finish``)
        g = self.generation + 1
        for f in faults:
            f.decision_t, f.new_generation = now, g
            self.replaced_pids.add(f.pid)
        lost = frozenset(f.rank for f in faults)
        # a recovery every rank finished, but for ranks this fault took before they reported
        # it, is complete with its own reports instead of merging into the next one
        for rec in self.recoveries:
            if rec.summary is None and rec.reports and \
                    set(rec.members) <= set(rec.reports) | lost:
                self._recovery_complete(rec, rec.generation, excused=lost)
        open_recoveries = [r for r in self.recoveries if r.summary is None]
        unreplaceable: dict[int, str] = {}
        for f in faults:
            if f.kind == "state_lost":
                unreplaceable[f.rank] = f.detail.get("reason") or \
                    f"rank {f.rank}'s state is lost with every copy of it"
                continue
            # a rank whose replacement keeps failing before it recovers is not restarted forever
            if any(f.rank in (x.rank for x in r.faults) for r in open_recoveries):
                self.restarts_without_progress[f.rank] = \
                    self.restarts_without_progress.get(f.rank, 1) + 1
            if self.restarts_without_progress.get(f.rank, 0) > MAX_FAILED_RESTARTS:
                self.broken_slots.add(f.rank)
                unreplaceable[f.rank] = (
                    f"rank {f.rank} failed {MAX_FAILED_RESTARTS + 1} times in a row before "
                    f"recovering (last: {f.kind} at step {f.step}); not restarting it again: "
                    "see its traceback in the journal")
        moved, unplaced = self._place(faults)
        unreplaceable.update(unplaced)
        removed: list[int] = []
        why_not = ""
        to_remove = sorted(f.rank for f in faults
                           if shrinks(self.cfg.shrink, f.rank not in unreplaceable))
        if to_remove:
            plan_shrink, why_not = self._shrink(to_remove)
            if plan_shrink is not None:
                removed = plan_shrink.removed
                self.removed_replicas += [rep for rep in self.dp_replicas
                                          if rep not in plan_shrink.replicas]
                self.members, self.dp_replicas = plan_shrink.members, plan_shrink.replicas
            elif self.cfg.shrink == "always" and not unreplaceable:
                self.journal.write("shrink_skipped", generation=g, ranks=to_remove,
                                   reason=why_not)
        stop = sorted(r for r in unreplaceable if r not in removed)
        if stop:
            r = stop[0]
            f = next(x for x in faults if x.rank == r)
            hint = ("; --shrink never keeps the job from going on with fewer data-parallel "
                    "replicas" if self.cfg.shrink == "never" else
                    f"; it cannot go on without it: {why_not}" if to_remove else "")
            self._stop_job(unreplaceable[r] + hint, rank=r, step=f.step, phase=f.phase,
                           node=self.node_of[r], last_good_step=self._last_good_step())
            return
        after = _sizes(self.members, self.dp_replicas)
        for f in faults:
            f.after = after
            if f.rank in removed:
                f.action = "shrink"
        replaced = sorted(f.rank for f in faults if f.rank not in removed)
        # a replacement that has not joined its generation yet waits in a rendezvous that can no
        # longer complete (a member just died): it is replaced again in the new generation
        stuck = sorted({f.rank for r in open_recoveries for f in r.faults
                        if f.joined_t is None and f.rank not in replaced and f.rank not in removed
                        and f.action == "replace"})
        for rank in stuck:
            self.replaced_pids.update(f.replacement_pid for r in open_recoveries
                                      for f in r.faults if f.rank == rank and f.replacement_pid)
            self.journal.write("replacement_restarted", generation=g, rank=rank,
                               reason="had not joined its generation when another fault came")
        replaced = sorted(replaced + stuck)
        self.node_of.update({r: n for r, n in moved.items() if r not in removed})
        for rank in removed:
            self._rank_committed(rank, self.views[rank].committed)
            del self.views[rank]
        for rank in replaced:  # judged again from its replacement's first heartbeat
            self._rank_committed(rank, self.views[rank].committed)
            self.views[rank] = RankView(rank, started_in=g)
        survivors = {r: v.pid for r, v in self.views.items() if r not in replaced}
        plan = {"generation": g, "replaced": replaced, "removed": removed,
                "members": self.members,
                "faults": [{"rank": f.rank, "kind": f.kind, "step": f.step, "phase": f.phase,
                            "pid": f.pid, "node": f.detail.get("node", self.node_of[f.rank]),
                            "detect_s": round(now - f.fault_t, 4), "action": f.action, **after}
                           for f in faults],
                "placement": {str(r): n for r, n in moved.items() if r not in removed},
                "decided_t": now}
        self.recoveries.append(Recovery(g, faults, now, survivors, list(self.members)))
        self.plan_t = now
        for f in faults:
            self.journal.write("fault_decided", generation=g, rank=f.rank, step=f.step,
                               phase=f.phase, kind=f.kind, detect_s=round(now - f.fault_t, 4),
                               action=f.action, **after, **_blame_fields(f))
        if removed:
            log.warning("generation=%d ranks %s leave the world with their data-parallel "
                        "replicas: %d ranks, data-parallel size %s", g, removed,
                        after["world_size"], after["data_parallel_size"])
        self.generation = g
        self._publish_generation(plan)

    def _home_slots_free(self, replica: list[int]) -> bool:
        """Whether ``replica`` can come back where it ran: every rank's node is live and its
        slot (device) was not given up on. A rank comes back under its own number, so on its
        own node in its own slot, which the healthy ranks' spares hold meanwhile. Under
        ``--shrink always`` never: it would undo each shrink at once."""
        if self.cfg.shrink == "always":
            return False
        for r in replica:
            node = self.node_of[r]
            agent = self.agents.get(node)
            live = node == self.local_node or (agent is not None and not agent.lost)
            if r in self.broken_slots or not live or node in self.done_nodes:
                return False
            if sum(self.node_of[m] == node for m in self.members) >= self.nproc:
                return False  # its slot went to another rank meanwhile
        return True

    def _grow(self) -> None:
        """Take removed replicas back into the world once capacity has returned: their own
        slots, when those are usable (``_home_slots_free``: a replica removed because its
        state was lost with every copy), else a spare node that hosts no rank. Between
        recoveries only; whole replicas, on the spares of those nodes. The ranks come back
        under their own numbers and take their state from their data-parallel replicas.

        In two steps, so that training goes on while the new processes start: the agents are
        woken first (the spare node starts the grown ranks, which report ``standby``), and the
        ranks' plan is published once every grown rank waits for it (``_open_grow``)."""
        if self.stopping or self.fatal or self.growing is not None or \
                any(r.summary is None for r in self.recoveries):
            return
        free = sorted(n for n, a in self.agents.items() if a.spare and not a.lost
                      and n not in {self.node_of[r] for r in self.members})
        slots = [n for n in free for _ in range(self.nproc)]
        back: list[list[int]] = []
        placement: dict[int, int] = {}
        for rep in self.removed_replicas:
            if self._home_slots_free(rep):
                placement.update({r: self.node_of[r] for r in rep})
            elif len(rep) <= len(slots):
                placement.update({r: slots.pop(0) for r in sorted(rep)})
            else:
                continue
            back.append(rep)
        if not back:
            return
        grown = sorted(placement)
        now = time.time()
        g = self.generation + 1
        members, replicas = sorted(self.members + grown), sorted(self.dp_replicas + back, key=min)
        after = _sizes(members, replicas)
        plan = {"generation": g, "replaced": grown, "removed": [], "grown": grown,
                "members": members, "faults": [],
                "placement": {str(r): n for r, n in placement.items()}, "decided_t": now}
        self.journal.write("grow_decided", generation=g, ranks=grown,
                           nodes=sorted(set(placement.values())), **after)
        log.warning("generation=%d ranks %s come back on node(s) %s once started: %d ranks, "
                    "data-parallel size %d", g, grown, sorted(set(placement.values())),
                    after["world_size"], after["data_parallel_size"])
        # the generation is taken now (the agents act on it; the job's end goes after it), and
        # the world changes when it opens
        self.generation = g
        self.growing = {"generation": g, "plan": plan, "standby": set(), "back": back,
                        "replicas": replicas, "placement": placement, "decided_t": now}
        self._publish_generation(plan, ranks=False)

    def _show_sizes(self, first_step: int, sizes: dict) -> None:
        """The world and data-parallel sizes (``_sizes``) over steps in the wandb run, as a step
        function: a change shows the old sizes at the step before ``first_step`` and the new
        ones from it."""
        if not self.wandb or sizes == self._shown_sizes:
            return
        if self._shown_sizes:
            self.wandb.sizes(first_step - 1, self._shown_sizes)
        self.wandb.sizes(first_step, sizes)
        self._shown_sizes = sizes

    def _recovery_complete(self, rec: Recovery, resumed: int, excused: frozenset = frozenset()):
        """Summarise ``rec`` from the reports of generation ``resumed``, the one training resumed
        in (a later one when a new fault cut this recovery short)."""
        reports = rec.reports.values()
        first_step_t = max(r["first_step_t"] for r in reports)
        phases: dict[str, float] = {}
        for r in reports:
            for k, v in r.get("phases", {}).items():
                phases[k] = max(phases.get(k, 0.0), v)
        steps_lost = max(r.get("steps_lost", 0) for r in reports)
        pids_now = {int(r["rank"]): r["pid"] for r in reports}
        unchanged = all(pids_now.get(rank) == pid for rank, pid in rec.survivor_pids.items()
                        if rank not in excused)
        rec.summary = {"first_step_t": first_step_t, "phases": phases, "steps_lost": steps_lost,
                       "survivor_pids_unchanged": unchanged,
                       "recovery_point": max(r.get("recovery_point", -1) for r in reports),
                       "fallback": any(r.get("fallback") for r in reports),
                       "restored": {int(r["rank"]): r["restored"] for r in reports
                                    if r.get("restored")},
                       "kept_live_state": sorted(int(r["rank"]) for r in reports
                                                 if r.get("kept_live_state")),
                       "resumed_generation": resumed}
        after = rec.after or (rec.faults[-1].after if rec.faults else None)
        if after:
            self._show_sizes(rec.summary["recovery_point"] + 1, after)
        if rec.grown:
            grow_s = round(first_step_t - rec.decision_t, 4)
            phases = {"prepare": rec.prepare_s or 0.0, **phases}
            self.journal.write("grown", generation=rec.generation, ranks=rec.grown,
                               grow_s=grow_s, steps_lost=steps_lost,
                               recovery_point=rec.summary["recovery_point"],
                               survivor_pids_unchanged=unchanged, **rec.after)
            if self.wandb:
                self.wandb.recovery({"rank": rec.grown[0], "kind": "grow", "action": "grow",
                                     "step": rec.summary["recovery_point"] + 1, **rec.after},
                                    phases, steps_lost, "spare node", rec.generation)
        for f in rec.faults:
            phases_f = {"detect": round(rec.decision_t - f.fault_t, 4), **phases}
            self.journal.write("recovered", generation=rec.generation, rank=f.rank, step=f.step,
                               phase=f.phase, kind=f.kind,
                               recovery_s=round(first_step_t - f.fault_t, 4),
                               steps_lost=steps_lost, replacement=f.replacement,
                               survivor_pids_unchanged=unchanged, action=f.action, **f.after)
            if self.wandb:
                self.wandb.recovery({"rank": f.rank, "kind": f.kind, "step": f.step,
                                     "phase": f.phase, "action": f.action, **f.after},
                                    phases_f, steps_lost,
                                    f.replacement or "spawn", rec.generation)

    # ---- the end -----------------------------------------------------------------------
    def report(self) -> dict:
        faults = []
        for rec in self.recoveries:
            s = rec.summary
            for f in rec.faults:
                entry = {"rank": f.rank, "kind": f.kind, "step": f.step, "phase": f.phase,
                         "generation": rec.generation, **_blame_fields(f),
                         "action": f.action,
                         **{f"{k}_after": v for k, v in f.after.items()},
                         "detect_s": round(rec.decision_t - f.fault_t, 4),
                         "replacement": f.replacement,
                         "replacement_start_s": round(f.replacement_t - rec.decision_t, 4)
                         if f.replacement_t else None,
                         "replacement_join_s": round(f.joined_t - rec.decision_t, 4)
                         if f.joined_t else None}
                if s:
                    entry.update({"recovery_s": round(s["first_step_t"] - f.fault_t, 4),
                                  "phases": {"detect": entry["detect_s"],
                                             **{k: round(v, 4) for k, v in s["phases"].items()}},
                                  "steps_lost": s["steps_lost"],
                                  "recovery_point": s["recovery_point"],
                                  "fallback_to_checkpoint": s["fallback"],
                                  **_restored(s["restored"].get(f.rank)),
                                  "ranks_kept_live_state": s["kept_live_state"],
                                  "resumed_generation": s["resumed_generation"],
                                  "survivor_pids_unchanged": s["survivor_pids_unchanged"]})
                else:
                    entry.update({"recovery_s": None, "steps_lost": None,
                                  "survivor_pids_unchanged": None})
                faults.append(entry)
        grows = [self._grow_entry(rec) for rec in self.recoveries if rec.grown]
        return {"world_size": self.world_size, "nnodes": self.nnodes, "grows": grows,
                "members": self.members,
                "data_parallel_size": _sizes(self.members, self.dp_replicas)["data_parallel_size"],
                "generations": self.generation, "faults": faults,
                "rejected_messages": self.rejected, "fatal": self.fatal,
                "startup_error": self.startup_error,
                "stopped": self._stopped(), "exit_code": self.exit_code,
                "failed_after_training": self.failed_after_training,
                "finished_ranks": len(self.finished_ranks), "redundancy": self.redundancy,
                "rank_stats": {str(r): v for r, v in sorted(self.rank_stats.items())}}

    def _grow_entry(self, rec: Recovery) -> dict:
        """A grow in the report: its ranks, node, sizes after it, and once the ranks trained on
        after it, its time from the plan to that step, phases and recovery point."""
        entry = {"generation": rec.generation, "ranks": rec.grown, "action": "grow",
                 **{f"{k}_after": v for k, v in rec.after.items()},
                 "nodes": sorted({self.node_of[r] for r in rec.grown}),
                 "prepare_s": rec.prepare_s, "grow_s": None}
        s = rec.summary
        if s:
            entry.update({"grow_s": round(s["first_step_t"] - rec.decision_t, 4),
                          "phases": {k: round(v, 4) for k, v in s["phases"].items()},
                          "steps_lost": s["steps_lost"], "recovery_point": s["recovery_point"],
                          "survivor_pids_unchanged": s["survivor_pids_unchanged"]})
        return entry

    def _stopped(self) -> Optional[dict]:
        st = self.stopping
        if st is None:
            return None
        # the newest checkpoint the job saved, the one to start again from (the stop's own,
        # when the ranks saved on it, or a periodic one of the iteration they stopped at)
        return {"signal": st["signal"], "by": st["by"], "save": st["save"],
                "forced": st["force"], "last_committed_step": self._last_good_step(),
                "checkpoint_iteration": max((c.get("iteration", -1) for c in self.checkpoints),
                                            default=None),
                "ranks_exited": len(self.exited_ranks | self.finished_ranks)}

    def _unfired_injections(self) -> list[str]:
        try:
            return [str(i) for i in self.injections
                    if not self.store.check([keys.injection_fired(i.index)])]
        except Exception:  # noqa: BLE001 - a report without this is still a report
            return []

    def _finish(self):
        if self.growing is not None:  # the job ended while the grown ranks started
            self.journal.write("grow_abandoned", generation=self.generation,
                               ranks=self.growing["plan"]["grown"],
                               reason="the job ended before the grown ranks stood by")
        for spec in self._unfired_injections():
            self.journal.write("injection_not_fired", generation=self.generation, spec=spec)
            log.warning("--inject %s never fired: the job never ran that rank, step and phase",
                        spec)
        rep = self.report()
        stopped = rep["stopped"]
        if stopped and not self.fatal:
            self.journal.write("job_stopped", generation=self.generation,
                               reason=f"stopped by {stopped['signal']} ({stopped['by']})",
                               signal=stopped["signal"],
                               last_good_step=stopped["last_committed_step"],
                               checkpoint_iteration=stopped["checkpoint_iteration"])
        self.journal.write("job_failed" if self.fatal else
                           "job_interrupted" if stopped else "job_finished",
                           generation=self.generation, faults=len(rep["faults"]),
                           exit_code=self.exit_code)
        if self.report_path:
            tmp = self.report_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(rep, f, indent=2)
            os.replace(tmp, self.report_path)
        # the job's end, where every agent waits for the next plan: no plan comes after this
        self.store.set(keys.agent_wake(self._end_wake or self.generation + 1),
                       self.signer.sign("done", fatal=self.fatal or "",
                                        stopped=stopped["signal"] if stopped else ""))
        if self.wandb:
            if self._shown_sizes:  # the sizes' line runs to the job's last step
                self.wandb.sizes(self._last_good_step(), self._shown_sizes)
            self.wandb.close()
        self._stop.set()
        self.journal.close()

    def stop(self):
        self._stop.set()
        self._wake.set()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fr-megatron controller",
                                description="Host a job's store and decide its recoveries "
                                            "(fr-megatron run starts one on node 0 itself).")
    p.add_argument("--address", default="127.0.0.1:0",
                   help="HOST:PORT to listen on (default: loopback, a free port)")
    p.add_argument("--world-size", type=int, required=True, help="ranks in the job")
    p.add_argument("--nnodes", type=int, default=1, help="nodes that run ranks (default 1)")
    p.add_argument("--nproc-per-node", type=int, required=True, help="ranks per node")
    p.add_argument("--report", default=None, help="write the JSON recovery report here")
    p.add_argument("--ready-file", default=None, help="write HOST:PORT here once listening")
    p.add_argument("--run-name", default="fr_megatron",
                   help="name of the wandb run that logs recoveries (default fr_megatron)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    host, port = parse_address(a.address, "--address") if not a.address.endswith(":0") else \
        (a.address.rsplit(":", 1)[0], 0)
    cfg = FlashRecoveryConfig.from_env()
    ctl = Controller(a.world_size, a.nnodes, a.nproc_per_node, host, port, read_token(), cfg,
                     a.report, a.run_name)
    for sig in (signal.SIGINT, signal.SIGTERM):  # the job stops as under fr-megatron run
        signal.signal(sig, lambda signum, _: ctl.request_stop(
            signal.Signals(signum).name, f"{signal.Signals(signum).name} to the controller"))
    if a.ready_file:
        with open(a.ready_file + ".tmp", "w") as f:
            f.write(f"{ctl.host}:{ctl.port}")
        os.replace(a.ready_file + ".tmp", a.ready_file)
    return ctl.serve()


if __name__ == "__main__":
    sys.exit(main())
