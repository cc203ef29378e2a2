"""Moving state between ranks: packing, checksums, and point-to-point transfer.

State travels as one flat byte buffer (the tensors, then the pickled meta) plus a small header
(names, dtypes, shapes, offsets and a BLAKE2b checksum of the buffer). The receiver recomputes the
checksum before anything is restored: a mismatch raises ``ChecksumError`` and training never runs
on wrong state. Tensors inside the meta (RNG states) are pickled as raw bytes: torch's own
pickling of a tensor goes through ``torch.save`` and made up most of a commit's cost.
Transfers go over the runtime's own gloo group (CPU tensors), so they never interleave with the
framework's collectives; CUDA state is staged through host memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist


class ChecksumError(RuntimeError):
    """State received from a peer does not match the checksum its sender computed."""


@dataclass
class Packed:
    header: dict
    data: torch.Tensor  # uint8, CPU


def checksum(data: torch.Tensor) -> str:
    return hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest()


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


def pack(tensors: dict[str, torch.Tensor], meta: dict, step: int) -> Packed:
    entries, total = [], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        entries.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), total, n])
        total += n
    meta_raw = dumps_meta(meta)
    data = torch.empty(total + len(meta_raw), dtype=torch.uint8)
    for (name, _, _, off, n), t in zip(entries, tensors.values()):
        if n:
            data[off:off + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu())
    if meta_raw:
        data[total:].copy_(torch.frombuffer(bytearray(meta_raw), dtype=torch.uint8))
    header = {"step": step, "entries": entries, "meta": [total, len(meta_raw)],
              "checksum": checksum(data)}
    if os.environ.get("FR_CORRUPT_TRANSFER") == "1" and total:
        data[total // 2] ^= 0xFF  # test hook: corrupt after checksumming, as a bad link would
    return Packed(header, data)


def unpack(p: Packed, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    if verify:
        got = checksum(p.data)
        if got != p.header["checksum"]:
            raise ChecksumError(f"checksum mismatch for state of step {p.header['step']}: "
                                f"sent {p.header['checksum']}, received {got}")
    out = {}
    for name, dtype, shape, off, n in p.header["entries"]:
        dt = getattr(torch, dtype)
        out[name] = p.data[off:off + n].view(dt).reshape(shape) if n else torch.empty(shape, dtype=dt)
    off, n = p.header["meta"]
    return out, pickle.loads(p.data[off:off + n].numpy().tobytes())


def send(p: Packed, dst: int, group) -> list:
    """Start sending ``p`` to global rank ``dst``; returns the works to wait on."""
    hdr = torch.frombuffer(bytearray(json.dumps(p.header).encode()), dtype=torch.uint8)
    sizes = torch.tensor([hdr.numel(), p.data.numel()], dtype=torch.int64)
    works = [dist.isend(sizes, dst, group=group), dist.isend(hdr, dst, group=group)]
    if p.data.numel():
        works.append(dist.isend(p.data, dst, group=group))
    # keep the buffers alive until the sends complete
    works.append(_Keep(sizes, hdr, p.data))
    return works


def recv(src: int, group) -> Packed:
    sizes = torch.empty(2, dtype=torch.int64)
    dist.recv(sizes, src, group=group)
    hdr = torch.empty(int(sizes[0]), dtype=torch.uint8)
    dist.recv(hdr, src, group=group)
    data = torch.empty(int(sizes[1]), dtype=torch.uint8)
    if data.numel():
        dist.recv(data, src, group=group)
    return Packed(json.loads(bytes(hdr.numpy()).decode()), data)


def wait_all(works: list) -> None:
    for w in works:
        w.wait()


class _Keep:
    def __init__(self, *objs):
        self.objs = objs

    def wait(self):
        self.objs = ()
