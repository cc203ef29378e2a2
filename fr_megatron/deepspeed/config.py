"""The ``"flash_recovery"`` section of a DeepSpeed config, checked before any process group exists.

DeepSpeed accepts an unknown top-level key, so the section travels in the user's ds_config unchanged.
Everything that can be wrong with it (bad values, an unsupported ZeRO stage, more replicas than
data-parallel peers) is reported here, before ``deepspeed.initialize`` creates groups, so a bad
setting costs no rendezvous and leaves no half-built world behind.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any, Optional

from fr_megatron.config import ConfigError, FlashRecoveryConfig

SECTION = "flash_recovery"
SUPPORTED_ZERO_STAGES = (0, 1, 2)


def ds_config_dict(config: Any) -> dict:
    """The ds_config as a dict, from whatever DeepSpeed itself accepts or holds.

    ``config``: a dict; a path to a JSON file; a base64-encoded JSON string (as DeepSpeed's launcher
    passes it); a ``DeepSpeedConfig``; or a DeepSpeed engine (its ``_config`` / ``config``).
    """
    if config is None:
        return {}
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, os.PathLike)):
        return _load(os.fspath(config))
    param_dict = getattr(config, "_param_dict", None)           # a DeepSpeedConfig
    if isinstance(param_dict, dict):
        return param_dict
    for attr in ("_config", "config"):                          # a DeepSpeedEngine
        inner = getattr(config, attr, None)
        if inner is not None and inner is not config:
            return ds_config_dict(inner)
    raise ConfigError(f"DeepSpeed config: expected a dict, a path to a JSON file or a DeepSpeed engine, "
                      f"got {type(config).__name__}")


def _load(path: str) -> dict:
    if os.path.exists(path):
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"DeepSpeed config {path}: not valid JSON ({e})") from None
    else:
        try:
            data = json.loads(base64.urlsafe_b64decode(path).decode("utf-8"))
        except Exception:
            raise ConfigError(f"DeepSpeed config {path!r}: no such file, and not base64-encoded "
                              f"JSON") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_section(config: Any) -> FlashRecoveryConfig:
    """The validated ``"flash_recovery"`` section; a config without one gives ``enabled=False``."""
    data = ds_config_dict(config)
    if SECTION not in data:
        return FlashRecoveryConfig(enabled=False)
    return FlashRecoveryConfig.from_dict(data[SECTION], where=SECTION)


def zero_stage(config: Any) -> int:
    """``zero_optimization.stage`` (0 when absent), or a ConfigError if it is not a stage number."""
    zero = ds_config_dict(config).get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ConfigError(f"zero_optimization: expected an object, got {type(zero).__name__}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage: expected 0, 1, 2 or 3 (got {stage!r})")
    return stage


def check_zero_stage(stage: int) -> None:
    """Flash recovery restores ZeRO-1/2 shards bit-exactly; ZeRO-3 is refused up front."""
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ConfigError(
            f"zero_optimization.stage={stage}: flash recovery supports ZeRO stages 0, 1 and 2 "
            f"(ZeRO-1 and ZeRO-2); ZeRO-3 is not supported yet. Use stage 1 or 2, or set "
            f'"{SECTION}": {{"enabled": false}}.')


def check_replicas(cfg: FlashRecoveryConfig, dp_size: int) -> None:
    """Each redundant copy lives on another data-parallel rank, so replicas <= dp_size - 1."""
    if not cfg.enabled:
        return
    if cfg.replicas > dp_size - 1:
        raise ConfigError(
            f"{SECTION}.replicas: {cfg.replicas} copies need at least {cfg.replicas + 1} data-parallel "
            f"ranks, but the data-parallel size is {dp_size}; allowed: 1..{max(dp_size - 1, 1)}"
            + (" (a data-parallel size of 1 has no peer to hold a copy: run with more data-parallel "
               f'ranks or set "{SECTION}": {{"enabled": false}})' if dp_size < 2 else ""))


def infer_dp_size(config: Any, world_size: Optional[int] = None, mpu: Any = None) -> Optional[int]:
    """The data-parallel size, without touching a process group when it can be helped.

    Order: ``mpu.get_data_parallel_world_size()`` (the mpu's groups exist already); the batch
    triple ``train_batch_size = micro_batch * grad_accum * dp``; WORLD_SIZE divided by DeepSpeed's
    AutoTP size. None when none of these is known.
    """
    if mpu is not None and hasattr(mpu, "get_data_parallel_world_size"):
        return int(mpu.get_data_parallel_world_size())
    data = ds_config_dict(config)
    tb, mb = data.get("train_batch_size"), data.get("train_micro_batch_size_per_gpu")
    ga = data.get("gradient_accumulation_steps")
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (tb, mb, ga)):
        if tb % (mb * ga) == 0:
            return tb // (mb * ga)
    if world_size is None and os.environ.get("WORLD_SIZE", "").isdigit():
        world_size = int(os.environ["WORLD_SIZE"])
    if world_size is None:
        return None
    tp = (data.get("tensor_parallel") or {}).get("autotp_size", 1) or 1
    seq = data.get("sequence_parallel_size", 1) or 1
    return max(world_size // (int(tp) * int(seq)), 1)


def validate(config: Any, dp_size: Optional[int] = None, mpu: Any = None,
             replicas: bool = True) -> FlashRecoveryConfig:
    """Every start-up check of the section: values, ZeRO stage and replicas against ``dp_size``
    (inferred when not given; ``replicas=False`` leaves that out). Touches no process group."""
    cfg = read_section(config)
    if not cfg.enabled:
        return cfg
    check_zero_stage(zero_stage(config))
    if not replicas:
        return cfg
    if dp_size is None:
        dp_size = infer_dp_size(config, mpu=mpu)
    if dp_size is not None:
        check_replicas(cfg, dp_size)
    return cfg
