"""The runtime's view of a megatron-core job (see ``fr_megatron.runtime.integration``).

State split, for megatron-core 0.16.1 with the DistributedOptimizer:

* ``unique``: what this rank alone holds of the data-parallel state. With the
  DistributedOptimizer every parameter lives in DDP's param buffer, and the optimizer updates only
  this rank's shard of each bucket, then all-gathers the bucket (``start_param_sync``): that shard
  is committed, the rest of the buffer is not (``restore`` has the group exchange the shards
  again, ``runtime.shard_gather``, so a commit copies P/DP parameter bytes, not P). With fp32
  params the optimizer's "main params" are views into these same shards. Also the inner torch
  optimizer's ``state[shard_param]`` (``exp_avg``, ``exp_avg_sq``, ``step``) for every shard param
  of ``optimizer.optimizer.param_groups``, and with 16-bit params the fp32 master shards
  ``optimizer.shard_fp32_from_float16_groups``.
* ``replicated``: model parameters outside a distributed-optimizer buffer (``param.data``; all of
  them with megatron DDP without the DistributedOptimizer), bit-identical across the
  data-parallel group *with* context parallelism.
* ``meta``: the model chunks' buffers (copied at the commit: some change in the forward), the
  RNG tracker's named states (the runtime keeps the process's own generators), the LR scheduler,
  the inner optimizer's param-group hyper-parameters (lr, wd, ...), the grad scaler, and the
  progress counters (``iteration``, ``consumed_samples``) of the object passed as ``progress``.

Groups: ``teardown``/``rebuild`` replay ``initialize_model_parallel`` through
``parallel_state_hook`` (install it before that call, in every process, survivors and replacements
alike), rebind every cached group (``rebind``) and retire the old ones. A replacement process
builds its model and optimizer while the survivors wait in the runtime; megatron-core communicates
while it builds, and ``runtime.startup_calls`` answers those calls from the replaced rank's record.
"""

from __future__ import annotations

import logging
import pickle
import time
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from fr_megatron.megatron import parallel_state_hook, rebind
from fr_megatron.runtime import reshard
from fr_megatron.runtime.integration import Integration, RankState, resized_to, tensor_bytes
from fr_megatron.runtime.shard_gather import gather_shards

logger = logging.getLogger(__name__)


def sub_optimizers(optimizer) -> list:
    """The MegatronOptimizers inside ``optimizer`` (itself, or a ChainedOptimizer's members)."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _ensure_adam_state(inner: torch.optim.Optimizer) -> None:
    """Create torch Adam/AdamW state as its first ``step`` would, so names and shapes exist early.

    A DistributedOptimizer's state is empty until its first step (megatron's ``init_state_fn``
    creates moments but no ``step``, which torch's Adam then trips over).
    """
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        return
    for group in inner.param_groups:
        for p in group["params"]:
            state = inner.state[p]
            if "step" in state and "exp_avg" in state:
                continue
            if group.get("capturable") or group.get("fused"):
                step = torch.zeros((), dtype=torch.float32, device=p.device)
            else:
                step = torch.tensor(0.0, dtype=torch.get_default_dtype())
            state.setdefault("step", step)
            state.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
            state.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))
            if group.get("amsgrad"):
                state.setdefault(
                    "max_exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format)
                )


def _bucket_groups(chunk) -> list:
    """The DDP bucket groups of a megatron-core model chunk (none for other wrappers)."""
    return [*(getattr(chunk, "bucket_groups", None) or ()),
            *(getattr(chunk, "expert_parallel_bucket_groups", None) or ())]


def _param_shards(chunk):
    """(group index, bucket index, bucket, the bucket's param buffer in the group's shards, this
    rank's index, the group) for each bucket that the DistributedOptimizer shards: the slices
    megatron-core's ``start_param_sync`` all-gathers."""
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    for g, bucket_group in enumerate(_bucket_groups(chunk)):
        if not bucket_group.ddp_config.use_distributed_optimizer:
            continue
        size = bucket_group.intra_distributed_optimizer_instance_size
        rank = bucket_group.intra_distributed_optimizer_instance_rank
        group = bucket_group.intra_distributed_optimizer_instance_group
        for b, bucket in enumerate(bucket_group.buckets):
            if bucket.param_data is not None:
                yield g, b, bucket, shard_buffer(bucket.param_data, size), rank, group


class MegatronIntegration(Integration):
    """A megatron-core job: DDP-wrapped model chunks, a Chained/DistributedOptimizer, scheduler."""

    name = "megatron"
    shrink_needs = ("a resize function (training_hooks.on_train_start(resize=...)) that builds "
                    "model, optimizer and scheduler again, and data that any data-parallel size "
                    "can spread (the recipe: --dataloader-type synthetic)")

    def __init__(
        self,
        model: list[torch.nn.Module] | torch.nn.Module,
        optimizer,
        scheduler=None,
        progress: Any = None,
        progress_attrs: Iterable[str] = ("iteration", "consumed_samples"),
        extra_roots: Iterable[Any] = (),
        resize: Any = None,
    ):
        self.model = list(model) if isinstance(model, (list, tuple)) else [model]
        # builds model, optimizer and scheduler again at a new data-parallel size (a shrink or
        # a grow); without it the job cannot change that size
        self.resize = resize
        self.shrinkable = resize is not None
        self._data_parallel_size = self._current_data_parallel_size()
        self._layout: reshard.ShardLayout | None = None  # this partition's, once computed
        self._layout_bytes: bytes | None = None
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.progress = progress
        self.progress_attrs = tuple(progress_attrs)
        self.extra_roots = list(extra_roots)
        self._old_roles: dict[str, dist.ProcessGroup] = {}
        self._old_groups: list[dist.ProcessGroup] = []
        self._retire: list[dist.ProcessGroup] = []
        self._torn_down = False  # between a teardown and the rebuild that completes it
        self._world = c10d._get_default_group() if dist.is_initialized() else None
        self.last_rebuild: dict[str, float] = {}
        parallel_state_hook.install()
        if parallel_state_hook.recorded_call() is None:
            raise RuntimeError(
                "parallel_state.initialize_model_parallel was called before "
                "parallel_state_hook.install(); call install() first or record_call(...)"
            )

    @classmethod
    def from_job(cls, job) -> "MegatronIntegration":
        """For ``fr_megatron.megatron.model.TinyGPTJob``-like objects."""
        return cls(job.model, job.optimizer, job.scheduler, progress=job,
                   resize=getattr(job, "resize", None))

    @staticmethod
    def _current_data_parallel_size() -> int | None:
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            return None
        return parallel_state.get_data_parallel_world_size(with_context_parallel=True)

    # ------------------------------------------------------------------ state

    def replica_ranks(self) -> list[int]:
        from megatron.core import parallel_state

        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        return dist.get_process_group_ranks(group)

    def shard_replica_ranks(self) -> list[int]:
        """With ``num_distributed_optimizer_instances`` N > 1, megatron-core splits the
        data-parallel (with context-parallel) group into N contiguous instances that shard the
        optimizer alike: the ranks at this rank's place in every instance hold its shard."""
        from megatron.core import parallel_state

        n = max((getattr(getattr(c, "ddp_config", None), "num_distributed_optimizer_instances", 1)
                 for c in self.model), default=1)
        me = dist.get_rank()
        if n <= 1:
            return [me]
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        ranks = dist.get_process_group_ranks(group)
        size = len(ranks) // n
        pos = ranks.index(me) % size
        return [ranks[k * size + pos] for k in range(n)]

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [inner for opt in sub_optimizers(self.optimizer)
                if (inner := getattr(opt, "optimizer", None)) is not None]

    def capture(self, meta: bool = True) -> RankState:
        state = RankState()
        for i, chunk in enumerate(self.model):
            sharded: set[int] = set()
            for g, b, bucket, shards, rank, _ in _param_shards(chunk):
                state.unique[f"model{i}/bucket_group{g}/bucket{b}/param_shard"] = shards[rank]
                sharded.update(id(p) for p in bucket.params_list)
            for name, p in chunk.named_parameters():
                if id(p) not in sharded:
                    state.replicated[f"model{i}/param/{name}"] = p.data
        for k, opt in enumerate(sub_optimizers(self.optimizer)):
            inner = getattr(opt, "optimizer", None)
            if inner is None:  # a rank with no trainable params in this sub-optimizer
                continue
            _ensure_adam_state(inner)
            for g, group in enumerate(inner.param_groups):
                for j, p in enumerate(group["params"]):
                    for key, value in inner.state[p].items():
                        if torch.is_tensor(value):
                            state.unique[f"optim{k}/group{g}/param{j}/{key}"] = value
            for g, shards in enumerate(getattr(opt, "shard_fp32_from_float16_groups", []) or []):
                for j, shard in enumerate(shards):
                    if shard is not None:
                        state.unique[f"optim{k}/main{g}/param{j}"] = shard
        if meta:
            state.meta = self._capture_meta()
            if self.resize is not None:  # read by any rank after a shrink or grow
                state.meta["shard_layout"] = self._shard_layout_bytes()
        return state

    def left_out_bytes(self) -> int:
        """The other ranks' shards of each bucket: ``capture`` holds only this rank's."""
        return sum(tensor_bytes(shards) - tensor_bytes([shards[rank]])
                   for chunk in self.model for _, _, _, shards, rank, _ in _param_shards(chunk))

    def shard_layout(self) -> reshard.ShardLayout:
        """Which range of which parameter each of this rank's ``unique`` tensors holds: the
        DistributedOptimizer's own ranges for this rank (``gbuf_ranges``), so a snapshot can be
        re-partitioned over another data-parallel size (``runtime.reshard``). Computed once per
        partition."""
        if self._layout is None:
            self._layout = self._shard_layout()
            self._layout_bytes = None
        return self._layout

    def _shard_layout_bytes(self) -> bytes:
        """The layout pickled once per partition: a commit carries it in its meta, and a layout
        of thousands of parameters takes milliseconds to pickle."""
        layout = self.shard_layout()
        if self._layout_bytes is None:
            self._layout_bytes = pickle.dumps(layout, protocol=pickle.HIGHEST_PROTOCOL)
        return self._layout_bytes

    def _shard_layout(self) -> reshard.ShardLayout:
        from megatron.core import parallel_state as ps

        unique = self.capture(meta=False).unique
        names = {p: f"model{i}/{n}" for i, c in enumerate(self.model)
                 for n, p in c.named_parameters()}
        shards = [(rank, len(shards)) for chunk in self.model
                  for _, _, _, shards, rank, _ in _param_shards(chunk)]
        layout = reshard.ShardLayout(
            numel={name: p.numel() for p, name in names.items()},
            position=(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()),
            part=shards[0] if shards else (0, 1))
        shard_of = {p: f"model{i}/bucket_group{g}/bucket{b}/param_shard"
                    for i, chunk in enumerate(self.model)
                    for g, b, bucket, _, _, _ in _param_shards(chunk) for p in bucket.params_list}
        key_of = {id(t): key for key, t in unique.items()}
        for opt in sub_optimizers(self.optimizer):
            for per_dtype in getattr(opt, "gbuf_ranges", None) or []:
                for per_bucket in per_dtype.values():
                    for ranges in per_bucket:
                        for p, r in ranges["param_map"].items():
                            name, rng = names[p], r["param"]
                            layout.add(shard_of[p], reshard.Span(name, "param", rng.start,
                                                                 rng.end, r["gbuf_local"].start))
                            for kind, t in opt._get_main_param_and_optimizer_states(p).items():
                                key = key_of.get(id(t))
                                if key is None:  # an fp32 main param: a view of the param shard
                                    continue
                                kind = "main" if kind == "param" else kind
                                start, end = ((reshard.SCALAR, reshard.SCALAR) if t.dim() == 0
                                              else (rng.start, rng.end))
                                layout.add(key, reshard.Span(name, kind, start, end))
        layout.check_covers(unique)
        return layout

    def reshard(self, snapshots: Iterable[tuple[reshard.ShardLayout, dict[str, torch.Tensor]]]
                ) -> int:
        """Restore this rank's distributed-optimizer shards, and every sharded parameter, from
        the shards of another partitioning: ``snapshots`` are (layout, unique tensors) of every
        old data-parallel rank at this rank's model position. Local: no collective."""
        layout = self.shard_layout()
        mine = [(old, t) for old, t in snapshots if old.position == layout.position]
        logger.info("megatron reshard: %d old shards of position %s into this rank's",
                    len(mine), layout.position)
        space = reshard.assemble(mine)
        copied = reshard.scatter(space, layout, self.capture(meta=False).unique)
        sharded = {p for chunk in self.model for _, _, bucket, _, _, _ in _param_shards(chunk)
                   for p in bucket.params_list}
        with torch.no_grad():  # every parameter whole: the shards' all-gather, done locally
            for i, chunk in enumerate(self.model):
                for name, p in chunk.named_parameters():
                    if p in sharded:
                        whole = reshard.Span(f"model{i}/{name}", "param", 0, p.numel())
                        p.data.view(-1).copy_(space.get(whole))
        return copied

    def _capture_meta(self) -> dict[str, Any]:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        # the process's own generators are the runtime's (``runtime.rng``); the tracker's
        # named states are megatron-core's
        meta: dict[str, Any] = {
            "rng_tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
            # buffers may change outside the optimizer step (a MoE router's token counts and
            # expert bias): copied now, not by the snapshot's background copy
            "buffers": {f"model{i}/{name}": b.detach().clone()
                        for i, chunk in enumerate(self.model)
                        for name, b in chunk.named_buffers()},
        }
        groups = []
        for opt in sub_optimizers(self.optimizer):
            inner = getattr(opt, "optimizer", None)
            groups.append(
                [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
                if inner is not None
                else []
            )
            scaler = getattr(opt, "grad_scaler", None)
            if scaler is not None:
                meta.setdefault("grad_scalers", []).append(scaler.state_dict())
        meta["param_groups"] = groups
        if self.scheduler is not None:
            meta["scheduler"] = self.scheduler.state_dict()
        if self.progress is not None:
            meta["progress"] = {
                a: getattr(self.progress, a)
                for a in self.progress_attrs
                if hasattr(self.progress, a)
            }
        return meta

    def restore(self, state: RankState, old_shards=None) -> None:
        """``old_shards``: (layout, unique tensors) of the old partition's shards at this
        rank's position, after the data-parallel size changed: the unique state is taken from
        them (``reshard``) instead of from ``state``."""
        live = self.capture(meta=False)
        parts = [(live.replicated, state.replicated)]
        if old_shards is None:
            parts.append((live.unique, state.unique))
        missing = {key for dst, src in parts for key in set(dst) - set(src)}
        if missing:
            raise KeyError(f"restore: state lacks {sorted(missing)[:5]} ({len(missing)} keys)")
        with torch.no_grad():
            for dst_part, src_part in parts:
                for key, dst in dst_part.items():
                    src = src_part[key]
                    if dst.shape != src.shape or dst.dtype != src.dtype:
                        raise ValueError(
                            f"restore: {key} is {src.dtype}{tuple(src.shape)}, "
                            f"live is {dst.dtype}{tuple(dst.shape)}"
                        )
                    dst.copy_(src)
        if old_shards is None:
            self._gather_params()
        else:
            self.reshard(old_shards)
        self._restore_meta(state.meta)

    def _gather_params(self) -> None:
        """Every rank of a bucket's data-parallel group has its shard of the bucket back: the
        group exchanges the shards, as the optimizer step's all-gather does. A collective: every
        rank restores at the same time (a recovery restores every rank)."""
        for chunk in self.model:
            for bucket_group in _bucket_groups(chunk):
                bucket_group.param_gather_handle = None  # one in flight was cut by the fault
        gather_shards([(shards, rank, group) for chunk in self.model
                       for _, _, _, shards, rank, group in _param_shards(chunk)])

    def _restore_meta(self, meta: dict[str, Any]) -> None:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        if "rng_tracker" in meta:
            states = {k: v.clone() for k, v in meta["rng_tracker"].items()}
            get_cuda_rng_tracker().set_states(states)
        saved = meta.get("buffers", {})
        with torch.no_grad():
            for i, chunk in enumerate(self.model):
                for name, b in chunk.named_buffers():
                    if f"model{i}/{name}" in saved:
                        b.copy_(saved[f"model{i}/{name}"])
        if self.scheduler is not None and "scheduler" in meta:
            # load_state_dict() *adds* the saved step count to the current one.
            self.scheduler.num_steps = 0
            self.scheduler.load_state_dict(meta["scheduler"])
        scalers = iter(meta.get("grad_scalers", []))
        for opt, groups in zip(sub_optimizers(self.optimizer), meta.get("param_groups", [])):
            inner = getattr(opt, "optimizer", None)
            if inner is not None:
                for live, saved in zip(inner.param_groups, groups):
                    live.update(saved)
            if getattr(opt, "grad_scaler", None) is not None:
                opt.grad_scaler.load_state_dict(next(scalers))
        for attr, value in meta.get("progress", {}).items():
            setattr(self.progress, attr, value)

    # ------------------------------------------------------------------ groups

    def roots(self) -> list[Any]:
        """Everything that may cache a group: the model chunks, optimizer, scheduler, extra roots
        and megatron-core's module namespaces (module-level caches)."""
        roots: list[Any] = [self.model, self.optimizer]
        if self.scheduler is not None:
            roots.append(self.scheduler)
        return roots + self.extra_roots + rebind.megatron_module_roots()

    def teardown(self) -> None:
        """Remember the old groups by role, then drop megatron's parallel state.

        Works before or after the runtime destroyed the old world: megatron's groups are read
        from parallel_state, the old default group from the world if it still exists, else from
        the last build.
        """
        t0 = time.perf_counter()
        roles = parallel_state_hook.group_roles()
        world_groups = list(c10d._world.pg_map) if dist.is_initialized() else []
        if self._torn_down:
            # the rebuild after the last teardown did not complete (a new fault interrupted it):
            # the framework's objects still hold the groups taken down then, so the map starts
            # from those; whatever the attempt built is retired with them
            self._retire = _unique([*self._retire, *roles.values()])
            self._old_groups = _unique([*self._old_groups, *roles.values(), *world_groups])
        else:
            if dist.is_initialized():
                self._world = c10d._get_default_group()
            if self._world is not None:
                roles["WORLD"] = self._world
            self._old_roles = roles
            # Retire what megatron held; count references to every group of the old world.
            self._retire = _unique(roles.values())
            self._old_groups = _unique([*roles.values(), *world_groups])
        self._torn_down = True
        parallel_state_hook.teardown()
        self.last_rebuild = {"teardown_s": time.perf_counter() - t0}

    def rebuild(self) -> bool:
        """Rebuild parallel_state on the new world, rebind, retire the old groups, check;
        whether the model and optimizer were built again (the data-parallel size changed)."""
        if not self._old_roles:
            raise RuntimeError("rebuild() without a preceding teardown()")
        t0 = time.perf_counter()
        parallel_state_hook.rebuild_model_parallel()
        self._world = c10d._get_default_group()
        resized = self._resize_if_needed()
        t1 = time.perf_counter()
        mapping = rebind.build_group_map(self._old_roles, parallel_state_hook.group_roles(),
                                         resized=resized)
        roots = self.roots()
        replaced = rebind.rebind(roots, mapping)
        t2 = time.perf_counter()
        retired = rebind.retire_groups(self._retire, "fr_megatron: group of a previous generation")
        stale = rebind.count_old_group_references(roots, self._old_groups)
        t3 = time.perf_counter()
        self.last_rebuild.update(
            initialize_model_parallel_s=t1 - t0,
            rebind_s=t2 - t1,
            retire_and_check_s=t3 - t2,
            references_replaced=replaced,
            groups_retired=retired,
        )
        logger.info("megatron rebuild: %s", self.last_rebuild)
        if stale:
            raise RuntimeError(f"{stale} references to old process groups survived the rebind")
        self._torn_down = False
        return resized

    def _resize_if_needed(self) -> bool:
        """The world's data-parallel size changed: model, optimizer and scheduler are built
        again for it (``resize``), their state restored later from the old shards."""
        dp = resized_to(self._data_parallel_size, self._current_data_parallel_size(),
                        self.resize, "its model and optimizer")
        if dp is None:
            return False
        model, self.optimizer, self.scheduler = self.resize()
        self.model = list(model) if isinstance(model, (list, tuple)) else [model]
        self._data_parallel_size, self._layout = dp, None
        logger.info("megatron resize: data-parallel size %s, model and optimizer built again", dp)
        return True

    def group_kinds(self) -> dict[str, list[Any]]:
        """parallel_state's groups by kind (``inject.GROUP_KINDS``); "dist_opt" is the group the
        DistributedOptimizer all-gathers updated parameters in: the DDP bucket groups' (the
        data-parallel group with CP, not parallel_state's world-sized "intra distributed
        optimizer instance" group)."""
        from megatron.core import parallel_state as ps

        getters = {
            "tp": ps.get_tensor_model_parallel_group,
            "pp": ps.get_pipeline_model_parallel_group,
            "dp": lambda check_initialized: ps.get_data_parallel_group(with_context_parallel=True),
            "cp": ps.get_context_parallel_group,
            "ep": ps.get_expert_model_parallel_group,
            "embd": ps.get_embedding_group,
            "mp": ps.get_model_parallel_group,
        }
        kinds = {}
        for kind, get in getters.items():
            try:
                group = get(check_initialized=False)
            except (AssertionError, AttributeError, RuntimeError, TypeError):
                continue
            if isinstance(group, dist.ProcessGroup):  # a non-member holds no group of the kind
                kinds[kind] = [group]
        buckets = [bg for chunk in self.model for bg in _bucket_groups(chunk)]
        gather = _unique(getattr(bg, "intra_distributed_optimizer_instance_group", None)
                         for bg in buckets)
        if gather:
            kinds["dist_opt"] = gather
        return kinds

    @property
    def old_groups(self) -> list[dist.ProcessGroup]:
        """The groups of the world before the last teardown (megatron's are retired by rebuild)."""
        return list(self._old_groups)

    def old_group_references(self, old_groups: list[Any] | None = None) -> int:
        """References from the job's objects to ``old_groups`` and the groups seen at teardown."""
        return rebind.count_old_group_references(
            self.roots(), _unique([*self._old_groups, *(old_groups or [])])
        )

    def load_checkpoint(self, directory: str) -> int | None:
        """Load the latest dist_checkpointing checkpoint of ``--save DIR`` (see ``checkpoint``);
        the runtime step it ends: its iteration less the one the job started at (the
        ``start_iteration`` of the progress object, when it has one)."""
        from fr_megatron.megatron import checkpoint

        if checkpoint.latest(directory) is None:
            return None
        view = _CheckpointView(self)
        iteration = checkpoint.load(view, directory)
        from_checkpoint = getattr(self.progress, "from_checkpoint", None)
        if from_checkpoint is not None:  # counters under other names (Megatron-LM's args)
            from_checkpoint(view)
        for attr in self.progress_attrs:  # the counters the checkpoint restored
            if self.progress is not None and hasattr(view, attr):
                setattr(self.progress, attr, getattr(view, attr))
        return iteration - getattr(self.progress, "start_iteration", 0)


class _CheckpointView:
    """What ``checkpoint.load`` reads and writes of a job, over the integration's objects."""

    def __init__(self, integration: MegatronIntegration):
        self.model, self.optimizer = integration.model, integration.optimizer
        self.scheduler = integration.scheduler
        for attr in ("iteration", "consumed_samples"):
            if integration.progress is not None and hasattr(integration.progress, attr):
                setattr(self, attr, getattr(integration.progress, attr))


def _unique(groups: Iterable[Any]) -> list[dist.ProcessGroup]:
    seen: dict[int, dist.ProcessGroup] = {}
    for g in groups:
        if isinstance(g, dist.ProcessGroup):
            seen.setdefault(id(g), g)
    return list(seen.values())
