"""Moving sharded state from one partition to another: who sends which element ranges to whom.

A distributed optimizer (megatron-core's, ZeRO-1/2) splits each full state tensor (a parameter's
fp32 master copy, its Adam moments) over the data-parallel ranks. When the data-parallel size
changes in place (a replica removed or added back), every rank of the new partition needs element
ranges that old ranks hold. Each rank describes what it holds and what it needs as ``Piece``s
(key of the full tensor, element range of its flattened form); ``plan`` matches them, the same
way on every rank; ``exchange`` moves the bytes, one buffer per (source, destination, dtype).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True, order=True)
class Piece:
    key: str     # the full tensor, e.g. "decoder.layers.0.mlp.linear_fc1.weight/exp_avg"
    start: int   # [start, stop): elements of its flattened form
    stop: int


Move = tuple[int, int, Piece]  # (source rank, destination rank, the elements moved)


def plan(have: dict[int, list[Piece]], want: dict[int, list[Piece]]) -> list[Move]:
    """Every element each rank wants, with the rank it comes from: itself when it has it, else
    the lowest rank that does. Raises ``KeyError`` naming what nobody holds."""
    by_key: dict[str, list[tuple[int, Piece]]] = defaultdict(list)
    for rank, pieces in sorted(have.items()):
        for p in pieces:
            by_key[p.key].append((rank, p))
    moves: list[Move] = []
    for dst, pieces in sorted(want.items()):
        for w in sorted(pieces):
            holders = sorted(by_key.get(w.key, ()), key=lambda rp: (rp[0] != dst, rp[0]))
            pos = w.start
            while pos < w.stop:
                src, got = next(((r, p) for r, p in holders if p.start <= pos < p.stop),
                                (None, None))
                if src is None:
                    raise KeyError(f"no rank holds elements {pos}.. of {w.key}")
                stop = min(w.stop, got.stop)
                moves.append((src, dst, Piece(w.key, pos, stop)))
                pos = stop
    return moves


def exchange(moves: list[Move], rank: int, group, read: Callable[[Piece], torch.Tensor],
             write: Callable[[Piece, torch.Tensor], None], dtype_of: Callable[[str], torch.dtype],
             group_rank: Callable[[int], int] = lambda r: r) -> int:
    """Carry out ``moves`` for this ``rank``: ``read(piece)`` gives a 1-D CPU tensor of elements
    this rank holds, ``write(piece, values)`` stores what it receives (or holds itself). Messages
    go over ``group`` (``group_rank`` maps a rank of the plan to its rank there). Returns the
    bytes received."""
    out: dict[tuple[int, torch.dtype], list[Piece]] = defaultdict(list)
    inc: dict[tuple[int, torch.dtype], list[Piece]] = defaultdict(list)
    for src, dst, piece in moves:
        if src == rank and dst == rank:
            write(piece, read(piece))
        elif src == rank:
            out[(dst, dtype_of(piece.key))].append(piece)
        elif dst == rank:
            inc[(src, dtype_of(piece.key))].append(piece)
    works, keep = [], []
    for (dst, dtype), pieces in sorted(out.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        buf = torch.cat([read(p).to(dtype) for p in pieces])
        keep.append(buf)
        works.append(dist.isend(buf, group_rank(dst), group=group))
    received = 0
    for (src, dtype), pieces in sorted(inc.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        buf = torch.empty(sum(p.stop - p.start for p in pieces), dtype=dtype)
        dist.recv(buf, group_rank(src), group=group)
        received += buf.numel() * buf.element_size()
        off = 0
        for p in pieces:
            n = p.stop - p.start
            write(p, buf[off:off + n])
            off += n
    for w in works:
        w.wait()
    return received
