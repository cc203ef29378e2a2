"""Find, count and swap process-group references in an object graph.

After a rebuild every group a framework cached (model modules, DDP buckets, optimizers, attributes
set on parameters, closures, module-level caches) must point at the new generation's group; on gloo
a collective on a destroyed old group can still succeed while the peers live, so equal losses prove
nothing. ``ProcessGroup`` objects are not tracked by Python's gc, so ``gc.get_referrers`` cannot find
their holders: this walk is explicit. It enters instance ``__dict__`` and ``__slots__``, dicts (keys
too), lists, deques, tuples (rebuilt, named tuples included), sets, function closures and defaults,
bound methods and ``functools.partial``; a module given as a root has its namespace walked. It does
not enter values, classes, code, modules reached from objects, loggers, stores, data loaders, mocks
(they make up attributes) or compiler wrappers. Both integrations use it: megatron-core's and
DeepSpeed's graphs differ only in their roots.
"""

from __future__ import annotations

import functools
import logging
import sys
import types
import weakref
from collections import deque
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup

_SKIP_TYPES = (
    str, bytes, bytearray, int, float, complex, bool, type(None), range, slice, memoryview,
    type, types.ModuleType, types.BuiltinFunctionType, types.BuiltinMethodType, types.CodeType,
    types.FrameType, types.GeneratorType, weakref.ref, weakref.ProxyType,
    torch.dtype, torch.device, torch.Size, torch.Generator, dist.Store,
    logging.Logger, logging.Handler, logging.Manager, logging.PlaceHolder, logging.Formatter,
    torch.utils.data.DataLoader, torch.utils.data.Dataset, torch.utils.data.Sampler,
)
_COMPILER_MODULES = ("torch._dynamo", "torch._inductor", "torch.fx", "torch.jit", "torch._logging")
_KEEP = object()  # "leave it as it is"
_KINDS: dict[type, str] = {}

Roots = Union[dict, Iterable[Any]]
Fix = Callable[[ProcessGroup, str], Optional[ProcessGroup]]


def _kind(tp: type) -> str:
    """How the walk treats instances of ``tp`` (cached: isinstance on ProcessGroup is slow)."""
    kind = _KINDS.get(tp)
    if kind is not None:
        return kind
    if issubclass(tp, ProcessGroup):
        kind = "group"
    elif issubclass(tp, _SKIP_TYPES) or _is_mock(tp) or _is_compiler(tp):
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


def _is_compiler(tp: type) -> bool:
    # torch.compile / jit wrappers carry the compiler's whole configuration, never a group
    module = getattr(tp, "__module__", "") or ""
    return module.startswith(_COMPILER_MODULES) or tp.__name__.startswith("_TorchCompile")


def _is_mock(tp: type) -> bool:
    mock = sys.modules.get("unittest.mock")
    return mock is not None and issubclass(tp, mock.NonCallableMock)


@functools.lru_cache(maxsize=None)
def _slot_names(cls: type) -> tuple[str, ...]:
    names = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        if isinstance(slots, str):
            slots = (slots,)
        names.extend(s for s in slots if s not in ("__dict__", "__weakref__"))
    return tuple(names)


class _Walk:
    """One pass. The path of each object is a stack of (how, key) steps, turned into text only
    where a group is found: the walk of a megatron job visits hundreds of thousands of objects."""

    def __init__(self, fix: Fix, skip: tuple):
        self.fix, self.skip = fix, skip
        self.seen: set[int] = set()
        self.keep: list = []   # visited temporaries stay alive, so ids stay unique
        self.path: list = []

    def text(self) -> str:
        out = ""
        for how, key in self.path:
            out += {"root": f"{key}", "attr": f".{key}", "item": f"[{key!r}]",
                    "key": f"{{key {key!r}}}", "cell": f".<closure {key}>"}[how]
        return out

    def at(self, how: str, key, obj):
        self.path.append((how, key))
        try:
            return self.visit(obj)
        finally:
            self.path.pop()

    def visit(self, obj):
        kind = _kind(type(obj))
        if kind == "group":
            new = self.fix(obj, self.text())
            return _KEEP if new is None or new is obj else new
        if kind == "skip" or (self.skip and isinstance(obj, self.skip)):
            return _KEEP
        oid = id(obj)
        if oid in self.seen:
            return _KEEP
        self.seen.add(oid)
        self.keep.append(obj)
        return getattr(self, f"_{kind}")(obj)

    def _dict(self, obj):
        for k, v in list(obj.items()):
            nv = self.at("item", k, v)
            nk = self.at("key", k, k)
            if nk is not _KEEP:
                del obj[k]
                obj[nk] = v if nv is _KEEP else nv
            elif nv is not _KEEP:
                obj[k] = nv
        return self._object(obj)

    def _list(self, obj):
        for i, v in enumerate(list(obj)):
            nv = self.at("item", i, v)
            if nv is not _KEEP:
                obj[i] = nv
        return self._object(obj)

    def _tuple(self, obj):
        items = [self.at("item", i, v) for i, v in enumerate(obj)]
        if all(v is _KEEP for v in items):
            return _KEEP
        new = [o if n is _KEEP else n for o, n in zip(obj, items)]
        return type(obj)(*new) if hasattr(obj, "_fields") else type(obj)(new)

    def _set(self, obj):
        changed = {}
        for v in list(obj):
            nv = self.at("item", v, v)
            if nv is not _KEEP:
                changed[v] = nv
        if changed and isinstance(obj, frozenset):
            return frozenset(changed.get(v, v) for v in obj)
        for old, new in changed.items():
            obj.discard(old)
            obj.add(new)
        return _KEEP

    def _partial(self, obj):
        func, args, kwargs, state = obj.__reduce__()[2]
        nf, na = self.at("attr", "func", func), self.at("attr", "args", args)
        if kwargs:
            self.at("attr", "keywords", kwargs)
        ns = self.at("attr", "__dict__", state) if state else _KEEP
        if nf is not _KEEP or na is not _KEEP or ns is not _KEEP:
            obj.__setstate__((func if nf is _KEEP else nf, args if na is _KEEP else na, kwargs,
                              state if ns is _KEEP else ns))
        return _KEEP

    def _method(self, obj):
        self.at("attr", "__self__", obj.__self__)
        self.at("attr", "__func__", obj.__func__)
        return _KEEP

    def _function(self, obj):
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ()):
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            nv = self.at("cell", name, content)
            if nv is not _KEEP:
                cell.cell_contents = nv
        if obj.__defaults__:
            nv = self.at("attr", "__defaults__", obj.__defaults__)
            if nv is not _KEEP:
                obj.__defaults__ = nv
        if obj.__kwdefaults__:
            self.at("attr", "__kwdefaults__", obj.__kwdefaults__)
        return _KEEP

    def _object(self, obj):
        d = getattr(obj, "__dict__", None)
        if type(d) is dict:
            for k, v in list(d.items()):
                nv = self.at("attr", k, v)
                if nv is not _KEEP:
                    d[k] = nv
        for slot in _slot_names(type(obj)):
            try:
                v = object.__getattribute__(obj, slot)
            except (AttributeError, TypeError):
                continue
            nv = self.at("attr", slot, v)
            if nv is not _KEEP:
                object.__setattr__(obj, slot, nv)
        return _KEEP


def _named(roots: Roots) -> list[tuple[str, Any]]:
    if isinstance(roots, dict):
        return list(roots.items())
    return [(r.__name__ if isinstance(r, types.ModuleType) else f"root{i}", r)
            for i, r in enumerate(roots)]


def walk(roots: Roots, fix: Fix, skip: tuple = ()) -> None:
    """Visit every group reachable from ``roots`` (name -> object, or objects) and put
    ``fix(group, path)`` in its place (None: leave it). ``skip``: more types not to enter. A
    root must not be a tuple (a rebuilt one could not be stored anywhere)."""
    w = _Walk(fix, tuple(skip))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20000))
    try:
        for name, root in _named(roots):
            if isinstance(root, types.ModuleType):
                for key, value in list(vars(root).items()):
                    if key.startswith("__"):
                        continue
                    w.path = [("root", name), ("attr", key)]
                    new = w.visit(value)
                    if new is not _KEEP:
                        setattr(root, key, new)
            else:
                w.path = [("root", name)]
                w.visit(root)
    finally:
        sys.setrecursionlimit(limit)


def find(roots: Roots, skip: tuple = ()) -> list[tuple[str, ProcessGroup]]:
    """Every (path, group) reference reachable from ``roots``."""
    found: list[tuple[str, ProcessGroup]] = []

    def note(pg, path):
        found.append((path, pg))

    walk(roots, note, skip)
    return found


def rebind(roots: Roots, mapping: Union[Fix, dict], skip: tuple = ()) -> list[str]:
    """Replace each group by ``mapping(group, path)`` (or ``mapping[id(group)]``; None or absent:
    leave it); returns the paths rebound."""
    changed: list[str] = []
    lookup = (lambda pg, path: mapping.get(id(pg))) if isinstance(mapping, dict) else mapping

    def fix(pg, path):
        new = lookup(pg, path)
        if new is not None and new is not pg:
            changed.append(path)
            return new
        return None

    walk(roots, fix, skip)
    return changed


def count(roots: Roots, groups: Iterable[Any], skip: tuple = ()) -> int:
    """How many references to any of ``groups`` the graph under ``roots`` holds."""
    ids = {id(g) for g in groups if isinstance(g, ProcessGroup)}
    return sum(1 for _, pg in find(roots, skip) if id(pg) in ids)
