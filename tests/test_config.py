"""The one settings schema, read from a dict (DeepSpeed section, FR_CONFIG) and from Megatron flags.

Every bad value must give an error that names the field (or the flag the user typed), says what
was wrong, and lists the allowed keys when the key itself is unknown.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest

from fr_megatron.config import ConfigError, FlashRecoveryConfig
from fr_megatron.settings_args import SPECS, add_flash_recovery_args, config_from_args, flag_for

pytestmark = pytest.mark.timeout(30)


# ---- dict reader -------------------------------------------------------------------------------
@pytest.mark.parametrize("data, words", [
    ({"heartbeat_interval": "fast"}, ["flash_recovery.heartbeat_interval", "valid number", "'fast'"]),
    ({"heartbeat_interval": -1}, ["flash_recovery.heartbeat_interval", "greater than 0", "-1"]),
    ({"heartbeat_interval": 0}, ["flash_recovery.heartbeat_interval", "greater than 0"]),
    ({"hang_timeout": "soon"}, ["flash_recovery.hang_timeout", "'auto' or a number"]),
    ({"hang_timeout": -5}, ["flash_recovery.hang_timeout", "positive"]),
    ({"hang_timeout_min": 0}, ["flash_recovery.hang_timeout_min", "greater than 0"]),
    ({"replicas": 0}, ["flash_recovery.replicas", "greater than or equal to 1", "0"]),
    ({"replicas": 1.5}, ["flash_recovery.replicas", "integer"]),
    ({"replicas": 9}, ["flash_recovery.replicas", "less than or equal to 8"]),
    ({"snapshot_depth": 1}, ["flash_recovery.snapshot_depth", "greater than or equal to 2"]),
    ({"node_timeout": 0}, ["flash_recovery.node_timeout", "greater than 0"]),
    ({"checkpoint_timeout": -1}, ["flash_recovery.checkpoint_timeout", "greater than 0"]),
    ({"spares": -1}, ["flash_recovery.spares", "greater than or equal to 0"]),
    ({"controller": "localhost"}, ["flash_recovery.controller", "HOST:PORT", "'localhost'"]),
    ({"controller": "host:99999"}, ["flash_recovery.controller", "HOST:PORT"]),
    ({"controller": 29400}, ["flash_recovery.controller", "string"]),
    ({"journal": ["a"]}, ["flash_recovery.journal", "string"]),
    ({"verify_checksums": "perhaps"}, ["flash_recovery.verify_checksums", "boolean"]),
    ({"enabled": "yes please"}, ["flash_recovery.enabled", "boolean"]),
    ({"wandb": {"mode": "loud"}}, ["flash_recovery.wandb.mode", "'online', 'offline' or 'disabled'"]),
    ({"wandb": "on"}, ["flash_recovery.wandb", "dictionary"]),
    ({"wandb": {"tags": "a"}}, ["flash_recovery.wandb.tags", "list"]),
])
def test_dict_bad_values_name_the_field(data, words):
    with pytest.raises(ConfigError) as e:
        FlashRecoveryConfig.from_dict(data)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_a_bad_value_for_every_field_names_the_field():
    for key in FlashRecoveryConfig.model_fields:
        bad = "on" if key == "wandb" else [1, 2]  # the wrong type for each of them
        with pytest.raises(ConfigError) as e:
            FlashRecoveryConfig.from_dict({key: bad})
        assert str(e.value).startswith(f"flash_recovery.{key}"), str(e.value)


def test_dict_unknown_keys_list_the_allowed_ones():
    with pytest.raises(ConfigError) as e:
        FlashRecoveryConfig.from_dict({"replica": 2})
    msg = str(e.value)
    assert "flash_recovery.replica: unknown key" in msg
    for key in FlashRecoveryConfig.model_fields:
        assert key in msg
    with pytest.raises(ConfigError) as e:
        FlashRecoveryConfig.from_dict({"wandb": {"projekt": "x"}})
    assert "flash_recovery.wandb.projekt: unknown key; allowed keys: dir, enabled, mode, project, tags" \
        in str(e.value)


def test_dict_not_an_object_and_several_errors():
    with pytest.raises(ConfigError, match=r"flash_recovery: expected an object with keys \[.*'replicas'"):
        FlashRecoveryConfig.from_dict(["replicas", 1])
    with pytest.raises(ConfigError) as e:
        FlashRecoveryConfig.from_dict({"replicas": 0, "spares": -1})
    assert "flash_recovery.replicas" in str(e.value) and "flash_recovery.spares" in str(e.value)


def test_env_round_trip():
    cfg = FlashRecoveryConfig(replicas=2, hang_timeout=12.5, controller="10.0.0.1:29400")
    assert FlashRecoveryConfig.from_env({"FR_CONFIG": cfg.to_env()}) == cfg
    with pytest.raises(ConfigError, match="FR_CONFIG.replicas"):
        FlashRecoveryConfig.from_env({"FR_CONFIG": json.dumps({"replicas": 0})})


# ---- flags -------------------------------------------------------------------------------------
def megatron_like_parser() -> argparse.ArgumentParser:
    """The shape of Megatron-LM's parse_args: allow_abbrev=False, groups, then extra_args_provider."""
    parser = argparse.ArgumentParser(description="Megatron-LM Arguments", allow_abbrev=False)
    g = parser.add_argument_group(title="distributed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--distributed-backend", default="nccl", choices=["nccl", "gloo"])
    g = parser.add_argument_group(title="training")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--bf16", action="store_true")
    g = parser.add_argument_group(title="checkpointing")
    g.add_argument("--save", type=str, default=None)
    g.add_argument("--wandb-project", type=str, default="")
    return parser


def parse(argv: str):
    extra_args_provider = add_flash_recovery_args
    parser = extra_args_provider(megatron_like_parser())
    return parser.parse_args(shlex.split(argv))


def test_provider_returns_the_parser_and_adds_a_group():
    parser = megatron_like_parser()
    assert add_flash_recovery_args(parser) is parser
    titles = [g.title for g in parser._action_groups]
    assert "flash recovery" in titles
    flags = {o for a in parser._actions for o in a.option_strings}
    for f in ("--flash-recovery", "--flash-recovery-heartbeat-interval", "--flash-recovery-hang-timeout",
              "--flash-recovery-replicas", "--flash-recovery-spares", "--flash-recovery-controller",
              "--flash-recovery-journal", "--flash-recovery-checkpoint-dir", "--flash-recovery-wandb",
              "--no-flash-recovery-wandb"):
        assert f in flags, f


def test_flags_are_generated_from_the_schema():
    # every scalar field of the model has exactly one flag, its help is the field's description
    paths = {s.path for s in SPECS}
    for name, field in FlashRecoveryConfig.model_fields.items():
        if name == "wandb":
            continue
        assert (name,) in paths, name
        spec = next(s for s in SPECS if s.path == (name,))
        assert field.description in spec.help
    assert ("wandb", "enabled") in paths and flag_for(("wandb", "enabled")) == "--flash-recovery-wandb"
    assert flag_for(("heartbeat_interval",)) == "--flash-recovery-heartbeat-interval"
    help_text = add_flash_recovery_args(argparse.ArgumentParser()).format_help()
    assert "seconds between heartbeats (default: 0.5)" in help_text


def test_megatron_user_flags_parse():
    args = parse("--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --micro-batch-size 4 "
                 "--global-batch-size 32 --train-iters 100 --bf16 --save /ckpt --wandb-project demo "
                 "--flash-recovery --flash-recovery-heartbeat-interval 0.25 --flash-recovery-hang-timeout 90 "
                 "--flash-recovery-replicas 2 --flash-recovery-spares 0 "
                 "--flash-recovery-controller 10.1.2.3:29400 --flash-recovery-journal /tmp/j.jsonl "
                 "--flash-recovery-checkpoint-dir /ckpt/fallback --no-flash-recovery-wandb")
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.bf16) == (2, 2, True)
    assert args.wandb_project == "demo"  # Megatron's own wandb flag is untouched
    cfg = config_from_args(args)
    assert cfg.enabled is True
    assert cfg.heartbeat_interval == 0.25 and cfg.hang_timeout == 90.0
    assert (cfg.replicas, cfg.spares) == (2, 0)
    assert cfg.controller == "10.1.2.3:29400"
    assert (cfg.journal, cfg.checkpoint_dir) == ("/tmp/j.jsonl", "/ckpt/fallback")
    assert cfg.wandb.enabled is False


def test_defaults_and_disabled_without_the_switch():
    cfg = config_from_args(parse("--tensor-model-parallel-size 2"))
    assert cfg.enabled is False
    assert cfg.model_dump(exclude={"enabled"}) == FlashRecoveryConfig().model_dump(exclude={"enabled"})
    cfg = config_from_args(parse("--flash-recovery --flash-recovery-hang-timeout auto "
                                 "--flash-recovery-wandb --flash-recovery-wandb-tags a b"))
    assert cfg.enabled and cfg.hang_timeout == "auto" and cfg.wandb.enabled and cfg.wandb.tags == ["a", "b"]
    # a namespace that never saw the flags (provider not installed) gives the disabled defaults
    assert config_from_args(argparse.Namespace()).enabled is False


@pytest.mark.parametrize("argv, expected", [
    ("--flash-recovery-heartbeat-interval -1",
     "--flash-recovery-heartbeat-interval: must be greater than 0 (got -1)"),
    ("--flash-recovery-heartbeat-interval fast",
     "--flash-recovery-heartbeat-interval: must be a valid number, unable to parse string as a number "
     "(got fast)"),
    ("--flash-recovery-replicas 0", "--flash-recovery-replicas: must be greater than or equal to 1 (got 0)"),
    ("--flash-recovery-replicas two", "--flash-recovery-replicas: must be a valid integer"),
    ("--flash-recovery-spares -2", "--flash-recovery-spares: must be greater than or equal to 0 (got -2)"),
    ("--flash-recovery-hang-timeout never",
     "--flash-recovery-hang-timeout: must be 'auto' or a number of seconds (got never)"),
    ("--flash-recovery-hang-timeout -3", "--flash-recovery-hang-timeout: must be a positive number"),
    ("--flash-recovery-controller localhost",
     "--flash-recovery-controller: 'localhost' is not HOST:PORT (e.g. 127.0.0.1:29400) (got localhost)"),
    ("--flash-recovery-controller host:0", "--flash-recovery-controller: 'host:0' is not HOST:PORT"),
    ("--flash-recovery-snapshot-depth 9", "--flash-recovery-snapshot-depth: must be less than or equal to 4"),
    ("--flash-recovery-wandb-mode loud",
     "--flash-recovery-wandb-mode: must be 'online', 'offline' or 'disabled' (got loud)"),
])
def test_bad_flag_values_name_the_flag(argv, expected):
    with pytest.raises(ConfigError) as e:
        config_from_args(parse("--flash-recovery " + argv))
    assert str(e.value).startswith(expected), str(e.value)


def test_several_bad_flags_are_all_reported():
    with pytest.raises(ConfigError) as e:
        config_from_args(parse("--flash-recovery-replicas 0 --flash-recovery-heartbeat-interval 0"))
    msg = str(e.value)
    assert "--flash-recovery-replicas:" in msg and "--flash-recovery-heartbeat-interval:" in msg


def test_unknown_flash_recovery_flag_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit):
        parse("--flash-recovery-heartbeat 1")  # Megatron disables abbreviations
    assert "unrecognized arguments: --flash-recovery-heartbeat" in capsys.readouterr().err


def test_hang_timeout_a_rank_reports_where_it_is():
    """Start-up and a replacement's first step are never judged; the first step after a
    recovery gets three times the hang timeout (survivors wait there for a replacement's
    one-off costs); a checkpoint save gets its own timeout."""
    auto = FlashRecoveryConfig(hang_timeout="auto", hang_timeout_min=5, checkpoint_timeout=600)
    steps = [1.0] * 10
    assert auto.step_hang_timeout("forward", [], resuming=False) == 1e9
    assert auto.step_hang_timeout("forward", steps, resuming=False) == 10.0
    assert auto.step_hang_timeout("grad_reduce", steps, resuming=True) == 30.0
    assert auto.step_hang_timeout("checkpoint", steps, resuming=True) == 600
    fixed = FlashRecoveryConfig(hang_timeout=2)
    assert fixed.step_hang_timeout("backward", [0.1], resuming=False) == 2.0
    assert fixed.step_hang_timeout("backward", [0.1], resuming=True) == 6.0


def test_readme_carries_the_configuration_reference_of_the_schema():
    from fr_megatron import config_reference

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert config_reference.in_readme(readme) == config_reference.table(), (
        "README.md's configuration reference differs from the schema: replace the block between "
        "its config-reference markers with the output of `fr-megatron config`")
    rows = config_reference.table().splitlines()[2:]
    assert len(rows) == len(FlashRecoveryConfig.model_fields) - 1 + len(
        FlashRecoveryConfig.model_fields["wandb"].annotation.model_fields)


def test_run_flags_name_real_settings_and_real_options():
    from fr_megatron.launcher.launch import RUN_FLAGS, build_parser

    paths = {".".join(s.path) for s in SPECS}
    options = {o for action in build_parser()._actions for o in action.option_strings}
    for field, flag in RUN_FLAGS.items():
        assert field in paths, field
        assert flag in options, flag
