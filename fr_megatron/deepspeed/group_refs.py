"""Find, count and rebind ProcessGroup references held in an object graph.

ProcessGroup objects are not tracked by Python's gc, so ``gc.get_referrers`` cannot find who holds
them. After the world is rebuilt every cached group (engine attributes, optimizer lists, attributes
set on parameters, module-level caches) must point at the new generation's group; a stale one can
even appear to work on gloo while its peers live. This module walks objects explicitly: instance
``__dict__`` and ``__slots__``, dicts (keys too), lists, tuples, sets, function closures and
``functools.partial`` arguments. It does not enter modules, classes, loggers or data loaders.
"""

from __future__ import annotations

import functools
import logging
import types
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup

_ATOMIC = (str, bytes, bytearray, int, float, complex, bool, type(None), torch.dtype, torch.device,
           range, slice, memoryview)
_OPAQUE = (types.ModuleType, type, logging.Logger, logging.Handler, torch.utils.data.DataLoader,
           torch.utils.data.Dataset, torch.utils.data.Sampler, types.BuiltinFunctionType,
           types.CodeType, types.FrameType, types.GeneratorType)


class _Walker:
    """One pass over a graph; ``fix(pg)`` returns the object to put in place of ``pg``."""

    def __init__(self, fix: Callable[[ProcessGroup, str], ProcessGroup], skip: tuple = ()):
        self.fix = fix
        self.skip = skip
        self.done: dict[int, Any] = {}   # id → replacement (for immutables) or the object itself
        self.keep: list = []             # keeps visited temporaries alive so ids stay unique

    def value(self, obj: Any, path: str) -> Any:
        if isinstance(obj, ProcessGroup):
            return self.fix(obj, path)
        if isinstance(obj, _ATOMIC) or isinstance(obj, _OPAQUE) or isinstance(obj, self.skip):
            return obj
        if id(obj) in self.done:
            return self.done[id(obj)]
        self.done[id(obj)] = obj
        self.keep.append(obj)
        new = self._enter(obj, path)
        self.done[id(obj)] = new
        return new

    def _enter(self, obj: Any, path: str) -> Any:
        if isinstance(obj, dict):
            for k, v in list(obj.items()):
                nk = self.value(k, f"{path}{{key {k!r}}}")
                nv = self.value(v, f"{path}[{k!r}]")
                if nk is not k:
                    del obj[k]
                    obj[nk] = nv
                elif nv is not v:
                    obj[k] = nv
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                nv = self.value(v, f"{path}[{i}]")
                if nv is not v:
                    obj[i] = nv
        elif isinstance(obj, tuple):
            items = [self.value(v, f"{path}[{i}]") for i, v in enumerate(obj)]
            if any(a is not b for a, b in zip(items, obj)):
                return type(obj)._make(items) if hasattr(obj, "_make") else type(obj)(items)
        elif isinstance(obj, (set, frozenset)):
            items = [(v, self.value(v, f"{path}{{{v!r}}}")) for v in obj]
            if any(a is not b for a, b in items):
                if isinstance(obj, frozenset):
                    return frozenset(b for _, b in items)
                obj.clear()
                obj.update(b for _, b in items)
        elif isinstance(obj, types.FunctionType):
            for i, cell in enumerate(obj.__closure__ or ()):
                try:
                    v = cell.cell_contents
                except ValueError:  # empty cell
                    continue
                nv = self.value(v, f"{path}.<closure {obj.__code__.co_freevars[i]}>")
                if nv is not v:
                    cell.cell_contents = nv
        elif isinstance(obj, types.MethodType):
            self.value(obj.__self__, f"{path}.__self__")
            self.value(obj.__func__, f"{path}.__func__")
        elif isinstance(obj, functools.partial):
            func = self.value(obj.func, f"{path}.func")
            args = self.value(obj.args, f"{path}.args")
            kw = self.value(obj.keywords, f"{path}.keywords")
            if func is not obj.func or args is not obj.args or kw is not obj.keywords:
                obj.__setstate__((func, args, kw, obj.__dict__ or None))
        else:
            self._attrs(obj, path)
        return obj

    def _attrs(self, obj: Any, path: str) -> None:
        d = getattr(obj, "__dict__", None)
        if isinstance(d, dict):
            for k, v in list(d.items()):
                nv = self.value(v, f"{path}.{k}")
                if nv is not v:
                    d[k] = nv
        for cls in type(obj).__mro__:
            for k in getattr(cls, "__slots__", ()):
                if k in ("__dict__", "__weakref__") or not hasattr(obj, k):
                    continue
                v = getattr(obj, k)
                nv = self.value(v, f"{path}.{k}")
                if nv is not v:
                    setattr(obj, k, nv)


def _module_items(mod: types.ModuleType) -> Iterable[tuple[str, Any]]:
    for k, v in vars(mod).items():
        if k.startswith("__") or isinstance(v, (types.ModuleType, type, types.FunctionType)):
            continue
        yield k, v


def walk(roots: dict[str, Any], fix: Callable[[ProcessGroup, str], ProcessGroup],
         skip: tuple = ()) -> None:
    """Visit every ProcessGroup reachable from ``roots`` (name → object) and put ``fix(pg, path)``
    in its place. A module root is entered one level: its globals, not the modules it imports."""
    w = _Walker(fix, skip)
    for name, root in roots.items():
        if isinstance(root, types.ModuleType):
            for k, v in list(_module_items(root)):
                nv = w.value(v, f"{name}.{k}")
                if nv is not v:
                    setattr(root, k, nv)
        else:
            w.value(root, name)


def find(roots: dict[str, Any], skip: tuple = ()) -> list[tuple[str, ProcessGroup]]:
    """Every (path, group) reference reachable from ``roots``."""
    found: list[tuple[str, ProcessGroup]] = []

    def note(pg, path):
        found.append((path, pg))
        return pg

    walk(roots, note, skip)
    return found


def rebind(roots: dict[str, Any], mapping: Callable[[ProcessGroup, str], Optional[ProcessGroup]],
           skip: tuple = ()) -> list[str]:
    """Replace each group ``pg`` by ``mapping(pg, path)`` (None: leave it). Returns rebound paths."""
    changed: list[str] = []

    def fix(pg, path):
        new = mapping(pg, path)
        if new is None or new is pg:
            return pg
        changed.append(path)
        return new

    walk(roots, fix, skip)
    return changed


def count(roots: dict[str, Any], groups: Iterable[Any], skip: tuple = ()) -> int:
    """How many references to any of ``groups`` the graph under ``roots`` holds."""
    ids = {id(g) for g in groups if g is not None}
    return sum(1 for _, pg in find(roots, skip) if id(pg) in ids)
