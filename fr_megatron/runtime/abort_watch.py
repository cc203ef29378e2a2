"""A survivor that the abort did not free reports itself, instead of waiting to be blamed.

When a fault plan arrives, the monitor thread aborts this process's communicators: a training
thread blocked in a collective then raises and enters recovery within milliseconds. Some blocked
operations ignore the abort (on gloo, a message that a killed peer cut in the middle waits for
its group's timeout; a device that stopped answering). The rank would then keep reporting the
old generation until the controller blames it as hung, a whole hang timeout later.

``AbortWatch`` runs from the abort until the training thread has left training (it entered
recovery): if that thread stays inside one operation (``comm_progress``) for ``STUCK_S`` after
the abort, the rank cannot take part in the recovery, and ``on_stuck`` reports it as faulty
and ends it. Its agent replaces it from its last snapshot, as for any other lost rank; a rank
computing between two operations is not inside one and is left alone.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Hashable, Optional

STUCK_S = 1.0  # an aborted operation ends in milliseconds; this one will not end
POLL_S = 0.05


class AbortWatch(threading.Thread):
    """``training()`` says whether the training thread is still in the step the abort cut
    (not yet in recovery); ``inside()`` which operation it is inside (``comm_progress``), or
    None; ``on_stuck(seconds)`` is called at most once, from this thread. The seconds count
    from when this watch, started at the abort, first saw the thread inside that operation."""

    def __init__(self, training: Callable[[], bool], inside: Callable[[], Optional[Hashable]],
                 on_stuck: Callable[[float], None], stuck_s: float = STUCK_S):
        super().__init__(name="fr-abort-watch", daemon=True)
        self.training, self.inside, self.on_stuck = training, inside, on_stuck
        self.stuck_s = stuck_s

    def run(self) -> None:
        seen, since = None, 0.0
        while self.training():
            op, now = self.inside(), time.monotonic()
            if op is None or op != seen:
                seen, since = op, now
            elif now - since > self.stuck_s:
                self.on_stuck(now - since)
                return
            time.sleep(POLL_S)
