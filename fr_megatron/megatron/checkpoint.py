"""Disk checkpoints of a megatron-core job with ``megatron.core.dist_checkpointing``.

What Megatron-LM's ``--save DIR --save-interval K`` / ``--load DIR`` do, for a
``fr_megatron.megatron.model.TinyGPTJob``-like job (``model``: DDP-wrapped chunks, ``optimizer``:
the (Chained)DistributedOptimizer, ``scheduler``: an ``OptimizerParamScheduler`` or None,
``iteration`` / ``consumed_samples`` counters)::

    DIR/iter_0000004/                  one dist_checkpointing checkpoint per saved step
    DIR/latest_checkpointed_iteration.txt

The tracker file is written last, by rank 0, after every rank has finished its part of the
checkpoint (``dist_checkpointing.save`` ends with a barrier and writes ``metadata.json`` last), to a
temporary file that is fsynced and renamed over the old one: a crash while saving leaves the
previous checkpoint as the latest one, never a half-written one.

The checkpoint holds what Megatron-LM's holds: the model's ``sharded_state_dict`` (of the unwrapped
GPTModel, so the keys are Megatron-LM's), the DistributedOptimizer's ``sharded_state_dict``
(``dp_reshardable``: each rank writes its own shard, no gather), the scheduler's state, the step,
the counters, and the RNG states. RNG states (Python's, numpy's, torch's CPU generator, the CUDA
one when there is one, megatron's RNG tracker) are saved per global rank (a ``ShardedObject`` of
shape ``(world,)``), so a checkpoint loads back only into the same world size and TP x PP layout;
``load`` checks that.

What megatron-core 0.16.1 does on CPU with gloo, and how this module deals with it:

* The default ``torch_dist`` backend (torch.distributed.checkpoint, ``TorchDistSaveShardedStrategy``
  / the default load strategy) works as is on a gloo default group: its collectives (plans,
  ``all_gather_object`` of the sharding metadata for ``validate_access_integrity``, barriers) all
  run on the default group, and gloo runs them on CPU tensors. Nothing CPU-specific is needed
  besides what the job's CPU mode already bridges (on GPUs it runs on NCCL, as in Megatron-LM).
* ``FileSystemWriterAsync`` fetches its results queue from a ``multiprocessing`` *spawn*
  ``Manager`` the first time a rank saves: that starts a server process which re-imports the main
  script (which must be guarded by ``if __name__ == "__main__"``), which multiplies the first
  save's time several times over. A synchronous save produces and consumes the results in the
  calling process, so ``save`` hands it a plain ``queue.Queue`` instead (``_in_process_queue``).
  The writer still forks one process per ``thread_count`` bucket per save (we use 1).
* Adam's ``step`` without apex/TE (torch's Adam): ``DistributedOptimizer.state_dict()`` keeps it
  only as one number in the param groups; ``load_state_dict`` puts *one* tensor holding it into
  every parameter's state, and then ``load_parameter_state_from_dp_reshardable`` copies the
  *live* optimizer's ``step`` (0 in a fresh process) over that shared tensor. Left so, training
  goes on with Adam's bias correction of step 1 (and a shared tensor that torch's Adam would
  increment once per parameter), without any error. ``load`` sets every parameter's ``step`` to
  its own tensor holding the checkpoint's number, and checks it.
* A fresh DistributedOptimizer has no Adam state until its first step, and its ``state_dict()``
  (called by ``sharded_state_dict(is_loading=True)``) asserts on the missing ``step``: ``load``
  creates the state first, as torch's Adam would (zeros, overwritten by the load).
* ``OptimizerParamScheduler.load_state_dict`` *adds* the saved step count to the live one;
  ``load`` zeroes it first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from fr_megatron.runtime import rng

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
SHARDING_TYPE = "dp_reshardable"


def checkpoint_dir(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"iter_{step:07d}"


def latest(directory: str | os.PathLike) -> Optional[int]:
    """The step recorded in ``DIR/latest_checkpointed_iteration.txt``, None if there is none."""
    try:
        text = (Path(directory) / TRACKER).read_text().strip()
    except FileNotFoundError:
        return None
    try:
        return int(text)
    except ValueError as e:
        raise ValueError(f"{Path(directory) / TRACKER}: not a step number: {text!r}") from e


# ---------------------------------------------------------------- state dicts


def _unwrapped(job) -> list[torch.nn.Module]:
    from megatron.core.utils import unwrap_model

    return unwrap_model(list(job.model))


def _model_keys(n: int) -> list[str]:
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def _topology() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"world": dist.get_world_size(),
            "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _rng_state() -> dict[str, Any]:
    """Megatron-LM's ``get_rng_state`` for this rank: the process's generators and the tracker."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {**rng.capture(), "rng_tracker_states": {
        k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}}


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    rng.restore(state)
    get_cuda_rng_tracker().set_states({k: v.clone()
                                       for k, v in state["rng_tracker_states"].items()})


def _sharded_state_dict(job, step: int, *, loading: bool) -> dict[str, Any]:
    """Megatron-LM's checkpoint layout (``generate_state_dict``), for this job."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    metadata = {"distrib_optim_sharding_type": SHARDING_TYPE}
    chunks = _unwrapped(job)
    state: dict[str, Any] = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": step,
                             "topology": _topology()}
    model_sd: dict[str, Any] = {}
    for key, chunk in zip(_model_keys(len(chunks)), chunks):
        state[key] = chunk.sharded_state_dict(metadata=metadata)
        model_sd.update(state[key])
    state["optimizer"] = job.optimizer.sharded_state_dict(model_sd, is_loading=loading,
                                                          metadata=metadata)
    if getattr(job, "scheduler", None) is not None:
        state["opt_param_scheduler"] = job.scheduler.state_dict()
    state["progress"] = {a: getattr(job, a) for a in ("iteration", "consumed_samples")
                         if hasattr(job, a)}
    rank, world = dist.get_rank(), dist.get_world_size()
    state["rng_state"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    return state


def _adam_steps(job) -> list[float]:
    from fr_megatron.megatron.integration import sub_optimizers

    steps = []
    for opt in sub_optimizers(job.optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            steps += [float(s["step"]) for s in inner.state.values() if "step" in s]
    return steps


def _ensure_optimizer_state(job) -> None:
    """A DistributedOptimizer that never stepped has no Adam state, and its ``state_dict()``
    (which ``sharded_state_dict(is_loading=True)`` calls) asserts on the missing ``step``."""
    from fr_megatron.megatron.integration import _ensure_adam_state, sub_optimizers

    for opt in sub_optimizers(job.optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            _ensure_adam_state(inner)


def _restore_adam_steps(job, step: float) -> None:
    """Give every parameter its own Adam ``step`` tensor holding the checkpoint's ``step``."""
    from fr_megatron.megatron.integration import sub_optimizers

    for opt in sub_optimizers(job.optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for s in inner.state.values():
            if torch.is_tensor(s.get("step")):
                s["step"] = torch.tensor(float(step), dtype=s["step"].dtype,
                                         device=s["step"].device)


@contextlib.contextmanager
def _in_process_queue():
    """A synchronous save writes and reads its results in this process: no spawn Manager."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    saved = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = saved


# ---------------------------------------------------------------- save / load


def save(job, step: int, directory: str | os.PathLike) -> Path:
    """Save the job's full training state after ``step`` finished steps; every rank calls it.

    Returns the checkpoint's directory. ``latest(directory)`` says ``step`` only once every rank
    has written its part.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    t0 = time.monotonic()
    rank = dist.get_rank()
    target = checkpoint_dir(directory, step)
    if rank == 0:
        if target.exists():  # an earlier attempt that never became "latest"
            shutil.rmtree(target)
        target.mkdir(parents=True)
    dist.barrier()
    state = _sharded_state_dict(job, step, loading=False)
    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
    with _in_process_queue():
        dist_checkpointing.save(state, str(target), sharded_strategy=strategy,
                                content_metadata={"distrib_optim_sharding_type": SHARDING_TYPE})
    dist.barrier()  # every rank's files and metadata.json are written
    if rank == 0:
        _write_tracker(Path(directory), step)
    dist.barrier()
    if rank == 0:
        log.info("saved checkpoint of step %d to %s in %.3f s", step, target, time.monotonic() - t0)
    return target


def _write_tracker(directory: Path, step: int) -> None:
    tmp = directory / f".{TRACKER}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / TRACKER)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(job, directory: str | os.PathLike, step: Optional[int] = None) -> int:
    """Load the checkpoint of ``step`` (default: the latest) into ``job``; every rank calls it.

    Returns the step loaded, or 0 (and loads nothing) when ``directory`` holds no checkpoint and
    no ``step`` was asked for, as Megatron-LM's ``--load`` does.
    """
    from megatron.core import dist_checkpointing

    t0 = time.monotonic()
    if step is None:
        step = latest(directory)
        if step is None:
            if dist.get_rank() == 0:
                log.warning("no checkpoint in %s (no %s): starting from scratch", directory,
                            TRACKER)
            return 0
    target = checkpoint_dir(directory, step)
    if not (target / "metadata.json").exists():
        raise FileNotFoundError(f"no complete checkpoint of step {step} in {target}")
    common = dist_checkpointing.load_common_state_dict(str(target))
    if common.get("topology") != _topology():
        raise ValueError(f"{target} was saved with {common.get('topology')}, this job is "
                         f"{_topology()}: RNG states are per rank, load into the same layout")
    meta = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    if meta.get("distrib_optim_sharding_type", SHARDING_TYPE) != SHARDING_TYPE:
        raise ValueError(f"{target}: optimizer sharding {meta['distrib_optim_sharding_type']}, "
                         f"expected {SHARDING_TYPE}")

    _ensure_optimizer_state(job)
    sharded = _sharded_state_dict(job, step, loading=True)
    state = dist_checkpointing.load(sharded, str(target))
    if state["iteration"] != step:
        raise ValueError(f"{target} holds iteration {state['iteration']}, not {step}")

    chunks = _unwrapped(job)
    # with fp32 params the optimizer's main params are views of the model's (leaves that
    # require grad): the in-place copies of the load need no_grad
    with torch.no_grad():
        for key, chunk in zip(_model_keys(len(chunks)), chunks):
            chunk.load_state_dict(state[key], strict=True)
        job.optimizer.load_state_dict(state["optimizer"])
    expected = _saved_adam_step(state["optimizer"])
    if expected is not None:  # torch's Adam (no apex/TE): see the module docstring
        _restore_adam_steps(job, expected)
        got = set(_adam_steps(job))
        if got and got != {float(expected)}:
            raise RuntimeError(f"{target}: Adam steps restored as {sorted(got)}, checkpoint "
                               f"has {expected}")
    if getattr(job, "scheduler", None) is not None:
        if "opt_param_scheduler" not in state:
            raise KeyError(f"{target} has no opt_param_scheduler")
        job.scheduler.num_steps = 0  # load_state_dict adds the saved count to the live one
        job.scheduler.load_state_dict(state["opt_param_scheduler"])
    for attr, value in state.get("progress", {}).items():
        setattr(job, attr, value)
    _set_rng_state(state["rng_state"])
    dist.barrier()
    if dist.get_rank() == 0:
        log.info("loaded checkpoint of step %d from %s in %.3f s", step, target, time.monotonic() - t0)
    return step


def _saved_adam_step(opt_state: Any) -> Optional[float]:
    """The ``step`` the DistributedOptimizer's param groups carried, if one."""
    steps = set()

    def walk(x):
        if isinstance(x, dict):
            if "param_groups" in x and isinstance(x["param_groups"], list):
                steps.update(g["step"] for g in x["param_groups"] if "step" in g)
            for v in x.values():
                walk(v)

    walk(opt_state)
    if len(steps) > 1:
        raise ValueError(f"optimizer param groups disagree on Adam's step: {sorted(steps)}")
    return steps.pop() if steps else None
