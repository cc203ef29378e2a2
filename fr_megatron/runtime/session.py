"""The recovery session inside one training process: the runtime's public API.

A training script written for ``fr-megatron run``::

    session = Session.from_env()
    session.init_process_group("gloo")          # on PrefixStore("gen{g}/")
    ... build groups, model, optimizer ...
    session.attach(integration)                  # fr_megatron.megatron / .deepspeed / TorchIntegration
    session.run(train_step, num_steps)           # train_step(step) marks session.phase(...)

``run`` is made of ``start`` / ``begin_step`` / ``commit`` / ``recover``, which loops that are not
ours (Megatron-LM's ``train()``) call directly. The session ties together the parts that do the
work: its link to the control plane (``control``), the step transaction (``transaction``), the
recovery procedure (``recovery``), the communicators (``comms``), the recovery state machine
(``state_machine``) and fault injection (``inject``). A step that raises anywhere before
``commit`` returns leaves no trace once recovery restores the recovery point, the last step that
every rank committed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.profiler import record_function

from ..config import FlashRecoveryConfig, parse_address
from ..events import log_recovery_to_script_run
from ..protocol import keys
from ..protocol import modules as job_modules
from ..protocol.auth import read_token
from ..protocol.node_beats import BeatSender
from ..protocol.stderr_tail import restore_stderr
from ..protocol.store import connect_cuttable, wait_key
from . import comm_progress, inject, transaction
from .abort_watch import AbortWatch
from .comms import Communicators, RendezvousInterrupted, release_deferred
from .control import ControlLink
from .errors import (EXIT_FAULTY, RecoveryImpossible, RecoveryRequested, exit_process,
                     is_communication_failure)
from .integration import Integration, check_shrink_policy
from .layout import ChecksumError
from .recovery import Recovery
from .state_machine import RecoveryStateMachine, State
from .transaction import StepTransaction

log = logging.getLogger("fr_megatron.runtime")


# whether torch's profiler runs now (a private function of torch's: a torch without it gets every
# range, as before the check existed)
_profiler_enabled = getattr(torch._C._autograd, "_profiler_enabled", lambda: True)


def _profiled(name: str):
    """A range named in the user's profiles (PyTorch profiler, NVTX under ``emit_nvtx``); nothing
    while no profiler runs, where a range would cost the training thread about 9 us each."""
    return record_function(name) if _profiler_enabled() else contextlib.nullcontext()


__all__ = ["Session", "RecoveryRequested", "RecoveryImpossible", "EXIT_FAULTY"]

# a rank that has stayed in one phase for this fraction of its hang timeout puts its collective
# progress in its beats (``comm_progress``): the controller compares it once ranks stall, and a
# running job's beats stay small
COMM_AFTER_FRACTION = 0.25
# the innermost frames of the training thread that a rank stuck after an abort reports
STUCK_STACK_FRAMES = 12


class Session:
    def __init__(self, *, rank: int, world_size: int, nproc_per_node: int, controller: str,
                 token: bytes, generation: int, replacement: bool,
                 agent_socket: str, config: Optional[FlashRecoveryConfig] = None,
                 injections: str = "", snapshot_dir: Optional[str] = None,
                 handover_dir: Optional[str] = None):
        # ``rank`` is the job rank, this process's name for the control plane (heartbeats,
        # snapshots, injections); its rank in the current world is ``world_rank``: the two
        # differ once the job goes on with fewer replicas (``members``)
        self.rank, self.job_size, self.nproc = rank, world_size, nproc_per_node
        self.members = list(range(world_size))  # the job ranks of the current world, in order
        self.world_rank = rank  # this rank's rank in the current world (dist.get_rank())
        self.cfg = config or FlashRecoveryConfig()
        self.host, self.port = parse_address(controller, "FR_CONTROLLER")
        self.replacement = replacement
        self.has_state = True  # False until a replacement has restored its state from peers
        self.fresh = False  # started as the job grows back: no state of its own anywhere
        self.history: dict[int, Any] = {}  # step -> what train_step returned, for every step
        self.link = ControlLink(rank, self.host, self.port, token, agent_socket, self.cfg,
                                self._status, self._orphaned)
        self.generation = max(generation, self.link.latest_generation())
        self.sm = RecoveryStateMachine(rank)
        self.step, self.phase_name = 0, "init"
        self._phase_t = time.monotonic()  # when the step or phase last changed
        self._step_t0 = time.monotonic()
        self.step_times: list[float] = []
        self.integration: Optional[Integration] = None
        self.tx = StepTransaction(rank, self.cfg, snapshot_dir, handover_dir)
        self.tx.interrupted = self.superseded  # a fault plan ends a wait for copies in flight
        self.recovery = Recovery(self)
        # an injected fault lands once the last commit's snapshot is sealed (a real fault
        # during the copy costs the step before it too: the recovery point is then the step
        # before that), and after the heartbeat that names its step and phase
        self.injector = inject.Injector(rank, injections, self._claim, self.tx.wait_snapshot,
                                        self.link.beat_now, self._group_kinds)
        self.group = None
        self.comms: Optional[Communicators] = None
        self._notice: Optional[dict] = None
        self._lock = threading.Lock()
        self._pending_report: Optional[dict] = None
        self._pending_faults: list[dict] = []
        self.recoveries: list[dict] = []
        self._trained = False  # this process has committed a training step
        self._published = False  # its modules, for the warm spares
        self._recoveries_logged = 0
        # what the framework calls the step after runtime step ``s``: ``s + iteration_offset``
        # (Megatron-LM's iteration); a recovery goes into the script's wandb run there
        self.iteration_offset = 0
        self.sm.on_change = self.link.heartbeat.poke
        comm_progress.install()  # before any group exists: every operation is counted
        comm_progress.TRACKER.current_phase = lambda: self.phase_name
        self.link.start(lambda: self.generation, self._on_plan)

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
                   snapshot_dir=env.get("FR_SNAPSHOT_DIR"),
                   handover_dir=env.get("FR_HANDOVER_DIR"))

    # what other modules read of a session
    @property
    def world_size(self) -> int:
        return len(self.members)

    @property
    def store(self):
        return self.link.store

    @property
    def signer(self):
        return self.link.signer

    @property
    def committed(self) -> int:
        return self.tx.committed

    def send(self, kind: str, **body) -> None:
        self.link.send(kind, **body)

    def event(self, name: str, **fields) -> None:
        self.link.send("event", event=name, generation=self.generation, step=self.step,
                       phase=self.phase_name, fields=fields)

    # ---- what the control plane sees and says ------------------------------------------
    def _status(self) -> dict:
        """The heartbeat's body (its thread calls this)."""
        step_times = self.step_times
        timeout = self.cfg.step_hang_timeout(self.phase_name, step_times,
                                             resuming=self._pending_report is not None)
        status = {"generation": self.generation, "step": self.step, "phase": self.phase_name,
                  "state": self.sm.state.value, "committed": self.tx.committed,
                  "inject_t": self.injector.fired_t, "hang_timeout": timeout}
        # bounded by the job's hang timeout: a rank in its first step (no timeout of its own
        # yet) may be the one its peers wait for, or one waiting
        stall_after = COMM_AFTER_FRACTION * min(
            timeout, self.cfg.resolved_hang_timeout(step_times[-50:]))
        if time.monotonic() - self._phase_t >= stall_after:
            status["comm"] = comm_progress.TRACKER.report()
        return status

    def _orphaned(self, silent_s: float) -> None:
        log.error("rank=%d generation=%d step=%d phase=%s cannot reach its node agent for %.1f s "
                  "(twice the node timeout): the agent is gone, exiting; last committed step %d",
                  self.rank, self.generation, self.step, self.phase_name, silent_s,
                  self.tx.committed)
        exit_process(EXIT_FAULTY)

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
                if self.rank not in plan["replaced"]:
                    self._watch_abort()
            log.info("rank=%d generation=%d step=%d phase=%s fault notice (generation %d): "
                     "aborted %d links", self.rank, self.generation, self.step, self.phase_name,
                     plan["generation"], n)

    def _watch_abort(self) -> None:
        """Leave as faulty if the training thread stays inside an operation that the abort
        did not end (``abort_watch``)."""
        generation = self.generation

        def training() -> bool:
            return self.generation == generation and self.sm.state in (State.RUNNING,
                                                                       State.SYNCING)

        def stuck(seconds: float) -> None:
            operation = comm_progress.TRACKER.main_key()
            frame = sys._current_frames().get(threading.main_thread().ident)
            stack = "".join(traceback.format_stack(frame)[-STUCK_STACK_FRAMES:]) if frame else ""
            log.error("rank=%d generation=%d step=%d phase=%s still inside %s %.1f s after the "
                      "abort: it cannot take part in the recovery; exiting as faulty; the "
                      "training thread:\n%s", self.rank, self.generation, self.step,
                      self.phase_name, operation, seconds, stack)
            self._leave_faulty("stuck", operation=operation, stack=stack)

        AbortWatch(training, comm_progress.TRACKER.main_inside, stuck).start()

    def enter_generation(self, plan: dict) -> None:
        with self._lock:  # a notice of an even newer plan that came meanwhile is kept
            self.generation = plan["generation"]
            self._adopt_members(plan)
            if self._notice is not None and self._notice["generation"] <= self.generation:
                self._notice = None

    def _plan_of_own_generation(self) -> dict:
        """The plan of the generation this process was started in. A rank started as the job
        grows back (``launcher.shrink``) is started before its generation opens: it says it
        stands by, and waits while the others train."""
        key = keys.plan(self.generation)
        if not self.store.check([key]):
            self.send("standby", generation=self.generation, pid=os.getpid())
            log.info("rank=%d generation=%d stands by until its generation opens", self.rank,
                     self.generation)
            while not wait_key(self.store, key, 1.0):
                pass
        return self.link.plan_for(self.generation)

    def _adopt_members(self, plan: dict) -> None:
        """The world of ``plan``: its members (every job rank unless the job has shrunk)."""
        self.members = list(plan.get("members", range(self.job_size)))
        self.world_rank = self.members.index(self.rank)
        if self.comms is not None:
            self.comms.resize(self.world_rank, self.world_size)

    def superseded(self) -> bool:
        return self._notice is not None

    def _wait_plan(self) -> dict:
        return self.link.wait_plan(self.generation, lambda: self._notice)

    def _leave_if_replaced(self, plan: dict, when: str) -> None:
        if self.rank in plan["replaced"]:
            log.error("rank=%d was %s in generation %d; exiting", self.rank, when,
                      plan["generation"])
            exit_process(EXIT_FAULTY)
        if self.rank in plan.get("removed", ()):
            # its data-parallel replica left the world (a shrink); its node agent ends it
            log.warning("rank=%d generation=%d step=%d phase=%s its data-parallel replica left "
                        "the world; exiting", self.rank, plan["generation"], self.step,
                        self.phase_name)
            exit_process(EXIT_FAULTY)

    # ---- set-up ----------------------------------------------------------------------------
    def init_process_group(self, backend: str = "gloo") -> None:
        if self.generation > 0:  # a replacement: the world of its generation
            plan = self._plan_of_own_generation()
            self.fresh = self.rank in plan.get("grown", ())
            self._adopt_members(plan)
        self.comms = Communicators(lambda: connect_cuttable(self.host, self.port), self.port,
                                   self.world_rank, self.world_size, backend)
        while True:
            try:
                self.comms.init_world(self.generation, self.superseded)
                break
            except RendezvousInterrupted:
                # a peer failed before the job was even up: follow the newer generation
                plan = self._wait_plan()
                self._leave_if_replaced(plan, "replaced before it joined")
                self.enter_generation(plan)
        log.info("rank=%d generation=%d joined world of %d (%s)%s", self.rank, self.generation,
                 self.world_size, backend, " as replacement" if self.replacement else "")
        if self.replacement:
            self.send("joined", generation=self.generation, pid=os.getpid())

    def attach(self, integration: Integration) -> None:
        """Hand the runtime the framework's state; builds the runtime's own groups."""
        check_shrink_policy(self.cfg.shrink, integration)
        self.integration = integration
        integration.install_phase_marks(self.phase)
        self.tx.guard(integration.optimizers())
        self.build_runtime_groups()

    def build_runtime_groups(self) -> None:
        """The runtime's own gloo group, and who copies what to whom."""
        self.group = dist.new_group(backend="gloo")
        summary = self.tx.configure(self.integration, self.group, self.members,
                                    self.world_rank, self.nproc, self.has_state)
        if summary is not None and self.world_rank == 0:
            self.event("redundancy", **summary)

    # ---- the step transaction --------------------------------------------------------------
    def phase(self, name: str) -> None:
        """Mark where in the step this rank is; fires injected faults; notices fault plans.
        Before the optimizer phase changes the state, the last commit's snapshot and copies are
        complete (they ran during this step's forward and backward)."""
        if name != self.phase_name:
            self.phase_name = name
            self._phase_t = time.monotonic()
            self.link.heartbeat.poke()
        self.injector.at_phase(self.step, name)
        if self._notice is not None:
            raise RecoveryRequested(f"generation {self._notice['generation']} opened")
        if name == "optimizer":
            with _profiled("fr_megatron.wait_snapshot_read"):
                self.tx.before_optimizer()
        elif name != "forward":
            self.tx.start_copy()  # a deferred copy starts by the first backward at the latest

    def defer_snapshot_copy(self) -> None:
        """The integration calls ``forward_issued`` in each step: snapshot copies on a GPU
        wait for it."""
        self.tx.defer_copy = True

    def forward_issued(self) -> None:
        """The integration's word that this step's first forward is queued on the device: the
        last commit's deferred snapshot copy starts (``StepTransaction.defer_copy``)."""
        self.tx.start_copy()

    def _claim(self, inj: inject.Injection) -> bool:
        return self.link.claim(keys.injection_fired(inj.index))

    def _group_kinds(self) -> dict[str, list]:
        kinds = dict(self.integration.group_kinds()) if self.integration else {}
        if dist.is_initialized():
            kinds.setdefault("world", [dist.distributed_c10d._get_default_group()])
        return kinds

    def start(self) -> int:
        """The first step to run: 1 on a fresh job, the recovery point + 1 for a replacement."""
        if self.replacement:
            self.has_state = False
            self.sm.to(State.SYNCING, self.generation, self.step)
            try:
                return self._sync_and_resume(self.link.plan_for(self.generation))
            except Exception as exc:  # noqa: BLE001 - recover() tells a fault from our own
                return self.recover(exc)
        self.sm.to(State.RUNNING, self.generation, 0)
        self.step = 0
        self.commit(0)
        return 1

    def begin_step(self, step: int) -> None:
        with _profiled("fr_megatron.begin_step"):
            self._after_commit()
            self.step = step
            self._step_t0 = self._phase_t = time.monotonic()
            self.injector.new_step(step)
            self.link.heartbeat.poke()  # a new step is progress even if the phase name is the same
            self.phase("forward")

    def commit(self, step: int, output: Any = None) -> None:
        """Make ``step`` the newest recovery point of this rank."""
        self.phase("after_step")
        with _profiled("fr_megatron.commit"):  # named in the user's profiles
            self.tx.commit(step, transaction.capture(self.integration, step))
        if step:
            self.history[step] = output
            self.step_times.append(time.monotonic() - self._step_t0)
        if self._pending_report is not None:
            rep, self._pending_report = self._pending_report, None
            rep["phases"]["resume"] = time.monotonic() - rep.pop("restored_t")
            rep["phases"] = {k: round(v, 4) for k, v in rep["phases"].items()}
            self.send("recovered", generation=self.generation, pid=os.getpid(),
                      first_step_t=time.time(), **rep)
            self.recoveries.append(rep)
            release_deferred()  # the groups of older generations, now that the rebuild is over

    def _after_commit(self) -> None:
        """What follows a committed step, outside the step transaction: training has started
        (rank 0 publishes what it imported, for the warm spares); this process's start-up is
        over at its first training step (its stderr goes straight to the launcher's again: the
        agent kept its tail for a start-up failure); a recovery it resumed from."""
        if self.tx.committed >= 0 and not self._published:
            self._published = True
            if self.world_rank == 0:
                job_modules.publish_soon(self.host, self.port, self.signer)
        if self.tx.committed >= 1 and not self._trained:
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
            except Exception as exc:  # noqa: BLE001 - recover() tells a fault from our own
                step = self.recover(exc)
        self.close()
        return dict(self.history)

    # ---- recovery ----------------------------------------------------------------------------
    def recover(self, exc: BaseException) -> int:
        """Survive a fault elsewhere: abort, rebuild on the new generation, restore; the step
        to run next. An exception that is not a communication failure is this rank's own fault:
        it is reported and the process exits (its agent replaces it).

        A fault during the recovery itself (a peer or the replacement dying while groups are
        rebuilt or state is restored) sends this rank back to waiting for the next plan.
        """
        while True:
            if not is_communication_failure(exc):
                self._die(exc)
            with self._lock:
                if self.sm.state != State.ABORTING:
                    self.sm.to(State.ABORTING, self.generation, self.step)
                if self.comms:
                    self.comms.abort()
            log.warning("rank=%d generation=%d step=%d phase=%s communication failed: %s",
                        self.rank, self.generation, self.step, self.phase_name,
                        str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__)
            self.tx.abandon()
            plan = self._wait_plan()
            self._leave_if_replaced(plan, "declared faulty")
            try:
                self.recovery.rebuild(plan)
                return self._sync_and_resume(plan)
            except (ChecksumError, RecoveryImpossible):
                raise
            except Exception as e:  # noqa: BLE001 - classified at the top of the loop
                # whatever a rendezvous cut short by a newer plan raised, it is not our fault
                exc = RendezvousInterrupted(str(e)) if self.superseded() else e

    def _sync_and_resume(self, plan: dict) -> int:
        self._pending_faults = list(plan.get("faults", []))
        step = self.recovery.sync(plan)
        self.sm.to(State.RUNNING, self.generation, self.step)
        self._pending_report = {"phases": self.sm.take_phases(), **self.recovery.last}
        return step

    def _die(self, exc: BaseException) -> None:
        """This rank's own fault: report it with its traceback and exit; an agent replaces us."""
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        log.error("rank=%d generation=%d step=%d phase=%s exception: %s", self.rank,
                  self.generation, self.step, self.phase_name, exc)
        try:
            sys.stderr.write(tb)
            sys.stderr.flush()
        except OSError:
            pass  # nowhere to write it: the report carries it
        self._leave_faulty("exception", traceback=tb[-4000:])

    def _leave_faulty(self, kind: str, **detail) -> None:
        """Report this rank's own fault to the controller and exit; its agent replaces it."""
        self.tx.wait_snapshot()  # the replacement adopts it from shared memory
        handed = self.tx.hand_over()  # or, where it is in process memory, from these files
        if handed:
            log.info("rank=%d generation=%d step=%d phase=%s handed over %d MB of snapshots "
                     "for its replacement", self.rank, self.generation, self.step,
                     self.phase_name, handed >> 20)
            detail["handed_over_bytes"] = handed
        self.send("fault", fault=kind, pid=os.getpid(), step=self.step, phase=self.phase_name,
                  generation=self.generation, fault_t=time.time(), committed=self.tx.committed,
                  **detail)
        exit_process(EXIT_FAULTY)

    # ---- the end -----------------------------------------------------------------------------
    def stats(self) -> dict:
        return self.tx.stats(self.integration, self.step_times)

    def close(self) -> None:
        self._after_commit()
        self.sm.to(State.FINISHED, self.generation, self.step)
        self.link.mark_finished()
        self.send("finished", step=self.step, stats=self.stats())
        self.link.beat_now()  # the finished mark above is what the agent and controller go by
        self.link.stop()
        self.tx.close()
        if dist.is_initialized():
            dist.barrier(group=self.group)  # nobody tears down links a peer still uses
            dist.destroy_process_group()
