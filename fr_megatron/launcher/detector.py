"""Hang detection from heartbeats, by the controller's own clock.

A rank is *hung* when its heartbeat keeps coming but its (step, phase) has not moved for longer
than its hang timeout; it is *hung holding the GIL* (or otherwise frozen) when the heartbeat
itself has stopped for that long. Ranks blocked in a collective with a hung peer stop making
progress too, but later than the culprit: among the ranks past the timeout, the one whose
progress stopped first is blamed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RankView:
    """What the controller has seen of one rank, timed by the controller's clock."""

    rank: int
    pid: int = 0
    generation: int = -1
    step: int = -1
    phase: str = "init"
    state: str = "starting"
    hang_timeout: float = 30.0
    hb_interval: float = 0.5
    seq: int = -1
    seen_t: float = 0.0          # when the last new heartbeat arrived
    progress_t: float = 0.0      # when (step, phase) last changed
    extra: dict = field(default_factory=dict)

    def update(self, hb: dict, now: float) -> None:
        if hb.get("seq", 0) == self.seq and hb.get("pid") == self.pid:
            return
        moved = (hb.get("step"), hb.get("phase"), hb.get("pid")) != (self.step, self.phase, self.pid)
        self.seq, self.seen_t = hb.get("seq", 0), now
        if moved or not self.progress_t:
            self.progress_t = now
        for k in ("pid", "generation", "step", "phase", "state", "hang_timeout",
                  "hb_interval"):
            if k in hb:
                setattr(self, k, hb[k])


def find_hang(views: dict[int, RankView], generation: int, now: float) -> tuple[int, str] | None:
    """The rank to blame for a hang and its kind ('hang' or 'hang_gil'), or None.

    The trigger is progress alone, so the culprit (whose progress stopped first) is always the
    first rank past its timeout; its kind is 'hang_gil' when its heartbeat has stopped too.
    """
    suspects = [v for v in views.values()
                if v.generation == generation and v.state == "running"
                and now - v.progress_t > v.hang_timeout]
    if not suspects:
        return None
    culprit = min(suspects, key=lambda v: (v.progress_t, v.rank))
    frozen = now - culprit.seen_t > max(3 * culprit.hb_interval, 0.5)
    return culprit.rank, ("hang_gil" if frozen else "hang")
