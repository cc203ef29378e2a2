"""The one schema of fr_megatron's settings.

The same model is read from the DeepSpeed config's ``"flash_recovery"`` section, from Megatron
``--flash-recovery-*`` flags, from the ``fr-megatron`` CLI and from the environment the launcher
hands to workers. Errors name the field, what was wrong, and the allowed values.
"""

from __future__ import annotations

import json
import os
from typing import ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A bad setting; the message names the field and the fix."""


class WandbConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(True, description="log recovery events to wandb when wandb is importable")
    project: str = Field("fr_megatron", description="wandb project")
    mode: Optional[Literal["online", "offline", "disabled"]] = Field(
        None, description="wandb mode; default: WANDB_MODE or offline")
    dir: Optional[str] = Field(None, description="directory wandb writes its run into")
    tags: list[str] = Field(default_factory=list, description="extra run tags")


class FlashRecoveryConfig(BaseModel):
    """Settings of flash recovery; every field has a safe default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(True, description="turn flash recovery on")
    heartbeat_interval: float = Field(0.5, gt=0, le=60, description="seconds between heartbeats")
    hang_timeout: Union[Literal["auto"], float] = Field(
        "auto", description="seconds without step progress that count as a hang, or 'auto' "
                            "(derived from observed step times)")
    hang_timeout_min: float = Field(5.0, gt=0, description="lower bound of the 'auto' hang timeout")
    node_timeout: float = Field(3.0, gt=0, le=600,
                                description="seconds without its agent's heartbeat after which a "
                                            "node counts as lost (and fences itself)")
    checkpoint_timeout: float = Field(
        1800.0, gt=0, description="seconds a disk checkpoint save may take before the rank saving "
                                  "it counts as hung (the hang timeout is for steps)")
    stop_timeout: float = Field(
        120.0, ge=0, description="seconds ranks that save a checkpoint when the job is stopped "
                                 "(SIGTERM, Ctrl-C) get before they are killed")
    replicas: int = Field(1, ge=1, le=8, description="redundant copies of each rank's unique state")
    snapshot_depth: int = Field(2, ge=2, le=4, description="committed steps kept for rollback")
    snapshot_dir: Optional[str] = Field(
        "/dev/shm", description="node-local shared-memory directory (a tmpfs) the node agent keeps "
                                "the ranks' snapshots in, so a replacement on the same node "
                                "restores from them with no transfer; empty: keep them in "
                                "process memory and copy unique state to peers every step")
    spares: int = Field(1, ge=0, le=64, description="warm spare processes per node")
    shrink: Literal["no-spare", "never", "always"] = Field(
        "no-spare", description="remove a lost rank's data-parallel replica and go on with fewer "
                                "replicas, same global batch: 'no-spare' when no replacement "
                                "can be placed (a node lost with no spare node, a rank failing "
                                "again and again), 'never' (the job stops then), 'always' "
                                "(instead of any replacement)")
    controller: Optional[str] = Field(None, description="controller address HOST:PORT")
    journal: Optional[str] = Field(None, description="path of the JSON-lines event journal")
    checkpoint_dir: Optional[str] = Field(
        None, description="fallback checkpoint directory, used only when a rank and every holder of "
                          "its copy are lost together")
    verify_checksums: bool = Field(True, description="verify checksums of state received from peers")
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @field_validator("hang_timeout", mode="before")
    @classmethod
    def _hang_timeout(cls, v):
        if isinstance(v, str) and v != "auto":
            try:
                v = float(v)
            except ValueError:
                raise ValueError("must be 'auto' or a number of seconds") from None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0:
            raise ValueError("must be a positive number of seconds or 'auto'")
        return v

    @field_validator("controller")
    @classmethod
    def _controller(cls, v):
        if v is not None:
            parse_address(v, "controller")
        return v

    # ---- readers -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, where: str = "flash_recovery") -> "FlashRecoveryConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected an object with keys {sorted(cls.model_fields)}, "
                              f"got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, where, cls)) from None

    def to_env(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_env(cls, env=os.environ) -> "FlashRecoveryConfig":
        raw = env.get("FR_CONFIG")
        return cls.from_dict(json.loads(raw), "FR_CONFIG") if raw else cls()

    # the first step after a recovery: survivors wait in it for a replacement's one-off costs
    # (first calls into everything, on a busy node), which can exceed ten steady steps; with
    # the plain timeout the survivors waiting there would be blamed for a hang
    RESUME_HANG_FACTOR: ClassVar[float] = 3.0

    def step_hang_timeout(self, phase: str, step_times: list[float], resuming: bool) -> float:
        """The hang timeout a rank reports for where it is: ``checkpoint_timeout`` in the
        "checkpoint" phase; unbounded before its first step has finished (start-up, a
        replacement's first step); else the hang timeout, ``RESUME_HANG_FACTOR`` times it in
        the first step after a recovery."""
        if phase == "checkpoint":
            return self.checkpoint_timeout
        if not step_times:
            return 1e9
        timeout = self.resolved_hang_timeout(step_times[-50:])
        return timeout * self.RESUME_HANG_FACTOR if resuming else timeout

    def resolved_hang_timeout(self, step_times: list[float]) -> float:
        """The hang timeout in seconds: fixed, or 'auto' = 10x the median observed step time."""
        if self.hang_timeout != "auto":
            return float(self.hang_timeout)
        if not step_times:
            return max(self.hang_timeout_min, 30.0)
        med = sorted(step_times)[len(step_times) // 2]
        return max(self.hang_timeout_min, 10.0 * med)


def _allowed(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        if isinstance(part, str) and part in model.model_fields:
            ann = model.model_fields[part].annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                model = ann
    return sorted(model.model_fields)


def format_validation_error(e: ValidationError, where: str, model: type[BaseModel]) -> str:
    lines = []
    for err in e.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}.{key}: unknown key; allowed keys: {', '.join(_allowed(model, loc))}")
        else:
            lines.append(f"{where}.{key}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)


def parse_address(value: str, field: str = "address") -> tuple[str, int]:
    """'HOST:PORT' → (host, port), or a ConfigError naming ``field``."""
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{field}: {value!r} is not HOST:PORT (e.g. 127.0.0.1:29400)")
    return host.strip("[]"), int(port)
