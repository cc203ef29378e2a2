"""Moving committed state between ranks, straight out of one snapshot slot into another.

A sender sends regions of a sealed slot (its own snapshot of a step, or a copy it holds for a
ward) as they lie in memory, after a small JSON header: the step, the layout of what follows, the
checksums written with the slot and, when asked, the slot's pickled meta. The receiver writes the
regions straight into a slot of its own and keeps the sender's checksums, which are verified
before anything is restored (``Slot.verify``): no intermediate copy, no checksum on the way.
Transfers go over the runtime's own gloo group (CPU tensors), so they never interleave with the
framework's collectives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .layout import Layout


@dataclass
class Received:
    """What ``recv_header`` announced, then what ``recv_body`` wrote."""

    step: int
    layout: Layout              # of the regions sent, packed from offset 0
    sums: dict
    meta_len: int
    meta: bytes = b""
    parts: list = field(default_factory=list)


def _bytes_tensor(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else \
        torch.empty(0, dtype=torch.uint8)


def send(messages: list[tuple], dst: int, group) -> list:
    """Start sending to global rank ``dst`` each ``(slot, parts, with_meta)``: those regions of
    the sealed slot, and its meta when ``with_meta``; returns the works to wait on
    (``wait_all``). All headers go first, so the receiver can make room before any data."""
    headers, keep, bodies = [], [], []
    for slot, parts, with_meta in messages:
        header = slot.header
        meta = header["meta"] if with_meta else b""
        sums = {p: header["sums"][p] for p in parts}
        if with_meta:
            sums["meta"] = header["sums"]["meta"]
        headers.append({"step": header["step"], "sums": sums, "meta_len": len(meta),
                        "layout": slot.layout.only(parts).to_json()})
        bodies += [slot.region(p) for p in parts]
        if meta:
            bodies.append(_bytes_tensor(meta))
    hdr = _bytes_tensor(json.dumps(headers).encode())
    size = torch.tensor([hdr.numel()], dtype=torch.int64)
    keep = [size, hdr, *bodies]
    works = [dist.isend(t, dst, group=group) for t in (size, hdr, *bodies) if t.numel()]
    return works + [_Keep(keep)]


def recv_headers(src: int, group) -> list[Received]:
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src, group=group)
    hdr = torch.empty(int(size[0]), dtype=torch.uint8)
    dist.recv(hdr, src, group=group)
    out = []
    for h in json.loads(bytes(hdr.numpy()).decode()):
        layout = Layout.from_json(h["layout"])
        out.append(Received(h["step"], layout, h["sums"], h["meta_len"], parts=list(layout.regions)))
    return out


def recv_bodies(src: int, group, announced: list[Received], slot) -> list[Received]:
    """Receive what ``recv_headers`` announced straight into the same regions of ``slot``, whose
    layout must hold the same tensors there."""
    for got in announced:
        for part in got.parts:
            if not slot.layout.same_tensors(got.layout, part):
                raise ValueError(f"state of step {got.step} from rank {src}: its {part} tensors "
                                 "do not match the slot they are received into")
            region = slot.region(part)
            if region.numel():
                dist.recv(region, src, group=group)
        if got.meta_len:
            m = torch.empty(got.meta_len, dtype=torch.uint8)
            dist.recv(m, src, group=group)
            got.meta = bytes(m.numpy())
    return announced


def wait_all(works: list) -> None:
    for w in works:
        w.wait()


class _Keep:
    """Holds a send's small buffers until its works are waited on."""

    def __init__(self, objs):
        self.objs = objs

    def wait(self):
        self.objs = ()
