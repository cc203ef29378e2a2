"""How a rank's state is laid out as bytes, checksummed and pickled.

A state (``RankState``) becomes one flat byte buffer: its regions (replicated, then unique) one
after the other, each tensor at a fixed offset (``Layout``), each region with its own xxh3-128
checksum, so that a replacement can take each region from a different source and still verify
what it got. The meta (RNG states, counters, scheduler) is pickled with plain CPU tensors as raw
bytes: torch's own pickling of a tensor goes through ``torch.save`` and costs far more.
"""

from __future__ import annotations

import io
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import xxhash

from .integration import RankState


class ChecksumError(RuntimeError):
    """State does not match the checksum computed when it was written."""


PARTS = ("replicated", "unique")


# A region's checksum: xxh3-128 of its bytes up to one block; beyond, xxh3-128 of its blocks'
# xxh3-128 digests, so that the blocks of a large region are hashed on several cores at once
# (xxhash releases the GIL) and a region of gigabytes is sealed and verified in a fraction of the
# time one core takes.
BLOCK = 64 << 20
_pool: Optional[ThreadPoolExecutor] = None


def _hash_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)),
                                   thread_name_prefix="fr-checksum")
    return _pool


def checksum(data: torch.Tensor) -> str:
    """The checksum of a CPU byte tensor, read in place (no copy)."""
    n = data.numel()
    if not n:
        return "0"
    a = data.numpy()
    if n <= BLOCK:
        return xxhash.xxh3_128(a).hexdigest()
    return _combine(list(_hash_pool().map(lambda off: xxhash.xxh3_128(a[off:off + BLOCK]),
                                          range(0, n, BLOCK))))


def _combine(blocks: list) -> str:
    """The checksum of a region from its blocks' hashers, in order."""
    if len(blocks) == 1:
        return blocks[0].hexdigest()
    return xxhash.xxh3_128(b"".join(b.digest() for b in blocks)).hexdigest()


class BlockHasher:
    """``checksum`` of bytes fed in pieces, in order (a copy hashes each piece as it lands)."""

    def __init__(self):
        self.blocks, self.filled, self.total = [xxhash.xxh3_128()], 0, 0

    def update(self, a) -> None:
        """``a``: a numpy byte array, the next bytes."""
        off = 0
        while off < len(a):
            if self.filled == BLOCK:
                self.blocks.append(xxhash.xxh3_128())
                self.filled = 0
            take = min(len(a) - off, BLOCK - self.filled)
            self.blocks[-1].update(a[off:off + take])
            self.filled += take
            off += take
        self.total += len(a)

    def hexdigest(self) -> str:
        return _combine(self.blocks) if self.total else "0"


def bytes_of(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8)


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str
    shape: tuple
    offset: int
    nbytes: int


class Layout:
    """Where each tensor of a state lies in a slot: region by region, in ``parts`` order."""

    def __init__(self, regions: dict[str, list[Entry]]):
        self.regions = regions
        self.spans: dict[str, tuple[int, int]] = {}
        for part, entries in regions.items():
            start = entries[0].offset if entries else None
            end = entries[-1].offset + entries[-1].nbytes if entries else None
            self.spans[part] = (start, end)
        self.total = max((e for _, e in self.spans.values() if e is not None), default=0)
        # regions without tensors sit where the previous one ended
        pos = 0
        for part in regions:
            s, e = self.spans[part]
            self.spans[part] = (pos, pos) if s is None else (s, e)
            pos = self.spans[part][1]

    def nbytes(self, part: str) -> int:
        """The bytes of ``part``'s tensors."""
        start, end = self.spans[part]
        return end - start

    @classmethod
    def of(cls, state: RankState, parts: Iterable[str] = PARTS) -> "Layout":
        regions, off = {}, 0
        for part in parts:
            entries = []
            for name, t in getattr(state, part).items():
                n = t.numel() * t.element_size()
                entries.append(Entry(name, str(t.dtype).removeprefix("torch."), tuple(t.shape),
                                     off, n))
                off += n
            regions[part] = entries
        return cls(regions)

    def only(self, parts: Iterable[str]) -> "Layout":
        """The layout of ``parts`` alone, packed from offset 0 (what a copy holder keeps)."""
        regions, off = {}, 0
        for part in parts:
            base = self.spans[part][0]
            regions[part] = [Entry(e.name, e.dtype, e.shape, e.offset - base + off, e.nbytes)
                             for e in self.regions[part]]
            off += self.size(part)
        return Layout(regions)

    @classmethod
    def assemble(cls, parts: Iterable[str], pieces: dict[str, "Layout"]) -> "Layout":
        """One layout of ``parts`` in that order, each part's tensors taken from
        ``pieces[part]`` (a part with no piece is empty)."""
        regions, off = {}, 0
        for part in parts:
            piece = pieces.get(part)
            entries = piece.regions[part] if piece is not None else []
            base = piece.spans[part][0] if piece is not None else 0
            regions[part] = [Entry(e.name, e.dtype, e.shape, e.offset - base + off, e.nbytes)
                             for e in entries]
            off += piece.size(part) if piece is not None else 0
        return cls(regions)

    def size(self, part: str) -> int:
        s, e = self.spans[part]
        return e - s

    def to_json(self) -> dict:
        return {p: [[e.name, e.dtype, list(e.shape), e.offset, e.nbytes] for e in es]
                for p, es in self.regions.items()}

    @classmethod
    def from_json(cls, data: dict) -> "Layout":
        return cls({p: [Entry(n, d, tuple(s), o, b) for n, d, s, o, b in es]
                    for p, es in data.items()})

    def same_tensors(self, other: "Layout", part: str) -> bool:
        """Same names, dtypes and shapes in ``part`` (offsets may differ)."""
        a = [(e.name, e.dtype, e.shape) for e in self.regions.get(part, [])]
        b = [(e.name, e.dtype, e.shape) for e in other.regions.get(part, [])]
        return a == b

    def __eq__(self, other) -> bool:
        return isinstance(other, Layout) and self.regions == other.regions

    def views(self, buf: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {}
        for part, entries in self.regions.items():
            out[part] = {e.name: buf[e.offset:e.offset + e.nbytes].view(getattr(torch, e.dtype))
                         .reshape(e.shape) if e.nbytes else
                         torch.empty(e.shape, dtype=getattr(torch, e.dtype))
                         for e in entries}
        return out


class _MetaPickler(pickle.Pickler):
    """Pickles plain CPU tensors as (dtype, shape, bytes) instead of through ``torch.save``."""

    def reducer_override(self, obj):
        if (type(obj) is torch.Tensor and obj.device.type == "cpu" and obj.layout == torch.strided
                and not obj.requires_grad):
            raw = obj.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            return _tensor_from_bytes, (str(obj.dtype).removeprefix("torch."),
                                        tuple(obj.shape), raw)
        return NotImplemented


def _tensor_from_bytes(dtype: str, shape: tuple, raw: bytes) -> torch.Tensor:
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else \
        torch.empty(0, dtype=torch.uint8)
    return flat.view(getattr(torch, dtype)).reshape(shape)


def dumps_meta(meta: dict) -> bytes:
    buf = io.BytesIO()
    _MetaPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(meta)
    return buf.getvalue()


def loads_meta(raw: bytes) -> dict:
    return pickle.loads(raw)
