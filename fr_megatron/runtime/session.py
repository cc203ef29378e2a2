"""The recovery session inside one training process: the runtime's public API.

A training script written for ``fr-megatron run``::

    session = Session.from_env()
    session.init_process_group("gloo")          # on PrefixStore("gen{g}/")
    ... build groups, model, optimizer ...
    session.attach(integration)                  # fr_megatron.megatron / .deepspeed / TorchIntegration
    session.run(train_step, num_steps)           # train_step(step) marks session.phase(...)

``run`` is made of ``start`` / ``begin_step`` / ``commit`` / ``recover``, which loops that are not
ours (Megatron-LM's ``train()``) call directly.

Step transaction: ``commit(step)`` copies the rank's state into its snapshot ring (in the node's
shared memory, where it outlives the process) and, where a copy is needed
(``failure_domains``), starts sending its unique state to its holders; that exchange is waited
for before the next optimizer phase changes the state. A step that raises anywhere before
``commit`` returns leaves no trace once recovery restores the recovery point, the last step that
every rank committed.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..config import FlashRecoveryConfig, parse_address
from ..events import log_recovery_to_script_run
from ..protocol import keys
from ..protocol import modules as job_modules
from ..protocol.stderr_tail import restore_stderr
from ..protocol.auth import Signer, read_token
from ..protocol.node_beats import BeatSender
from ..protocol.store import connect, connect_cuttable, shutdown_sockets
from . import comm_progress, failure_domains, inject, recovery_point, transfer
from .comms import Communicators, RendezvousInterrupted, release_deferred
from .heartbeat import Heartbeat, PlanMonitor
from .integration import Integration, RankState
from .layout import ChecksumError, Layout
from .redundancy import CopyExchange
from .snapshot import SnapshotRing
from .state_machine import RecoveryStateMachine, State

log = logging.getLogger("fr_megatron.runtime")

EXIT_FAULTY = 70  # a rank that found itself at fault exits with this code after reporting
# a rank that has stayed in one phase for this fraction of its hang timeout puts its collective
# progress in its beats (``comm_progress``): the controller compares it once ranks stall, and a
# running job's beats stay small
COMM_AFTER_FRACTION = 0.25


class RecoveryRequested(RuntimeError):
    """Raised at a phase marker when the controller has opened a new generation."""


class RecoveryImpossible(RuntimeError):
    """No consistent state can be assembled from live peers."""


def _is_comm_error(exc: BaseException) -> bool:
    if isinstance(exc, (RecoveryRequested, dist.DistError, ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__} {exc}"
    return any(s in text for s in ("gloo", "Connection", "NCCL", "connection", "peer", "Timed out",
                                   "closed", "aborted", "ProcessGroup"))


def _median(values: list[float]) -> Optional[float]:
    return round(sorted(values)[len(values) // 2], 5) if values else None


class Session:
    def __init__(self, *, rank: int, world_size: int, nproc_per_node: int, controller: str,
                 token: bytes, generation: int, replacement: bool,
                 agent_socket: str, config: Optional[FlashRecoveryConfig] = None,
                 injections: str = "", snapshot_dir: Optional[str] = None):
        self.rank, self.world_size, self.nproc = rank, world_size, nproc_per_node
        self.cfg = config or FlashRecoveryConfig()
        self.host, self.port = parse_address(controller, "FR_CONTROLLER")
        self.signer = Signer(token, f"rank{rank}")
        self.replacement = replacement
        self.has_state = True  # False until a replacement has restored its state from peers
        self.inject_t: Optional[float] = None
        self.history: dict[int, Any] = {}  # step -> what train_step returned, for every step  # when an injected fault fired (benchmarks)
        self.store = connect(self.host, self.port)            # main thread: pg rendezvous, events
        self._beats = BeatSender(agent_socket)                # heartbeat thread -> the agent
        # plan monitor thread; its socket is cut at close, so the thread ends without waiting
        self._mon_store, self._mon_fds = connect_cuttable(self.host, self.port)
        latest = self._latest_generation()
        self.generation = max(generation, latest)
        self.sm = RecoveryStateMachine(rank)
        self.step, self.phase_name, self.committed = 0, "init", -1
        self._phase_t = time.time()  # when the step or phase last changed
        self.step_times: list[float] = []
        self.injections = inject.parse(injections)
        self.integration: Optional[Integration] = None
        # the node agent's shared-memory directory: a replacement finds its predecessor's
        # snapshots there under the same name
        self.snapshot_dir = snapshot_dir if self.cfg.snapshot_dir else None
        self.ring = SnapshotRing(self.cfg.snapshot_depth, self.snapshot_dir, f"rank{rank}")
        self.copies: Optional[CopyExchange] = None
        self.copy_plan: Optional[failure_domains.CopyPlan] = None
        self._durable_step = -1  # the newest step whose snapshot and copies are all in place
        self.commit_blocked_s: list[float] = []  # training-thread time per commit (benchmarks)
        self.group = None
        self.comms: Optional[Communicators] = None
        self._notice: Optional[dict] = None
        self._lock = threading.Lock()
        self._step_t0 = time.time()
        self._pending_report: Optional[dict] = None
        self._pending_faults: list[dict] = []
        self.recoveries: list[dict] = []
        self._trained = False  # this process has committed a training step
        self._published = False  # its modules, for the warm spares
        self._recoveries_logged = 0
        # what the framework calls the step after runtime step ``s``: ``s + iteration_offset``
        # (Megatron-LM's iteration); a recovery goes into the script's wandb run there
        self.iteration_offset = 0
        # the agent fences a node cut off for twice the node timeout; a rank whose agent is gone
        # fences itself after the same time (its beats fail: nobody supervises it any more)
        self.heartbeat = Heartbeat(self._beats.send, self.signer, rank, self.cfg.heartbeat_interval,
                                   self._status, orphan_timeout=2 * self.cfg.node_timeout,
                                   orphaned=self._orphaned)
        self.sm.on_change = self.heartbeat.poke
        comm_progress.install()  # before any group exists: every operation is counted
        comm_progress.TRACKER.current_phase = lambda: self.phase_name
        self._armed: set[int] = set()  # injections waiting for an operation on a group
        try:
            self.heartbeat.beat()
        except (FileNotFoundError, ConnectionRefusedError) as e:  # no agent at all
            raise RuntimeError(f"rank {rank} cannot reach its node agent at {agent_socket}: {e} "
                               "(start this script with `fr-megatron run`)") from e
        except OSError as e:  # a busy agent: the heartbeat thread sends the next beat
            log.warning("rank=%d first heartbeat not sent: %s", rank, e)
        self.heartbeat.start()
        self.monitor = PlanMonitor(self._mon_store, self.signer, lambda: self.generation,
                                   self._on_plan)
        self.monitor.start()
        # Daemon threads caught inside a C++ store call at interpreter exit abort the process
        # ("terminate called without an active exception"): stop them first.
        atexit.register(self._stop_threads)

    def _stop_threads(self) -> None:
        self.heartbeat.stop()
        self.monitor.stop()
        shutdown_sockets(self._mon_fds)  # its wait for the next plan fails now
        for t in (self.heartbeat, self.monitor):
            if t.is_alive() and t is not threading.current_thread():
                t.join(5)
        self._beats.close()

    def _orphaned(self, silent_s: float) -> None:
        log.error("rank=%d generation=%d step=%d phase=%s cannot reach its node agent for %.1f s "
                  "(twice the node timeout): the agent is gone, exiting; last committed step %d",
                  self.rank, self.generation, self.step, self.phase_name, silent_s, self.committed)
        os._exit(EXIT_FAULTY)

    @classmethod
    def from_env(cls, config: Optional[FlashRecoveryConfig] = None, env=os.environ) -> "Session":
        if "FR_CONTROLLER" not in env:
            raise RuntimeError("FR_CONTROLLER is not set: start this script with "
                               "`fr-megatron run --nproc-per-node N script.py ...`")
        return cls(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                   nproc_per_node=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
                   controller=env["FR_CONTROLLER"], token=read_token(env),
                   generation=int(env.get("FR_GENERATION", 0)),
                   replacement=env.get("FR_REPLACEMENT") == "1",
                   config=config or FlashRecoveryConfig.from_env(env),
                   agent_socket=BeatSender.from_env(env).path,
                   injections=env.get("FR_INJECT", ""),
                   snapshot_dir=env.get("FR_SNAPSHOT_DIR"))

    # ---- control plane ------------------------------------------------------------------
    def _latest_generation(self) -> int:
        try:
            if self.store.check([keys.GENERATION]):
                return int(self.signer.verify(self.store.get(keys.GENERATION))["generation"])
        except Exception:
            pass
        return 0

    def _status(self) -> dict:
        timeout = self.cfg.step_hang_timeout(self.phase_name, self.step_times,
                                             resuming=self._pending_report is not None)
        status = {"generation": self.generation, "step": self.step, "phase": self.phase_name,
                  "state": self.sm.state.value, "committed": self.committed,
                  "inject_t": self.inject_t, "hang_timeout": timeout}
        # bounded by the job's hang timeout: a rank in its first step (no timeout of its own
        # yet) may be the one its peers wait for, or one waiting
        stall_after = COMM_AFTER_FRACTION * min(
            timeout, self.cfg.resolved_hang_timeout(self.step_times[-50:]))
        if time.time() - self._phase_t >= stall_after:
            status["comm"] = comm_progress.TRACKER.report()
        return status

    def send(self, kind: str, **body) -> None:
        try:
            self.store.queue_push(keys.EVENTS, self.signer.sign(kind, rank=self.rank, **body))
        except Exception as e:
            log.warning("rank=%d cannot reach the controller: %s", self.rank, e)

    def event(self, name: str, **fields) -> None:
        self.send("event", event=name, generation=self.generation, step=self.step,
                  phase=self.phase_name, fields=fields)

    def _on_plan(self, plan: dict) -> None:
        """Monitor thread: a new generation exists; make the main thread notice, now."""
        with self._lock:
            if plan["generation"] <= self.generation:
                return
            self._notice = plan
            if self.comms is None:
                return
            # a rendezvous waiting for a peer of the superseded generation fails at once, and so
            # does a collective blocked on one
            n = self.comms.interrupt_rendezvous()
            if self.sm.state in (State.RUNNING, State.SYNCING):
                n += self.comms.abort()
            log.info("rank=%d generation=%d step=%d phase=%s fault notice (generation %d): "
                     "aborted %d links", self.rank, self.generation, self.step, self.phase_name,
                     plan["generation"], n)

    # ---- set-up ----------------------------------------------------------------------------
    def init_process_group(self, backend: str = "gloo") -> None:
        self.comms = Communicators(lambda: connect_cuttable(self.host, self.port), self.port,
                                   self.rank, self.world_size, backend)
        while True:
            try:
                self.comms.init_world(self.generation, self._superseded)
                break
            except RendezvousInterrupted:
                # a peer failed before the job was even up: follow the newer generation
                plan = self._wait_plan()
                if self.rank in plan["replaced"]:
                    log.error("rank=%d was replaced in generation %d before it joined; exiting",
                              self.rank, plan["generation"])
                    os._exit(EXIT_FAULTY)
                self._enter_generation(plan)
        log.info("rank=%d generation=%d joined world of %d (%s)%s", self.rank, self.generation,
                 self.world_size, backend, " as replacement" if self.replacement else "")
        if self.replacement:
            self.send("joined", generation=self.generation, pid=os.getpid())

    def attach(self, integration: Integration) -> None:
        """Hand the runtime the framework's state; builds the runtime's own groups."""
        self.integration = integration
        integration.install_phase_marks(self.phase)
        self._build_runtime_groups()

    def _build_runtime_groups(self) -> None:
        """The runtime's own gloo group, and who copies what to whom (the same plan on every
        rank: from every rank's replicas and whether its snapshot is in shared memory)."""
        self.group = dist.new_group(backend="gloo")
        if self.ring.steps() == [] and self.has_state:
            self.ring.reserve(self._capture(self.committed))
        mine = (self.integration.replica_ranks(), self.integration.shard_replica_ranks(),
                self.ring.in_shared_memory)
        every: list = [None] * self.world_size
        dist.all_gather_object(every, mine, group=self.group)
        self.replica_of = [e[0] for e in every]
        self.shard_replicas_of = [e[1] for e in every]
        self.copy_plan = failure_domains.copy_plan(self.world_size, self.nproc, self.replica_of,
                                                   self.shard_replicas_of, [e[2] for e in every],
                                                   self.cfg.replicas)
        old = self.copies
        self.copies = CopyExchange(self.rank, self.copy_plan.holders[self.rank],
                                   self.copy_plan.wards(self.rank), self.copy_plan.parts,
                                   self.group, self.cfg.snapshot_depth, self.snapshot_dir)
        if old is not None:
            self.copies.adopt(old)
            old.close()
        if self.rank == 0 and old is None:
            self.event("redundancy", snapshots="shared memory" if all(e[2] for e in every)
                       else "process memory" if not any(e[2] for e in every) else "mixed",
                       instances=max(len(r) for r in self.shard_replicas_of),
                       **self.copy_plan.summary())

    # ---- the step transaction --------------------------------------------------------------
    def phase(self, name: str) -> None:
        """Mark where in the step this rank is; fires injected faults; notices fault plans.
        Before the optimizer phase changes the state, the last commit's snapshot and copies are
        complete (they ran during this step's forward and backward)."""
        if name != self.phase_name:
            self.phase_name = name
            self._phase_t = time.time()
            self.heartbeat.poke()
        self._fire_injections()
        if self._notice is not None:
            raise RecoveryRequested(f"generation {self._notice['generation']} opened")
        if name == "optimizer" and self.commit_blocked_s:
            self.commit_blocked_s[-1] += self._wait_durable()

    def _wait_durable(self) -> float:
        """Wait until the last commit's snapshot is sealed and its copies are in place; the
        seconds waited."""
        if self._durable_step >= self.committed:
            return 0.0
        t0 = time.perf_counter()
        self.ring.wait()
        if self.copies is not None:
            self.copies.wait()
        self._durable_step = self.committed
        return time.perf_counter() - t0

    def _claim(self, inj: inject.Injection) -> bool:
        # each injection fires once per job: the first rank to reach it claims it in the store
        return self.store.add(keys.injection_fired(inj.index), 1) == 1

    def start(self) -> int:
        """The first step to run: 1 on a fresh job, the recovery point + 1 for a replacement."""
        if self.replacement:
            self.has_state = False
            self.sm.to(State.SYNCING, self.generation, self.step)
            try:
                return self._sync_and_resume(self._plan_for(self.generation))
            except Exception as exc:
                return self.recover(exc)
        self.sm.to(State.RUNNING, self.generation, 0)
        self.step = 0
        self.commit(0)
        return 1

    def begin_step(self, step: int) -> None:
        self._after_commit()
        self.step = step
        self._step_t0 = self._phase_t = time.time()
        self._disarm()
        self.heartbeat.poke()  # a new step is progress even if the phase name is the same
        self.phase("forward")

    def commit(self, step: int, output: Any = None) -> None:
        """Make ``step`` the newest recovery point of this rank."""
        self.phase("after_step")
        t0 = time.perf_counter()
        self._wait_durable()  # the previous step's copies read a slot this one may reuse
        self.ring.write(step, self._capture(step))
        if self.copies.active:
            self.copies.start(step, self.ring)
        self.committed = step
        if not self.ring.in_shared_memory:
            # a snapshot in process memory dies with the process: the step is committed once
            # its copies are in place
            self._wait_durable()
        self.commit_blocked_s.append(time.perf_counter() - t0)
        if step:
            self.history[step] = output
            self.step_times.append(time.time() - self._step_t0)
        if self._pending_report is not None:
            rep, self._pending_report = self._pending_report, None
            now = time.time()
            rep["phases"]["resume"] = now - rep.pop("restored_t")
            rep["phases"] = {k: round(v, 4) for k, v in rep["phases"].items()}
            self.send("recovered", generation=self.generation, pid=os.getpid(),
                      first_step_t=now, **rep)
            self.recoveries.append(rep)
            release_deferred()  # the groups of older generations, now that the rebuild is over

    def _after_commit(self) -> None:
        """What follows a committed step, outside the step transaction: training has started
        (rank 0 publishes what it imported, for the warm spares); this process's start-up is
        over at its first training step (its stderr goes straight to the launcher's again: the
        agent kept its tail for a start-up failure); a recovery it resumed from."""
        if self.committed >= 0 and not self._published:
            self._published = True
            if self.rank == 0:
                job_modules.publish_soon(self.host, self.port, self.signer)
        if self.committed >= 1 and not self._trained:
            self._trained = True
            restore_stderr()
        if len(self.recoveries) > self._recoveries_logged:
            self._recoveries_logged = len(self.recoveries)
            rep = self.recoveries[-1]
            log_recovery_to_script_run(rep, self._pending_faults, self.generation,
                                       rep.get("recovery_point", 0) + 1 + self.iteration_offset)

    def run(self, train_step: Callable[[int], Any], num_steps: int) -> dict[int, Any]:
        """Train steps 1..num_steps, recovering from faults; returns step -> output."""
        step = self.start()
        while step <= num_steps:
            try:
                self.begin_step(step)
                out = train_step(step)
                self.commit(step, out)
                step += 1
            except Exception as exc:
                step = self.recover(exc)
        self.close()
        return dict(self.history)

    # ---- recovery ----------------------------------------------------------------------------
    def recover(self, exc: BaseException) -> int:
        """Survive a fault elsewhere: abort, rebuild on the new generation, restore; next step.

        A fault during the recovery itself (a peer or the replacement dying while groups are
        rebuilt or state is restored) sends this rank back to waiting for the next plan.
        """
        while True:
            if not _is_comm_error(exc):
                self._die(exc)
            with self._lock:
                if self.sm.state != State.ABORTING:
                    self.sm.to(State.ABORTING, self.generation, self.step)
                if self.comms:
                    self.comms.abort()
            log.warning("rank=%d generation=%d step=%d phase=%s communication failed: %s",
                        self.rank, self.generation, self.step, self.phase_name,
                        str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__)
            try:
                self.copies.wait()
            except Exception:
                pass  # the exchange of a failed step is void; the rollback makes it moot
            plan = self._wait_plan()
            if self.rank in plan["replaced"]:
                log.error("rank=%d was declared faulty in generation %d; exiting", self.rank,
                          plan["generation"])
                os._exit(EXIT_FAULTY)
            try:
                self._rebuild(plan)
                return self._sync_and_resume(plan)
            except (ChecksumError, RecoveryImpossible):
                raise
            except Exception as e:
                # whatever a rendezvous cut short by a newer plan raised, it is not our fault
                exc = RendezvousInterrupted(str(e)) if self._superseded() else e

    def _rebuild(self, plan: dict) -> None:
        self.sm.to(State.REBUILDING, self.generation, self.step)
        t = [time.time()]
        if self.integration:
            self.integration.teardown()  # the framework lets go of its groups first
        old_groups = self.comms.destroy_world() if self.comms else []
        t.append(time.time())
        self._enter_generation(plan)
        self.comms.init_world(self.generation, self._superseded)
        t.append(time.time())
        if self.integration:
            self.integration.rebuild()
            stale = self.integration.old_group_references(old_groups)
            if stale:
                raise RecoveryImpossible(f"{stale} references to old groups survived the rebuild")
        t.append(time.time())
        self._build_runtime_groups()
        t.append(time.time())
        log.info("rank=%d generation=%d step=%d phase=rebuild teardown %.3fs world %.3fs "
                 "framework groups %.3fs runtime groups %.3fs", self.rank, self.generation,
                 self.step, *(b - a for a, b in zip(t, t[1:])))
        self.sm.to(State.SYNCING, self.generation, self.step)

    def _sync_and_resume(self, plan: dict) -> int:
        self._pending_faults = list(plan.get("faults", []))
        step = self._sync(plan)
        self.sm.to(State.RUNNING, self.generation, self.step)
        self._pending_report = {"phases": self.sm.take_phases(), **self._last_sync}
        return step

    def _die(self, exc: BaseException) -> None:
        """This rank's own fault: report it with its traceback and exit; an agent replaces us."""
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        log.error("rank=%d generation=%d step=%d phase=%s exception: %s", self.rank,
                  self.generation, self.step, self.phase_name, exc)
        self.send("fault", fault="exception", pid=os.getpid(), step=self.step,
                  phase=self.phase_name, generation=self.generation, fault_t=time.time(),
                  committed=self.committed, traceback=tb[-4000:])
        try:
            sys.stderr.write(tb)
            sys.stderr.flush()
        except OSError:
            pass  # nowhere to write it: the report above carries it
        os._exit(EXIT_FAULTY)

    def _enter_generation(self, plan: dict) -> None:
        with self._lock:  # a notice of an even newer plan that came meanwhile is kept
            self.generation = plan["generation"]
            if self._notice is not None and self._notice["generation"] <= self.generation:
                self._notice = None

    def _superseded(self) -> bool:
        return self._notice is not None

    def _plan_for(self, generation: int) -> dict:
        return self.signer.verify(self.store.get(keys.plan(generation)))

    def _wait_plan(self, timeout: float = 600.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            plan = self._notice or self.monitor.latest
            if plan and plan["generation"] > self.generation:
                return plan
            time.sleep(0.002)
        raise RecoveryImpossible(f"no recovery plan from the controller within {timeout:.0f}s")

    def _fire_injections(self) -> None:
        for inj in self.injections:
            if inj.rank != self.rank or inj.step != self.step or inj.phase != self.phase_name:
                continue
            if inj.group:
                self._arm(inj)
            elif self._claim(inj):
                self._fire(inj)

    def _fire(self, inj: inject.Injection) -> None:
        self.inject_t = time.time()
        try:
            self.heartbeat.beat()  # the report must name this step and phase (and when)
        except OSError:
            pass
        inject.fire(inj)

    def _arm(self, inj: inject.Injection) -> None:
        """From the phase marker on, count this step's operations on groups of ``inj.group``
        in that phase; the fault fires before the ``inj.nth``."""
        if inj.index in self._armed:
            return
        self._armed.add(inj.index)
        groups = self._group_kinds().get(inj.group)
        if not groups:
            log.warning("rank=%d generation=%d step=%d phase=%s injection %s: this job has no "
                        "group of kind %r", self.rank, self.generation, self.step,
                        self.phase_name, inj, inj.group)
            return
        comm_progress.TRACKER.arm(groups, inj.phase, inj.nth,
                                  lambda: self._claim(inj) and self._fire(inj))

    def _disarm(self) -> None:
        for a in comm_progress.TRACKER.disarm():
            log.warning("rank=%d generation=%d step=%d phase=%s an injection armed in phase %s "
                        "did not fire: the step ended %d operations on its group short",
                        self.rank, self.generation, self.step, self.phase_name, a.phase, a.left)
        self._armed.clear()

    def _group_kinds(self) -> dict[str, list]:
        kinds = dict(self.integration.group_kinds()) if self.integration else {}
        if dist.is_initialized():
            kinds.setdefault("world", [dist.distributed_c10d._get_default_group()])
        return kinds

    def _sync(self, plan: dict) -> int:
        """Agree on the recovery point, restore every rank to it, return the step to redo."""
        self.phase_name = "restore"
        me_lost = self.rank in plan["replaced"] or not self.has_state
        mine = recovery_point.RankReport(
            lost=me_lost, ring=self.ring.steps(), held=self.copies.held_steps(),
            committed=-1 if me_lost else self.committed,
            refused=self._check_inherited() if me_lost else [])
        wire: list = [None] * self.world_size
        dist.all_gather_object(wire, mine.to_wire(), group=self.group)
        reports = [recovery_point.RankReport.from_wire(w) for w in wire]
        lost = {r for r, rep in enumerate(reports) if rep.lost}
        decision = recovery_point.decide(reports, self.replica_of, self.shard_replicas_of,
                                         self.copy_plan)
        if decision is None:
            return self._no_live_state(reports, lost)
        point = decision.point
        if self.rank in decision.sources:
            self.ring.drop_after(point)
        t_move = time.perf_counter()
        self._transfer(decision)
        if lost:  # what the steps up to the point returned, for the lost ranks too
            history = [{s: v for s, v in self.history.items() if s <= point}]
            dist.broadcast_object_list(history, src=min(set(range(self.world_size)) - lost,
                                                        default=0), group=self.group)
            self.history = history[0]
        # every rank now restores the state that ends step ``point``, to redo ``point + 1``
        # (injections at phase "restore" fire here: a replacement lost while it restores)
        self.step = point + 1
        self._fire_injections()
        try:
            self._restore(self.ring.get(point, verify=self.cfg.verify_checksums))
            moved = (self.ring.slot(point).layout.total, time.perf_counter() - t_move)
        except ChecksumError as e:
            self.send("fatal", reason=str(e), step=point, last_good_step=point)
            log.error("rank=%d generation=%d step=%d phase=restore %s", self.rank,
                      self.generation, point, e)
            raise
        self.ring.drop_after(point)
        self.history = {s: v for s, v in self.history.items() if s <= point}
        restored = {"from": decision.sources[self.rank], "bytes": moved[0],
                    "seconds": round(moved[1], 4)} if self.rank in decision.sources else None
        self._settle(point, decision.steps_lost, lost, decision.resend, restored=restored)
        log.info("rank=%d generation=%d step=%d phase=restore recovered to step %d%s",
                 self.rank, self.generation, point, point,
                 " from its predecessor's snapshot" if decision.sources.get(self.rank, {})
                 .get("unique") == self.rank else "")
        return point + 1

    def _check_inherited(self) -> list[str]:
        """A replacement offers what its predecessor left in shared memory only once checked;
        returns what it refused, and why."""
        refused = [f"rank {self.rank}'s snapshot of step {step}: {why}"
                   for step, why in self.ring.validate()]
        for ward, ring in self.copies.held.items():
            refused += [f"the copy of rank {ward} held by rank {self.rank}, step {step}: {why}"
                        for step, why in ring.validate()]
        for why in refused:
            log.warning("rank=%d generation=%d step=%d phase=restore refused %s", self.rank,
                        self.generation, self.step, why)
        return refused

    def _transfer(self, decision: recovery_point.RecoveryPlan) -> None:
        """Send and receive the lost ranks' state of the point, every source in parallel,
        straight from the sources' slots into the lost rank's slot of the point (laid out as
        the sources announce: a replacement's own optimizer may not have its state yet)."""
        point, works, pulls = decision.point, [], []
        for (src, dst), messages in decision.transfers(self.copy_plan).items():
            if src == self.rank:
                works += transfer.send(
                    [(self.ring.slot(point) if origin == "ring" else
                      self.copies.held[dst].slot(point),
                      tuple(p for p in parts if p != "meta"), "meta" in parts)
                     for origin, parts in messages], dst, self.group)
            elif dst == self.rank:
                pulls.append(src)
        if pulls:
            with ThreadPoolExecutor(len(pulls), thread_name_prefix="fr-pull") as pool:
                announced = dict(zip(pulls, pool.map(
                    lambda src: transfer.recv_headers(src, self.group), pulls)))
                got = [g for gs in announced.values() for g in gs]
                slot = self.ring.take(point)
                slot.ensure(Layout.assemble(self.ring.parts, {
                    part: g.layout for g in got for part in g.parts}))
                list(pool.map(lambda src: transfer.recv_bodies(src, self.group, announced[src],
                                                               slot), pulls))
            slot.seal({"step": point, "layout": slot.layout.to_json(),
                       "sums": {k: v for g in got for k, v in g.sums.items()},
                       "meta": next((g.meta for g in got if g.meta_len), b"")})
        transfer.wait_all(works)

    def _no_live_state(self, reports: list, lost: set) -> int:
        """No step can be assembled for every lost rank from live peers: fall back to the disk
        checkpoint when there is one, else stop the job with the reason."""
        reason = (f"ranks {sorted(lost)} and every holder of their copies are lost; "
                  "no consistent state among live peers")
        refused = [why for rep in reports for why in rep.refused]
        if refused:
            reason += "; refused: " + "; ".join(refused)
        if self.cfg.checkpoint_dir:  # every rank takes this branch: the reports are the same
            resume = self._fall_back_to_checkpoint(reports, lost)
            if resume is not None:
                return resume
            reason += f", and {self.cfg.checkpoint_dir} holds no checkpoint to fall back to"
        good = min((rep.committed for rep in reports if not rep.lost), default=-1)
        self.send("fatal", reason=reason, step=self.step, last_good_step=good)
        raise RecoveryImpossible(reason)

    def _fall_back_to_checkpoint(self, reports: list, lost: set) -> Optional[int]:
        """No live copy of a lost rank's state: every rank loads the framework's latest disk
        checkpoint instead, and the steps since it are redone (and reported as lost)."""
        step = self.integration.load_checkpoint(self.cfg.checkpoint_dir)
        if step is None:
            return None
        finished = [rep.committed for rep in reports if not rep.lost]
        steps_lost = max(0, min(finished) - step) if finished else 0
        survivors = [r for r in range(self.world_size) if r not in lost]
        history = [{s: v for s, v in self.history.items() if s <= step}]
        if survivors:  # what the steps up to the checkpoint returned, for the lost ranks too
            dist.broadcast_object_list(history, src=survivors[0], group=self.group)
        self.history = history[0]
        self.ring.drop_after(-1)
        self.ring.write(step, self._capture(step))
        everyone = {r: hs for r, hs in self.copy_plan.holders.items() if hs}
        self._settle(step, steps_lost, lost, everyone, fallback=True)
        log.warning("rank=%d generation=%d step=%d phase=restore no live copy of ranks %s: fell "
                    "back to the checkpoint of step %d in %s (%d steps redone)", self.rank,
                    self.generation, step, sorted(lost), step, self.cfg.checkpoint_dir, steps_lost)
        if self.rank == 0:
            self.event("fallback_to_checkpoint", checkpoint_step=step, steps_lost=steps_lost,
                       lost=sorted(lost), directory=self.cfg.checkpoint_dir)
        return step + 1

    def _restore(self, state: RankState) -> None:
        self.integration.restore(state)
        if "fr/rng_cpu" in state.meta:
            torch.set_rng_state(state.meta["fr/rng_cpu"])
        if "fr/rng_cuda" in state.meta and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state.meta["fr/rng_cuda"])

    def _capture(self, step: int) -> RankState:
        """The live state, with what the runtime itself restores (RNG) in its meta."""
        live = self.integration.capture()
        live.meta["fr/rng_cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            live.meta["fr/rng_cuda"] = torch.cuda.get_rng_state_all()
        live.meta["fr/step"] = step
        return live

    def _settle(self, point: int, steps_lost: int, lost: set, resend: dict[int, list[int]],
                fallback: bool = False, restored: Optional[dict] = None) -> None:
        """Every rank stands at ``point`` now: its counters, its copies, what it will report
        (a lost rank: where its state came from, how many bytes, and how long from the decision
        to the state restored in place).
        Holders that lack a copy of the point (a replaced holder on another node, a copy that
        was in flight) get it again before training resumes."""
        self.committed = self.step = self._durable_step = point
        self.has_state = True
        to = resend.get(self.rank, [])
        wards = sorted(r for r, hs in resend.items() if self.rank in hs)
        if to or wards:
            self.copies.start(point, self.ring, to=to, wards=wards)
            self.copies.wait()
            if to:
                log.info("rank=%d generation=%d step=%d phase=restore copy of step %d sent again "
                         "to holders %s", self.rank, self.generation, point, point, to)
        self._last_sync = {"recovery_point": point, "steps_lost": steps_lost, "lost": sorted(lost),
                           "restored_t": time.time(), **({"fallback": True} if fallback else {}),
                           **({"restored": restored} if restored else {})}

    def stats(self) -> dict:
        """What this rank's redundancy costs it: bytes of state, of its snapshots and of the
        copies it holds; training-thread seconds per commit and per step (medians)."""
        live = self.integration.capture() if self.integration else RankState()
        return {"replicated_bytes": sum(t.numel() * t.element_size()
                                        for t in live.replicated.values()),
                "unique_bytes": sum(t.numel() * t.element_size() for t in live.unique.values()),
                "snapshot_bytes": self.ring.nbytes(),
                "snapshots_in_shared_memory": self.ring.in_shared_memory,
                "held_copy_bytes": self.copies.nbytes() if self.copies else 0,
                "commit_blocked_s_p50": _median(self.commit_blocked_s[1:]),
                "step_s_p50": _median(self.step_times)}

    def close(self) -> None:
        self._after_commit()
        self.sm.to(State.FINISHED, self.generation, self.step)
        self.store.set(f"fr/finished/{self.rank}", b"1")
        self.send("finished", step=self.step, stats=self.stats())
        try:
            self.heartbeat.beat()
        except OSError:
            pass  # the finished mark above is what the agent and controller go by
        self._stop_threads()
        if self.copies is not None:
            self.copies.close()
        if dist.is_initialized():
            dist.barrier(group=self.group)  # nobody tears down links a peer still uses
            dist.destroy_process_group()
