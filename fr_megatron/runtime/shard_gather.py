"""Putting a data-parallel group's shards of a buffer back together after a restore.

A distributed optimizer updates only this rank's shard of each parameter buffer and all-gathers
the others after its step (megatron-core's DDP buckets, ZeRO's flat low-precision groups). A
commit therefore keeps only the shard, and a restore has the group exchange the shards again, as
the optimizer step does. On NCCL that is an all-gather; on gloo, whose all-gather runs on the CPU
at a fraction of loopback speed, each CPU shard goes to each peer point to point (CUDA shards
take the all-gather: gloo's point-to-point has no CUDA path).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_shards(pieces: list[tuple[list[torch.Tensor], int, dist.ProcessGroup]]) -> None:
    """For each (the group's shards of one buffer in group-rank order, this rank's index, the
    group): fill the other shards from their owners. Every member of each group calls it with the
    same pieces in the same order."""
    works = []
    for shards, me, group in pieces:
        if dist.get_backend(group) != "gloo" or shards[me].is_cuda:
            # gloo's point-to-point has no CUDA path; its all-gather stages through host memory
            dist.all_gather(shards, shards[me].clone(), group=group)
            continue
        for i, peer in enumerate(dist.get_process_group_ranks(group)):
            if i != me:
                works.append(dist.isend(shards[me], peer, group=group))
                works.append(dist.irecv(shards[i], peer, group=group))
    for w in works:
        w.wait()
