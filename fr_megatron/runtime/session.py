"""The recovery session inside one training process: the runtime's public API.

A training script written for ``fr-megatron run``::

    session = Session.from_env()
    session.init_process_group("gloo")          # on PrefixStore("gen{g}/")
    ... build groups, model, optimizer ...
    session.attach(integration)                  # fr_megatron.megatron / .deepspeed / TorchIntegration
    session.run(train_step, num_steps)           # train_step(step) marks session.phase(...)

``run`` is made of ``start`` / ``begin_step`` / ``commit`` / ``recover``, which loops that are not
ours (Megatron-LM's ``train()``) call directly.

Step transaction: ``commit(step)`` copies the rank's state into its snapshot ring and its unique
state to its holders; a step that raises anywhere before ``commit`` returns leaves no trace once
recovery restores the recovery point, the last step that every rank committed.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..config import FlashRecoveryConfig, parse_address
from ..protocol import keys
from ..protocol.auth import Signer, read_token
from ..protocol.node_beats import BeatSender
from ..protocol.store import connect, connect_cuttable, shutdown_sockets
from . import comm_progress, failure_domains, inject, transfer
from .comms import Communicators, RendezvousInterrupted, release_deferred
from .heartbeat import Heartbeat, PlanMonitor
from .integration import Integration, RankState
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


class Session:
    def __init__(self, *, rank: int, world_size: int, nproc_per_node: int, controller: str,
                 token: bytes, generation: int, replacement: bool,
                 agent_socket: str, config: Optional[FlashRecoveryConfig] = None,
                 injections: str = ""):
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
        self.ring = SnapshotRing(self.cfg.snapshot_depth)
        self.copies: Optional[CopyExchange] = None
        self.group = None
        self.comms: Optional[Communicators] = None
        self._notice: Optional[dict] = None
        self._lock = threading.Lock()
        self._step_t0 = time.time()
        self._pending_report: Optional[dict] = None
        self.recoveries: list[dict] = []
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
                   injections=env.get("FR_INJECT", ""))

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
        self.group = dist.new_group(backend="gloo")
        replica_of: list = [None] * self.world_size
        dist.all_gather_object(replica_of, self.integration.replica_ranks(), group=self.group)
        self.replica_of = replica_of
        self.placement = failure_domains.placement(self.world_size, self.nproc, replica_of,
                                                   self.cfg.replicas)
        old = self.copies
        self.copies = CopyExchange(self.rank, self.placement[self.rank],
                                   failure_domains.wards(self.placement, self.rank), self.group,
                                   self.cfg.snapshot_depth, keep=old.copies if old else None)
        if old is not None:
            old.close()

    # ---- the step transaction --------------------------------------------------------------
    def phase(self, name: str) -> None:
        """Mark where in the step this rank is; fires injected faults; notices fault plans."""
        if name != self.phase_name:
            self.phase_name = name
            self._phase_t = time.time()
            self.heartbeat.poke()
        self._fire_injections()
        if self._notice is not None:
            raise RecoveryRequested(f"generation {self._notice['generation']} opened")

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
        self.step = step
        self._step_t0 = self._phase_t = time.time()
        self._disarm()
        self.heartbeat.poke()  # a new step is progress even if the phase name is the same
        self.phase("forward")

    def commit(self, step: int, output: Any = None) -> None:
        """Make ``step`` the newest recovery point of this rank."""
        self.phase("after_step")
        live = self.integration.capture()
        live.meta["fr/rng_cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            live.meta["fr/rng_cuda"] = torch.cuda.get_rng_state_all()
        live.meta["fr/step"] = step
        self.copies.start(step, live)
        self.ring.commit(step, live)
        self.copies.wait()
        self.committed = step
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
            except (transfer.ChecksumError, RecoveryImpossible):
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
                  traceback=tb[-4000:])
        sys.stderr.write(tb)
        sys.stderr.flush()
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
        info = {"has_state": not me_lost, "ring": [] if me_lost else self.ring.steps(),
                "held": {} if me_lost else {str(w): s for w, s in self.copies.held().items()},
                "committed": -1 if me_lost else self.committed}
        infos: list = [None] * self.world_size
        dist.all_gather_object(infos, info, group=self.group)
        lost = {r for r, i in enumerate(infos) if not i["has_state"]}
        point, sources = self._recovery_point(infos, lost)
        if point is not None:
            # the last step every rank finished: a lost rank finished what its copies hold
            finished = [i["committed"] for r, i in enumerate(infos) if r not in lost]
            finished += [max((s for i in infos for s in i["held"].get(str(x), [])), default=-1)
                         for x in lost]
            steps_lost = max(0, min(finished) - point)
        else:
            reason = (f"ranks {sorted(lost)} and every holder of their copies are lost; "
                      "no consistent state among live peers")
            if self.cfg.checkpoint_dir:  # every rank takes this branch: the infos are the same
                resume = self._fall_back_to_checkpoint(infos, lost)
                if resume is not None:
                    return resume
                reason += f", and {self.cfg.checkpoint_dir} holds no checkpoint to fall back to"
            good = min(i["committed"] for r, i in enumerate(infos) if r not in lost) \
                if len(lost) < self.world_size else -1
            self.send("fatal", reason=reason, step=self.step, last_good_step=good)
            raise RecoveryImpossible(reason)
        works, received = [], {}
        for dst, (src_rep, src_unique) in sorted(sources.items()):
            if self.rank == src_rep:
                st = self.ring.get(point)
                history = {s: v for s, v in self.history.items() if s <= point}
                works += transfer.send(transfer.pack(st.replicated, {"history": history}, point),
                                       dst, self.group)
            if self.rank == src_unique:
                works += transfer.send(self._held_copy(dst, point), dst, self.group)
            if self.rank == dst:
                received["replicated"] = transfer.recv(src_rep, self.group)
                received["unique"] = transfer.recv(src_unique, self.group)
        transfer.wait_all(works)
        # every rank now restores the state that ends step ``point``, to redo ``point + 1``
        # (injections at phase "restore" fire here: a replacement lost while it restores)
        self.step = point + 1
        self._fire_injections()
        if me_lost:
            try:
                rep, rep_meta = transfer.unpack(received["replicated"], self.cfg.verify_checksums)
                self.history = rep_meta["history"]
                uniq, meta = transfer.unpack(received["unique"], self.cfg.verify_checksums)
            except transfer.ChecksumError as e:
                self.send("fatal", reason=str(e), step=point, last_good_step=point)
                log.error("rank=%d generation=%d step=%d phase=restore %s", self.rank,
                          self.generation, point, e)
                raise
            state = RankState(rep, uniq, meta)
        else:
            state = self.ring.get(point)
        self._restore(state)
        self.ring.drop_after(point)
        self.history = {s: v for s, v in self.history.items() if s <= point}
        if me_lost:
            self.ring.commit(point, self._live_with_rng())
        self._settle(point, steps_lost, lost)
        log.info("rank=%d generation=%d step=%d phase=restore recovered to step %d",
                 self.rank, self.generation, point, point)
        return point + 1

    def _fall_back_to_checkpoint(self, infos: list, lost: set) -> Optional[int]:
        """No live copy of a lost rank's state: every rank loads the framework's latest disk
        checkpoint instead, and the steps since it are redone (and reported as lost)."""
        step = self.integration.load_checkpoint(self.cfg.checkpoint_dir)
        if step is None:
            return None
        finished = [i["committed"] for r, i in enumerate(infos) if r not in lost]
        steps_lost = max(0, min(finished) - step) if finished else 0
        survivors = [r for r in range(self.world_size) if r not in lost]
        history = [{s: v for s, v in self.history.items() if s <= step}]
        if survivors:  # what the steps up to the checkpoint returned, for the lost ranks too
            dist.broadcast_object_list(history, src=survivors[0], group=self.group)
        self.history = history[0]
        self.ring.drop_after(-1)
        self.ring.commit(step, self._live_with_rng())
        self._settle(step, steps_lost, lost, fallback=True)
        log.warning("rank=%d generation=%d step=%d phase=restore no live copy of ranks %s: fell "
                    "back to the checkpoint of step %d in %s (%d steps redone)", self.rank,
                    self.generation, step, sorted(lost), step, self.cfg.checkpoint_dir, steps_lost)
        if self.rank == 0:
            self.event("fallback_to_checkpoint", checkpoint_step=step, steps_lost=steps_lost,
                       lost=sorted(lost), directory=self.cfg.checkpoint_dir)
        return step + 1

    def _recovery_point(self, infos: list, lost: set) -> tuple[Optional[int], dict]:
        """The newest step every survivor has and every lost rank can be rebuilt at, and who
        serves each lost rank (replicated state, unique state)."""
        survivors = [r for r in range(self.world_size) if r not in lost]
        common = set.intersection(*(set(infos[r]["ring"]) for r in survivors)) if survivors else set()
        for point in sorted(common, reverse=True):
            sources = {}
            for x in sorted(lost):
                reps = [r for r in self.replica_of[x] if r not in lost]
                holders = [r for r in survivors if point in infos[r]["held"].get(str(x), [])]
                if not reps or not holders:
                    break
                # spread the load: lost rank x takes its replica from a peer chosen by x
                sources[x] = (reps[x % len(reps)], holders[0])
            else:
                return point, sources
        return None, {}

    def _held_copy(self, ward: int, step: int) -> transfer.Packed:
        return self.copies.copies[ward][step]

    def _restore(self, state: RankState) -> None:
        self.integration.restore(state)
        if "fr/rng_cpu" in state.meta:
            torch.set_rng_state(state.meta["fr/rng_cpu"])
        if "fr/rng_cuda" in state.meta and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state.meta["fr/rng_cuda"])

    def _live_with_rng(self) -> RankState:
        live = self.integration.capture()
        live.meta["fr/rng_cpu"] = torch.get_rng_state()
        live.meta["fr/step"] = self.committed
        return live

    def _settle(self, point: int, steps_lost: int, lost: set, fallback: bool = False) -> None:
        """Every rank stands at ``point`` now: its counters, its copies, what it will report."""
        self.committed = self.step = point
        self.has_state = True
        self._refresh_copies(point)
        self._last_sync = {"recovery_point": point, "steps_lost": steps_lost, "lost": sorted(lost),
                           "restored_t": time.time(), **({"fallback": True} if fallback else {})}

    def _refresh_copies(self, point: int) -> None:
        """After a recovery every rank re-sends its copy of ``point``: the replacement held
        copies for others that died with its predecessor."""
        self.copies.start(point, self._live_with_rng())
        self.copies.wait()

    def close(self) -> None:
        self.sm.to(State.FINISHED, self.generation, self.step)
        self.store.set(f"fr/finished/{self.rank}", b"1")
        self.send("finished", step=self.step)
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
