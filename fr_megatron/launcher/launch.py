"""``fr-megatron run``: the torchrun-like launcher of one node (and of the controller on node 0)."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading

from ..config import ConfigError, FlashRecoveryConfig, parse_address
from ..protocol.auth import TOKEN_ENV, new_token, read_token, write_token_file
from ..runtime.inject import InjectSpecError, parse as parse_inject

log = logging.getLogger("fr_megatron.launch")


# settings of FlashRecoveryConfig that `fr-megatron run` sets, and the flag that sets each
RUN_FLAGS = {
    "spares": "--spares", "journal": "--journal", "heartbeat_interval": "--heartbeat-interval",
    "hang_timeout": "--hang-timeout", "controller": "--controller",
    "node_timeout": "--node-timeout", "stop_timeout": "--stop-timeout",
    "snapshot_dir": "--snapshot-dir", "shrink": "--shrink", "wandb.enabled": "--no-wandb",
}


class UsageError(ValueError):
    """Bad command-line input; the message names the argument and the fix (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fr-megatron run", description=(
        "Launch a training script with flash recovery: torchrun-compatible environment, warm "
        "spares, replacement of faulty ranks only. Ctrl-C or SIGTERM stops the job in order "
        "(exit code 130 / 143), a second one at once."))
    p.add_argument("--nnodes", type=int, default=1,
                   help="nodes that run ranks (spare nodes not counted; default 1)")
    p.add_argument("--node-rank", type=int, default=0,
                   help="this node's index, 0 to NNODES-1 (node 0 hosts the controller), or at "
                        "least NNODES for a --spare-node (default 0)")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="ranks per node; the job has NNODES x NPROC_PER_NODE ranks (default 1)")
    p.add_argument("--controller", default=None,
                   help="HOST:PORT of the controller; node 0 starts it there (default: loopback, "
                        "free port, single node only)")
    p.add_argument("--spares", type=int, default=None,
                   help="warm spare processes on this node (default 1)")
    p.add_argument("--inject", default=None,
                   help="faults to inject, e.g. kill:rank=3:step=20 (several joined by ';'); "
                        "ranks and steps are checked against the job")
    p.add_argument("--report", default=None, help="write the JSON recovery report here")
    p.add_argument("--journal", default=None, help="write the JSON-lines event journal here")
    p.add_argument("--token-file", default=None,
                   help=f"job token file shared by all nodes (default: generated; also ${TOKEN_ENV})")
    p.add_argument("--heartbeat-interval", type=float, default=None,
                   help="seconds between a rank's heartbeats (default 0.5)")
    p.add_argument("--hang-timeout", default=None,
                   help="seconds without step progress that make a rank hung, or 'auto' "
                        "(10x the median step, at least 5 s; default)")
    p.add_argument("--stop-timeout", type=float, default=None,
                   help="seconds ranks that save a checkpoint on a stop (Megatron-LM's "
                        "--exit-signal-handler with --save) get before they are killed "
                        "(default 120)")
    p.add_argument("--preload", default="",
                   help="modules a warm spare imports at its start, in addition to torch and "
                        "to what the job's ranks import (spares learn that once training has "
                        "started), e.g. fr_megatron.megatron.preload")
    p.add_argument("--no-wandb", action="store_true", help="do not log recovery events to wandb")
    p.add_argument("--spare-node", action="store_true",
                   help="join as a spare node: start no workers, take over the ranks of a lost "
                        "node (give it a --node-rank of its own, at least --nnodes)")
    p.add_argument("--node-timeout", type=float, default=None,
                   help="seconds without a node agent's heartbeat before its node is lost")
    p.add_argument("--snapshot-dir", default=None, metavar="DIR",
                   help="shared-memory directory (tmpfs) for the ranks' snapshots, which a "
                        "replacement on the same node restores from (default: /dev/shm); '' keeps "
                        "them in process memory and copies unique state to peers every step")
    p.add_argument("--shrink", choices=("no-spare", "never", "always"), default=None,
                   help="go on with fewer data-parallel replicas when a lost rank is not "
                        "replaced: when no replacement can be placed (no-spare, default), "
                        "never (the job stops), or always instead of replacing")
    p.add_argument("--connect-timeout", type=float, default=30.0,
                   help="seconds a node waits for the controller to be reachable")
    p.add_argument("script", help="the training script, run as each rank's __main__")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's own arguments")
    return p


def _script_steps(script_args: list[str]) -> tuple[str, int] | None:
    """The job's last step, where the script's arguments say it: Megatron-LM's ``--train-iters``
    or the recipes' ``--steps`` (the flag and its value)."""
    for i, arg in enumerate(script_args):
        for flag in ("--train-iters", "--steps"):
            value = None
            if arg == flag and i + 1 < len(script_args):
                value = script_args[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            if value is not None and value.isdigit():
                return flag, int(value)
    return None


def check_injections(spec: str | None, nnodes: int, nproc: int, script_args: list[str]) -> None:
    """Every injection must be able to fire in this job: its rank in the job, its step one the
    job runs and its phase one that step has."""
    world = nnodes * nproc
    last = _script_steps(script_args)
    for inj in parse_inject(spec):
        where = f"--inject {inj.kind}:rank={inj.rank}:step={inj.step}"
        if not 0 <= inj.rank < world:
            raise UsageError(f"{where}: rank {inj.rank} is not in the job, whose ranks are "
                             f"0-{world - 1} (--nnodes {nnodes} x --nproc-per-node {nproc})")
        if inj.step < 0 or (inj.step == 0 and inj.phase != "after_step"):
            raise UsageError(f"{where}: training steps count from 1 (step 0 has only the phase "
                             "after_step: the commit of the initial state)")
        if last and inj.step > last[1]:
            raise UsageError(f"{where}: the job ends at step {last[1]} ({last[0]} {last[1]}); "
                             "give a step it runs")
        if inj.kind == "node_crash" and inj.rank // nproc == 0:
            raise UsageError(f"{where}: node_crash kills the rank's whole node, and node 0 "
                             "hosts the controller: pick a rank of another node (--nnodes > 1)")
    for part in filter(str.strip, (spec or "").split(";")):
        if ":code=" in part and not part.strip().startswith("exit:"):
            raise UsageError(f"--inject {part.strip()}: code= is for exit faults only")


def check_preload(modules: str) -> None:
    """Each --preload name must be installed (found without importing it: the launcher imports
    no training framework)."""
    for name in filter(None, (m.strip() for m in modules.split(","))):
        top = name.split(".")[0]
        if not top.isidentifier() or importlib.util.find_spec(top) is None:
            raise UsageError(f"--preload: no module named {top!r} is installed; give importable "
                             "module names separated by commas")


def validate(a) -> FlashRecoveryConfig:
    if a.nproc_per_node < 1:
        raise UsageError("--nproc-per-node must be at least 1 (got %d)" % a.nproc_per_node)
    if a.nnodes < 1:
        raise UsageError("--nnodes must be at least 1 (got %d)" % a.nnodes)
    if a.spare_node:
        if a.node_rank < a.nnodes:
            raise UsageError(f"--spare-node needs a --node-rank of its own, at least --nnodes "
                             f"({a.nnodes}); got {a.node_rank}")
        if not a.controller:
            raise UsageError("--spare-node needs --controller HOST:PORT of the running job")
    elif not 0 <= a.node_rank < a.nnodes:
        raise UsageError(f"--node-rank must be in [0, {a.nnodes}) (got {a.node_rank})")
    if not os.path.isfile(a.script):
        raise UsageError(f"script {a.script!r} not found; give the path of a Python training script")
    if a.nnodes > 1 and not a.controller:
        raise UsageError("--controller HOST:PORT is required when --nnodes > 1 "
                         "(node 0 listens there, the others connect)")
    if a.controller:
        try:
            parse_address(a.controller, "--controller")
        except ConfigError as e:
            raise UsageError(str(e)) from None
    try:
        check_injections(a.inject, a.nnodes, a.nproc_per_node, a.script_args)
    except InjectSpecError as e:
        raise UsageError(str(e)) from None
    check_preload(a.preload)
    base = FlashRecoveryConfig.from_env()
    given = {field: getattr(a, flag[2:].replace("-", "_")) for field, flag in RUN_FLAGS.items()
             if "." not in field}
    updates = {field: value for field, value in given.items() if value is not None}
    if a.no_wandb:
        updates["wandb"] = {**base.wandb.model_dump(), "enabled": False}
    try:
        cfg = FlashRecoveryConfig.from_dict({**base.model_dump(), **updates}, "fr-megatron run")
    except ConfigError as e:
        raise UsageError(str(e).replace("fr-megatron run.", "--").replace("_", "-")) from None
    beats = 2 * cfg.heartbeat_interval
    if cfg.hang_timeout != "auto" and float(cfg.hang_timeout) < beats:
        raise UsageError(f"--hang-timeout {cfg.hang_timeout} is shorter than two heartbeats "
                         f"(--heartbeat-interval {cfg.heartbeat_interval}): a healthy rank would "
                         f"count as hung; give at least {beats:g}")
    if cfg.node_timeout < beats:
        raise UsageError(f"--node-timeout {cfg.node_timeout} is shorter than two heartbeats "
                         f"(--heartbeat-interval {cfg.heartbeat_interval}): a live node would "
                         f"count as lost; give at least {beats:g}")
    return cfg


class Stopper:
    """SIGINT / SIGTERM to the launcher. The first stops the job in order: the controller ends
    it (its ranks save a checkpoint first when they do that on a stop), writes the report and
    the journal, and the agents kill what is left. A second stops it at once: no waiting for a
    save, every process of this node killed."""

    def __init__(self, node: int):
        self.node = node
        self.signals: list[str] = []
        self.ctl = None
        self.agent = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self)

    def __call__(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        self.signals.append(name)
        force = len(self.signals) > 1
        log.warning("node=%d %s: %s", self.node, name,
                    "stopping the job now" if force else
                    "stopping the job (a second Ctrl-C or SIGTERM stops it at once)")
        threading.Thread(target=self.act, args=(name, force), daemon=True).start()

    def act(self, name: str, force: bool) -> None:
        by = f"{name} to the launcher of node {self.node}"
        if self.ctl is not None:
            self.ctl.request_stop(name, by, force=force)
        if self.agent is not None and (self.ctl is None or force):
            self.agent.request_stop(name, force=force)


def _how_it_ended(f: dict) -> str:
    return f"signal {f['signal']}" if f.get("signal") else f"exit code {f.get('exit_code')}"


def summary(ctl, report_path, journal_path) -> str | None:
    """The launcher's last line, for a job that did not simply finish."""
    rep = ctl.report()
    where = "".join(f"; {what} {path}" for what, path in (("report", report_path),
                                                          ("journal", journal_path)) if path)
    if rep["fatal"]:
        return f"fr-megatron run: the job failed: {rep['fatal']}{where}"
    st = rep["stopped"]
    if st:
        saved = (f"; newest checkpoint: iteration {st['checkpoint_iteration']}"
                 if st["checkpoint_iteration"] is not None else
                 "; no checkpoint saved" if st["save"] else "")
        return (f"fr-megatron run: the job was stopped by {st['by']}; last committed step "
                f"{st['last_committed_step']} (every rank committed it){saved}{where}")
    if rep["failed_after_training"]:
        ranks = ", ".join(f"rank {f['rank']} ({_how_it_ended(f)})"
                          for f in rep["failed_after_training"])
        return (f"fr-megatron run: training finished, then the script failed on {ranks}: "
                f"what it does after training (a final save, an evaluation) did not complete; "
                f"see the rank's output{where}")
    return None


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        cfg = validate(a)
    except UsageError as e:
        print(f"fr-megatron run: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from .agent import NodeAgent
    from .controller import Controller

    stopper = Stopper(a.node_rank)
    stopper.install()
    run_dir = tempfile.mkdtemp(prefix="fr-megatron-")
    token_file = a.token_file or os.environ.get(TOKEN_ENV) or os.path.join(run_dir, "token")
    if not os.path.exists(token_file):
        if a.node_rank != 0:
            print(f"fr-megatron run: error: --token-file {token_file} does not exist; node 0 "
                  "creates it, give every node the same shared path", file=sys.stderr)
            shutil.rmtree(run_dir, ignore_errors=True)
            return 2
        write_token_file(token_file, new_token())
    token = read_token({TOKEN_ENV: token_file})
    host, port = parse_address(a.controller, "--controller") if a.controller else ("127.0.0.1", 0)
    extra_env = {}
    group = None
    if cfg.wandb.enabled:
        # the script's own wandb runs (Megatron-LM's --wandb-project) and the controller's
        # share a group, the same on every node (the token is)
        stem = os.path.splitext(os.path.basename(a.script))[0]
        group = os.environ.get("WANDB_RUN_GROUP") or \
            f"{stem}-{hashlib.sha256(token).hexdigest()[:8]}"
        extra_env["WANDB_RUN_GROUP"] = group
    ctl = None
    ctl_thread = None
    if a.node_rank == 0 and not a.spare_node:
        bind = host if a.nnodes == 1 or host not in ("localhost",) else "0.0.0.0"
        ctl = Controller(a.nnodes * a.nproc_per_node, a.nnodes, a.nproc_per_node, bind, port, token,
                         cfg, a.report, run_name=os.path.basename(a.script), inject=a.inject,
                         wandb_group=group)
        port = ctl.port
        ctl_thread = threading.Thread(target=ctl.serve, name="fr-controller", daemon=True)
        ctl_thread.start()
        stopper.ctl = ctl
    try:
        agent = NodeAgent(node_rank=a.node_rank, nnodes=a.nnodes, nproc=a.nproc_per_node,
                          controller=(host, port), token=token, token_file=token_file, cfg=cfg,
                          script=a.script, script_args=a.script_args, spares=cfg.spares,
                          inject=a.inject, preload=a.preload, extra_env=extra_env,
                          connect_timeout=a.connect_timeout, spare_node=a.spare_node,
                          run_dir=run_dir, with_controller=ctl is not None)
    except ConnectionError as e:
        print(f"fr-megatron run: error: --controller: {e}", file=sys.stderr)
        shutil.rmtree(run_dir, ignore_errors=True)
        return 2
    stopper.agent = agent
    if stopper.signals:  # stopped before it started: nothing to run
        stopper.act(stopper.signals[0], force=True)
        rc = agent.exit_code()
        agent.inbox.close()
    else:
        rc = agent.run()
    if ctl_thread is not None:
        ctl_thread.join(30)
        rc = ctl.exit_code
        line = summary(ctl, a.report, cfg.journal)
    else:
        end = agent.end or {}
        line = (f"fr-megatron run: node {a.node_rank}: the job was stopped by "
                f"{end['stopped']} (node 0 has its report)") if end.get("stopped") else None
    if line:
        print(line, file=sys.stderr)
    _exit(rc, run_dir)


def _exit(rc: int, run_dir: str) -> None:
    """End the launcher now: its report, journal and wandb run are closed, and interpreter
    finalization with daemon threads still blocked in C++ store calls can abort the process
    ("terminate called without an active exception") and lose the exit code. The run directory
    (token, heartbeat socket) goes with it."""
    shutil.rmtree(run_dir, ignore_errors=True)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
