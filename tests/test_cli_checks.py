"""What ``fr-megatron`` checks before it starts anything: every flag of every command has help
text, and launcher input that cannot work (an injection that could never fire, flags that
contradict each other) is one line naming the flag, exit code 2. In this process: each case
fails before a worker starts."""

from __future__ import annotations

import argparse
import importlib

import pytest

from fr_megatron import cli

SCRIPT = "recipes/torch_ddp/train.py"


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Each command's parser, as the command builds it."""
    from benchmarks.__main__ import build_parser as bench

    out = {name: importlib.import_module(mod).build_parser()
           for name, (mod, _) in cli.COMMANDS.items() if name != "bench"}
    out["bench"] = bench()
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_flag_of_every_command_has_help(command):
    parser = _parsers()[command]
    missing = [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert missing == [], f"fr-megatron {command}: no help text for {missing}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args,needle", [
    # an injection that could never fire in this job
    (["--nproc-per-node", "2", "--inject", "kill:rank=9:step=2", SCRIPT],
     "--inject kill:rank=9:step=2: rank 9 is not in the job, whose ranks are 0-1"),
    (["--nproc-per-node", "2", "--inject", "kill:rank=1:step=500", SCRIPT, "--steps", "400"],
     "the job ends at step 400 (--steps 400)"),
    (["--nproc-per-node", "2", "--inject", "exit:rank=1:step=9", SCRIPT, "--train-iters=8"],
     "the job ends at step 8 (--train-iters 8)"),
    (["--nproc-per-node", "2", "--inject", "kill:rank=1:step=0", SCRIPT],
     "training steps count from 1"),
    (["--nproc-per-node", "2", "--inject", "node_crash:rank=1:step=2", SCRIPT],
     "node 0 hosts the controller"),
    (["--nproc-per-node", "2", "--inject", "kill:rank=1:step=2:code=3", SCRIPT],
     "code= is for exit faults only"),
    # flags that contradict each other
    (["--heartbeat-interval", "1", "--hang-timeout", "1.5", SCRIPT],
     "--hang-timeout 1.5 is shorter than two heartbeats (--heartbeat-interval 1.0)"),
    (["--heartbeat-interval", "1", "--node-timeout", "1", SCRIPT],
     "--node-timeout 1.0 is shorter than two heartbeats"),
    (["--preload", "torch,no_such_module_here", SCRIPT],
     "--preload: no module named 'no_such_module_here'"),
    (["--stop-timeout", "-1", SCRIPT], "--stop-timeout"),
])
def test_launch_checks_are_one_line_naming_the_flag(args, needle, capsys):
    assert cli.main(["run", *args]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], err
    assert lines[0].startswith("fr-megatron run: error: ")


@pytest.mark.timeout(120)
def test_injections_the_job_can_run_are_accepted():
    from fr_megatron.launcher.launch import check_injections

    check_injections("kill:rank=1:step=0:phase=after_step;exit:code=7:rank=3:step=8;"
                     "node_crash:rank=2:step=3", nnodes=2, nproc=2,
                     script_args=["--steps", "8"])
