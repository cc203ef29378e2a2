"""Swap old process groups for their rebuilt replacements wherever the training objects cache them.

megatron-core copies group handles into many objects: ``pg_collection``/``tp_group``/``cp_group``/
``pp_group``/``embd_group`` on model modules, DDP and its param-and-grad buffers and bucket groups,
the DistributedOptimizer (``data_parallel_group``, ``data_parallel_group_gloo``,
``grad_stats_parallel_group``, ``tp_group``), a ChainedOptimizer's sub-optimizers, config
callbacks bound to those objects. Listing them by hand breaks with every release, so this module
walks the object graph from a few roots (attributes, slots, dicts, lists, tuples, sets, closures,
partials, bound methods) and replaces every old group by the new group with the same role.
``ProcessGroup`` objects are not tracked by Python's gc, so ``gc.get_referrers`` cannot find the
holders: the walk is explicit.

On gloo a collective on a destroyed group can still succeed while the peers live, so equal losses
do not prove that nothing stale is left: ``count_old_group_references`` proves it, and
``retire_groups`` makes any use of an old group raise at once.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import types
import weakref
from collections import deque
from datetime import timedelta
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from fr_megatron.runtime.comms import defer_release

logger = logging.getLogger(__name__)

ProcessGroup = dist.ProcessGroup

# Never descended into: values, code, modules and classes reached from objects, and logging's
# object graph (every logger of the process hangs off each one).
_SKIP_TYPES = (
    str,
    bytes,
    bytearray,
    int,
    float,
    complex,
    bool,
    type(None),
    type,
    types.ModuleType,
    types.BuiltinFunctionType,
    types.BuiltinMethodType,
    types.CodeType,
    types.FrameType,
    types.GeneratorType,
    weakref.ref,
    weakref.ProxyType,
    torch.dtype,
    torch.device,
    torch.Size,
    torch.Generator,
    dist.Store,
    logging.Logger,
    logging.Handler,
    logging.Manager,
    logging.PlaceHolder,
    logging.Formatter,
)

_KEEP = object()  # "no replacement" marker
_KINDS: dict[type, str] = {}


def _kind(tp: type) -> str:
    """How the walk treats instances of ``tp`` (cached: isinstance on ProcessGroup is slow)."""
    kind = _KINDS.get(tp)
    if kind is not None:
        return kind
    if issubclass(tp, ProcessGroup):
        kind = "group"
    elif issubclass(tp, _SKIP_TYPES) or _is_mock_type(tp) or _is_compiler_type(tp):
        kind = "skip"
    elif issubclass(tp, dict):
        kind = "dict"
    elif issubclass(tp, (list, deque)):
        kind = "list"
    elif issubclass(tp, tuple):
        kind = "tuple"
    elif issubclass(tp, (set, frozenset)):
        kind = "set"
    elif issubclass(tp, functools.partial):
        kind = "partial"
    elif issubclass(tp, types.MethodType):
        kind = "method"
    elif issubclass(tp, types.FunctionType):
        kind = "function"
    else:
        kind = "object"
    _KINDS[tp] = kind
    return kind


def _is_compiler_type(tp: type) -> bool:
    # torch.compile / jit wrappers carry the compiler's whole configuration, never a group.
    module = getattr(tp, "__module__", "") or ""
    return module.startswith(_COMPILER_MODULES) or tp.__name__.startswith("_TorchCompile")


_COMPILER_MODULES = ("torch._dynamo", "torch._inductor", "torch.fx", "torch.jit", "torch._logging")


def _is_mock_type(tp: type) -> bool:
    # A Mock makes up attributes on access; walking one never ends well.
    mock = sys.modules.get("unittest.mock")
    return mock is not None and issubclass(tp, mock.NonCallableMock)


def build_group_map(
    old_roles: dict[str, ProcessGroup], new_roles: dict[str, ProcessGroup]
) -> dict[int, ProcessGroup]:
    """Map ``id(old group)`` to the new group with the same role key.

    Roles come from ``parallel_state_hook.group_roles()`` before teardown and after rebuild. An old
    group seen under several roles (aliases such as the intra-partial DP group) must map to one
    new group; a role that vanished is an error (the rebuild changed the topology).
    """
    mapping: dict[int, ProcessGroup] = {}
    for role, old in old_roles.items():
        if role not in new_roles:
            raise RuntimeError(f"group role {role!r} has no replacement after the rebuild")
        new = new_roles[role]
        prev = mapping.get(id(old))
        if prev is not None and prev is not new:
            raise RuntimeError(f"group role {role!r} maps one old group to two new groups")
        mapping[id(old)] = new
    return mapping


def _walk(roots: Iterable[Any], on_group: Callable[[ProcessGroup], Any]) -> None:
    """Visit every object reachable from ``roots``; ``on_group`` returns a replacement or _KEEP.

    Mutable holders are updated in place; a tuple/frozenset/partial holding a replaced group is
    rebuilt and the rebuilt object is stored in its parent. A module given as a root has its
    namespace walked (dunder names excluded); modules reached from objects are not entered.
    """
    seen: set[int] = set()
    keepalive: list[Any] = []  # ids stay unique while we hold the objects

    def visit(obj):
        kind = _kind(type(obj))
        if kind == "group":
            return on_group(obj)
        if kind == "skip":
            return _KEEP
        oid = id(obj)
        if oid in seen:
            return _KEEP
        seen.add(oid)
        keepalive.append(obj)

        if kind == "dict":
            for k, v in list(obj.items()):
                nv = visit(v)
                nk = visit(k)
                if nk is not _KEEP:
                    del obj[k]
                    obj[nk] = v if nv is _KEEP else nv
                elif nv is not _KEEP:
                    obj[k] = nv
            _visit_attrs(obj)
        elif kind == "list":
            for i, v in enumerate(list(obj)):
                nv = visit(v)
                if nv is not _KEEP:
                    obj[i] = nv
            _visit_attrs(obj)
        elif kind == "tuple":
            items = [visit(v) for v in obj]
            if all(v is _KEEP for v in items):
                return _KEEP
            new = [o if n is _KEEP else n for o, n in zip(obj, items)]
            return type(obj)(*new) if hasattr(obj, "_fields") else type(obj)(new)
        elif kind == "set":
            changed = {}
            for v in list(obj):
                nv = visit(v)
                if nv is not _KEEP:
                    changed[v] = nv
            if changed and isinstance(obj, frozenset):
                return frozenset(changed.get(v, v) for v in obj)
            for old, new in changed.items():
                obj.discard(old)
                obj.add(new)
        elif kind == "partial":
            func, args, kwargs, state = obj.__reduce__()[2]
            nf, na = visit(func), visit(args)
            if kwargs:
                visit(kwargs)
            ns = visit(state) if state else _KEEP
            if nf is not _KEEP or na is not _KEEP or ns is not _KEEP:
                obj.__setstate__(
                    (
                        func if nf is _KEEP else nf,
                        args if na is _KEEP else na,
                        kwargs,
                        state if ns is _KEEP else ns,
                    )
                )
        elif kind == "method":
            visit(obj.__self__)
            visit(obj.__func__)
        elif kind == "function":
            for cell in obj.__closure__ or ():
                try:
                    content = cell.cell_contents
                except ValueError:  # empty cell
                    continue
                nv = visit(content)
                if nv is not _KEEP:
                    cell.cell_contents = nv
            if obj.__defaults__:
                nv = visit(obj.__defaults__)
                if nv is not _KEEP:
                    obj.__defaults__ = nv
            if obj.__kwdefaults__:
                visit(obj.__kwdefaults__)
        else:
            _visit_attrs(obj)
        return _KEEP

    def _visit_attrs(obj):
        d = getattr(obj, "__dict__", None)
        if type(d) is dict:
            for k, v in list(d.items()):
                nv = visit(v)
                if nv is not _KEEP:
                    d[k] = nv
        for slot in _slot_names(type(obj)):
            try:
                v = object.__getattribute__(obj, slot)
            except (AttributeError, TypeError):
                continue
            nv = visit(v)
            if nv is not _KEEP:
                object.__setattr__(obj, slot, nv)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20000))
    try:
        for root in roots:
            if isinstance(root, types.ModuleType):
                for name, value in list(vars(root).items()):
                    if name.startswith("__"):
                        continue
                    new = visit(value)
                    if new is not _KEEP:
                        setattr(root, name, new)
            else:
                visit(root)
    finally:
        sys.setrecursionlimit(limit)


@functools.lru_cache(maxsize=None)
def _slot_names(cls: type) -> tuple[str, ...]:
    names = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        if isinstance(slots, str):
            slots = (slots,)
        names.extend(s for s in slots if s not in ("__dict__", "__weakref__"))
    return tuple(names)


def rebind(roots: Iterable[Any], group_map: dict[int, ProcessGroup]) -> int:
    """Replace, everywhere under ``roots``, each group in ``group_map`` (by id); return the count.

    ``roots`` must not be tuples (a rebuilt root tuple could not be stored anywhere).
    """
    replaced = 0

    def on_group(group):
        nonlocal replaced
        new = group_map.get(id(group))
        if new is None or new is group:
            return _KEEP
        replaced += 1
        return new

    _walk(list(roots), on_group)
    return replaced


def count_old_group_references(roots: Iterable[Any], old_groups: Iterable[Any]) -> int:
    """How many references to any of ``old_groups`` are reachable from ``roots``."""
    old_ids = {id(g) for g in old_groups if isinstance(g, ProcessGroup)}
    count = 0

    def on_group(group):
        nonlocal count
        if id(group) in old_ids:
            count += 1
        return _KEEP

    _walk(list(roots), on_group)
    return count


def megatron_module_roots() -> list[types.ModuleType]:
    """The imported megatron.core modules except parallel_state.

    Walking their namespaces finds (and rebinds) module-level caches of groups; parallel_state
    itself is rebuilt, not rebound.
    """
    return [
        mod
        for name, mod in list(sys.modules.items())
        if mod is not None
        and name.startswith("megatron.core")
        and not name.endswith(".parallel_state")
    ]


# ---------------------------------------------------------------- retiring old groups


class _RefusingStore(dist.Store):
    """Store for a retired group's backend: any rendezvous attempt raises with the reason."""

    def __init__(self, reason: str):
        super().__init__()
        self._reason = reason
        self._inner = dist.HashStore()

    def set(self, key, value):
        self._inner.set(key, value)

    def add(self, key, value):
        return self._inner.add(key, value)

    def check(self, keys):
        return False

    def _refuse(self, *args, **kwargs):
        raise RuntimeError(self._reason)

    get = wait = compare_set = delete_key = num_keys = multi_get = multi_set = _refuse


# Backends replaced by the last retire_groups() call. Dropping a gloo backend runs its destructor:
# ~15 ms each with live peers (0.33 s for 20, measured), ~19 s when an op on it was abandoned
# mid-flight. They are kept alive for one generation and then handed to the runtime's
# defer_release, which drops them on a background thread once that recovery is over.
_RETIRED_BACKENDS: list[Any] = []


def retire_groups(groups: Iterable[Any], reason: str = "process group retired") -> int:
    """Make every collective on ``groups`` raise at once; returns how many were retired.

    ``abort()``/``shutdown()`` do not stop a gloo group from working while its peers live, so the
    group's backend is swapped for a gloo backend that was never connected (lazy init over a store
    that refuses rendezvous): any op on it fails immediately. Ranks and size stay readable.
    """
    global _RETIRED_BACKENDS
    previous, batch, count = _RETIRED_BACKENDS, [], 0
    dead: dict[tuple[int, int], Any] = {}  # one never-connected backend per (rank, size)
    seen: set[int] = set()
    for group in groups:
        if not isinstance(group, ProcessGroup) or id(group) in seen:
            continue
        seen.add(id(group))
        try:
            devices = list(group._device_types) or [torch.device("cpu")]
            for device in devices:
                try:
                    batch.append(group._get_backend(device))
                except RuntimeError:
                    pass
            # A one-rank gloo backend needs no peer and would still "work": claim two ranks.
            key = (group.rank(), max(group.size(), 2))
            if key not in dead:
                dead[key] = _dead_backend(*key, reason)
            for device in devices:
                group._register_backend(device, ProcessGroup.BackendType.CUSTOM, dead[key])
            group._set_default_backend(ProcessGroup.BackendType.CUSTOM)
            group._set_group_desc(f"RETIRED:{group.group_desc}")
            count += 1
        except Exception:  # noqa: BLE001 - retiring is best effort, never fatal to recovery
            logger.warning("could not retire group %s", group.group_desc, exc_info=True)
    _RETIRED_BACKENDS = batch
    defer_release(previous)
    return count


def _dead_backend(rank: int, size: int, reason: str):
    saved = os.environ.get("TORCH_GLOO_LAZY_INIT")
    os.environ["TORCH_GLOO_LAZY_INIT"] = "1"
    try:
        return dist.ProcessGroupGloo(_RefusingStore(reason), rank, size, timedelta(seconds=1))
    finally:
        if saved is None:
            os.environ.pop("TORCH_GLOO_LAZY_INIT", None)
        else:
            os.environ["TORCH_GLOO_LAZY_INIT"] = saved
