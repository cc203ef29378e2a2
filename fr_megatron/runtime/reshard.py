"""Re-partitioning sharded optimizer state over another data-parallel size, in memory.

A distributed optimizer (megatron-core's DistributedOptimizer, DeepSpeed ZeRO-1/2) gives each
data-parallel rank one contiguous shard of a flat buffer; which parameter ranges a shard holds
depends on the data-parallel size (and on the padding that size brings). When a job shrinks or
grows, the ranks' shards of the old partitioning are read in *model space*: every captured
tensor says which range of which parameter it holds. The integration writes that description
(a ``ShardLayout``) beside each commit, so a snapshot can be read by any rank, even one that
never had the writer's partitioning.

``assemble`` puts the old shards of one model position (the same tensor/pipeline ranks) back
together per parameter and kind ("param", "main", "exp_avg", ...); ``scatter`` copies into the
live tensors of the new partitioning the ranges its own layout names. Both check coverage: a
range that no old shard held is an error naming the parameter, never zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

SCALAR = -1  # ``Span.start`` of a 0-dim tensor that belongs to the parameter as a whole ("step")


class ReshardError(RuntimeError):
    """The old shards do not cover what the new partitioning needs, or a layout is incomplete."""


@dataclass(frozen=True)
class Span:
    """Elements ``[start, end)`` of parameter ``name``'s flattened ``kind`` tensor, found at
    element ``at`` of a captured tensor (a shard may hold several parameters' spans)."""

    name: str
    kind: str
    start: int
    end: int
    at: int = 0


@dataclass
class ShardLayout:
    """What each of a rank's captured sharded tensors holds, in model space; picklable."""

    spans: dict[str, list[Span]] = field(default_factory=dict)  # captured key -> its spans
    numel: dict[str, int] = field(default_factory=dict)         # parameter name -> elements
    position: tuple = ()  # the model position (tensor, pipeline, ... ranks) the shards belong to
    part: tuple = (0, 1)  # (which shard, of how many): this rank's place in its partition

    def add(self, key: str, span: Span) -> None:
        self.spans.setdefault(key, []).append(span)

    def check_covers(self, keys: Iterable[str]) -> None:
        """Every sharded tensor of a capture is described, or re-partitioning would lose it."""
        missing = sorted(set(keys) - set(self.spans))
        if missing:
            raise ReshardError(f"{len(missing)} sharded tensors have no model-space layout "
                               f"(first: {missing[:3]}); they cannot be re-partitioned")


def assemble(snapshots: Iterable[tuple[ShardLayout, dict[str, torch.Tensor]]]
             ) -> "ModelSpace":
    """The old shards of one model position, put together per (parameter, kind)."""
    space = ModelSpace()
    for layout, tensors in snapshots:
        for key, spans in layout.spans.items():
            if key not in tensors:
                raise ReshardError(f"the snapshot lacks {key!r}, which its layout describes")
            flat = tensors[key].reshape(-1)
            for sp in spans:
                space.put(sp, flat, layout.numel[sp.name])
    return space


class ModelSpace:
    """Whole flattened tensors per (parameter, kind), with which elements were filled."""

    def __init__(self):
        self.full: dict[tuple[str, str], torch.Tensor] = {}
        self.filled: dict[tuple[str, str], torch.Tensor] = {}
        self.scalars: dict[tuple[str, str], torch.Tensor] = {}

    def put(self, sp: Span, flat: torch.Tensor, numel: int) -> None:
        k = (sp.name, sp.kind)
        if sp.start == SCALAR:
            self.scalars[k] = flat.reshape(())
            return
        if k not in self.full:
            self.full[k] = torch.empty(numel, dtype=flat.dtype, device=flat.device)
            self.filled[k] = torch.zeros(numel, dtype=torch.bool)
        n = sp.end - sp.start
        self.full[k][sp.start:sp.end].copy_(flat[sp.at:sp.at + n])
        self.filled[k][sp.start:sp.end] = True

    def get(self, sp: Span) -> torch.Tensor:
        k = (sp.name, sp.kind)
        if sp.start == SCALAR:
            if k not in self.scalars:
                raise ReshardError(f"no old shard holds {sp.kind} of {sp.name}")
            return self.scalars[k]
        if k not in self.full or not bool(self.filled[k][sp.start:sp.end].all()):
            raise ReshardError(f"no old shard holds elements {sp.start}..{sp.end} of {sp.kind} "
                               f"of {sp.name}: a data-parallel rank's shard is missing")
        return self.full[k][sp.start:sp.end]


def scatter(space: ModelSpace, layout: ShardLayout, live: dict[str, torch.Tensor]) -> int:
    """Copy into ``live`` (the new partitioning's captured tensors, in place) the spans its
    ``layout`` names; returns the elements copied."""
    copied = 0
    with torch.no_grad():
        for key, spans in layout.spans.items():
            flat = live[key].view(-1)
            for sp in spans:
                src = space.get(sp)
                if sp.start == SCALAR:
                    live[key].copy_(src)
                    copied += 1
                else:
                    flat[sp.at:sp.at + sp.end - sp.start].copy_(src)
                    copied += sp.end - sp.start
    return copied
