"""Hang detection from heartbeats, by the controller's own clock, and whom to blame.

A rank is *stalled* when its (step, phase) has not moved for half its hang timeout, and *hung*
once that passes the whole timeout: ``hang`` while its heartbeat keeps coming, ``hang_gil`` when
the heartbeat has stopped too (the GIL held, or the process frozen). A hang stalls the
culprit's healthy peers as well: they block in the next operation that needs it, and report the
same step and phase. Whom to blame comes from this evidence, strongest first:

1. ``not_in_collective``: collective progress. A stalled rank reports, per key
   (``protocol.progress``), how many operations it has entered and whether it is inside the
   newest (``runtime.comm_progress``). A key's members run the same sequence of operations on
   it, so their counts compare: a group's collectives are one sequence for all its members;
   point-to-point traffic is one sequence per ordered pair (S's sends to D against D's receives
   from S), since in a pipeline group of more than two stages the pairs' traffic interleaves
   differently on each rank. A rank *waits* while it is inside an operation. A member whose
   count on a key is below that of a peer waiting on it, and that waits nowhere itself, has not
   entered the operation its peer waits in: it is the culprit. A rank that waits is never
   blamed while such a rank exists, so in a chain (A hung; B waits on A in a TP collective; C
   waits on B in a DP one) only A is: B is behind C on DP but waits on TP. A rank whose
   heartbeat stopped is judged from its last report, and, when it froze before it reported
   (a rank reports only once it stalls), it counts as behind on every key its peers wait on.
   Among several culprits, those known to be behind come first, then the furthest behind in
   (step, phase).
2. ``heartbeat_stopped``: without collective evidence, a stalled rank whose heartbeat stopped
   is blamed before one that beats (blocked in a collective, a healthy rank keeps beating).
3. ``behind_in_step``: otherwise the stalled rank furthest behind in (step, phase), and at the
   same phase the one that stopped first. Arrival order at one phase says little about who is
   stuck; this is the last resort, for waits outside the counted operations (collectives
   issued from C++, such as torch DDP's reducer).

The rank chosen is blamed once its own stall passes its own timeout, not before. A rank still
running in an older generation a timeout after the last plan (``old_generation``) is hung as
well: it blocks the rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..protocol import progress
from ..protocol.node_beats import PROGRESS_FIELDS

NOT_IN_COLLECTIVE = "not_in_collective"   # not in the collective its peers wait in
HEARTBEAT_STOPPED = "heartbeat_stopped"
BEHIND_IN_STEP = "behind_in_step"         # behind in (step, phase), or stopped there first
OLD_GENERATION = "old_generation"         # never noticed the last plan


@dataclass
class RankView:
    """What the controller has seen of one rank, timed by the controller's clock."""

    rank: int
    pid: int = 0                 # 0 until its process is known (handed the rank, or a beat)
    started_in: int = 0          # the generation whose plan started its process
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
    comm: Optional[dict] = None  # collective progress of the last beat (only while stalled)
    _progress: tuple = ()         # the progress fields of the last beat taken

    def update(self, hb: dict, now: float) -> None:
        """Take one relayed beat seen at ``now``. Called for every rank of every node beat in a
        sweep (16,384 times at 2,048 nodes), so the usual beat, with no progress in it, costs a
        tuple comparison."""
        seq = hb.get("seq", 0)
        if hb.get("pid") == self.pid and seq <= self.seq:
            return  # nothing new from this process (or an old beat played again)
        self.seq, self.seen_t = seq, now
        self.comm = hb.get("comm")
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


# an injected fault's own time is the fault's time when it fired this long before it was seen
INJECTION_WINDOW_S = 10.0


def fault_time(inject_t: Optional[float], observed_t: float, now: float) -> float:
    """When a fault happened: the time an injection fired just before it was observed (tests and
    benchmarks measure from the fault itself), else when it was observed."""
    if inject_t and observed_t - INJECTION_WINDOW_S <= inject_t <= now:
        return inject_t
    return observed_t


PHASE_ORDER = {"init": 0, "forward": 1, "backward": 2, "grad_reduce": 3, "optimizer": 4,
               "after_step": 5, "checkpoint": 6}


@dataclass
class Blame:
    """A hung rank, its kind ('hang' or 'hang_gil') and the evidence that points at it."""

    rank: int
    kind: str
    evidence: list[str]
    # for not_in_collective, each key its peers wait on: who waits there, their count and the
    # rank's own (None when it never reported)
    waits: list[dict] = field(default_factory=list)


def _position(v: RankView) -> tuple:
    return (v.step, PHASE_ORDER.get(v.phase, 0), v.progress_t, v.rank)


def find_hang(views: dict[int, RankView], generation: int, now: float,
              plan_t: float = 0.0) -> Optional[Blame]:
    """The hung rank to blame, or None (see the module docstring for the rule)."""
    running = [v for v in views.values() if v.state == "running"]
    stale_gen = [v for v in running if v.generation < generation
                 and now - max(plan_t, v.progress_t) > v.hang_timeout]
    if stale_gen:
        return _blame(min(stale_gen, key=_position), now, [OLD_GENERATION], [], running)
    current = [v for v in running if v.generation == generation]
    if not any(now - v.progress_t > v.hang_timeout for v in current):
        return None
    stalled = [v for v in current if now - v.progress_t > v.hang_timeout / 2]
    reports = {v.rank: progress.parse(v.comm) for v in stalled if v.comm is not None}
    waiting = {r for r, rep in reports.items() if any(inside for _, inside in rep.values())}
    suspects = _not_in_collective(stalled, reports, waiting)
    if suspects:
        rank = min(suspects, key=lambda r: (suspects[r][0]["its_count"] is None,
                                            _position(views[r])))
        culprit, evidence, detail = views[rank], [NOT_IN_COLLECTIVE], suspects[rank]
    else:
        # no collective evidence: a rank that waits nowhere before one that waits, one whose
        # heartbeat stopped before one that beats, then the furthest behind
        free = [v for v in stalled if v.rank not in waiting] or stalled
        frozen = [v for v in free if _frozen(v, now)]
        culprit = min(frozen or free, key=_position)
        evidence, detail = [HEARTBEAT_STOPPED if frozen else BEHIND_IN_STEP], []
    if now - culprit.progress_t <= culprit.hang_timeout:
        return None  # the culprit has not passed its own timeout yet
    return _blame(culprit, now, evidence, detail, stalled)


def _not_in_collective(stalled: list[RankView], reports: dict,
                       waiting: set) -> dict[int, list[dict]]:
    """Stalled ranks that wait nowhere and are behind a peer waiting on a key of theirs, with
    the waits they hold up. Each key a rank waits on is walked once, whoever waits there: a
    sweep of 16,384 ranks stalled in a world-sized collective reads its members once."""
    by_rank = {v.rank: v for v in stalled}
    waiters: dict[str, list[tuple[int, int]]] = {}  # key -> (rank, its count) of who waits there
    for r in sorted(waiting):
        for key, (n, inside) in reports[r].items():
            if inside:
                waiters.setdefault(key, []).append((r, n))
    suspects: dict[int, list[dict]] = {}
    for key, here in sorted(waiters.items()):
        top = max(n for _, n in here)
        for m in progress.members(key):
            if m in waiting or m not in by_rank:
                continue  # a waiting rank, or one still moving, is not the culprit
            rep = reports.get(m)
            count = None if rep is None else rep.get(key, (0, False))[0]
            if count is not None and count >= top:
                continue  # it has entered these operations: the wait is for someone else
            suspects.setdefault(m, []).append({
                "key": key, "waiting": [r for r, n in here if count is None or n > count],
                "their_count": top, "its_count": count})
    return suspects


def _blame(v: RankView, now: float, evidence: list[str], waits: list[dict],
           peers: list[RankView]) -> Blame:
    frozen = _frozen(v, now)
    if frozen and HEARTBEAT_STOPPED not in evidence:
        evidence.append(HEARTBEAT_STOPPED)
    if BEHIND_IN_STEP not in evidence and any(_position(p)[:2] > _position(v)[:2] for p in peers):
        evidence.append(BEHIND_IN_STEP)
    return Blame(v.rank, "hang_gil" if frozen else "hang", evidence, waits)


def _frozen(v: RankView, now: float) -> bool:
    return now - v.seen_t > max(3 * v.hb_interval, 0.5)
