"""The node agent: starts this node's workers, sees them die at once, replaces only the faulty.

Workers get the environment torchrun would give them, so an existing script runs unchanged.
A blocking ``waitpid`` thread learns of a death the moment it happens; a light poll finds stopped
(SIGSTOP) workers. Faults go to the controller; the agent acts only on the controller's signed
plans: it kills a replaced rank that is still alive (a hung one) and hands its rank to a warm
spare, or spawns a fresh process when none is left; it ends the ranks whose data-parallel replica
left the world (a shrink). Healthy workers of the world are never touched.

Heartbeats: the node's ranks send theirs to the agent (a local Unix socket); the agent beats
its own key with all of them inside (``protocol.node_beats``), so the controller reads one key per
node. Node liveness: a node whose agent falls silent is lost
(machine gone, link cut) and its ranks move to a spare node (``--spare-node``), an agent that
starts no workers of its own. An agent that cannot reach the store for the node timeout fences
itself: it kills its workers, so a partitioned node cannot come back and act on a stale world.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

import psutil

from ..config import FlashRecoveryConfig
from ..protocol import keys
from ..protocol import modules as learned_modules
from ..protocol import node_beats
from ..protocol.auth import AuthError, Signer
from ..protocol.stderr_tail import STDERR_FD_ENV, StderrTail
from ..protocol.store import connect, wait_key
from . import shared_memory, template
from .detector import fault_time
from .spare import DEFAULT_PRELOAD, MODULES_ENV, PRELOAD_ENV, SCRIPT_ENV

log = logging.getLogger("fr_megatron.agent")


@dataclass
class Worker:
    rank: int
    proc: subprocess.Popen
    generation: int
    how: str = "initial"
    expected_exit: bool = False  # killed by a plan: its death is not a new fault
    stderr: Optional[StderrTail] = None  # its start-up output, for a start-up failure's report


TEMPLATE_ENV = "FR_WORKER_TEMPLATE"

# a worker ended by one of these was told to stop (by a user or a scheduler): the job stops
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def classify_exit(status: int) -> tuple[str, dict]:
    """waitpid status → (fault kind, detail); kind "stop_signal" for ``STOP_SIGNALS``."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig in STOP_SIGNALS:
            return "stop_signal", {"signal": signal.Signals(sig).name}
        return ("segv" if sig == signal.SIGSEGV else "crash"), {"signal": signal.Signals(sig).name}
    code = os.WEXITSTATUS(status)
    return ("exit" if code else "exit0_early"), {"exit_code": code}


INBOX_WAIT_S = 0.1  # the inbox thread's longest wait for a beat
# how long a dead worker's last beats may take to be read: they are queued already, so this is
# the inbox thread's turn to run
LAST_BEATS_WAIT_S = 0.5
WAKE_WAIT_S = 30.0  # an idle agent's one wait; it ends early when a plan or the end comes


def popen_without_sigint(cmd: list[str], **kwargs) -> subprocess.Popen:
    """Start a job process with SIGINT blocked (a signal mask is inherited): a Ctrl-C in the
    terminal reaches every process of the foreground group, and the launcher, not each rank,
    turns it into the job's orderly stop."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return subprocess.Popen(cmd, **kwargs)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def watch_plan(store, g: int) -> Optional[bytes]:
    """One turn of an agent's plan watch: the raw message at ``keys.agent_wake(g)`` (the plan of
    generation ``g``, or ``done``), or None when ``WAKE_WAIT_S`` passed without either.

    Idle, an agent costs the store two messages (a wait and its cancel) per ``WAKE_WAIT_S``;
    a wake costs two (the wait, the get)."""
    if wait_key(store, keys.agent_wake(g), WAKE_WAIT_S):
        return store.get(keys.agent_wake(g))
    return None


class NodeAgent:
    def __init__(self, *, node_rank: int, nnodes: int, nproc: int, controller: tuple[str, int],
                 token: bytes, token_file: str, cfg: FlashRecoveryConfig, script: str,
                 script_args: list[str], spares: int, inject: Optional[str] = None,
                 preload: str = "", python: str = sys.executable,
                 extra_env: Optional[dict] = None, connect_timeout: float = 30.0,
                 spare_node: bool = False, run_dir: str, with_controller: bool = False):
        self.node, self.nnodes, self.nproc = node_rank, nnodes, nproc
        # in the controller's own process the agent cannot be cut off from it: a stall of the
        # process (seconds, on a node with more ranks than cores) must not make it kill its
        # workers
        self.with_controller = with_controller
        self.spare_node = spare_node
        # the ranks this node hosts: its own, or, for a spare node, those the plans move to it
        self.ranks: set[int] = set() if spare_node else set(range(node_rank * nproc,
                                                                  (node_rank + 1) * nproc))
        self.world_size = nnodes * nproc
        self.host, self.port = controller
        self.signer = Signer(token, f"agent{node_rank}")
        self.token_file = token_file
        self.cfg = cfg
        self.script, self.script_args = os.path.abspath(script), list(script_args)
        self.n_spares = max(spares, nproc) if spare_node else spares
        self._lent_slots: set[int] = set()  # removed ranks whose slot holds an extra spare
        self.inject = inject
        # the spares' start: the default list and the --preload additions; the job's own
        # modules follow once rank 0 has published them (``_learn_modules``)
        self.preload = ",".join(dict.fromkeys(
            m.strip() for m in f"{DEFAULT_PRELOAD},{preload}".split(",") if m.strip()))
        self.run_dir = run_dir
        self._learned: Optional[str] = None  # the learned module list, as a file for spares
        self.python = python
        self.extra_env = extra_env or {}
        self.store = connect(self.host, self.port, connect_timeout)
        self.generation = 0
        self.workers: dict[int, Worker] = {}      # pid -> worker
        self.spares: list[subprocess.Popen] = []
        self._held: set[int] = set()  # spares started during a recovery, stopped until its end
        self.finished: set[int] = set()
        self._lock = threading.RLock()
        self._done = threading.Event()
        self._beat_ok_t = time.monotonic()
        self.fenced = False
        self.stopping: Optional[dict] = None  # the controller's signed stop, when one came
        self.end: Optional[dict] = None       # the controller's signed done
        self._force_stop = threading.Event()  # stop now, whatever the controller says
        self._force_signal = "SIGINT"
        self._stderr_fd = os.dup(2)  # the launcher's stderr, for each worker (``StderrTail``)
        # the ranks' heartbeats: received here, relayed in the node's own beat
        self.inbox = node_beats.BeatInbox(node_beats.socket_path(run_dir))
        self._beats_taken = threading.Condition()  # notified after each pass of the inbox
        self._inbox_passes = 0
        self.beats: dict[int, dict] = {}  # rank -> newest verified beat (node_beats.RANK_FIELDS)
        self._beat_now = threading.Event()
        self._rejected_beats = 0
        self.snapshot_dir = shared_memory.make(cfg.snapshot_dir, os.path.basename(run_dir),
                                               node_rank)
        self.handover_dir = os.path.join(run_dir, "handover")
        os.makedirs(self.handover_dir, mode=0o700, exist_ok=True)
        # this node's workers are forked from one process that has imported torch and the
        # runtime (``template``); FR_WORKER_TEMPLATE=0 starts each as its own process
        self.template: Optional[template.Template] = None
        if (self.ranks and os.environ.get(TEMPLATE_ENV, "1") != "0"
                and template.become_subreaper()):
            self.template = template.Template(self.python, self._base_env(), popen_without_sigint)

    # ---- processes ---------------------------------------------------------------------
    def _env(self, rank: int, generation: int, replacement: bool) -> dict:
        env = {
            # node and local rank are the rank's place in the job, wherever it runs now
            "RANK": str(rank), "LOCAL_RANK": str(rank % self.nproc),
            "WORLD_SIZE": str(self.world_size), "LOCAL_WORLD_SIZE": str(self.nproc),
            "GROUP_RANK": str(rank // self.nproc), "NODE_RANK": str(rank // self.nproc),
            "MASTER_ADDR": self.host, "MASTER_PORT": str(self.port),
            "FR_CONTROLLER": f"{self.host}:{self.port}", "FR_TOKEN_FILE": self.token_file,
            "FR_NODE_RANK": str(self.node), "FR_NNODES": str(self.nnodes),
            "FR_GENERATION": str(generation), "FR_REPLACEMENT": "1" if replacement else "0",
            "FR_CONFIG": self.cfg.to_env(), "TORCH_CPP_LOG_LEVEL": "ERROR",
            # as torchrun: env:// makes every rank a client of the store the controller hosts
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            **self.extra_env,
        }
        if self.inject:
            env["FR_INJECT"] = self.inject
        return env

    def _base_env(self) -> dict:
        env = dict(os.environ)
        if self.nproc > 1:
            # as torchrun: one OpenMP thread per process unless the user says otherwise, or N
            # ranks on a node fight over its cores (and a spare must start with it too)
            env.setdefault("OMP_NUM_THREADS", "1")
        env.update(self.extra_env)
        env[PRELOAD_ENV] = self.preload
        env[SCRIPT_ENV] = self.script
        if self._learned:
            env[MODULES_ENV] = self._learned
        env["FR_TOKEN_FILE"] = self.token_file
        env[node_beats.SOCKET_ENV] = self.inbox.path
        env["TORCH_CPP_LOG_LEVEL"] = "ERROR"
        if self.snapshot_dir:
            env[shared_memory.ENV] = self.snapshot_dir
        env[shared_memory.HANDOVER_ENV] = self.handover_dir
        return env

    def _fork(self, argv: list[str], env: dict, fds: dict[str, int], spare: bool) -> Optional[int]:
        """A process forked by the worker template (its pid), or None when there is no template
        (any more): after a failure the node starts processes of their own."""
        if self.template is None:
            return None
        try:
            return self.template.fork(argv, env, fds, spare=spare)
        except (OSError, ValueError) as e:
            log.warning("node=%d the worker template failed (%s); starting workers and spares "
                        "as processes of their own", self.node, e)
            self.template.close()
            self.template = None
            return None

    def _spawn_worker(self, rank: int, generation: int, replacement: bool):
        env = {**self._base_env(), **self._env(rank, generation, replacement),
               STDERR_FD_ENV: str(self._stderr_fd)}
        argv = [self.script, *self.script_args]
        proc = None
        if self.template is not None:
            read, write = os.pipe()
            pid = self._fork(argv, env, {"stderr": write, STDERR_FD_ENV: self._stderr_fd}, False)
            os.close(write)
            if pid is None:
                os.close(read)
            else:
                proc = template.ForkedWorker(pid, stderr=os.fdopen(read, "rb"))
        if proc is None:
            proc = popen_without_sigint([self.python, "-u", *argv], env=env,
                                        stderr=subprocess.PIPE, pass_fds=(self._stderr_fd,))
        proc.fr_stderr = StderrTail(proc.stderr, self._stderr_fd, f"rank{rank}")
        proc.fr_stderr.start()
        return proc

    def _spawn_spare(self):
        if self.template is not None:
            read, write = os.pipe()
            pid = self._fork([], self._base_env(), {"stdin": read}, True)
            os.close(read)
            if pid is not None:
                return template.ForkedWorker(pid, stdin=os.fdopen(write, "wb"))
            os.close(write)
        return popen_without_sigint([self.python, "-u", "-m", "fr_megatron.launcher.spare"],
                                    env=self._base_env(), stdin=subprocess.PIPE)

    def _replace(self, rank: int, generation: int) -> tuple[subprocess.Popen, str]:
        while self.spares:
            spare = self.spares.pop(0)
            if spare.poll() is not None:
                continue
            self._wake_held([spare], f"handed rank {rank}")  # it must load now
            try:
                assignment = {"env": self._env(rank, generation, True),
                              "argv": [self.script, *self.script_args]}
                spare.stdin.write((json.dumps(assignment) + "\n").encode())
                spare.stdin.flush()
                spare.stdin.close()
                return spare, "spare"
            except (BrokenPipeError, OSError):
                continue
        return self._spawn_worker(rank, generation, True), "spawn"

    # ---- messages ----------------------------------------------------------------------
    def _send(self, kind: str, **body):
        try:
            self.store.queue_push(keys.EVENTS, self.signer.sign(kind, **body))
        except Exception as e:
            log.error("node=%d cannot reach the controller: %s", self.node, e)

    def _last_heartbeat(self, rank: int) -> dict:
        return dict(self.beats.get(rank, {}))

    # ---- threads -----------------------------------------------------------------------
    def _reaper(self):
        """Blocking waitpid: a worker's death is known the moment it happens."""
        while not self._done.is_set():
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                time.sleep(0.05)
                continue
            t = time.time()
            self._take_last_beats(pid)
            with self._lock:
                w = self.workers.pop(pid, None)
                if w is None:
                    self.spares = [s for s in self.spares if s.pid != pid]
                    continue
                w.proc.returncode = os.waitstatus_to_exitcode(status)
                if w.expected_exit:
                    continue
                kind, detail = classify_exit(status)
                if kind == "stop_signal" or self.stopping is not None:
                    # told to stop, or ended while the job stops: the controller counts it
                    log.info("node=%d rank=%d pid=%d ended (%s %s) while the job stops",
                             self.node, w.rank, pid, kind, detail)
                    self._send("fault", rank=w.rank, pid=pid, fault=kind, fault_t=t,
                               node=self.node, generation=w.generation, **detail)
                    continue
                if self._finished(w.rank) or (kind == "exit0_early"
                                              and not self._has_session(w.rank)):
                    # a script without the recovery session has no "finished" mark: exit 0 is
                    # its normal end
                    self.finished.add(w.rank)
                    log.info("node=%d rank=%d finished (%s)", self.node, w.rank,
                             "exit 0" if kind == "exit0_early" else f"then {kind} {detail}")
                    if kind != "exit0_early":
                        # what the script does after training (a final save, an evaluation)
                        # failed: the job did not simply finish
                        log.error("node=%d rank=%d pid=%d finished training, then ended with "
                                  "%s %s", self.node, w.rank, pid, kind, detail)
                        self._send("ended_after_finishing", rank=w.rank, pid=pid, fault=kind,
                                   node=self.node, **detail)
                    if self.ranks and self.finished >= self.ranks:
                        self._send("node_done", node=self.node)
                        self._done.set()  # nothing left to supervise on this node
                    continue
                hb = self._last_heartbeat(w.rank)
                if w.stderr is not None and hb.get("committed", -1) < 1 and \
                        kind in ("exit", "exit0_early"):
                    # it ended in its start-up: what it wrote last says why
                    w.stderr.join(1.0)
                    detail["stderr"] = w.stderr.text()
                log.warning("node=%d rank=%d pid=%d fault=%s %s step=%s phase=%s", self.node,
                            w.rank, pid, kind, {k: v for k, v in detail.items() if k != "stderr"},
                            hb.get("step"), hb.get("phase"))
                self._send("fault", rank=w.rank, pid=pid, fault=kind,
                           fault_t=fault_time(hb.get("inject_t"), t, t), node=self.node,
                           generation=w.generation, step=hb.get("step", -1),
                           phase=hb.get("phase", "unknown"),
                           committed=hb.get("committed", -1), **detail)

    def _has_session(self, rank: int) -> bool:
        return rank in self.beats

    def _finished(self, rank: int) -> bool:
        try:
            return self.store.check([keys.finished(rank)])
        except Exception:
            return False

    def _stop_watch(self):
        """Finds stopped (SIGSTOP) workers: a stopped process sends nothing at all."""
        reported: set[int] = set()
        while not self._done.wait(0.05):
            with self._lock:
                procs = [(pid, w) for pid, w in self.workers.items() if not w.expected_exit]
            for pid, w in procs:
                try:
                    stopped = psutil.Process(pid).status() == psutil.STATUS_STOPPED
                except psutil.Error:
                    continue
                if stopped and pid not in reported:
                    reported.add(pid)
                    hb = self._last_heartbeat(w.rank)
                    now = time.time()
                    self._send("fault", rank=w.rank, pid=pid, fault="stop",
                               fault_t=fault_time(hb.get("inject_t"), now, now),
                               node=self.node, generation=w.generation,
                               step=hb.get("step", -1), phase=hb.get("phase", "unknown"))

    def _plan_watch(self):
        """Acts on each new generation's plan: replace this node's faulty ranks, nothing else."""
        watcher = connect(self.host, self.port)
        rejected: set[bytes] = set()
        while not self._done.is_set():
            # a stop takes the next generation's key; the job's end comes at the one after
            g = self.generation + (2 if self.stopping else 1)
            try:
                raw = watch_plan(watcher, g)
                if raw is None:
                    continue
            except Exception as e:  # store unreachable: the heartbeat decides about fencing
                log.warning("node=%d plan watch: %s", self.node, e)
                time.sleep(0.2)
                continue
            try:
                plan = self.signer.verify(raw)
                if plan["kind"] == "done":
                    self.end = plan
                    self._done.set()
                    return
                if plan["kind"] == "stop" and self.stopping is None:
                    self._on_stop(plan)
                    continue
                if plan["kind"] != "plan":
                    raise AuthError(f"a {plan['kind']!r} message where a plan belongs")
            except AuthError as e:
                if raw not in rejected:  # a forged plan is logged once, then waited out
                    rejected.add(raw)
                    log.error("node=%d rejected plan for generation %d: %s", self.node, g, e)
                time.sleep(0.2)
                continue
            self.generation = g
            moved = {int(r): n for r, n in plan.get("placement", {}).items()}
            for rank in plan["replaced"]:
                if moved.get(rank, rank // self.nproc) == self.node:
                    if rank in self._lent_slots:  # its replica comes back (a grow): the spare
                        self._lent_slots.discard(rank)  # that held its slot is the pool's no more
                        self.n_spares -= 1
                    self._apply(rank, g)
                elif rank in self.ranks:  # moved to another node: stop hosting it
                    self._release(rank)
            lost = {f["rank"] for f in plan.get("faults", ())}
            for rank in plan.get("removed", ()):
                if rank in self.ranks:  # its data-parallel replica left the world (a shrink)
                    log.info("node=%d generation=%d rank=%d leaves the world with its "
                             "data-parallel replica", self.node, g, rank)
                    self._release(rank)
                    if rank not in lost:
                        self._spare_in_place_of(rank, g)

    def _on_stop(self, stop: dict) -> None:
        """The job stops and its ranks save first: each gets SIGTERM (Megatron-LM's
        ``--exit-signal-handler`` signal), saves, and exits; the controller ends the job when
        all have, or when the stop timeout has passed."""
        self.stopping = stop
        with self._lock:
            live = [w for w in self.workers.values() if not w.expected_exit
                    and w.proc.poll() is None]
        log.info("node=%d the job stops (%s): SIGTERM to its %d ranks here, which save and exit",
                 self.node, stop.get("signal"), len(live))
        for w in live:
            try:
                os.kill(w.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def request_stop(self, signal_name: str, force: bool = False) -> None:
        """This node's launcher was told to stop (``launch``): the controller stops the job.
        ``force`` (a second signal) stops this node now, whatever the controller does."""
        if force:
            self._force_signal = signal_name
            self._force_stop.set()
            self._done.set()
            return
        self._send("stop_requested", signal=signal_name, node=self.node,
                   by=f"the launcher of node {self.node}")

    def _spare_in_place_of(self, rank: int, g: int) -> None:
        """A healthy rank whose data-parallel replica left the world (a shrink) leaves its slot
        to a warm spare of this job: the pool grows by one, and a later fault on this node
        (one that cannot shrink the job further) is replaced from it. Started held, like a
        spare started during any recovery, and woken once the recovery is over (``_refill``)."""
        with self._lock:
            self.n_spares += 1
            self._lent_slots.add(rank)
            held = self._spawn_spares(len(self.spares) + 1, hold=True, rank=rank, generation=g)
            watch = min(self.ranks, default=rank)  # a rank of this node that goes on
        log.info("node=%d generation=%d rank=%d healthy, its slot holds a spare now (pids %s)",
                 self.node, g, rank, [s.pid for s in held])
        self._event("spare_in_place_of_removed_rank", g, rank, pids=[s.pid for s in held],
                    spares=self.n_spares)
        if held:
            threading.Thread(target=self._refill, args=(watch, g, held), daemon=True).start()

    def _release(self, rank: int):
        with self._lock:
            self.ranks.discard(rank)
            self._kill_rank(rank)

    def _kill_rank(self, rank: int) -> list[Worker]:
        """Kill the processes of ``rank`` (a hung or stopped one becomes a dead one); their exit
        is expected, not a new fault. Call with the lock held."""
        old = [w for w in self.workers.values() if w.rank == rank]
        for w in old:
            w.expected_exit = True
            try:
                w.proc.kill()
            except ProcessLookupError:
                pass
        return old

    def _inbox(self):
        """Keeps the newest verified beat of each rank of this node; progress wakes ``_beat``."""
        while not self._done.is_set():
            for raw in self.inbox.receive(INBOX_WAIT_S):
                self._take_beat(raw)
            with self._beats_taken:
                self.inbox.settle()
                self._inbox_passes += 1
                self._beats_taken.notify_all()

    def _take_last_beats(self, pid: int) -> None:
        """Wait until the beats a dead worker sent before it died are taken: its connection's
        end was read, or (a child of it still holds the connection) a whole pass of the inbox
        began after the death. Its fault report names the step and phase of the last one."""
        with self._beats_taken:
            after = self._inbox_passes + 2  # the pass under way may have looked before the death
            self._beats_taken.wait_for(lambda: pid not in self.inbox.open_pids
                                       or self._inbox_passes >= after, LAST_BEATS_WAIT_S)

    def _take_beat(self, raw: bytes):
        try:
            beat = self.signer.verify(raw)
            rank = int(beat["rank"])
        except (AuthError, KeyError, TypeError, ValueError) as e:
            self._rejected_beats += 1
            if self._rejected_beats in (1, 10, 100) or self._rejected_beats % 1000 == 0:
                log.error("node=%d rejected a rank heartbeat (%d so far): %s", self.node,
                          self._rejected_beats, e)
            return
        with self._lock:
            if rank not in self.ranks:
                return  # a rank this node does not host (any more) has nothing to say here
            entry = node_beats.rank_entry(beat)
            if node_beats.progressed(self.beats.get(rank), entry):
                self._beat_now.set()
            self.beats[rank] = entry

    def _beat(self):
        """The node's own heartbeat, with its ranks' newest beats in it: the controller's proof
        that this node is alive, and its only view of the ranks' progress. It goes out every
        heartbeat interval, and at once (at most every 20 ms) when a rank's progress changed."""
        client = connect(self.host, self.port)
        seq = 0
        while not self._done.is_set():
            self._beat_now.wait(self.cfg.heartbeat_interval)
            self._beat_now.clear()
            if self._done.is_set():
                return
            seq += 1
            with self._lock:
                ranks = {str(r): b for r, b in self.beats.items() if r in self.ranks}
            try:
                client.set(keys.agent(self.node), self.signer.sign(
                    "agent_heartbeat", node=self.node, seq=seq, pid=os.getpid(),
                    spare=self.spare_node, ranks=ranks))
                client.check([keys.agent(self.node)])  # a set is not answered; this round trip is
                self._beat_ok_t = time.monotonic()
                self._done.wait(0.02)
            except Exception as e:
                log.warning("node=%d heartbeat failed: %s", self.node, e)
                time.sleep(0.1)
                try:
                    client = connect(self.host, self.port, timeout=self.cfg.heartbeat_interval)
                except ConnectionError:
                    pass

    def _fence(self):
        """Cut off from the controller for twice the node timeout: either the job has replaced
        this node's ranks elsewhere by now, or the controller (and its store) is gone and the
        job cannot recover any fault. Either way the workers must not go on in a stale world:
        they are killed, and the newest step every rank of this node committed is logged, the
        step to restart the job from (its last checkpoint at or before it)."""
        with self._lock:
            committed = [self.beats.get(r, {}).get("committed", -1) for r in sorted(self.ranks)]
        log.error("node=%d has not reached the controller for %.1f s (twice the node timeout): "
                  "killing its workers; the job goes on without this node, or, if the "
                  "controller is gone, stops here: last good step %d (every rank of this node "
                  "committed it)", self.node, time.monotonic() - self._beat_ok_t,
                  min(committed, default=-1))
        self.fenced = True
        self._done.set()

    def cut_off(self, now: float) -> bool:
        """Whether this node has not reached the controller for twice the node timeout."""
        return not self.with_controller and now - self._beat_ok_t > 2 * self.cfg.node_timeout

    def _apply(self, rank: int, g: int):
        with self._lock:
            old = self._kill_rank(rank)
        for w in old:
            try:
                psutil.Process(w.proc.pid).wait(10)
            except (psutil.Error, psutil.TimeoutExpired):
                pass
        with self._lock:
            proc, how = self._replace(rank, g)
            self.workers[proc.pid] = Worker(rank, proc, g, how, stderr=getattr(proc, "fr_stderr",
                                                                               None))
            self.ranks.add(rank)
            # the other spares may still be loading (a spare node that just joined loads a
            # node's worth at once): their imports would take the cores this recovery needs,
            # so they wait, held, until it is over
            held = self._hold_spares(rank, g)
        log.info("node=%d generation=%d rank=%d replaced by %s pid=%d", self.node, g, rank, how,
                 proc.pid)
        self._send("replaced", rank=rank, generation=g, how=how, pid=proc.pid)
        # an empty pool gets one spare now, so that the next fault finds a process to hand its
        # rank, but held stopped (SIGSTOP): its imports would compete with this recovery
        held += self._spawn_spares(1, hold=True, rank=rank, generation=g)
        if how == "spare" or held:
            threading.Thread(target=self._refill, args=(rank, g, held), daemon=True).start()

    # the longest a refill waits for the recovery it follows to finish
    REFILL_WAIT_S = 30.0

    def _refill(self, rank: int, g: int, held: list[subprocess.Popen]):
        """Top the spare pool up after the recovery that used a spare.

        A new spare imports torch and the framework: seconds of CPU that, started at the fault,
        compete with the recovery on the same cores (the redone step and the replacement's
        start-up both wait for them). So the pool waits until rank ``rank`` has committed a step in
        generation ``g`` after its restore (at most ``REFILL_WAIT_S``). The spare ``_apply``
        started ``held`` for an empty pool loads then, or at once if a fault comes first and
        makes it a rank (``_replace``). Each step is a journal event (``spare_held``,
        ``spare_woken``, ``spare_pool_refilled``)."""
        restored, committed = None, None
        deadline = time.monotonic() + self.REFILL_WAIT_S
        while time.monotonic() < deadline and not self._done.wait(0.05):
            beat = self._last_heartbeat(rank)
            if beat.get("generation", -1) < g or beat.get("state") != "running":
                continue
            if restored is None:
                restored = beat.get("committed", -1)
            elif beat.get("committed", -1) > restored:
                committed = beat["committed"]
                break
        if self._done.is_set() or self.stopping:
            return  # the job is over: its spares are killed, held or not
        after = "committed" if committed is not None else "timeout"
        with self._lock:
            self._wake_held(held, f"generation {g} recovered" if committed is not None
                            else f"{self.REFILL_WAIT_S:.0f} s after generation {g}")
        n = len(self._spawn_spares(self.n_spares))
        if n:
            log.info("node=%d generation=%d rank=%d spare pool refilled with %d after %s",
                     self.node, g, rank, n, f"the replacement committed step {committed}"
                     if committed is not None else f"{self.REFILL_WAIT_S:.0f} s")
            self._event("spare_pool_refilled", g, rank, started=n, after=after,
                        restored=restored, committed=committed)

    def _event(self, name: str, generation: int, rank: Optional[int] = None, **fields) -> None:
        """A journal event from this agent (the controller writes the journal)."""
        self._send("event", event=name, generation=generation, rank=rank,
                   fields={"node": self.node, **fields})

    def _spawn_spares(self, at_least: int, hold: bool = False, rank: Optional[int] = None,
                      generation: Optional[int] = None) -> list[subprocess.Popen]:
        """Start spares until the pool holds ``at_least`` (at most ``n_spares``); ``hold``
        stops each at once (SIGSTOP) until ``_wake_held``, for the recovery of ``rank`` in
        ``generation``."""
        started = []
        with self._lock:
            while not self._done.is_set() and not self.stopping and \
                    len(self.spares) < min(at_least, self.n_spares):
                spare = self._spawn_spare()
                if hold:
                    os.kill(spare.pid, signal.SIGSTOP)
                    self._held.add(spare.pid)
                    log.info("node=%d spare pid=%d started held (stopped) until the recovery is "
                             "over", self.node, spare.pid)
                    self._event("spare_held", generation, rank, pid=spare.pid)
                self.spares.append(spare)
                started.append(spare)
        return started

    def _hold_spares(self, rank: int, generation: int) -> list[subprocess.Popen]:
        """Stop (SIGSTOP) every spare of the pool not held yet, for the recovery of ``rank`` in
        ``generation``; ``_replace`` wakes one it hands a rank, ``_refill`` the rest."""
        held = []
        for spare in self.spares:
            if spare.pid in self._held or spare.poll() is not None:
                continue
            try:
                os.kill(spare.pid, signal.SIGSTOP)
            except ProcessLookupError:
                continue
            self._held.add(spare.pid)
            held.append(spare)
            self._event("spare_held", generation, rank, pid=spare.pid)
        if held:
            log.info("node=%d generation=%d spares %s held (stopped) until the recovery of rank "
                     "%d is over", self.node, generation, [s.pid for s in held], rank)
        return held

    def _wake_held(self, spares: list[subprocess.Popen], why: str) -> None:
        for spare in spares:
            if spare.pid in self._held:
                self._held.discard(spare.pid)
                try:
                    os.kill(spare.pid, signal.SIGCONT)
                except ProcessLookupError:
                    continue
                log.info("node=%d spare pid=%d woken: %s", self.node, spare.pid, why)
                self._event("spare_woken", self.generation, pid=spare.pid, why=why)

    def _learn_modules(self):
        """Hands the spares what rank 0 had imported once training started
        (``protocol.modules``): a file they import from, named in a line on their stdin; spares
        started later find it in their environment."""
        watcher = connect(self.host, self.port)
        while not self._done.is_set():
            try:
                if not wait_key(watcher, keys.MODULES_DIGEST, WAKE_WAIT_S):
                    continue
                listing = learned_modules.read(watcher, self.signer)
            except AuthError as e:
                log.error("node=%d rejected the published module list: %s", self.node, e)
                return
            except Exception as e:  # store unreachable: the heartbeat decides about fencing
                log.warning("node=%d module list: %s", self.node, e)
                time.sleep(0.5)
                continue
            path = os.path.join(self.run_dir, "spare_modules.json")
            with open(path + ".tmp", "w") as f:
                json.dump({"modules": listing["modules"], "path": listing["path"]}, f)
            os.replace(path + ".tmp", path)
            line = (json.dumps({"preload_file": path}) + "\n").encode()
            with self._lock:
                self._learned = path
                told = 0
                for spare in self.spares:
                    try:
                        spare.stdin.write(line)
                        spare.stdin.flush()
                        told += 1
                    except (BrokenPipeError, OSError, ValueError):
                        pass
            log.info("node=%d spares learn %d modules from %s (%d spares told)", self.node,
                     len(listing["modules"]), listing["from"], told)
            self._event("spare_modules_learned", self.generation, modules=len(listing["modules"]),
                        source=listing["from"], spares=told)
            return

    # ---- main --------------------------------------------------------------------------
    def run(self) -> int:
        with self._lock:
            for rank in sorted(self.ranks):
                proc = self._spawn_worker(rank, 0, False)
                self.workers[proc.pid] = Worker(rank, proc, 0, stderr=proc.fr_stderr)
                self._event("worker_started", 0, rank, pid=proc.pid,
                            forked=isinstance(proc, template.ForkedWorker))
            for _ in range(self.n_spares):
                self.spares.append(self._spawn_spare())
        self._send("agent_started", node=self.node, spare=self.spare_node, pid=os.getpid())
        log.info("node=%d started %d workers and %d spares%s", self.node, len(self.ranks),
                 self.n_spares, " (spare node)" if self.spare_node else "")
        threads = [threading.Thread(target=f, daemon=True, name=f.__name__)
                   for f in (self._reaper, self._stop_watch, self._plan_watch, self._inbox,
                             self._beat, self._learn_modules)]
        for t in threads:
            t.start()
        self._beat_ok_t = time.monotonic()
        while not self._done.wait(0.1):
            # twice the controller's timeout: a slow but connected node is declared lost (and
            # replaced) before it would ever fence itself; a cut-off one stops soon after
            if self.cut_off(time.monotonic()):
                self._fence()
        self.shutdown()
        return self.exit_code()

    def exit_code(self) -> int:
        """1 when fenced or the job failed; 128 + the signal when it was stopped by one (as a
        shell reports a process a signal ended); else 0."""
        end = self.end or {}
        if self.fenced or end.get("fatal"):
            return 1
        if end.get("stopped") or self._force_stop.is_set():
            name = end.get("stopped") or self._force_signal
            return 128 + int(getattr(signal, name, signal.SIGINT))
        return 0

    SHUTDOWN_WAIT_S = 5.0

    def shutdown(self):
        """Kill every process this node started (workers with their own children, spares,
        held ones included) and wait for them, so that none outlives the launcher."""
        self._done.set()
        with self._lock:
            workers = list(self.workers.values())
            procs = []
            for w in workers:
                try:
                    procs += psutil.Process(w.proc.pid).children(recursive=True)
                except psutil.Error:
                    pass
                if w.proc.poll() is None:
                    w.expected_exit = True
            spares, self.spares = list(self.spares), []
            if self.template is not None:
                spares.append(self.template.proc)
                self.template.close()
                self.template = None
        for s in spares:
            try:
                if s.stdin is not None:
                    s.stdin.close()
            except OSError:
                pass
        for p in [*(w.proc for w in workers), *spares, *procs]:
            try:
                p.kill()
            except (ProcessLookupError, psutil.Error, OSError):
                pass
        pids = [w.proc.pid for w in workers] + [s.pid for s in spares] + \
            [p.pid for p in procs]
        gone = []
        for pid in pids:
            try:
                gone.append(psutil.Process(pid))
            except psutil.Error:
                pass
        psutil.wait_procs(gone, timeout=self.SHUTDOWN_WAIT_S)
        for w in workers:  # what they wrote last is shown before the launcher ends
            if w.stderr is not None:
                w.stderr.join(1.0)
        self.inbox.close()
        with self._lock:
            workers = [w.proc for w in self.workers.values()]
        for proc in workers:  # nobody may still write to the snapshots being removed
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        shared_memory.remove(self.snapshot_dir)
