"""Two threads of every training process: the heartbeat and the plan monitor.

The heartbeat sends (step, phase, state) every interval, and at once when it changes, to the
node's agent, which relays it to the controller in its node beat (``protocol.node_beats``); the
controller, not the rank, judges a hang from it, so a rank frozen with the GIL held is still seen. The monitor
blocks on the store key of the next generation's plan; when the controller publishes it, the
monitor aborts this process's communicators, so a rank blocked in a collective (NCCL never wakes by
itself) fails fast and enters recovery.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Optional

from ..protocol import keys
from ..protocol.auth import AuthError, Signer
from ..protocol.store import wait_key

log = logging.getLogger("fr_megatron.runtime")


class Heartbeat(threading.Thread):
    """``orphaned`` is called (from this thread) once no beat has reached the agent for
    ``orphan_timeout`` seconds: the agent is gone, and with it whoever would replace or stop
    this rank, so the rank must not train on by itself."""

    def __init__(self, send: Callable[[bytes], None], signer: Signer, rank: int, interval: float,
                 status: Callable[[], dict], orphan_timeout: Optional[float] = None,
                 orphaned: Callable[[float], None] = lambda silent_s: None):
        super().__init__(name="fr-heartbeat", daemon=True)
        self.send, self.signer, self.rank = send, signer, rank
        self.interval, self.status = interval, status
        self.orphan_timeout, self.orphaned = orphan_timeout, orphaned
        self._halt = threading.Event()
        self._changed = threading.Event()
        self._sent_t = time.monotonic()

    # changes closer together than this share one beat: a step has several phases per
    # micro-batch, and each beat is signed, relayed by the agent and written to the store
    MIN_GAP_FRACTION = 0.25

    def poke(self) -> None:
        """Send a beat soon (the step or phase changed), from this thread, not the caller's."""
        self._changed.set()

    def beat(self) -> None:
        self.send(self.signer.sign("heartbeat", rank=self.rank, pid=os.getpid(),
                                   hb_interval=self.interval, **self.status()))
        self._sent_t = time.monotonic()

    def run(self) -> None:
        while not self._halt.is_set():
            self._changed.wait(self.interval)
            gap = self._sent_t + self.interval * self.MIN_GAP_FRACTION - time.monotonic()
            if gap > 0:
                self._halt.wait(gap)
            self._changed.clear()
            try:
                self.beat()
            except Exception as e:  # a busy or restarting agent; keep beating
                log.debug("heartbeat failed: %s", e)
                silent = time.monotonic() - self._sent_t
                if self.orphan_timeout is not None and silent > self.orphan_timeout \
                        and not self._halt.is_set():
                    self.orphaned(silent)

    def stop(self) -> None:
        self._halt.set()
        self._changed.set()


class PlanMonitor(threading.Thread):
    """Waits for the plan of generation ``current + 1`` and hands it to ``on_plan``."""

    def __init__(self, store, signer: Signer, current: Callable[[], int],
                 on_plan: Callable[[dict], None]):
        super().__init__(name="fr-monitor", daemon=True)
        self.store, self.signer = store, signer
        self.current, self.on_plan = current, on_plan
        self._halt = threading.Event()
        self.latest: dict | None = None
        self._seen = -1
        self._rejected: bytes | None = None

    def run(self) -> None:
        while not self._halt.is_set():
            g = max(self.current(), self._seen) + 1
            try:
                if not wait_key(self.store, keys.plan(g), 1.0):
                    continue
                raw = self.store.get(keys.plan(g))
            except Exception as e:
                if self._halt.is_set():
                    return  # stopped: the session cut this thread's store connection
                log.warning("plan monitor: %s", e)
                time.sleep(0.2)
                continue
            try:
                plan = self.signer.verify(raw)
            except AuthError as e:
                if raw != self._rejected:  # a forged plan is logged once, then waited out
                    self._rejected = raw
                    log.error("rejected plan for generation %d: %s", g, e)
                time.sleep(0.2)
                continue
            self._seen = g
            self.latest = plan
            self.on_plan(plan)

    def stop(self) -> None:
        self._halt.set()
