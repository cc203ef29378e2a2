"""The wire format of a rank's collective progress: how far it has got in each communication.

A rank reports ``{key: [count, inside]}`` in its heartbeat (``comm``): for each key, how many
operations it has entered there and whether the newest one is still in flight. Two kinds of key
name what the count is comparable across:

- a collective key ``G@M`` for a group: ``G`` a short id of the group's name (torch gives every
  member of a group the same name), ``M`` its members as global ranks in ranges
  (``0-7``, ``1-7/2``, ``0-1,4-5``). Every member runs the group's collectives in one order,
  so their counts are comparable.
- a channel key ``G:S>D`` for point-to-point traffic from rank ``S`` to rank ``D`` in group
  ``G``: ``S`` counts its sends to ``D``, ``D`` its receives from ``S``. Pairwise traffic in a
  group of more than two ranks is not a sequence every member shares, so it is counted per
  ordered pair.

Keys carry their members so that the controller needs no table of groups, and a member that
has not yet entered a group's first collective (no entry of its own) is still known as one.
This module is shared by the runtime and the controller, and imports no training framework.
"""

from __future__ import annotations

import hashlib


def short_name(group_name: str) -> str:
    """A short id for a group name: the name itself when short, else 8 hex digits of its hash
    (megatron's member-only group names run to 50 characters)."""
    if len(group_name) <= 8:
        return group_name
    return hashlib.blake2b(group_name.encode(), digest_size=4).hexdigest()


def encode_ranks(ranks) -> str:
    """Sorted global ranks as arithmetic runs: ``a``, ``a-b`` (step 1) or ``a-b/s``."""
    r = sorted(ranks)
    out, i = [], 0
    while i < len(r):
        j = i + 1
        if j < len(r):
            step = r[j] - r[i]
            while j + 1 < len(r) and r[j + 1] - r[j] == step:
                j += 1
            if j - i >= 2 or step == 1:
                out.append(f"{r[i]}-{r[j]}" + (f"/{step}" if step != 1 else ""))
                i = j + 1
                continue
        out.append(str(r[i]))
        i += 1
    return ",".join(out)


def decode_ranks(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        span, _, step = part.partition("/")
        first, _, last = span.partition("-")
        out.extend(range(int(first), int(last or first) + 1, int(step or 1)))
    return out


def collective_key(group_name: str, ranks) -> str:
    return f"{short_name(group_name)}@{encode_ranks(ranks)}"


def channel_key(group_name: str, src: int, dst: int) -> str:
    return f"{short_name(group_name)}:{src}>{dst}"


def members(key: str) -> list[int]:
    """The global ranks whose counts on ``key`` are comparable; [] for a key not understood."""
    try:
        if "@" in key:
            return decode_ranks(key.split("@", 1)[1])
        src, _, dst = key.rpartition(":")[2].partition(">")
        return [int(src), int(dst)]
    except ValueError:
        return []


def parse(comm) -> dict[str, tuple[int, bool]]:
    """A reported ``comm`` field as {key: (count, inside)}; {} for a malformed one (beats are
    signed by the job's own ranks: this guards against a bug, not a forger)."""
    try:
        return {k: (int(n), bool(inside)) for k, (n, inside) in comm.items()}
    except (AttributeError, TypeError, ValueError):
        return {}
