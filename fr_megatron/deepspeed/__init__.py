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
from fr_megatron.deepspeed.integration import DeepSpeedIntegration, UnsupportedEngine, resizing
from fr_megatron.deepspeed.mpu import MegatronCoreMPU, parallel_state_rebuilder

__all__ = ["initialize", "DeepSpeedIntegration", "UnsupportedEngine", "validate", "read_section",
           "ConfigError", "FlashRecoveryConfig", "MegatronCoreMPU", "parallel_state_rebuilder"]

log = logging.getLogger(__name__)


def _user_config(args, config, kw) -> Any:
    if config is not None:
        return config
    if kw.get("config_params") is not None:
        return kw["config_params"]
    return getattr(args, "deepspeed_config", None)


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
    # the replicas are checked against the configured layout, by the job's first processes: an
    # engine built again at another data-parallel size (a shrink to one replica), or by a
    # replacement in such a world, keeps its copies where the runtime can place them
    at_start = not resizing() and os.environ.get("FR_REPLACEMENT") != "1"
    cfg = validate(user_config, dp_size=dp_size, mpu=mpu, replicas=at_start)
    result = deepspeed.initialize(args=args, model=model, optimizer=optimizer,
                                  model_parameters=model_parameters, config=config, mpu=mpu, **kw)
    engine = result[0]
    if not cfg.enabled:
        engine.flash_recovery = None
        return result
    if at_start:  # inference above may have lacked the sizes
        check_replicas(cfg, engine.seq_dp_world_size)
    engine.flash_recovery = DeepSpeedIntegration(engine, cfg, mpu=mpu, rebuild_mpu=rebuild_mpu,
                                                  resize=resize)
    log.info("flash recovery on: ZeRO stage %d, replica group %s", zero_stage(ds_config_dict(engine)),
             engine.flash_recovery.replica_ranks())
    return result
