"""Read back what an offline wandb run wrote (its ``run-*.wandb`` file), without wandb's servers.

wandb stores an offline run as a LevelDB-style log (7-byte file header, 32 KiB blocks, records
framed as crc32/length/type, FIRST/MIDDLE/LAST fragments) of ``wandb_internal_pb2.Record``
protobufs. Tests and the demo use this to check the recovery events a run actually logged.
"""

from __future__ import annotations

import glob
import json
import os
import struct

BLOCK = 32768
HEADER = 7  # ":W&B" + 2-byte magic + 1-byte version
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(path: str):
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file")
    pos, frags = HEADER, []
    while pos + 7 <= len(data):
        left = BLOCK - (pos % BLOCK)
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            frags = [payload]
        elif kind == MIDDLE:
            frags.append(payload)
        elif kind == LAST:
            yield b"".join([*frags, payload])
            frags = []


def read_run(run_dir_or_file: str) -> dict:
    """{'history': [row, ...], 'summary': {...}, 'tags': [...], 'name': str, 'group': str} of an
    offline run."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = run_dir_or_file
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "**", "run-*.wandb"), recursive=True))
        if not found:
            raise FileNotFoundError(f"no run-*.wandb under {path}")
        path = found[-1]
    out: dict = {"history": [], "summary": {}, "tags": [], "name": None, "group": None}
    for raw in _records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                   for i in rec.history.item})
        elif kind == "summary":
            for i in rec.summary.update:
                out["summary"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        elif kind == "run":
            out["tags"] = list(rec.run.tags)
            out["name"] = rec.run.display_name
            out["group"] = rec.run.run_group or None
    return out
