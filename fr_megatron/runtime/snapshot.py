"""Step transactions: the state of the last committed steps, kept to roll back to.

At each commit a rank copies its live state into preallocated host buffers (a ring of
``depth`` steps). Ranks can be one step apart when a fault strikes (a rank that finished step C+1
while a peer died inside it), and every rank must return to the last step *every* rank finished,
so the ring holds two steps by default. Partial updates need no detection of their own: whatever a
failed step changed (parameters mid-``optimizer.step``, half-reduced gradients, moments) is
overwritten by the copy of the recovery point.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch

from .integration import RankState


def _host_like(t: torch.Tensor) -> torch.Tensor:
    pin = t.is_cuda
    return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)


class SnapshotRing:
    def __init__(self, depth: int = 2):
        self.depth = depth
        self._ring: "OrderedDict[int, RankState]" = OrderedDict()

    def steps(self) -> list[int]:
        return list(self._ring)

    def __contains__(self, step: int) -> bool:
        return step in self._ring

    def commit(self, step: int, live: RankState) -> None:
        """Copy ``live`` into the buffers of ``step``, reusing the oldest step's buffers."""
        if step in self._ring:
            buf = self._ring.pop(step)
        elif len(self._ring) >= self.depth:
            _, buf = self._ring.popitem(last=False)
        else:
            buf = RankState()
        for part in ("replicated", "unique"):
            src, dst = getattr(live, part), getattr(buf, part)
            for k in [k for k in dst if k not in src]:
                del dst[k]
            for k, t in src.items():
                d = dst.get(k)
                if d is None or d.shape != t.shape or d.dtype != t.dtype:
                    d = dst[k] = _host_like(t)
                d.copy_(t, non_blocking=True)
        buf.meta = copy.deepcopy(live.meta)
        self._ring[step] = buf
        if any(t.is_cuda for t in live.replicated.values()):
            torch.cuda.synchronize()

    def get(self, step: int) -> RankState:
        return self._ring[step]

    def drop_after(self, step: int) -> None:
        for s in [s for s in self._ring if s > step]:
            del self._ring[s]

    def put(self, step: int, state: RankState) -> None:
        """Adopt an already-copied state (a replacement's restored state)."""
        self._ring[step] = state
        while len(self._ring) > self.depth:
            self._ring.popitem(last=False)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self._ring.values()
                   for part in (st.replicated, st.unique) for t in part.values())
