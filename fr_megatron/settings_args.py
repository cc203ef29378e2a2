"""``--flash-recovery-*`` command-line flags, generated from the one settings schema.

Megatron-LM takes extra flags through ``extra_args_provider(parser)``. The flags here are derived
from :class:`~fr_megatron.config.FlashRecoveryConfig`'s fields (names, help texts, defaults), so a
new field gets a flag without a second list to keep in step. argparse only collects strings; the
values are converted and checked by the same pydantic model that reads the DeepSpeed section, and a
bad value is reported with the flag the user typed.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import dataclass
from typing import Any, Optional

from pydantic import BaseModel, ValidationError

from fr_megatron.config import ConfigError, FlashRecoveryConfig

PREFIX = "--flash-recovery"
GROUP_TITLE = "flash recovery"


@dataclass(frozen=True)
class FlagSpec:
    """One flag and the schema field it sets."""

    path: tuple[str, ...]  # field path in FlashRecoveryConfig, e.g. ("wandb", "enabled")
    flag: str              # e.g. "--flash-recovery-wandb"
    dest: str              # argparse attribute, e.g. "flash_recovery_wandb"
    kind: str              # "switch" (store_true), "bool" (--x/--no-x), "list" or "value"
    help: str
    metavar: Optional[str] = None


def _is_bool(ann) -> bool:
    return ann is bool or (typing.get_origin(ann) is typing.Union and bool in typing.get_args(ann)
                           and all(a in (bool, type(None)) for a in typing.get_args(ann)))


def _metavar(name: str, ann, description: str) -> str:
    if "HOST:PORT" in description:
        return "HOST:PORT"
    if name.endswith("dir"):
        return "DIR"
    if "path" in description:
        return "PATH"
    args = [a for a in typing.get_args(ann) if a is not type(None)] or [ann]
    parts = []
    for a in args:
        if typing.get_origin(a) is typing.Literal:
            parts.extend(str(v) for v in typing.get_args(a))
        elif a in (int, float):
            parts.append("SECONDS" if any(w in name for w in ("interval", "timeout")) else a.__name__.upper())
        else:
            parts.append(name.upper())
    return "|".join(parts) if len(parts) > 1 else parts[0]


def _default_text(value: Any) -> str:
    return "" if value is None or value == [] else f" (default: {value})"


def flag_specs(model: type[BaseModel] = FlashRecoveryConfig,
               path: tuple[str, ...] = ()) -> list[FlagSpec]:
    """The flags for ``model``'s fields, nested models flattened (``wandb.project`` →
    ``--flash-recovery-wandb-project``; a nested model's ``enabled`` is the bare prefix)."""
    specs: list[FlagSpec] = []
    for name, field in model.model_fields.items():
        sub = path + (name,)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            specs.extend(flag_specs(ann, sub))
            continue
        words = [p for p in sub if p != "enabled"]
        flag = "-".join([PREFIX] + [w.replace("_", "-") for w in words])
        dest = flag.lstrip("-").replace("-", "_")
        desc = field.description or name.replace("_", " ")
        default = None if field.default_factory is not None else field.default
        if sub == ("enabled",):
            specs.append(FlagSpec(sub, flag, dest, "switch", desc))
        elif _is_bool(ann):
            specs.append(FlagSpec(sub, flag, dest, "bool", desc + _default_text(default)))
        elif typing.get_origin(ann) is list:
            specs.append(FlagSpec(sub, flag, dest, "list", desc, name.upper()))
        else:
            specs.append(FlagSpec(sub, flag, dest, "value", desc + _default_text(default),
                                  _metavar(name, ann, desc)))
    return specs


SPECS: list[FlagSpec] = flag_specs()
_BY_PATH = {s.path: s for s in SPECS}


def flag_for(path: tuple[str, ...]) -> str:
    """The flag that sets the field at ``path`` (or the longest prefix that has one)."""
    for n in range(len(path), 0, -1):
        spec = _BY_PATH.get(tuple(str(p) for p in path[:n]))
        if spec is not None:
            return spec.flag
    return PREFIX + "-" + "-".join(str(p).replace("_", "-") for p in path)


def add_flash_recovery_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flash recovery flags to ``parser`` and return it (Megatron's ``extra_args_provider``).

    Values stay strings (default None = not given) so that ``config_from_args`` can validate them
    through the schema and name the flag on error, instead of argparse exiting with its own message.
    """
    group = parser.add_argument_group(GROUP_TITLE, "fast checkpoint-free failure recovery (fr_megatron)")
    for s in SPECS:
        if s.kind == "switch":
            group.add_argument(s.flag, dest=s.dest, action="store_true", help=s.help)
        elif s.kind == "bool":
            group.add_argument(s.flag, dest=s.dest, action=argparse.BooleanOptionalAction,
                               default=None, help=s.help)
        elif s.kind == "list":
            group.add_argument(s.flag, dest=s.dest, nargs="*", default=None, metavar=s.metavar,
                               help=s.help)
        else:
            group.add_argument(s.flag, dest=s.dest, default=None, metavar=s.metavar, help=s.help)
    return parser


def _put(data: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        data = data.setdefault(p, {})
    data[path[-1]] = value


def _reason(msg: str, path: tuple) -> str:
    """pydantic's wording, phrased for a flag ('Input should be ...' → 'must be ...')."""
    msg = msg.removeprefix("Value error, ")
    field = str(path[-1]) if path else ""
    msg = msg.removeprefix(f"{field}: ")
    if msg.startswith("Input should be "):
        msg = "must be " + msg[len("Input should be "):]
    return msg


def config_from_args(args: argparse.Namespace,
                     base: Optional[FlashRecoveryConfig] = None) -> FlashRecoveryConfig:
    """Validate the parsed flags through FlashRecoveryConfig; a ConfigError names the bad flag.

    ``enabled`` is ``--flash-recovery``; flags that were not given keep the values of ``base``
    (e.g. what the launcher handed the worker) or else the schema's defaults.
    """
    data: dict = base.model_dump() if base is not None else {}
    given: dict[tuple, Any] = {}
    for s in SPECS:
        value = getattr(args, s.dest, None)
        if s.kind == "switch":
            value = bool(value)
        elif value is None:
            continue
        _put(data, s.path, value)
        given[s.path] = value
    try:
        return FlashRecoveryConfig.model_validate(data)
    except ValidationError as e:
        lines: dict[str, str] = {}
        for err in e.errors():
            loc = tuple(err["loc"])
            flag = flag_for(loc)
            spec_path = next((p for p in given if loc[:len(p)] == p), loc)
            shown = given.get(spec_path, err.get("input"))
            shown = " ".join(map(str, shown)) if isinstance(shown, list) else shown
            lines.setdefault(flag, f"{flag}: {_reason(err['msg'], spec_path)} (got {shown})")
        raise ConfigError("; ".join(lines.values())) from None
