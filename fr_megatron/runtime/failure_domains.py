"""Failure domains and where each rank's redundant copy lives.

A node is a failure domain. A rank's unique state is copied to ``replicas`` peers on *other*
nodes when the job has more than one (so losing any one node loses no copy together with its
owner); on a single node it goes to the next data-parallel rank, then any other rank.
"""

from __future__ import annotations


def node_of(rank: int, nproc_per_node: int) -> int:
    return rank // nproc_per_node


def holders(rank: int, world_size: int, nproc_per_node: int, replica_ranks: list[int],
            replicas: int) -> list[int]:
    """The ranks that keep copies of ``rank``'s unique state, best first."""
    me = node_of(rank, nproc_per_node)
    multi_node = world_size > nproc_per_node
    ring = [(rank + k) % world_size for k in range(1, world_size)]
    if multi_node:
        order = [r for r in ring if node_of(r, nproc_per_node) != me]
    else:
        dp = sorted(replica_ranks)
        i = dp.index(rank) if rank in dp else 0
        dp_next = [dp[(i + k) % len(dp)] for k in range(1, len(dp))]
        order = dp_next + [r for r in ring if r not in dp_next]
    if replicas > len(order):
        raise ValueError(f"replicas={replicas} but only {len(order)} other ranks can hold a copy "
                         f"(world size {world_size}); lower replicas")
    return order[:replicas]


def placement(world_size: int, nproc_per_node: int, replica_ranks_of: list[list[int]],
              replicas: int) -> dict[int, list[int]]:
    """rank -> its holders, for every rank (all ranks compute the same map)."""
    return {r: holders(r, world_size, nproc_per_node, replica_ranks_of[r], replicas)
            for r in range(world_size)}


def wards(placement_map: dict[int, list[int]], holder: int) -> list[int]:
    """The ranks whose copies ``holder`` keeps."""
    return sorted(r for r, hs in placement_map.items() if holder in hs)
