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
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from . import transfer
from .layout import loads_meta
from .reshard import ShardLayout
from .snapshot import SnapshotRing, Slot

log = logging.getLogger("fr_megatron.reshard")


def layout_of(slot: Slot) -> Optional[ShardLayout]:
    """The model-space layout a snapshot was committed with (the integration puts it in the
    meta), or None."""
    return loads_meta(slot.header["meta"]).get("shard_layout")


def rings_left_behind(directory: Optional[str], depth: int, ranks: list[int]) -> dict:
    """The snapshot rings that ``ranks`` (ranks that left the world) left in this node's shared
    memory ``directory``, by rank."""
    if not directory:
        return {}
    out = {}
    for r in ranks:
        if any(os.path.exists(os.path.join(directory, f"rank{r}.slot{i}.hdr"))
               for i in range(depth)):
            out[r] = SnapshotRing(depth, directory, f"rank{r}")
    return out


@dataclass
class Offers:
    """What every rank of the world offers: ``position[w]`` is world rank w's model position,
    ``steps[w][origin]`` the steps of job rank ``origin``'s snapshot it can send, and
    ``origin_position[origin]`` the model position that snapshot belongs to."""

    position: list
    steps: list[dict[int, list[int]]]
    origin_position: dict

    def steps_of(self, origin: int) -> set[int]:
        return {s for offered in self.steps for s in offered.get(origin, [])}

    def sender(self, origin: int, step: int) -> Optional[int]:
        return next((w for w, offered in enumerate(self.steps)
                     if step in offered.get(origin, [])), None)


def announce(rings: dict[int, SnapshotRing], position, group, world_size: int) -> Offers:
    """Every rank's offers (``rings``: origin job rank -> a ring holding its snapshots; only
    snapshots committed with a shard layout are offered)."""
    offered, where = {}, {}
    for origin, ring in rings.items():
        steps = [s for s in ring.steps() if layout_of(ring.slot(s)) is not None]
        if steps:
            offered[origin] = steps
            where[origin] = layout_of(ring.slot(steps[-1])).position
    every: list = [None] * world_size
    dist.all_gather_object(every, (position, offered, where), group=group)
    origin_position = {o: p for e in every for o, p in e[2].items()}
    return Offers([e[0] for e in every], [e[1] for e in every], origin_position)


def exchange(offers: Offers, rings: dict[int, SnapshotRing], step: int, me: int, group,
             verify: bool = True) -> list[tuple[ShardLayout, dict]]:
    """Send and receive the snapshots of ``step``: returns (layout, unique tensors) of every
    origin at this rank's position, this rank's own included."""
    plan = {o: (offers.sender(o, step), p) for o, p in offers.origin_position.items()}
    missing = sorted(o for o, (src, _) in plan.items() if src is None)
    if missing:
        raise RuntimeError(f"no rank offers step {step} of ranks {missing}")
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
