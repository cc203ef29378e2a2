"""Failure domains, and which ranks need copies of their unique state where.

A process is a failure domain (a GPU error ends the process, not the node) and so is a node.
Each rank's own snapshot (``snapshot``) lives in the node's shared memory when there is room: it
outlives the process, so a process fault needs no copy at all. What still needs a copy:

* a rank whose snapshot is in process memory (no shared memory): its unique state goes to the
  next data-parallel rank (then any other rank), on another node when there is one;
* on a job of several nodes, every rank, against the loss of its node: to ranks on other nodes.

Redundancy by computation replaces the tensors of such a copy: with megatron-core's
``num_distributed_optimizer_instances >= 2`` each optimizer shard is held and updated by one rank
per instance, so when an instance peer is in another failure domain only the meta is copied. On
several nodes the instances must be on different nodes; otherwise that is a start-up error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


class PlacementError(ValueError):
    """The job's layout cannot give every rank's state a copy in another failure domain."""


def node_of(rank: int, nproc_per_node: int) -> int:
    return rank // nproc_per_node


@dataclass
class CopyPlan:
    holders: dict[int, list[int]]          # rank -> the ranks that keep its copies
    parts: dict[int, tuple[str, ...]]      # rank -> tensor regions copied (the meta always is)

    def wards(self, holder: int) -> list[int]:
        """The ranks whose copies ``holder`` keeps."""
        return sorted(r for r, hs in self.holders.items() if holder in hs)

    def summary(self) -> dict:
        """For the report: who copies what, per step."""
        copying = sorted(r for r, hs in self.holders.items() if hs)
        return {"ranks_copying": copying,
                "ranks_copying_tensors": sorted(r for r in copying if self.parts[r]),
                "holders": {str(r): hs for r, hs in self.holders.items() if hs}}


def holders(rank: int, nodes: list[int], replica_ranks: list[int], replicas: int) -> list[int]:
    """The ranks that keep copies of ``rank``'s unique state, best first; ``nodes[r]``: the
    node of rank r."""
    world_size = len(nodes)
    me = nodes[rank]
    multi_node = len(set(nodes)) > 1
    ring = [(rank + k) % world_size for k in range(1, world_size)]
    if multi_node:
        order = [r for r in ring if nodes[r] != me]
    else:
        dp = sorted(replica_ranks)
        i = dp.index(rank) if rank in dp else 0
        dp_next = [dp[(i + k) % len(dp)] for k in range(1, len(dp))]
        order = dp_next + [r for r in ring if r not in dp_next]
    if replicas > len(order):
        raise PlacementError(f"replicas={replicas} but only {len(order)} other ranks can hold a "
                             f"copy (world size {world_size}); lower replicas")
    return order[:replicas]


def copy_plan(world_size: int, nproc_per_node: int, replica_of: list[list[int]],
              shard_replicas_of: list[list[int]], durable_of: list[bool],
              replicas: int, nodes: Optional[list[int]] = None) -> CopyPlan:
    """Every rank's holders and copied regions (every rank computes the same plan).

    ``durable_of[r]``: rank r's snapshot outlives its process (node shared memory);
    ``shard_replicas_of[r]``: the ranks, r among them, that hold r's unique state too;
    ``nodes[r]``: the node of rank r (default: ``nproc_per_node`` ranks a node)."""
    nodes = nodes if nodes is not None else [node_of(r, nproc_per_node) for r in range(world_size)]
    multi_node = len(set(nodes)) > 1
    plan = CopyPlan({}, {})
    for r in range(world_size):
        peers = [s for s in shard_replicas_of[r] if s != r]
        elsewhere = [s for s in peers
                     if not multi_node or nodes[s] != nodes[r]]
        if multi_node and peers and not elsewhere:
            raise PlacementError(
                f"--num-distributed-optimizer-instances: rank {r} and every other instance of its "
                f"optimizer shard (ranks {peers}) are on node {nodes[r]}, so "
                f"losing that node loses the shard. Spread the instances over nodes: with "
                f"{nproc_per_node} ranks per node, the data-parallel group must span as many "
                "nodes as there are instances (e.g. tensor x pipeline x context parallel size "
                "<= ranks per node), or use 1 instance and let flash recovery copy the shards")
        needs = multi_node or not durable_of[r]
        plan.holders[r] = holders(r, nodes, replica_of[r], replicas) if needs else []
        plan.parts[r] = () if elsewhere else ("unique",)
    return plan
