"""Record how megatron-core's parallel state was built, tear it down, build it again.

After a failure the runtime destroys the whole world and creates a new default group on the
next generation's store prefix. Megatron's groups must then be rebuilt with the same topology.
``install()`` wraps ``parallel_state.initialize_model_parallel`` so that whichever code calls it
(Megatron-LM's ``initialize.py``, a recipe, a test) has its arguments recorded;
``rebuild_model_parallel()`` replays the call on the new world and ``teardown()`` drops every
group reference ``destroy_model_parallel`` leaves behind.

Optimizer instances on a resized world
--------------------------------------
``num_distributed_optimizer_instances`` must divide the data-parallel size. A job that shrank to
three replicas of four cannot keep two instances: on a world whose data-parallel size the
recorded number does not divide, the call is made with the largest number below it that does
(``fit_optimizer_instances``; one at worst, the shards then copied instead of computed twice),
and the configured number comes back when the job grows back. ``optimizer_instances()`` says
the number in effect, which the model's DDP config must use.

Group creation with local synchronisation (``use_local_synchronization``)
--------------------------------------------------------------------------
megatron-core 0.16.1 calls ``torch.distributed.new_group`` for every group on every rank, members or
not. Without local synchronisation each call names the group from a per-process counter, so all
ranks must make every call in the same order, and with ``TORCH_DIST_INIT_BARRIER=1`` each call is a
store barrier over the whole world; on a device-bound NCCL world every non-member also joins a
``ncclCommSplit``. Passing ``use_local_synchronization=True`` as is, however, is NOT safe: torch
then names the group ``sha1(ranks + len(_world.pg_names))``, the number of groups *this* rank has
joined so far. Members of one group can have joined different numbers of earlier groups (e.g. with
PP=2 only first-stage ranks are in the position-embedding group, and the later
expert-tensor-model-pipeline and distributed-optimizer-instance groups span both stages), so they
compute different names, rendezvous under different store prefixes and hang.

``install(local_sync=True)`` therefore makes ``parallel_state.create_group`` behave so: a
non-member returns at once (no torch call, no counter), a member creates the group with
``use_local_synchronization=True`` under a name derived only from (description, backend, ranks,
how many such groups already exist in this world), identical on every member. Deadlock freedom:
every rank walks megatron's single global creation order and only waits in groups it belongs
to; the earliest group in that order with a waiting member has all its members waiting in it.
It is switched off (plain megatron behaviour) where it cannot hold: TorchComms, MPI, a
device-bound default group (NCCL split needs every parent rank) or a torch without
``distributed_c10d._process_group_name``.

One gloo group per member set
-----------------------------
Many of megatron's groups have the same members when a dimension is 1: with CP=1 and EP=1 the
data-parallel group equals the data-parallel-with-CP group and the expert data-parallel group,
the tensor group equals the expert tensor group, and so on; ``create_gloo_process_groups`` adds
gloo copies of the data-parallel groups, which on a gloo world are copies of gloo groups. Each
gloo group connects a TCP pair to every other member and starts its own threads when it is
created, which is most of a recovery's rebuild on CPU. So a member asking for a gloo group
whose members, timeout and options equal one it already joined in this world gets that group
again (same object, so ``rebind`` maps both roles to one new group), with or without local
synchronisation, so worlds built either way have the same groups. Sharing is safe because a
gloo group runs its collectives in the order each member issues them, and megatron issues
them in program order on every member. Groups of other backends (NCCL) are never shared: there a
group is also a stream that overlaps with others.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
from typing import Any

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d
from torch.distributed.constants import default_pg_timeout

from fr_megatron.runtime import startup_calls

logger = logging.getLogger(__name__)

_STATE: dict[str, Any] = {
    "installed": False,
    "local_sync": False,
    "orig_initialize": None,
    "orig_create_group": None,
    "call": None,  # (args, kwargs) of the last initialize_model_parallel call
    "instances": None,  # the optimizer instances of the groups built last
    "shared": (None, {}),  # (default group, {(members, timeout): gloo group}) of this world
}

# Module globals of parallel_state that destroy_model_parallel() (0.16.1) leaves set.
_LEFTOVER_GLOBALS = (
    "_EMBEDDING_GLOBAL_RANKS",
    "_PIPELINE_GLOBAL_RANKS",
    "_DATA_PARALLEL_GLOBAL_RANKS",
    "_DATA_PARALLEL_GLOBAL_RANKS_WITH_CP",
    "_TENSOR_MODEL_PARALLEL_GLOBAL_RANKS",
    "_MODEL_PARALLEL_GLOBAL_RANKS",
    "_EXPERT_MODEL_PARALLEL_RANKS",
    "_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP",
    "_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP_GLOO",
    "_HIERARCHICAL_CONTEXT_PARALLEL_GROUPS",
    "_INTER_DISTRIBUTED_OPTIMIZER_INSTANCE_GROUP",
)


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def install(local_sync: bool | None = None) -> None:
    """Wrap ``initialize_model_parallel`` and ``create_group``. Idempotent.

    ``local_sync``: member-only group creation (see the module docstring); None keeps the current
    choice (on by default). Install before the first ``initialize_model_parallel`` call, and before
    any module binds the function by name
    (``from megatron.core.parallel_state import initialize_model_parallel``).
    """
    if local_sync is None:
        local_sync = _STATE["local_sync"] if _STATE["installed"] else True
    ps = _ps()
    if not _STATE["installed"]:
        orig = ps.initialize_model_parallel
        _STATE["orig_initialize"] = orig

        def initialize_model_parallel(*args, **kwargs):
            _STATE["call"] = (args, dict(kwargs))
            # a replacement's peers build these groups too, in their rebuild: never replayed
            with startup_calls.passthrough():
                args, kwargs = _fitted(orig, args, kwargs)
                return orig(*args, **kwargs)

        initialize_model_parallel.__wrapped__ = orig
        initialize_model_parallel.__doc__ = orig.__doc__
        ps.initialize_model_parallel = initialize_model_parallel
        _STATE["orig_create_group"] = ps.create_group
        ps.create_group = _create_group
        _STATE["installed"] = True
    _STATE["local_sync"] = bool(local_sync)


def fit_optimizer_instances(configured: int, data_parallel_size: int) -> int:
    """The optimizer instances a data-parallel size can hold: ``configured`` when it divides
    the size, else the largest number below it that does."""
    return next(n for n in range(max(min(configured, data_parallel_size), 1), 0, -1)
                if data_parallel_size % n == 0)


def _fitted(orig, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's arguments with ``num_distributed_optimizer_instances`` fitted to the current
    world's data-parallel size (see the module docstring)."""
    bound = inspect.signature(orig).bind_partial(*args, **kwargs)
    bound.apply_defaults()
    given = bound.arguments
    configured = int(given.get("num_distributed_optimizer_instances") or 1)
    model_parallel = 1
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "context_parallel_size"):
        model_parallel *= int(given.get(name) or 1)
    dp = max(dist.get_world_size() // model_parallel, 1) if dist.is_initialized() else 1
    n = fit_optimizer_instances(configured, dp)
    _STATE["instances"] = n
    if n == configured or "num_distributed_optimizer_instances" not in given:
        return args, kwargs
    logger.info("initialize_model_parallel: %d optimizer instances at data-parallel size %d "
                "(configured: %d)", n, dp, configured)
    given["num_distributed_optimizer_instances"] = n
    return bound.args, bound.kwargs


def optimizer_instances(default: int = 1) -> int:
    """The optimizer instances of the groups built last (``default`` before any)."""
    return _STATE["instances"] or default


def recorded_call() -> tuple[tuple, dict] | None:
    """The (args, kwargs) of the last ``initialize_model_parallel`` call, or None."""
    return _STATE["call"]


def record_call(*args, **kwargs) -> None:
    """Record an ``initialize_model_parallel`` call made before ``install()``."""
    _STATE["call"] = (args, dict(kwargs))


def rebuild_model_parallel() -> None:
    """Re-run ``initialize_model_parallel`` with the recorded arguments on the current world."""
    if _STATE["call"] is None:
        raise RuntimeError("initialize_model_parallel was never called through the hook")
    args, kwargs = _STATE["call"]
    _ps().initialize_model_parallel(*args, **kwargs)  # the wrapper: instances fitted


def teardown() -> None:
    """``destroy_model_parallel()`` plus the globals it leaves behind (rank lists, group dicts)."""
    ps = _ps()
    ps.destroy_model_parallel()
    for name in _LEFTOVER_GLOBALS:
        if hasattr(ps, name):
            setattr(ps, name, None)
    ps._HYBRID_DP_CP_GROUPS = {}
    # Anything else still holding a group (a newer megatron-core may add globals).
    for name, value in list(vars(ps).items()):
        if name.startswith("_") and _holds_group(value):
            logger.debug("teardown: clearing parallel_state.%s", name)
            setattr(ps, name, {} if isinstance(value, dict) else None)


def _holds_group(value) -> bool:
    if isinstance(value, dist.ProcessGroup):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_group(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_group(v) for v in value.values())
    return False


def group_roles() -> dict[str, dist.ProcessGroup]:
    """Every group parallel_state holds now, keyed by role (global name, list index, dict key).

    The same key names the same role before teardown and after rebuild, which is what lets
    ``rebind`` map an old group to its replacement.
    """
    ps = _ps()
    roles: dict[str, dist.ProcessGroup] = {}

    def add(key, value):
        if isinstance(value, dist.ProcessGroup):
            roles[key] = value
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                add(f"{key}[{i}]", v)
        elif isinstance(value, dict):
            for k, v in value.items():
                add(f"{key}[{k!r}]", v)

    for name, value in vars(ps).items():
        if name.startswith("__") or not name.startswith("_"):
            continue
        if name != "_global_process_group_list":  # every group again, by creation order
            add(name, value)
    if dist.is_initialized():
        roles["WORLD"] = c10d._get_default_group()
    return roles


# ---------------------------------------------------------------- local synchronisation


def local_sync_supported() -> bool:
    """Whether member-only group creation is safe on the current world (see module docstring).

    Cached per default group: megatron asks once per group, tens of thousands of times at scale.
    """
    default = c10d._get_default_group()
    cached = _STATE.get("supported_for")
    if cached is not None and cached[0] is default:
        return cached[1]
    supported = (
        hasattr(c10d, "_process_group_name")
        and not getattr(c10d, "_use_torchcomms_enabled", lambda: False)()
        and default.bound_device_id is None
        and "mpi" not in str(dist.get_backend(default)).lower()
    )
    _STATE["supported_for"] = (default, supported)
    return supported


@contextlib.contextmanager
def _group_name(name: str):
    """Make the next ``new_group`` use ``name`` instead of torch's counter/hash name."""
    orig = c10d._process_group_name
    c10d._process_group_name = lambda ranks, use_hashed_name: c10d.GroupName(name)
    try:
        yield
    finally:
        c10d._process_group_name = orig


def _member_name(ranks, backend, group_desc) -> str:
    digest = hashlib.sha1(
        f"{group_desc}|{backend}|{','.join(map(str, sorted(ranks)))}".encode()
    ).hexdigest()[:20]
    base = f"mcore_{group_desc or 'group'}_{digest}"
    taken = set(c10d._world.pg_names.values())
    k = 0
    while f"{base}_{k}" in taken:
        k += 1
    return f"{base}_{k}"


def _create_group(ranks=None, timeout=None, backend=None, pg_options=None,
                  use_local_synchronization=False, group_desc=None):
    """``parallel_state.create_group`` that gives a gloo group already joined with the same
    members again, and with local synchronisation only lets members call into torch (see the
    module docstring).

    The sharing decision depends only on the call's arguments, which megatron passes alike on
    every rank, so every rank skips the same calls and torch's per-process group counter (used
    without local synchronisation) stays in step. It holds with and without local
    synchronisation, so a world built either way has the same groups for ``rebind`` to map."""
    orig = _STATE["orig_create_group"]
    if ranks is None:
        return orig(ranks, timeout, backend, pg_options, use_local_synchronization, group_desc)
    default = c10d._get_default_group()
    key = _gloo_share_key(default, ranks, timeout, backend, pg_options)
    world, shared = _STATE["shared"]
    if world is not default:  # a new world: nothing of the old one is shared
        shared = {}
        _STATE["shared"] = (default, shared)
    if key is not None and key in shared:
        return shared[key]
    if not (_STATE["local_sync"] and local_sync_supported()):
        group = orig(ranks, timeout, backend, pg_options, use_local_synchronization, group_desc)
    elif default.rank() not in ranks:
        group = c10d.GroupMember.NON_GROUP_MEMBER
    else:
        with _group_name(_member_name(ranks, backend, group_desc)):
            group = orig(ranks, timeout, backend, pg_options, True, group_desc)
    if key is not None:
        shared[key] = group
    return group


def _gloo_share_key(default, ranks, timeout, backend, pg_options):
    """What makes two gloo groups interchangeable, or None for a group never shared (see "One
    gloo group per member set" in the module docstring)."""
    resolved = str(backend or dist.get_backend(default)).lower()
    if resolved != "gloo" or pg_options is not None:
        return None
    # no timeout means gloo's default one (megatron passes none for its expert gloo groups)
    return tuple(sorted(ranks)), default_pg_timeout if timeout is None else timeout


__all__ = [
    "install",
    "recorded_call",
    "record_call",
    "rebuild_model_parallel",
    "teardown",
    "group_roles",
    "local_sync_supported",
]
