"""Going on with fewer data-parallel replicas: which ranks leave the world when lost ranks are
not replaced, and which stay.

A data-parallel replica is the set of ranks (tensor x pipeline x context parallel) that hold one
copy of the model together. A lost rank that is not replaced takes its whole replica out of the
world: the replica's other ranks cannot train without it. The job ranks keep their numbers (they
name heartbeats, snapshots and injections); the new world's ranks are the members' positions in
``members``. Pure functions: the controller decides with them, tests call them directly.
"""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("no-spare", "never", "always")


class ShrinkImpossible(RuntimeError):
    """No replica would be left, or the job does not say how it is split into replicas."""


@dataclass(frozen=True)
class Shrink:
    removed: list[int]          # job ranks that leave the world: every replica with a lost rank
    members: list[int]          # job ranks of the new world, in the new world's rank order
    replicas: list[list[int]]   # the data-parallel replicas that stay, in job ranks


def shrinks(policy: str, replaceable: bool) -> bool:
    """Whether a lost rank is removed with its replica instead of replaced."""
    if policy not in POLICIES:
        raise ValueError(f"shrink policy {policy!r} is not one of {', '.join(POLICIES)}")
    return policy == "always" or (policy == "no-spare" and not replaceable)


def shrink(members: list[int], replicas: list[list[int]], lost: list[int]) -> Shrink:
    """Remove every replica that holds a lost rank; the ranks left, in their order."""
    inside = {r for rep in replicas for r in rep}
    if sorted(inside) != sorted(members):
        raise ShrinkImpossible(f"the data-parallel replicas {replicas} do not cover the world's "
                               f"ranks {members}")
    stray = sorted(set(lost) - inside)
    if stray:
        raise ShrinkImpossible(f"ranks {stray} are not in the world {members}")
    gone = [rep for rep in replicas if set(rep) & set(lost)]
    kept = [rep for rep in replicas if not set(rep) & set(lost)]
    if not kept:
        raise ShrinkImpossible(f"ranks {sorted(lost)} leave no data-parallel replica whole "
                               f"(replicas: {replicas})")
    removed = sorted(r for rep in gone for r in rep)
    return Shrink(removed, [r for r in members if r not in removed], kept)
