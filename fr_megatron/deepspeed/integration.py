"""DeepSpeed (ZeRO stage 0, 1, 2) as the runtime sees it: state to copy, groups to rebuild.

State. Under ZeRO-1/2 the fp32 master partition ``optimizer.single_partition_of_fp32_groups[i]``
and the inner optimizer's moments for it exist on this rank only, so they are ``unique``. The
module parameters that ZeRO trains are not committed at all: ZeRO's step makes them from the
master partitions (each rank casts its partition into the flat low-precision buffer, then the
data-parallel group all-gathers the buffers), and ``restore`` does the same (as
``update_lp_params``, with the partitions exchanged by ``runtime.shard_gather``). So a commit
copies no parameter bytes beyond the partition, and every rank of the data-parallel group
restores at once, as a recovery does. Under stage 0 the parameters and
moments are ``replicated``.

Groups. DeepSpeed caches groups in many places (engine attributes, the ZeRO optimizer, an attribute
on every parameter, ``deepspeed.utils.groups``). After the runtime has made a new default group,
``rebuild`` recreates DeepSpeed's own groups in the order a fresh ``deepspeed.initialize`` creates
them (so a replacement process that initialises from scratch pairs with the survivors), maps each
old group to the new one with the same role or the same ranks, and rewrites every reference found
by walking the object graph. A replacement that runs ``deepspeed.initialize`` from scratch also
broadcasts the model from data-parallel rank 0; survivors meet it with ``mirror_fresh_init``.

Order on a new generation: runtime destroys the world and joins ``gen{g}/``; survivors call
``rebuild`` (which first calls ``rebuild_mpu`` when an mpu is used, and ends with the collectives of
a fresh ``deepspeed.initialize``, ``mirror_fresh_init``); the replacement builds its engine from the
top and receives its state via ``restore``. ``restore`` also clears what an interrupted step left in
ZeRO's gradient bookkeeping (``reset_step_state``), so the redone step starts clean.

Shrink and grow. With a ``resize`` callback (it builds the engine again, as the script's set-up
does, on the current world), a job goes on at another data-parallel size: ``rebuild`` finds the
size changed and takes the new engine instead of rebinding the old one. ZeRO's partition of the
master weights and moments depends on that size, so each commit carries a ``shard_layout`` (every
master-partition range, in model space, from each parameter's ``_hp_mapping``), and ``restore``
re-partitions the old shards into the new engine (``runtime.reshard``).
"""

from __future__ import annotations

import copy
import logging
import pickle
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from fr_megatron.config import FlashRecoveryConfig
from fr_megatron.runtime import group_refs, reshard
from fr_megatron.runtime.integration import Integration, RankState, resized_to, tensor_bytes
from fr_megatron.runtime.shard_gather import gather_shards

log = logging.getLogger(__name__)

ProcessGroup = group_refs.ProcessGroup

COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")

# Zero-argument mpu getters whose groups the engine may cache (Megatron-style mpu objects).
MPU_GETTERS = ("get_data_parallel_group", "get_model_parallel_group", "get_tensor_model_parallel_group",
               "get_pipeline_model_parallel_group", "get_sequence_parallel_group",
               "get_sequence_data_parallel_group")

# deepspeed.utils.groups globals that hold one group each.
DS_GROUP_GLOBALS = ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP",
                    "_TENSOR_MODEL_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP")


class UnsupportedEngine(NotImplementedError):
    """The engine uses a DeepSpeed feature whose state or groups this integration cannot rebuild."""


@dataclass
class _Catalog:
    """The groups in use, recorded while they are alive (their ranks cannot be read once destroyed)."""

    ranks: dict[int, tuple[int, ...]] = field(default_factory=dict)     # id(pg) → global ranks
    objects: dict[int, ProcessGroup] = field(default_factory=dict)      # id(pg) → pg
    named: dict[str, ProcessGroup] = field(default_factory=dict)        # role → pg

    def groups(self) -> list[ProcessGroup]:
        return list(self.objects.values())


def _ranks(pg: ProcessGroup) -> Optional[tuple[int, ...]]:
    try:
        return tuple(dist.get_process_group_ranks(pg))
    except Exception:  # destroyed, or not registered in this world
        return None


class DeepSpeedIntegration(Integration):
    """A DeepSpeed engine with ZeRO stage 0, 1 or 2.

    ``mpu``: the model-parallel unit the engine was built with (Megatron-style); its data-parallel
    group is the replica group. ``rebuild_mpu``: called first by ``rebuild`` to recreate the mpu's
    groups on the new world (e.g. Megatron's parallel_state); without it the mpu is assumed to have
    been rebuilt already by its own integration.
    """

    name = "deepspeed"
    shrink_needs = ("a resize function (fr_megatron.deepspeed.initialize(resize=...)) that builds "
                    "the engine again on the current world, and data that any data-parallel size "
                    "can spread (fr_megatron.runtime.batch_split)")

    def __init__(self, engine, cfg: Optional[FlashRecoveryConfig] = None, mpu: Any = None,
                 rebuild_mpu: Optional[Callable[[], None]] = None,
                 resize: Optional[Callable[[], Any]] = None):
        self.engine = engine
        self.cfg = cfg if cfg is not None else FlashRecoveryConfig()
        self.mpu = mpu if mpu is not None else getattr(engine, "mpu", None)
        self.rebuild_mpu = rebuild_mpu
        # builds the engine again at a new data-parallel size (a shrink or a grow); without it
        # the job cannot change that size
        self.resize = resize
        self.shrinkable = resize is not None
        self.zero_stage = int(engine.zero_optimization_stage())
        self._init_mirrored = False  # rebuild() has issued a fresh process's init collectives
        self._mark: Optional[Callable[[str], None]] = None  # the runtime's phase marker
        self._layout: Optional[tuple[tuple, reshard.ShardLayout, bytes]] = None
        self._check_supported()
        self._data_parallel_size = self._current_data_parallel_size()
        self._catalog = self._record()

    # ---- what is supported ---------------------------------------------------------------
    def _check_supported(self) -> None:
        from deepspeed.runtime.pipe.engine import PipelineEngine
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        e = self.engine
        problems = []
        if self.zero_stage not in (0, 1, 2):
            problems.append(f"ZeRO stage {self.zero_stage} (ZeRO-1 and ZeRO-2 are supported)")
        if isinstance(e, PipelineEngine):
            problems.append("DeepSpeed's PipelineEngine")
        if getattr(e, "has_moe_layers", False):
            problems.append("MoE layers (expert groups)")
        if getattr(e, "sequence_parallel_size", 1) != 1:
            problems.append("DeepSpeed sequence parallelism")
        if callable(getattr(e, "autotp_size", None)) and (e.autotp_size() or 1) > 1:
            problems.append("DeepSpeed AutoTP")
        opt = e.optimizer
        if self.zero_stage in (1, 2) and not isinstance(opt, DeepSpeedZeroOptimizer):
            problems.append(f"optimizer wrapper {type(opt).__name__}")
        if self.zero_stage == 0 and not isinstance(opt, torch.optim.Optimizer):
            problems.append(f"stage-0 optimizer {type(opt).__name__} (stage 0 is supported with a plain "
                            f"torch optimizer in fp32; use ZeRO-1 for fp16/bf16)")
        if problems:
            raise UnsupportedEngine("flash recovery cannot handle this DeepSpeed engine: "
                                    + "; ".join(problems))

    @property
    def _zero(self) -> bool:
        return self.zero_stage in (1, 2)

    # ---- state ---------------------------------------------------------------------------
    def replica_ranks(self) -> list[int]:
        return list(dist.get_process_group_ranks(self._dp_group()))

    def _dp_group(self) -> ProcessGroup:
        e = self.engine
        return getattr(e, "seq_data_parallel_group", None) or e.data_parallel_group

    def _current_data_parallel_size(self) -> int:
        """The data-parallel size of the current world: the mpu's (rebuilt first), else the
        world's."""
        if self.mpu is not None and callable(getattr(self.mpu, "get_data_parallel_world_size",
                                                     None)):
            return int(self.mpu.get_data_parallel_world_size())
        return dist.get_world_size()

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer.optimizer if self._zero else self.engine.optimizer

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self._inner_optimizer()]

    def _optim_slots(self) -> list[tuple[str, torch.Tensor]]:
        """(name prefix, optimizer parameter) pairs, stable across ranks and restarts."""
        if self._zero:
            partitions = self.engine.optimizer.single_partition_of_fp32_groups
            return [(f"zero/{i}", p) for i, p in enumerate(partitions)]
        params = [p for g in self.engine.optimizer.param_groups for p in g["params"]]
        return [(f"optim/{j}", p) for j, p in enumerate(params)]

    def capture(self) -> RankState:
        e = self.engine
        state = RankState()
        made_by_zero = set(map(id, self._trained_by_zero()))
        for name, p in e.module.named_parameters():
            if id(p) not in made_by_zero:  # frozen parameters, and all of them under stage 0
                state.replicated[f"param/{name}"] = p.data
        opt_tensors, opt_scalars = self._optim_state()
        getattr(state, "unique" if self._zero else "replicated").update(opt_tensors)
        inner = self._inner_optimizer()
        meta: dict[str, Any] = {"counters": {k: getattr(e, k) for k in COUNTERS},
                                "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                                 for g in inner.param_groups],
                                "optim_scalars": opt_scalars}
        if e.lr_scheduler is not None and hasattr(e.lr_scheduler, "state_dict"):
            meta["lr_scheduler"] = e.lr_scheduler.state_dict()
        scaler = getattr(e.optimizer, "loss_scaler", None)
        if scaler is not None:
            meta["loss_scaler"] = {k: v for k, v in vars(scaler).items()
                                   if isinstance(v, (int, float, bool, str, type(None)))}
        state.meta = copy.deepcopy(meta)
        if self.resize is not None and self._zero:  # read by any rank after a shrink or grow
            state.meta["shard_layout"] = self._shard_layout(state.unique)[2]
        return state

    # ---- re-partitioning (a shrink or a grow) ---------------------------------------------
    def shard_layout(self) -> Optional[reshard.ShardLayout]:
        """Which range of which parameter each master partition and each of its moments holds,
        from ZeRO's own fragment mapping (``_hp_mapping``); None under stage 0 (nothing is
        partitioned) and for a job that cannot resize."""
        if self.resize is None or not self._zero:
            return None
        return self._shard_layout(self._optim_state()[0])[1]

    def _optim_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The optimizer's tensors by capture key (under ZeRO the master partitions with their
        moments), and its non-tensor state."""
        inner = self._inner_optimizer()
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, Any] = {}
        for prefix, p in self._optim_slots():
            if self._zero:
                tensors[f"{prefix}/fp32"] = p.data
            for k, v in inner.state.get(p, {}).items():
                if torch.is_tensor(v):
                    tensors[f"{prefix}/state/{k}"] = v
                else:
                    scalars[f"{prefix}/state/{k}"] = v
        return tensors, scalars

    def _shard_layout(self, unique: dict[str, torch.Tensor]
                      ) -> tuple[tuple, reshard.ShardLayout, bytes]:
        """(keys, layout, layout pickled), computed again only when the captured keys change
        (the moments appear at the first step; a resize makes a new partition)."""
        keys = tuple(unique)
        if self._layout is not None and self._layout[0] == keys:
            return self._layout
        opt = self.engine.optimizer
        names = {id(p): n for n, p in self.engine.module.named_parameters()}
        group = self._dp_group()
        layout = reshard.ShardLayout(
            numel={n: p.numel() for n, p in self.engine.module.named_parameters()},
            position=self._position(), part=(dist.get_rank(group), dist.get_world_size(group)))
        for i, params in enumerate(opt.bit16_groups):
            prefix = f"zero/{i}"
            kinds = [(key, key.rpartition("/")[2]) for key in keys
                     if key.startswith(f"{prefix}/state/")]
            for p in params:
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is None:  # no element of it in this rank's partition
                    continue
                name, lp, hp = names[id(p)], mapping.lp_fragment_address, \
                    mapping.hp_fragment_address
                whole = reshard.Span(name, "fp32", lp.start, lp.start + lp.numel, hp.start)
                layout.add(f"{prefix}/fp32", whole)
                for key, kind in kinds:
                    layout.add(key, reshard.Span(name, kind, reshard.SCALAR, reshard.SCALAR)
                               if unique[key].dim() == 0 else
                               reshard.Span(name, kind, whole.start, whole.end, whole.at))
        layout.check_covers(unique)
        self._layout = (keys, layout, pickle.dumps(layout, protocol=pickle.HIGHEST_PROTOCOL))
        return self._layout

    def _position(self) -> tuple:
        """The model position (tensor and pipeline ranks) this rank's partition belongs to."""
        if self.mpu is None:
            return ()
        return tuple(int(getattr(self.mpu, f)()) for f in (
            "get_tensor_model_parallel_rank", "get_pipeline_model_parallel_rank")
            if callable(getattr(self.mpu, f, None)))

    def reshard(self, snapshots) -> int:
        """This rank's master partitions, their moments and the module parameters, from the
        partitions of another data-parallel size: ``snapshots`` are (layout, unique tensors) of
        the old shards. Local: each rank casts the whole parameters it assembled, instead of the
        partitions' all-gather."""
        position = self._position()
        space = reshard.assemble([(old, t) for old, t in snapshots if old.position == position])
        inner = self._inner_optimizer()
        kinds = {kind: t for (_, kind), t in [*space.full.items(), *space.scalars.items()]
                 if kind != "fp32"}
        for _, p in self._optim_slots():  # moments this fresh engine has not made yet
            st = inner.state[p]
            for kind, t in kinds.items():
                if kind not in st:
                    st[kind] = t.clone() if t.dim() == 0 else torch.zeros_like(p, dtype=t.dtype)
        unique = self._optim_state()[0]
        copied = reshard.scatter(space, self._shard_layout(unique)[1], unique)
        trained = set(map(id, self._trained_by_zero()))
        with torch.no_grad():
            for name, p in self.engine.module.named_parameters():
                if id(p) in trained:
                    p.data.view(-1).copy_(space.get(reshard.Span(name, "fp32", 0, p.numel())))
        log.info("deepspeed reshard: %d old shards into this rank's partition, %d elements",
                 len(snapshots), copied)
        return copied

    def _check_compatible(self, live: RankState, state: RankState) -> None:
        """Refuse a state that does not fit this engine before changing anything."""
        errors = []
        for part in ("replicated", "unique"):
            have, want = getattr(live, part), getattr(state, part)
            missing = [k for k in have if k not in want]
            extra = [k for k in want if k not in have and "/state/" not in k]
            if missing:
                errors.append(f"{part}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
            if extra:
                errors.append(f"{part}: unknown {extra[:5]}{'...' if len(extra) > 5 else ''}")
            for k, t in have.items():
                s = want.get(k)
                if s is not None and (s.shape != t.shape or s.dtype != t.dtype):
                    errors.append(f"{part}[{k}]: {tuple(s.shape)} {s.dtype} does not fit "
                                  f"{tuple(t.shape)} {t.dtype}")
        if errors:
            raise ValueError("DeepSpeed state does not fit this engine: " + "; ".join(errors))

    def restore(self, state: RankState, old_shards=None) -> None:
        """``old_shards``: (layout, unique tensors) of the old partition's shards, after the
        data-parallel size changed: the partitions are taken from them (``reshard``) instead of
        from ``state``."""
        e = self.engine
        live = self.capture()
        if old_shards is not None:
            live.unique, state = {}, RankState(state.replicated, {}, state.meta)
        self._check_compatible(live, state)
        self.reset_step_state()
        inner = self._inner_optimizer()
        slots = dict(self._optim_slots())
        with torch.no_grad():
            for part in ("replicated", "unique"):
                have, want = getattr(live, part), getattr(state, part)
                for k, src in want.items():
                    if k in have:
                        have[k].copy_(src)
                    else:  # optimizer state not created yet here (e.g. a fresh replacement)
                        prefix, _, key = k.rpartition("/state/")
                        inner.state[slots[prefix]][key] = src.detach().clone()
        meta = copy.deepcopy(state.meta)
        if old_shards is not None:
            self.reshard(old_shards)
        elif self._zero:
            self._make_trained_params()
        for k, v in meta.get("optim_scalars", {}).items():
            prefix, _, key = k.rpartition("/state/")
            inner.state[slots[prefix]][key] = v
        for k, v in meta.get("counters", {}).items():
            setattr(e, k, v)
        for group, saved in zip(inner.param_groups, meta.get("param_groups", [])):
            group.update(saved)
        if "lr_scheduler" in meta and e.lr_scheduler is not None:
            e.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        scaler = getattr(e.optimizer, "loss_scaler", None)
        if scaler is not None:
            for k, v in meta.get("loss_scaler", {}).items():
                setattr(scaler, k, v)

    def _make_trained_params(self) -> None:
        """What ZeRO's step does after the update (``update_lp_params``): each rank casts its
        master partition into its partition of the flat low-precision group, and the
        data-parallel group exchanges the partitions. A collective."""
        opt = self.engine.optimizer
        pieces = []
        with torch.no_grad():
            for i, fp32 in enumerate(opt.single_partition_of_fp32_groups):
                group = opt.real_dp_process_group[i]
                me = dist.get_rank(group=group)
                partitions = opt.parallel_partitioned_bit16_groups[i]
                partitions[me].data.copy_(fp32.data)
                pieces.append(([p.data for p in partitions], me, group))
            gather_shards(pieces)

    def _trained_by_zero(self) -> list[torch.Tensor]:
        """The module parameters ZeRO-1/2 makes from the master partitions (none under stage 0)."""
        return [p for group in self.engine.optimizer.bit16_groups for p in group] \
            if self._zero else []

    def left_out_bytes(self) -> int:
        """The parameters ZeRO trains: ``capture`` leaves them to ``restore`` to make again."""
        return tensor_bytes(self._trained_by_zero())

    def reset_step_state(self) -> None:
        """Forget everything a step that did not finish left in the engine and the ZeRO optimizer.

        A step interrupted by a fault (a collective raising in the backward epilogue, an exception
        inside ``engine.step``) leaves gradients and ZeRO's reduction bookkeeping half-filled: the
        ipg bucket still lists its parameters and elements, ``params_already_reduced`` is partly set,
        ``averaged_gradients`` / ``grads_in_partition`` hold partial sums, the backward-hook counters
        think a backward is still active. Redoing the step on top of that would reduce gradients twice
        (or trip DeepSpeed's asserts). This puts every one of them back to what it is between two
        completed steps; no collective is issued, values (parameters, shards, moments) are untouched.
        """
        e = self.engine
        for name, value in (("_running_engine_step", False), ("_running_engine_backward", False),
                            ("_running_engine_backward_count", 0), ("_unmanaged_backward_count", 0),
                            ("inside_no_sync_ctxt", False), ("losses", None)):
            if hasattr(e, name):
                setattr(e, name, value)
        for p in e.module.parameters():
            p.grad = None
        if not self._zero:
            self.engine.optimizer.zero_grad(set_to_none=True)
            return
        opt = e.optimizer
        opt.zero_grad(set_to_none=True)            # bit16 params: grad and grad_accum
        for bucket in getattr(opt, "ipg_buckets", {}).values():
            bucket.clear()
            bucket.reuse_events.clear()
        getattr(opt, "extra_large_param_to_reduce", {}).clear()
        for grads in getattr(opt, "previous_reduced_grads", {}).values():
            grads.clear()
        reduced = getattr(opt, "params_already_reduced", [])
        for i in range(len(reduced)):
            reduced[i] = False
        for d in (getattr(opt, "averaged_gradients", {}), getattr(opt, "all_grad_tensors", {})):
            for k in list(d):
                d[k] = None
        if hasattr(opt, "_release_preflattened_grad_buffers"):
            opt._release_preflattened_grad_buffers()
        opt._release_ipg_buffers()                 # buffers, grads_in_partition, ready_for_gradients
        for fp32 in opt.single_partition_of_fp32_groups:
            fp32.grad = None
        if hasattr(opt, "reset_partition_gradient_structures") and getattr(opt, "is_partition_reduced", None):
            opt.reset_partition_gradient_structures()
        from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

        opt.micro_step_id = INITIAL_MICRO_STEP_ID
        opt.overflow = False
        hooks = getattr(opt, "_backward_hook_state", None)
        if hooks is not None:
            hooks.reset_for_new_step()
            hooks.backward_active_depth = 0
            hooks.remaining_grad_acc_hooks = 0

    # ---- groups --------------------------------------------------------------------------
    def _roots(self) -> dict[str, Any]:
        from deepspeed.comm import comm as ds_comm
        from deepspeed.utils import groups as ds_groups

        roots: dict[str, Any] = {"engine": self.engine, "deepspeed.utils.groups": ds_groups,
                                 "deepspeed.comm": ds_comm}
        sp = sys.modules.get("deepspeed.runtime.sequence_parallel.parallel_state_sp")
        if sp is not None:
            roots[sp.__name__] = sp
        if self.mpu is not None and not isinstance(self.mpu, types.ModuleType):
            roots["mpu"] = self.mpu
        return roots

    @staticmethod
    def _walk_skip() -> tuple:
        """Not walked: integrations (they keep the old groups on purpose), the runtime's Session and
        its copy exchange (they own their groups and rebuild them after the framework's; a training
        script's hook on the engine or its optimizer, e.g. one that marks ``session.phase``, makes them
        reachable from the engine) and data loaders (large, and they hold no groups)."""
        from deepspeed.runtime.dataloader import DeepSpeedDataLoader, RepeatingLoader

        from fr_megatron.runtime.redundancy import CopyExchange
        from fr_megatron.runtime.session import Session

        return (Integration, Session, CopyExchange, DeepSpeedDataLoader, RepeatingLoader)

    def _named_groups(self) -> dict[str, ProcessGroup]:
        """Groups by role: the default group, DeepSpeed's module-level groups, the mpu's groups."""
        from deepspeed.utils import groups as ds_groups

        named: dict[str, ProcessGroup] = {}
        if dist.is_initialized() and isinstance(dist.group.WORLD, ProcessGroup):
            named["WORLD"] = dist.group.WORLD
        for k in DS_GROUP_GLOBALS:
            v = getattr(ds_groups, k, None)
            if isinstance(v, ProcessGroup):
                named[f"ds.{k}"] = v
        for k, v in getattr(ds_groups, "_ALL_TO_ALL_GROUP", {}).items():
            named[f"ds._ALL_TO_ALL_GROUP[{k}]"] = v
        if self.mpu is not None:
            for getter in MPU_GETTERS:
                fn = getattr(self.mpu, getter, None)
                if not callable(fn):
                    continue
                try:
                    v = fn()
                except Exception:  # not initialised / not applicable for this mpu
                    continue
                if isinstance(v, ProcessGroup):
                    named[f"mpu.{getter}"] = v
        return named

    def _record(self) -> _Catalog:
        prev = getattr(self, "_catalog", None)
        cat = _Catalog(named=self._named_groups())
        refs = group_refs.find(self._roots(), self._walk_skip())
        for pg in list(cat.named.values()) + [pg for _, pg in refs]:
            r = _ranks(pg)
            if r is None and prev is not None:
                r = prev.ranks.get(id(pg))
            if r is not None:
                cat.ranks[id(pg)] = r
                cat.objects[id(pg)] = pg
        return cat

    def group_references(self) -> list[tuple[str, tuple[int, ...]]]:
        """(where, global ranks) of every group reference the engine and DeepSpeed hold."""
        return [(path, _ranks(pg) or self._catalog.ranks.get(id(pg), ()))
                for path, pg in group_refs.find(self._roots(), self._walk_skip())]

    def teardown(self) -> None:
        """Record the groups in use (ranks are unreadable once destroyed) and drop DeepSpeed's
        module-level caches so nothing creates work on the old world."""
        self._catalog = self._record()
        self._clear_ds_caches()
        self._init_mirrored = False

    @staticmethod
    def _clear_ds_caches() -> None:
        from deepspeed.utils import groups as ds_groups

        ds_groups._WORLD_GROUP = None
        getattr(ds_groups, "_ALL_TO_ALL_GROUP", {}).clear()

    def _recreate_ds_groups(self, old: _Catalog) -> None:
        """Create DeepSpeed's own groups the way ``DeepSpeedEngine._configure_distributed_model``
        does, in the same order, so the group-name counter matches a freshly started rank."""
        from deepspeed.utils import groups as ds_groups

        had_a2a = any(k.startswith("ds._ALL_TO_ALL_GROUP") for k in old.named)
        had_world_clone = "ds._WORLD_GROUP" in old.named
        self._clear_ds_caches()
        if self.mpu is not None:
            ds_groups.mpu = self.mpu
        if had_a2a:
            ds_groups._get_local_all_to_all_group()
        if had_world_clone:
            ds_groups._clone_world_group()

    def _new_groups(self, old: _Catalog) -> dict[str, ProcessGroup]:
        """The groups of the new world by role; refuses an mpu that still hands out old groups."""
        named = self._named_groups()
        stale = [name for name, pg in named.items() if _ranks(pg) is None or id(pg) in old.objects]
        if stale:
            raise RuntimeError(
                f"flash recovery: {', '.join(stale)} still return groups of the old world; rebuild the "
                f"mpu first (pass rebuild_mpu, or rebuild Megatron's parallel_state before DeepSpeed)")
        return named

    def _old_to_new(self, old: _Catalog, new_named: dict[str, ProcessGroup]) -> dict[int, ProcessGroup]:
        """id(old group) → new group: same role if the old one had a role, else same ranks."""
        by_ranks: dict[tuple[int, ...], ProcessGroup] = {}
        for name, pg in sorted(new_named.items(), key=lambda kv: kv[0] == "WORLD"):  # WORLD last
            by_ranks.setdefault(_ranks(pg), pg)
        mapping: dict[int, ProcessGroup] = {}
        for name, pg in old.named.items():
            new = new_named.get(name)
            if new is not None and _ranks(new) == old.ranks.get(id(pg)):
                mapping[id(pg)] = new
        for key, ranks in old.ranks.items():
            if key not in mapping and ranks in by_ranks:
                mapping[key] = by_ranks[ranks]
        return mapping

    def rebuild(self) -> bool:
        """Rebuild the groups on the new world and rebind the engine's references to them;
        whether the engine was built again instead (the data-parallel size changed)."""
        old = self._catalog
        if self.mpu is not None and self.rebuild_mpu is not None:
            self.rebuild_mpu()
        resized = self._resize_if_needed()
        if not resized:
            self._recreate_ds_groups(old)
        new_named = self._new_groups(old)
        mapping = self._old_to_new(old, new_named)
        unmapped: list[str] = []

        def fix(pg: ProcessGroup, path: str) -> Optional[ProcessGroup]:
            if id(pg) in mapping:
                return mapping[id(pg)]
            if _ranks(pg) is None:  # neither new nor alive: a group we never recorded
                unmapped.append(f"{path} (ranks {old.ranks.get(id(pg), 'unknown')})")
            return None

        changed = group_refs.rebind(self._roots(), fix, self._walk_skip())
        if unmapped:
            raise RuntimeError("flash recovery: no new group for these cached DeepSpeed groups: "
                               + "; ".join(unmapped))
        self._catalog = self._record()
        left = self.old_group_references(old.groups())
        if left:
            raise RuntimeError(f"flash recovery: {left} references to old process groups remain after "
                               f"rebuild")
        log.info("deepspeed: rebuilt groups, rebound %d references", len(changed))
        log.debug("deepspeed: rebound %s", changed)
        if not resized:  # a new engine made the collectives of its set-up already
            self._mirror_init()
        self._init_mirrored = True
        return resized

    def _resize_if_needed(self) -> bool:
        """The world's data-parallel size changed: the engine is built again for it
        (``resize``, the collectives of a fresh process's set-up), its state restored later from
        the old shards."""
        dp = resized_to(self._data_parallel_size, self._current_data_parallel_size(),
                        self.resize, "its engine")
        if dp is None:
            return False
        built = self.resize()
        engine = built[0] if isinstance(built, tuple) else built
        engine.flash_recovery = self
        self.engine, self.zero_stage = engine, int(engine.zero_optimization_stage())
        self._check_supported()
        self._data_parallel_size, self._layout = dp, None
        if self._mark is not None:
            self.install_phase_marks(self._mark)
        log.info("deepspeed resize: data-parallel size %d, engine built again", dp)
        return True

    def mirror_fresh_init(self) -> None:
        """The collectives that ``deepspeed.initialize`` issues in a freshly started replacement once
        its groups exist, so that a survivor meets them.

        ``rebuild`` already issues them (the runtime contract: a survivor's rebuild issues exactly the
        collectives a fresh process issues in its set-up, in the same order), so right after
        ``rebuild`` this is a no-op; it is kept for callers that drive the steps themselves.
        """
        if getattr(self, "_init_mirrored", False):
            self._init_mirrored = False
            return
        self._mirror_init()

    def _mirror_init(self) -> None:
        """In DeepSpeed 0.19.8 (ZeRO 0-2) that is ``DeepSpeedEngine._broadcast_model``: one broadcast
        per parameter from data-parallel rank 0. When the replacement is data-parallel rank 0 it
        broadcasts its initial parameters, so this rank's values are put back afterwards; the
        replacement then receives its state through ``restore``. When every rank rebuilds in place,
        every rank broadcasts and nothing changes."""
        params = [p for _, p in self.engine.module.named_parameters()]
        keep = [p.data.clone() for p in params]
        self.engine._broadcast_model()
        with torch.no_grad():
            for p, k in zip(params, keep):
                p.data.copy_(k)

    def old_group_references(self, old_groups: list[Any]) -> int:
        return group_refs.count(self._roots(), old_groups, self._walk_skip())

    def group_kinds(self) -> dict[str, list[Any]]:
        """The engine's data-parallel group and the mpu's model-parallel groups, by kind."""
        e = self.engine
        kinds: dict[str, list[Any]] = {}
        dp = getattr(e, "seq_data_parallel_group", None) or getattr(e, "data_parallel_group", None)
        if isinstance(dp, ProcessGroup):
            kinds["dp"] = [dp]
        for kind, getter in (("tp", "get_tensor_model_parallel_group"),
                             ("pp", "get_pipeline_model_parallel_group"),
                             ("mp", "get_model_parallel_group")):
            fn = getattr(self.mpu, getter, None) if self.mpu is not None else None
            try:
                group = fn() if callable(fn) else None
            except Exception:  # not initialised / not applicable for this mpu
                continue
            if isinstance(group, ProcessGroup):
                kinds[kind] = [group]
        return kinds

    def install_phase_marks(self, mark: Callable[[str], None]) -> None:
        """Mark ``grad_reduce`` where the engine reduces gradients (``allreduce_gradients``, at
        the end of ``engine.backward``); the training script marks the other phases."""
        self._mark = mark  # installed again on an engine built at another size
        e = self.engine
        orig = e.allreduce_gradients
        if getattr(orig, "_fr_marked", False):
            return

        def allreduce_gradients(*args, **kwargs):
            mark("grad_reduce")
            return orig(*args, **kwargs)
        allreduce_gradients._fr_marked = True
        e.allreduce_gradients = allreduce_gradients
