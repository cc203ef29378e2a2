"""The recovery point: the newest step every rank can be put back at, and where from.

A pure function of what every rank reported after a fault (``decide``): every rank computes it from
the same all-gathered reports, so they agree without another round. A survivor rolls back to the
point from its own snapshot. A lost rank's state of the point comes, in this order of preference,
from the snapshot its predecessor left in the node's shared memory (no transfer at all), else
region by region: the replicated tensors from a live data-parallel replica, the unique tensors
from a holder's copy or from an optimizer instance peer, the meta from a holder's copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from .failure_domains import CopyPlan

PARTS = ("replicated", "unique", "meta")


@dataclass
class RankReport:
    """What one rank says about itself after a fault. A lost rank's replacement reports what its
    predecessor left in shared memory (its own snapshots, the copies it held), checked."""

    lost: bool
    ring: list[int]                                       # steps of its own snapshots
    held: dict[int, list[int]] = field(default_factory=dict)  # ward -> steps of copies
    committed: int = -1
    refused: list[str] = field(default_factory=list)      # what failed its checksums, and why
    # a rank that joins the world as the job grows back: nothing of it was kept anywhere, and
    # all of its state, meta included, comes from a data-parallel replica
    fresh: bool = False

    @classmethod
    def from_wire(cls, d: dict) -> "RankReport":
        return cls(d["lost"], list(d["ring"]), {int(w): list(s) for w, s in d["held"].items()},
                   d["committed"], list(d["refused"]), bool(d.get("fresh")))

    def to_wire(self) -> dict:
        return {"lost": self.lost, "ring": self.ring, "committed": self.committed,
                "held": {str(w): s for w, s in self.held.items()}, "refused": self.refused,
                "fresh": self.fresh}


@dataclass
class RecoveryPlan:
    point: int
    sources: dict[int, dict[str, int]]   # lost rank -> part -> the rank that serves it
    steps_lost: int                      # committed steps that must be redone
    resend: dict[int, list[int]]         # rank -> holders without its copy of the point
    fresh: frozenset = frozenset()       # lost ranks that take everything from a replica

    def transfers(self, copies: CopyPlan) -> dict[tuple[int, int], list[tuple[str, tuple]]]:
        """(source, lost rank) -> the messages the source sends, in order: each (where from,
        parts), where from being "ring" (the source's own snapshot of the point) or "held" (its
        copy of the lost rank). A lost rank that serves itself appears nowhere here."""
        out: dict[tuple[int, int], list[tuple[str, tuple]]] = {}
        for x, parts in sorted(self.sources.items()):
            msgs: dict[tuple[int, str], list[str]] = {}
            for part in PARTS:
                src = parts[part]
                if src == x:
                    continue
                held = x not in self.fresh and (
                    part == "meta" or (part == "unique" and "unique" in copies.parts[x]))
                msgs.setdefault((src, "held" if held else "ring"), []).append(part)
            for (src, origin), ps in sorted(msgs.items(), key=lambda m: (m[0][0], m[0][1])):
                out.setdefault((src, x), []).append((origin, tuple(ps)))
        return out


def decide(reports: list[RankReport], replica_of: list[list[int]],
           shard_replicas_of: list[list[int]], copies: CopyPlan,
           allowed: Optional[Callable[[int], bool]] = None) -> Optional[RecoveryPlan]:
    """The recovery plan, or None when no step can be assembled for every lost rank.
    ``allowed``: whether a step can be the point (a step that must be re-partitioned needs the
    snapshots of the ranks that left the world, ``reshard_exchange``)."""
    n = len(reports)
    lost = [r for r in range(n) if reports[r].lost]
    survivors = [r for r in range(n) if not reports[r].lost]
    if survivors:
        candidates = set.intersection(*(set(reports[r].ring) for r in survivors))
    else:
        candidates = set.union(*(set(r.ring) for r in reports)) if reports else set()
    if allowed is not None:
        candidates = {c for c in candidates if allowed(c)}
    for point in sorted(candidates, reverse=True):
        sources = {}
        for x in lost:
            s = _sources(x, point, reports, replica_of, shard_replicas_of, copies)
            if s is None:
                break
            sources[x] = s
        else:
            return RecoveryPlan(point, sources, _steps_lost(point, reports, survivors, lost),
                                _resend(point, reports, copies),
                                frozenset(x for x in lost if reports[x].fresh))
    return None


def _sources(x: int, point: int, reports: list[RankReport], replica_of, shard_replicas_of,
             copies: CopyPlan) -> Optional[dict[str, int]]:
    if point in reports[x].ring:
        return dict.fromkeys(PARTS, x)
    reps = [r for r in replica_of[x] if r != x and point in reports[r].ring]
    if reports[x].fresh:  # only a job whose ranks each hold the whole state grows back
        return dict.fromkeys(PARTS, reps[x % len(reps)]) if reps else None
    held = [h for h in copies.holders[x] if point in reports[h].held.get(x, [])]
    if "unique" in copies.parts[x]:
        uniq = held
    else:
        uniq = [s for s in shard_replicas_of[x] if s != x and point in reports[s].ring]
    if not (reps and uniq and held):
        return None
    # spread the load: lost rank x takes its replica from a peer chosen by x
    return {"replicated": reps[x % len(reps)], "unique": uniq[0], "meta": held[0]}


def _steps_lost(point: int, reports: list[RankReport], survivors: list[int],
                lost: list[int]) -> int:
    """Committed steps past the point: the last step every rank finished, a lost rank having
    finished the newest step anything of it was kept for."""
    finished = [reports[r].committed for r in survivors]
    for x in lost:
        kept = list(reports[x].ring) + [s for r in reports for s in r.held.get(x, [])]
        finished.append(max(kept, default=-1))
    return max(0, min(finished, default=point) - point)


def _resend(point: int, reports: list[RankReport], copies: CopyPlan) -> dict[int, list[int]]:
    out = {}
    for r, holders in copies.holders.items():
        missing = [h for h in holders if point not in reports[h].held.get(r, [])]
        if missing:
            out[r] = missing
    return out
