"""Fault injection for tests, the demo and users: ``FR_INJECT`` / ``--inject``.

A spec is ``kind[:key=value...]``, several joined by ``;``, e.g.
``kill:rank=3:step=20``, ``exception:rank=1:step=5:phase=backward``, ``exit:code=7:rank=2:step=4``.
Kinds: kill (SIGKILL), segv (SIGSEGV), exception, hang (no progress, heartbeat alive),
hang_gil (holds the GIL, heartbeat stops), stop (SIGSTOP), exit (code, default 1), exit0 (exit 0
before the end), node_crash (SIGKILL to the rank's whole process group: its node's launcher,
agent, workers and spares, as when a machine dies; start each node's launcher in a process group
of its own), wedge (with ``group=``: the rank takes part in the operation, then never leaves it,
whatever aborts it: a transport that ignores the abort). Each spec fires once per job, whatever generation reaches it: the controller's
store remembers what fired, so a replacement redoing the step does not fire it again.

A fault fires at the phase marker ``phase`` of step ``step``, or, with ``group=KIND``, just
before the rank's ``nth`` operation (collective or point-to-point, default the first) on a
group of that kind while it is in that phase: ``hang:rank=1:step=3:phase=forward:group=tp``
hangs on the way into the first tensor-parallel collective of the forward, with its peers
inside it. Which groups a kind names is the framework integration's (``group_kinds``); "world"
is the default group in every job.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from dataclasses import dataclass

log = logging.getLogger("fr_megatron.inject")

KINDS = ("kill", "segv", "exception", "hang", "hang_gil", "stop", "exit", "exit0", "node_crash",
         "wedge")
STEP_PHASES = ("forward", "backward", "grad_reduce", "optimizer", "after_step")
# "restore": inside a recovery, once the state to redo ``step`` has arrived (a replacement dies
# while it restores)
PHASES = (*STEP_PHASES, "restore")
# group kinds an injection can count operations on (``Integration.group_kinds``): tensor,
# pipeline, data and context parallel, expert, embedding, model parallel (TP x PP), the
# distributed optimizer's parameter all-gather group, the default group
GROUP_KINDS = ("tp", "pp", "dp", "cp", "ep", "embd", "mp", "dist_opt", "world")
FIELDS = ("rank", "step", "phase", "code", "group", "nth")


class InjectedFault(RuntimeError):
    """The exception an ``exception`` injection raises inside the training step."""


class InjectSpecError(ValueError):
    pass


@dataclass(frozen=True)
class Injection:
    index: int
    kind: str
    rank: int = 0
    step: int = 1
    phase: str = "forward"
    code: int = 1
    group: str = ""   # fire before the nth operation on a group of this kind, not at the marker
    nth: int = 1

    def __str__(self):
        where = f":group={self.group}:nth={self.nth}" if self.group else ""
        return f"{self.kind}:rank={self.rank}:step={self.step}:phase={self.phase}{where}"


def parse(spec: str | None) -> list[Injection]:
    """Parse an injection spec; errors name the bad part and list what is allowed."""
    out = []
    for i, part in enumerate(p for p in (spec or "").split(";") if p.strip()):
        kind, *kvs = part.strip().split(":")
        if kind not in KINDS:
            raise InjectSpecError(f"--inject: unknown fault kind {kind!r}; use one of {', '.join(KINDS)}")
        fields: dict = {}
        for kv in kvs:
            k, sep, v = kv.partition("=")
            if not sep or k not in FIELDS:
                raise InjectSpecError(f"--inject: bad field {kv!r} in {part!r}; fields are "
                                      "rank=N, step=N, phase=NAME, code=N, group=KIND, nth=N")
            if k == "phase":
                if v not in PHASES:
                    raise InjectSpecError(f"--inject: unknown phase {v!r}; use one of {', '.join(PHASES)}")
                fields[k] = v
            elif k == "group":
                if v not in GROUP_KINDS:
                    raise InjectSpecError(f"--inject: unknown group {v!r} in {part!r}; use one of "
                                          f"{', '.join(GROUP_KINDS)}")
                fields[k] = v
            else:
                try:
                    fields[k] = int(v)
                except ValueError:
                    raise InjectSpecError(f"--inject: {k} must be an integer in {part!r}") from None
        if fields.get("nth", 1) < 1:
            raise InjectSpecError(f"--inject: nth must be 1 or more in {part!r}")
        if "nth" in fields and "group" not in fields:
            raise InjectSpecError(f"--inject: nth needs group=KIND in {part!r}")
        if kind == "wedge" and "group" not in fields:
            raise InjectSpecError(f"--inject: wedge stays inside an operation; name its group "
                                  f"with group=KIND in {part!r}")
        if fields.get("group") and fields.get("phase") == "restore":
            raise InjectSpecError(f"--inject: group=KIND counts operations of a training step; "
                                  f"phase restore has none in {part!r}")
        out.append(Injection(i, kind, **fields))
    return out


def fire(inj: Injection) -> None:
    """Make the fault happen in this process, now."""
    log.warning("injecting %s", inj)
    for h in logging.getLogger().handlers:
        h.flush()
    if inj.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif inj.kind == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif inj.kind == "exception":
        raise InjectedFault(f"injected exception at step {inj.step} phase {inj.phase}")
    elif inj.kind in ("hang", "wedge"):
        while True:
            time.sleep(3600)
    elif inj.kind == "hang_gil":
        # libc sleep called through PyDLL keeps the GIL: no other thread of ours can run.
        libc = ctypes.PyDLL(None)
        while True:
            libc.sleep(3600)
    elif inj.kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif inj.kind == "exit":
        os._exit(inj.code)
    elif inj.kind == "exit0":
        os._exit(0)
    elif inj.kind == "node_crash":
        os.killpg(os.getpgrp(), signal.SIGKILL)


class Injector:
    """A rank's injections: fired at a phase marker, or armed there to fire before the nth
    operation on a group of a kind (``comm_progress``). ``claim(inj)`` is true for the first
    rank of the job to reach ``inj`` (the controller's store remembers it). Before a fault
    fires, ``ready()`` returns once it may land (the last commit's snapshot sealed, so that the
    step it names is the one redone whatever the copy's timing), then ``announce()`` tells the
    agent its step, phase and ``fired_t`` (the rank's report of the fault must name them).
    ``group_kinds()`` maps a kind to the job's groups of it."""

    def __init__(self, rank: int, spec: str, claim, ready, announce, group_kinds):
        self.rank, self.injections = rank, parse(spec)
        self.claim, self.ready, self.announce = claim, ready, announce
        self.group_kinds = group_kinds
        # when the last injected fault landed: detection and recovery are timed from it
        self.fired_t: float | None = None
        self._armed: set[int] = set()

    def at_phase(self, step: int, phase: str) -> None:
        for inj in self.injections:
            if inj.rank != self.rank or inj.step != step or inj.phase != phase:
                continue
            if inj.group:
                self._arm(inj, step)
            elif self.claim(inj):
                self._fire(inj)

    def _fire(self, inj: Injection) -> None:
        self.ready()
        self.fired_t = time.time()
        self.announce()
        fire(inj)

    def _arm(self, inj: Injection, step: int) -> None:
        """From the phase marker on, count this step's operations on groups of ``inj.group``
        in that phase; the fault fires before the ``inj.nth``."""
        from . import comm_progress

        if inj.index in self._armed:
            return
        self._armed.add(inj.index)
        groups = self.group_kinds().get(inj.group)
        if not groups:
            log.warning("rank=%d step=%d phase=%s injection %s: this job has no group of kind %r",
                        self.rank, step, inj.phase, inj, inj.group)
            return
        comm_progress.TRACKER.arm(groups, inj.phase, inj.nth,
                                  lambda: self.claim(inj) and self._fire(inj),
                                  inside=inj.kind == "wedge")

    def new_step(self, step: int) -> None:
        """A step begins: what was armed in the last one and never fired is dropped."""
        from . import comm_progress

        for a in comm_progress.TRACKER.disarm():
            log.warning("rank=%d step=%d an injection armed in phase %s did not fire: the step "
                        "ended %d operations on its group short", self.rank, step, a.phase,
                        a.left)
        self._armed.clear()
