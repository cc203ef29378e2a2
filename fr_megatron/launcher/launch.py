"""``fr-megatron run``: the torchrun-like launcher of one node (and of the controller on node 0)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import threading

from ..config import ConfigError, FlashRecoveryConfig, parse_address
from ..protocol.auth import TOKEN_ENV, new_token, read_token, write_token_file
from ..runtime.inject import InjectSpecError, parse as parse_inject
from .spare import DEFAULT_PRELOAD

log = logging.getLogger("fr_megatron.launch")


class UsageError(ValueError):
    """Bad command-line input; the message names the argument and the fix (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fr-megatron run", description=(
        "Launch a training script with flash recovery: torchrun-compatible environment, warm "
        "spares, replacement of faulty ranks only."))
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--controller", default=None,
                   help="HOST:PORT of the controller; node 0 starts it there (default: loopback, "
                        "free port, single node only)")
    p.add_argument("--spares", type=int, default=None, help="warm spare processes on this node")
    p.add_argument("--inject", default=None, help="faults to inject, e.g. kill:rank=3:step=20")
    p.add_argument("--report", default=None, help="write the JSON recovery report here")
    p.add_argument("--journal", default=None, help="write the JSON-lines event journal here")
    p.add_argument("--token-file", default=None,
                   help=f"job token file shared by all nodes (default: generated; also ${TOKEN_ENV})")
    p.add_argument("--heartbeat-interval", type=float, default=None)
    p.add_argument("--hang-timeout", default=None, help="seconds, or 'auto'")
    p.add_argument("--preload", default=DEFAULT_PRELOAD,
                   help="modules a warm spare imports before it is needed")
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
    p.add_argument("--connect-timeout", type=float, default=30.0,
                   help="seconds a node waits for the controller to be reachable")
    p.add_argument("script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    return p


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
        parse_inject(a.inject)
    except InjectSpecError as e:
        raise UsageError(str(e)) from None
    base = FlashRecoveryConfig.from_env()
    updates = {k: v for k, v in {
        "spares": a.spares, "journal": a.journal, "heartbeat_interval": a.heartbeat_interval,
        "hang_timeout": a.hang_timeout, "controller": a.controller,
        "node_timeout": a.node_timeout, "snapshot_dir": a.snapshot_dir}.items() if v is not None}
    if a.no_wandb:
        updates["wandb"] = {**base.wandb.model_dump(), "enabled": False}
    try:
        return FlashRecoveryConfig.from_dict({**base.model_dump(), **updates}, "fr-megatron run")
    except ConfigError as e:
        raise UsageError(str(e).replace("fr-megatron run.", "--").replace("_", "-")) from None


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
    ctl = None
    ctl_thread = None
    if a.node_rank == 0 and not a.spare_node:
        bind = host if a.nnodes == 1 or host not in ("localhost",) else "0.0.0.0"
        ctl = Controller(a.nnodes * a.nproc_per_node, a.nnodes, a.nproc_per_node, bind, port, token,
                         cfg, a.report, run_name=os.path.basename(a.script))
        port = ctl.port
        ctl_thread = threading.Thread(target=ctl.serve, name="fr-controller", daemon=True)
        ctl_thread.start()
    try:
        agent = NodeAgent(node_rank=a.node_rank, nnodes=a.nnodes, nproc=a.nproc_per_node,
                          controller=(host, port), token=token, token_file=token_file, cfg=cfg,
                          script=a.script, script_args=a.script_args, spares=cfg.spares,
                          inject=a.inject, preload=a.preload,
                          connect_timeout=a.connect_timeout, spare_node=a.spare_node,
                          run_dir=run_dir, with_controller=ctl is not None)
    except ConnectionError as e:
        print(f"fr-megatron run: error: --controller: {e}", file=sys.stderr)
        shutil.rmtree(run_dir, ignore_errors=True)
        return 2
    rc = agent.run()
    if ctl_thread is not None:
        ctl_thread.join(30)
        rc = ctl.exit_code
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
