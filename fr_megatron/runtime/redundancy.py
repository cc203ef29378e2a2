"""Redundant copies of unique state, held in the host memory of peers in other failure domains.

Every commit, a rank packs its unique state (optimizer shards, RNG, counters) and sends it to its
holders; each holder keeps the last ``depth`` versions of each ward's copy. The exchange runs on a
background thread over the runtime's own gloo group, overlapped with the local snapshot; the
commit waits for it (``wait``), so a committed step always has its copies in place and a fault at
any later point of the next step costs no finished work.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from . import transfer
from .integration import RankState

log = logging.getLogger("fr_megatron.redundancy")


class CopyExchange:
    def __init__(self, rank: int, holders: list[int], wards: list[int], group, depth: int = 2,
                 keep: dict | None = None):
        self.rank, self.holders, self.wards, self.group = rank, holders, wards, group
        self.depth = depth
        # copies survive a rebuild of the groups: ``keep`` hands over those of the old exchange
        self.copies: dict[int, "OrderedDict[int, transfer.Packed]"] = {
            w: (keep or {}).get(w, OrderedDict()) for w in wards}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fr-copies")
        self._pending: Future | None = None

    def start(self, step: int, live: RankState) -> None:
        """Pack now (the state is final for ``step``) and exchange in the background."""
        packed = transfer.pack(live.unique, live.meta, step)
        self._pending = self._pool.submit(self._exchange, step, packed)

    def wait(self) -> None:
        if self._pending is not None:
            fut, self._pending = self._pending, None
            fut.result()

    def _exchange(self, step: int, packed: transfer.Packed) -> None:
        works = []
        for h in self.holders:
            works += transfer.send(packed, h, self.group)
        for w in self.wards:
            p = transfer.recv(w, self.group)
            ring = self.copies[w]
            ring[p.header["step"]] = p
            while len(ring) > self.depth:
                ring.popitem(last=False)
        transfer.wait_all(works)

    def held(self) -> dict[int, list[int]]:
        return {w: list(r) for w, r in self.copies.items()}

    def nbytes(self) -> int:
        return sum(p.data.numel() for r in self.copies.values() for p in r.values())

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)
