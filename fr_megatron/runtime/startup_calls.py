"""A replacement's start-up collectives, answered from its rank's record while no peer is there.

A training script communicates while it starts. Megatron-LM's ``pretrain()``, for one, makes world
barriers, all-reduces its start time, all-gathers the optimizer's param-group keys, all-reduces the
tied embedding and broadcasts the ``do_train`` flags from tensor-parallel rank 0, all before the
first training hook. A replacement process runs that same start-up while the survivors wait for it
in the runtime's recovery, so its collectives would never be matched.

So every process of the first generation records what its start-up collectives returned
(``Recorder``) and publishes the record, signed with the job token, when its start-up is over. A
replacement of rank r answers the same calls, in the same order, from rank r's record
(``Replayer``) without communicating: it sees exactly the values rank r saw, including those only
a peer knew. Start-up is a function of the rank and the arguments, so the calls match; one that
does not (another op, other shapes) stops the replacement with an error naming the call, instead
of letting it go on with wrong values.

Outputs over ``RECORD_LIMIT_BYTES`` (parameters, as in the embedding all-reduce) are not kept: a
replacement leaves them with its local values, which the restore from its peers overwrites.
Calls made inside ``passthrough()`` communicate as usual: the communicator rebuild, which the
survivors run too. The ``torch.distributed`` functions in ``OUTPUTS`` are intercepted where they
are looked up during start-up and where a module outside torch keeps one of its own, taken at
its import (megatron-core's timers keep ``all_gather_into_tensor`` as ``dist_all_gather_func``;
a warm spare imports such modules before it becomes a replacement).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import pickle
import sys
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..protocol import keys
from ..protocol.auth import Signer

log = logging.getLogger("fr_megatron.startup")

RECORD_LIMIT_BYTES = 1 << 20

# op -> (argument holding its outputs, whether they are tensors or a list of picklable objects)
OUTPUTS: dict[str, tuple[Optional[str], str]] = {
    "all_reduce": ("tensor", "tensor"),
    "broadcast": ("tensor", "tensor"),
    "reduce": ("tensor", "tensor"),
    "all_gather": ("tensor_list", "tensors"),
    "all_gather_into_tensor": ("output_tensor", "tensor"),
    "reduce_scatter_tensor": ("output", "tensor"),
    "all_gather_object": ("object_list", "objects"),
    "broadcast_object_list": ("object_list", "objects"),
    "barrier": (None, "none"),
}


class StartupMismatch(RuntimeError):
    """A replacement's start-up made a call its rank's record does not have."""


class _Done:
    def wait(self, *args, **kwargs):
        return True

    def is_completed(self):
        return True


def _outputs(op: str, bound: inspect.BoundArguments) -> tuple[str, list]:
    arg, kind = OUTPUTS[op]
    if arg is None:
        return kind, []
    value = bound.arguments[arg]
    return kind, [value] if kind == "tensor" else value


def _signature(kind: str, outs: list) -> list:
    if kind in ("tensor", "tensors"):
        return [(tuple(t.shape), str(t.dtype)) for t in outs]
    return [len(outs)]


def _group_size(bound: inspect.BoundArguments) -> int:
    try:
        return dist.get_world_size(bound.arguments.get("group"))
    except Exception:  # noqa: BLE001 - a group this process is not in
        return -1


class _Interceptor:
    """Swaps the ``OUTPUTS`` functions of ``torch.distributed`` for ``self._call`` until closed."""

    def __init__(self):
        self.saved = {op: getattr(dist, op) for op in OUTPUTS}
        self.signatures = {op: inspect.signature(fn) for op, fn in self.saved.items()}
        self.depth = 0  # > 0 inside passthrough()
        self.closed = False
        self.calls = 0
        wrappers = {op: self._wrap(op) for op in OUTPUTS}
        for op, fn in wrappers.items():
            setattr(dist, op, fn)
        self.aliases = _swap_aliases({id(self.saved[op]): fn for op, fn in wrappers.items()})

    def _wrap(self, op: str) -> Callable:
        original = self.saved[op]

        def call(*args, **kwargs):
            # a module imported during start-up may keep this function (megatron-core's DDP
            # does): once closed, it is the original again
            if self.depth or self.closed:
                return original(*args, **kwargs)
            bound = self.signatures[op].bind(*args, **kwargs)
            bound.apply_defaults()
            self.calls += 1
            return self._call(op, original, bound)

        call.__wrapped__ = original
        return call

    def _call(self, op: str, original: Callable, bound: inspect.BoundArguments):
        raise NotImplementedError

    def close(self) -> None:
        self.closed = True
        for op, fn in self.saved.items():
            setattr(dist, op, fn)
        for namespace, name, original, wrapper in self.aliases:
            if namespace.get(name) is wrapper:
                namespace[name] = original


def _swap_aliases(wrapper_of: dict[int, Callable]) -> list[tuple[dict, str, Callable, Callable]]:
    """In every loaded module outside torch and fr_megatron, replace each global that is one of
    the intercepted functions (by identity: ``wrapper_of`` maps its id to its wrapper). Returns
    what was swapped, to put back."""
    swapped = []
    for name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict) or name.split(".")[0] in ("torch", "fr_megatron"):
            continue
        for attr, value in list(namespace.items()):
            wrapper = wrapper_of.get(id(value))
            if wrapper is not None:
                namespace[attr] = wrapper
                swapped.append((namespace, attr, value, wrapper))
    return swapped


class Recorder(_Interceptor):
    """Runs each start-up collective and keeps what it returned."""

    def __init__(self):
        super().__init__()
        self.entries: list[dict] = []

    def _call(self, op, original, bound):
        work = original(*bound.args, **bound.kwargs)
        if bound.arguments.get("async_op") and work is not None:
            work.wait()  # start-up only: record the finished result, hand back a finished op
        kind, outs = _outputs(op, bound)
        entry = {"op": op, "group_size": _group_size(bound), "signature": _signature(kind, outs)}
        if kind in ("tensor", "tensors"):
            entry["values"] = [t.detach().cpu().clone()
                               if t.numel() * t.element_size() <= RECORD_LIMIT_BYTES else None
                               for t in outs]
        elif kind == "objects":
            blob = pickle.dumps(list(outs))
            entry["objects"] = blob if len(blob) <= RECORD_LIMIT_BYTES else None
        self.entries.append(entry)
        return work

    def publish(self, store, signer: Signer, rank: int,
                world_size: Optional[int] = None) -> int:
        """Write the record and its signed digest to the store; returns its size in bytes.
        ``world_size``: of the world it was made in (default: the current one)."""
        if world_size is None and dist.is_initialized():
            world_size = dist.get_world_size()
        blob = pickle.dumps(self.entries)
        store.set(keys.startup_record(rank), blob)
        store.set(keys.startup_digest(rank), signer.sign(
            "startup_record", rank=rank, sha256=hashlib.sha256(blob).hexdigest(),
            calls=len(self.entries), world_size=world_size))
        log.info("rank=%d generation=0 step=0 phase=startup start-up record published: %d "
                 "collective calls, %d bytes", rank, len(self.entries), len(blob))
        return len(blob)


class Replayer(_Interceptor):
    """Answers each start-up collective from the record of the rank this process replaces."""

    def __init__(self, entries: list[dict], rank: int):
        super().__init__()
        self.entries, self.rank = entries, rank

    def _call(self, op, original, bound):
        k = self.calls
        if k > len(self.entries):
            raise StartupMismatch(
                f"replacement of rank {self.rank}: start-up call #{k} ({op}) is past the end of "
                f"rank {self.rank}'s record ({len(self.entries)} calls); its start-up must not "
                f"depend on anything but the rank and the arguments")
        entry = self.entries[k - 1]
        kind, outs = _outputs(op, bound)
        got = {"op": op, "group_size": _group_size(bound), "signature": _signature(kind, outs)}
        want = {name: entry[name] for name in got}
        if got != want:
            raise StartupMismatch(f"replacement of rank {self.rank}: start-up call #{k} is "
                                  f"{got}, rank {self.rank}'s record has {want}")
        if kind in ("tensor", "tensors"):
            for t, value in zip(outs, entry["values"]):
                if value is not None:
                    with torch.no_grad():
                        t.copy_(value)
        elif kind == "objects" and entry["objects"] is not None:
            outs[:] = pickle.loads(entry["objects"])
        return _Done() if bound.arguments.get("async_op") else None

    def close(self) -> None:
        super().close()
        if self.calls != len(self.entries):
            log.warning("rank=%d replacement start-up made %d collective calls, its record has %d",
                        self.rank, self.calls, len(self.entries))


def load_record(store, signer: Signer, rank: int,
                world_size: Optional[int] = None) -> Optional[list[dict]]:
    """Rank ``rank``'s verified record, or None when it never published one (or, given
    ``world_size``, published none made in a world of that size)."""
    if not store.check([keys.startup_digest(rank)]):
        return None
    digest = signer.verify(store.get(keys.startup_digest(rank)))
    if world_size is not None and digest.get("world_size") not in (None, world_size):
        return None
    blob = store.get(keys.startup_record(rank))
    if digest.get("rank") != rank or hashlib.sha256(blob).hexdigest() != digest.get("sha256"):
        raise StartupMismatch(f"the start-up record of rank {rank} in the store does not match "
                              f"its signed digest")
    return pickle.loads(blob)  # verified above: written by a process holding the job token


_active: Optional[_Interceptor] = None


def begin(store, signer: Signer, rank: int, replacement: bool,
          members: Optional[list[int]] = None) -> str:
    """Start recording (first generation) or replaying (replacement); returns which.

    ``members``: the job ranks of the current world. A replacement replays its rank's record
    when that was made in a world of this size; else (its predecessor was lost before it built
    again after a shrink or grow) a record another member made in this world: the start-up's
    world-wide collectives (megatron-core's all-gather of param-group keys) returned the same
    on every rank."""
    global _active
    end()
    if not replacement:
        _active = Recorder()
        return "recording"
    size = len(members) if members is not None else None
    for source in [rank, *(m for m in members or () if m != rank)]:
        entries = load_record(store, signer, source, size)
        if entries is not None:
            break
    if entries is None:
        log.warning("rank=%d: no start-up record (the rank was lost before its start-up "
                    "finished); the replacement's start-up communicates", rank)
        return "none"
    _active = Replayer(entries, rank)
    return f"replaying {len(entries)} calls" + (f" of rank {source}" if source != rank else "")


def end(publish: Optional[Callable[[Recorder], Any]] = None) -> None:
    """Stop intercepting; a recorder's record is handed to ``publish`` (``Recorder.publish``
    with the session's store, signer and rank)."""
    global _active
    active, _active = _active, None
    if active is None:
        return
    active.close()
    if isinstance(active, Recorder) and publish is not None:
        publish(active)


@contextlib.contextmanager
def passthrough():
    """Collectives inside communicate for real (the peers make them too)."""
    active = _active
    if active is not None:
        active.depth += 1
    try:
        yield
    finally:
        if active is not None:
            active.depth -= 1
