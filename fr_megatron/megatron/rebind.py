"""Swap old process groups for their rebuilt replacements wherever megatron-core caches them.

megatron-core copies group handles into many objects: ``pg_collection``/``tp_group``/``cp_group``/
``pp_group``/``embd_group`` on model modules, DDP and its param-and-grad buffers and bucket groups,
the DistributedOptimizer (``data_parallel_group``, ``data_parallel_group_gloo``,
``grad_stats_parallel_group``, ``tp_group``), a ChainedOptimizer's sub-optimizers, config
callbacks bound to those objects. Listing them by hand breaks with every release, so the object
graph is walked from a few roots (``runtime.group_refs``) and every old group is replaced by the
new group with the same role (``build_group_map``).

On gloo a collective on a destroyed group can still succeed while the peers live, so equal losses
do not prove that nothing stale is left: ``count_old_group_references`` proves it, and
``retire_groups`` makes any use of an old group raise at once.
"""

from __future__ import annotations

import logging
import os
import sys
import types
from datetime import timedelta
from typing import Any, Iterable

import torch
import torch.distributed as dist

from fr_megatron.runtime import group_refs
from fr_megatron.runtime.comms import defer_release

logger = logging.getLogger(__name__)

ProcessGroup = dist.ProcessGroup


def build_group_map(
    old_roles: dict[str, ProcessGroup], new_roles: dict[str, ProcessGroup],
    resized: bool = False,
) -> dict[int, ProcessGroup]:
    """Map ``id(old group)`` to the new group with the same role key.

    Roles come from ``parallel_state_hook.group_roles()`` before teardown and after rebuild. An old
    group seen under several roles (aliases such as the intra-partial DP group) must map to one
    new group; a role that vanished is an error (the rebuild changed the topology). After the
    data-parallel size changed (``resized``), one group may have served roles that are apart now
    (at DP=1 the data-parallel group is the pipeline group), or a role may be gone (fewer
    optimizer instances): such a group is left out of the map, and the
    check for old references that follows the rebind fails if anything still holds it (the
    model and optimizer, built again, hold none).
    """
    mapping: dict[int, ProcessGroup] = {}
    split: set[int] = set()
    for role, old in old_roles.items():
        if role not in new_roles and resized:  # e.g. the inter-instance groups of optimizer
            split.add(id(old))                   # instances the new size cannot hold
            continue
        if role not in new_roles:
            raise RuntimeError(f"group role {role!r} has no replacement after the rebuild")
        new = new_roles[role]
        prev = mapping.get(id(old))
        if prev is not None and prev is not new:
            if not resized:
                raise RuntimeError(f"group role {role!r} maps one old group to two new groups")
            split.add(id(old))
        mapping[id(old)] = new
    return {k: v for k, v in mapping.items() if k not in split}


def rebind(roots: Iterable[Any], group_map: dict[int, ProcessGroup]) -> int:
    """Replace, everywhere under ``roots``, each group in ``group_map`` (by id); return the count."""
    return len(group_refs.rebind(list(roots), group_map))


def count_old_group_references(roots: Iterable[Any], old_groups: Iterable[Any]) -> int:
    """How many references to any of ``old_groups`` are reachable from ``roots``."""
    return group_refs.count(list(roots), old_groups)


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


# Backends replaced by the last retire_groups() call. Dropping a gloo backend runs its destructor,
# which joins its threads and closes its sockets, and blocks for the group's timeout when an op
# on it was abandoned mid-flight. They are kept alive for one generation and then handed to the
# runtime's defer_release, which drops them on a background thread once that recovery is over.
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
