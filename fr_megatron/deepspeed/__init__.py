"""DeepSpeed support: ``initialize`` is ``deepspeed.initialize`` plus flash recovery.

The ``"flash_recovery"`` section of the ds_config is read and validated before DeepSpeed creates
any process group; the returned engine carries its :class:`DeepSpeedIntegration` as
``engine.flash_recovery`` (None when the section is absent or disabled) for the runtime.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

from fr_megatron.config import ConfigError, FlashRecoveryConfig
from fr_megatron.deepspeed.config import (check_replicas, ds_config_dict, read_section, validate,
                                          zero_stage)
from fr_megatron.deepspeed.integration import DeepSpeedIntegration, UnsupportedEngine
from fr_megatron.deepspeed.mpu import MegatronCoreMPU, parallel_state_rebuilder

__all__ = ["initialize", "DeepSpeedIntegration", "UnsupportedEngine", "validate", "read_section",
           "ConfigError", "FlashRecoveryConfig", "MegatronCoreMPU", "parallel_state_rebuilder",
           "configured_data_parallel_size"]

log = logging.getLogger(__name__)


def _user_config(args, config, kw) -> Any:
    if config is not None:
        return config
    if kw.get("config_params") is not None:
        return kw["config_params"]
    return getattr(args, "deepspeed_config", None)


def _job_and_world_size() -> tuple[int, int]:
    """The job's configured world size (``fr-megatron run`` and DeepSpeed's launcher set
    WORLD_SIZE to it) and the current one, smaller in a job that went on with fewer replicas."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    job = os.environ.get("WORLD_SIZE", "")
    job = int(job) if job.isdigit() else world
    return job or 1, world or job or 1


def configured_data_parallel_size(current: int) -> int:
    """The data-parallel size the job was configured with, from the ``current`` one: a job that
    goes on with fewer replicas keeps its model-parallel layout, so both scale with the world."""
    job, world = _job_and_world_size()
    return current * job // world


def initialize(args=None, model=None, optimizer=None, model_parameters=None, config=None, *,
               mpu=None, rebuild_mpu: Optional[Callable[[], None]] = None,
               dp_size: Optional[int] = None, resize: Optional[Callable[[], Any]] = None, **kw):
    """``deepspeed.initialize`` with the ``"flash_recovery"`` section validated first.

    Same arguments and return value as ``deepspeed.initialize`` (the config is passed through as
    given; DeepSpeed ignores the extra top-level key). Under ``fr-megatron run`` the Session has made
    the default group already: pass ``dist_init_required=False`` so that DeepSpeed uses it.
    ``rebuild_mpu``: when ``mpu`` is given, the callback that recreates its groups on a new world
    (see ``DeepSpeedIntegration``; for Megatron-core's parallel_state, ``MegatronCoreMPU`` and
    ``parallel_state_rebuilder`` in ``fr_megatron.deepspeed.mpu``). ``dp_size``:
    the data-parallel size, when it cannot be inferred from the mpu, the batch sizes or WORLD_SIZE.
    ``resize``: builds the engine again on the current world, as the script's set-up does (this
    function's result or its engine); with it the job can go on with fewer data-parallel replicas
    and grow back (the ``shrink`` setting), its ZeRO partitions re-partitioned in memory.
    Raises ConfigError before any process group is touched.
    """
    import deepspeed

    user_config = _user_config(args, config, kw)
    # the replicas are checked against the job's configured layout; in a shrunk world the sizes
    # at hand are the current ones, so the check waits for the engine (below)
    job, world = _job_and_world_size()
    cfg = validate(user_config, dp_size=dp_size, mpu=mpu, replicas=job == world)
    result = deepspeed.initialize(args=args, model=model, optimizer=optimizer,
                                  model_parameters=model_parameters, config=config, mpu=mpu, **kw)
    engine = result[0]
    if not cfg.enabled:
        engine.flash_recovery = None
        return result
    check_replicas(cfg, configured_data_parallel_size(engine.seq_dp_world_size))
    engine.flash_recovery = DeepSpeedIntegration(engine, cfg, mpu=mpu, rebuild_mpu=rebuild_mpu,
                                                  resize=resize)
    log.info("flash recovery on: ZeRO stage %d, replica group %s", zero_stage(ds_config_dict(engine)),
             engine.flash_recovery.replica_ranks())
    return result
