"""Work that runs beside the training thread, on a thread that is started once.

A commit hands its snapshot's copy and its copies' exchange to background threads every step.
Starting a thread per step makes the training thread wait until the scheduler runs the new one
(``Thread.start`` waits for it), milliseconds on a machine whose cores are all training. A
``Worker`` starts its thread once and hands it each call through a queue.

A call handed over while the last one still runs (an exchange that gloo never ends, its peer
lost) gets a thread of its own, and the stuck one ends when its call does: a call never waits
behind another. The threads are daemons, so a stuck call never holds up the process's exit (a
``ThreadPoolExecutor`` joins its threads then).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable


class Worker:
    """Runs submitted calls on its own daemon thread, one at a time; see the module doc."""

    def __init__(self, name: str):
        self.name = name
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue | None = None  # the current thread's
        self._busy = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` in the background; its result or exception in the future."""
        fut: Future = Future()
        with self._lock:
            if self._queue is None or self._busy:
                self._queue = queue.SimpleQueue()
                threading.Thread(target=self._serve, args=(self._queue,), name=self.name,
                                 daemon=True).start()
            self._busy = True
            self._queue.put((fn, args, fut))
        return fut

    def _serve(self, calls: queue.SimpleQueue) -> None:
        while True:
            fn, args, fut = calls.get()
            outcome = None
            if fut.set_running_or_notify_cancel():
                try:
                    outcome = (fut.set_result, fn(*args))
                except BaseException as e:  # noqa: BLE001 - handed to whoever waits
                    outcome = (fut.set_exception, e)
            with self._lock:
                superseded = self._queue is not calls  # a later call got a thread of its own
                if not superseded:
                    self._busy = False
            # idle before the outcome is seen: whoever waited for it and hands over the next
            # call finds this thread free
            if outcome is not None:
                outcome[0](outcome[1])
            if superseded:
                return
