"""Hang detection from heartbeats, by the controller's own clock.

A rank is *hung* when its heartbeat keeps coming but its (step, phase) has not moved for longer
than its hang timeout; it is *hung holding the GIL* (or otherwise frozen) when the heartbeat
itself has stopped for that long. Ranks blocked in a collective with a hung peer stop making
progress too, but later than the culprit: among the ranks past the timeout, the one whose
progress stopped first is blamed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..protocol.node_beats import PROGRESS_FIELDS


@dataclass
class RankView:
    """What the controller has seen of one rank, timed by the controller's clock."""

    rank: int
    pid: int = 0
    generation: int = -1
    step: int = -1
    phase: str = "init"
    state: str = "starting"
    committed: int = -1          # the rank's newest recovery point
    hang_timeout: float = 30.0
    hb_interval: float = 0.5
    seq: int = -1
    seen_t: float = 0.0          # when the last new heartbeat arrived
    progress_t: float = 0.0      # when (step, phase) last changed
    extra: dict = field(default_factory=dict)
    _progress: tuple = ()         # the progress fields of the last beat taken

    def update(self, hb: dict, now: float) -> None:
        """Take one relayed beat seen at ``now``. Called for every rank of every node beat in a
        sweep (16,384 times at 2,048 nodes), so the usual beat, with no progress in it, costs a
        tuple comparison."""
        seq = hb.get("seq", 0)
        if hb.get("pid") == self.pid and seq <= self.seq:
            return  # nothing new from this process (or an old beat played again)
        self.seq, self.seen_t = seq, now
        # any change of step, phase, process, state, generation or commit is progress: a rank that
        # comes back from a recovery must not be judged by the clock of its failed step
        progress = tuple(map(hb.get, PROGRESS_FIELDS))
        if progress != self._progress or not self.progress_t:
            self._progress, self.progress_t = progress, now
            for k, v in zip(PROGRESS_FIELDS, progress):
                if v is not None:
                    setattr(self, k, v)
        if hb.get("inject_t"):
            self.extra["inject_t"] = hb["inject_t"]
        self.hang_timeout = hb.get("hang_timeout", self.hang_timeout)
        self.hb_interval = hb.get("hb_interval", self.hb_interval)


PHASE_ORDER = {"init": 0, "forward": 1, "backward": 2, "grad_reduce": 3, "optimizer": 4,
               "after_step": 5, "checkpoint": 6}


def _position(v: RankView) -> tuple:
    return (v.step, PHASE_ORDER.get(v.phase, 0), v.progress_t, v.rank)


def find_hang(views: dict[int, RankView], generation: int, now: float,
              plan_t: float = 0.0) -> tuple[int, str] | None:
    """The rank to blame for a hang and its kind ('hang' or 'hang_gil'), or None.

    A hang shows first as *some* rank without progress past its timeout, often a healthy one
    waiting in a collective for the culprit. The culprit is the stalled rank that is furthest
    behind in (step, phase); it is blamed once its own stall passes its timeout, as 'hang_gil'
    when its heartbeat has stopped too. A rank that never noticed the last plan (still running
    in an older generation a timeout after it) is hung as well: it blocks the rebuild.
    """
    running = [v for v in views.values() if v.state == "running"]
    stale_gen = [v for v in running if v.generation < generation
                 and now - max(plan_t, v.progress_t) > v.hang_timeout]
    if stale_gen:
        culprit = min(stale_gen, key=_position)
    else:
        current = [v for v in running if v.generation == generation]
        if not any(now - v.progress_t > v.hang_timeout for v in current):
            return None
        stalled = [v for v in current if now - v.progress_t > v.hang_timeout / 2]
        # a stalled rank whose heartbeat stopped too (the GIL held) is the culprit before any
        # that still beats: waiting in a collective, a healthy rank keeps beating, and at the same
        # (step, phase) the culprit is the one that arrived last
        frozen = [v for v in stalled if _frozen(v, now)]
        culprit = min(frozen or stalled, key=_position)
        if now - culprit.progress_t <= culprit.hang_timeout:
            return None  # the furthest-behind rank has not passed its own timeout yet
    return culprit.rank, ("hang_gil" if _frozen(culprit, now) else "hang")


def _frozen(v: RankView, now: float) -> bool:
    return now - v.seen_t > max(3 * v.hb_interval, 0.5)
