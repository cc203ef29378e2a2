"""Getting every old shard of a rank's model position to it, after the data-parallel size changed.

When a job shrinks or grows, a sharded optimizer's state is re-partitioned (``reshard``): each
rank of the new world needs the snapshots, at the recovery point, of every old data-parallel rank
at its model position. They are offered by whoever has them: each rank its own snapshot ring (not
a rank that joins as the job grows: it has nothing yet), and the rings that ranks which left the
world (a shrink) left in this node's shared memory, or the copies of them this rank held. Every
rank says what it offers (one all-gather), the point is chosen among the steps offered for every
rank that left, then the lowest rank offering each snapshot sends it to each rank at its position
(straight from the slot, ``transfer``), and checksums are verified on arrival.
"""

from __future__ import annotations

import logging
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from . import transfer
from .layout import loads_meta
from .reshard import ShardLayout
from .snapshot import SnapshotRing, Slot, rank_ring

log = logging.getLogger("fr_megatron.reshard")


def layout_of(slot: Slot) -> Optional[ShardLayout]:
    """The model-space layout a snapshot was committed with (the integration puts it, pickled,
    in the meta), or None."""
    raw = loads_meta(slot.header["meta"]).get("shard_layout")
    return pickle.loads(raw) if isinstance(raw, bytes) else raw


def rings_left_behind(directory: Optional[str], depth: int, ranks: list[int]) -> dict:
    """The snapshot rings that ``ranks`` (ranks that left the world) left in this node's shared
    memory ``directory``, by rank."""
    if not directory:
        return {}
    rings = {r: rank_ring(depth, directory, r) for r in ranks}
    return {r: ring for r, ring in rings.items() if ring.steps()}


@dataclass
class Offers:
    """What every rank of the world offers: ``position[w]`` is world rank w's model position,
    ``steps[w][origin]`` maps the steps of job rank ``origin``'s snapshots it can send to their
    partition (``ShardLayout.part``), ``origin_position[origin]`` is the model position those
    snapshots belong to, and ``stale[w]`` the steps of w's own ring held in another partition
    than its live one."""

    position: list
    steps: list[dict[int, dict[int, tuple]]]
    origin_position: dict
    stale: list[list[int]]

    def add(self, origin: int, w: int, step: int) -> None:
        """World rank w will hold ``origin``'s snapshot of ``step`` (a lost rank, once its
        sources sent it), at w's position."""
        self.steps[w] = {**self.steps[w], origin: {**self.steps[w].get(origin, {}), step: None}}
        self.origin_position[origin] = self.position[w]

    def sender(self, origin: int, step: int) -> Optional[int]:
        return next((w for w, offered in enumerate(self.steps)
                     if step in offered.get(origin, {})), None)

    def complete(self, step: int, wildcards: list[int] = ()) -> bool:
        """Whether, at every model position, the snapshots offered of ``step`` hold a whole
        partition (every shard of some partition size); ``wildcards``: world ranks that will
        hold their own snapshot of it but cannot say of which partition yet (lost ranks)."""
        parts: dict = {}
        for offered in self.steps:
            for origin, by_step in offered.items():
                if by_step.get(step) is not None:
                    parts.setdefault(self.origin_position[origin], set()).add(by_step[step])
        for pos in set(self.position) | set(parts):
            free = sum(1 for w in wildcards if self.position[w] == pos)
            held = parts.get(pos, set())
            sizes = {n for _, n in held} or {free}
            if not any(len({i for i, m in held if m == n}) + free >= n for n in sizes):
                return False
        return True


def announce(rings: dict[int, SnapshotRing], live: ShardLayout, own: Optional[int], group,
             world_size: int) -> Offers:
    """Every rank's offers (``rings``: origin job rank -> a ring holding its snapshots; only
    snapshots committed with a shard layout are offered), and which steps of its own ring
    (origin ``own``, None for a rank with none yet) are held in another partition than
    ``live``, its current layout."""
    offered, where, stale = {}, {}, []
    for origin, ring in rings.items():
        layouts = {s: layout_of(ring.slot(s)) for s in ring.steps()}
        layouts = {s: lay for s, lay in layouts.items() if lay is not None}
        if origin == own:
            stale = [s for s in ring.steps() if layouts.get(s) != live]
        if layouts:
            offered[origin] = {s: lay.part for s, lay in layouts.items()}
            where[origin] = next(iter(layouts.values())).position
    position = live.position
    every: list = [None] * world_size
    dist.all_gather_object(every, (position, offered, where, stale), group=group)
    origin_position = {o: p for e in every for o, p in e[2].items()}
    return Offers([e[0] for e in every], [e[1] for e in every], origin_position,
                  [e[3] for e in every])


def exchange(offers: Offers, rings: dict[int, SnapshotRing], step: int, me: int, group,
             verify: bool = True) -> list[tuple[ShardLayout, dict]]:
    """Send and receive the snapshots of ``step``: returns (layout, unique tensors) of every
    origin at this rank's position, this rank's own included."""
    plan = {o: (src, p) for o, p in offers.origin_position.items()
            if (src := offers.sender(o, step)) is not None}
    works = []
    for w, position in enumerate(offers.position):
        if w == me:
            continue
        msgs = [(rings[o].slot(step), ("unique",), True) for o, (src, pos) in sorted(plan.items())
                if src == me and pos == position]
        if msgs:
            works += transfer.send(msgs, w, group)
    here = offers.position[me]
    local = [rings[o].slot(step) for o, (src, pos) in sorted(plan.items())
             if src == me and pos == here]
    sources = sorted({src for src, pos in plan.values() if src != me and pos == here})
    received: list[Slot] = []
    if sources:
        with ThreadPoolExecutor(len(sources), thread_name_prefix="fr-reshard") as pool:
            for slots in pool.map(lambda src: _receive(src, group, verify), sources):
                received += slots
    transfer.wait_all(works)
    if verify:
        for slot in local:
            slot.verify(("unique",))
    return [(layout_of(slot), slot.state().unique) for slot in local + received]


def _receive(src: int, group, verify: bool) -> list[Slot]:
    out = []
    for got in transfer.recv_headers(src, group):
        slot = Slot(None, f"reshard.from{src}")
        slot.ensure(got.layout)
        transfer.recv_bodies(src, group, [got], slot)
        slot.seal({"step": got.step, "layout": got.layout.to_json(), "sums": got.sums,
                   "meta": got.meta})
        if verify:
            slot.verify(got.parts)
        out.append(slot)
    return out
