"""What the job does when a piece of its control plane dies: an agent, then the controller.

Three "nodes" on this machine, each a launcher in its own process group: node 0 (controller,
store, ranks 0-1), node 1 (ranks 2-3) and a spare node. First node 1's agent alone is killed:
its workers live on as orphans, but nobody relays their heartbeats, so after the node timeout the
node is lost, its ranks move to the spare node, and the orphans, named replaced in the plan,
exit. Training goes on there. Then node 0's whole process group is killed (the controller's
machine dies): nobody is left to recover a fault, so the spare node's agent, cut off from the
store for twice the node timeout, kills its workers and exits 1, logging the last step every rank
of its node committed, the step to restart the job from. Nothing is left running.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from jobs import REPO, TORCH_RECIPE, free_port, node_beat

NODE_TIMEOUT = 2.0


def _launch(tmp: Path, port: int, node_rank: int, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fr_megatron.cli", "run", "--nnodes", "2", "--node-rank",
           str(node_rank), "--nproc-per-node", "2", "--controller", f"127.0.0.1:{port}",
           "--token-file", str(tmp / "token"), "--no-wandb", "--spares", "0",
           "--node-timeout", str(NODE_TIMEOUT), "--heartbeat-interval", "0.2", *extra,
           str(TORCH_RECIPE), "--steps", "2000", "--step-sleep", "0.05",
           "--out", str(tmp / "job.pt")]
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _committed(port: int, token: bytes, node: int) -> int:
    """The lowest step the ranks of ``node`` have committed, from the node's beat in the store."""
    ranks = node_beat("127.0.0.1", port, token, node)
    return min((b.get("committed", -1) for b in ranks.values()), default=-1) if len(ranks) == 2 \
        else -1


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return alive


@pytest.mark.timeout(240)
def test_lost_agent_moves_its_ranks_then_lost_controller_stops_cleanly(tmp_path):
    from fr_megatron.protocol.auth import new_token, write_token_file

    write_token_file(str(tmp_path / "token"), new_token())
    token = (tmp_path / "token").read_bytes().strip()
    port = free_port()
    logs = {n: tmp_path / f"{n}.log" for n in ("node0", "node1", "spare")}
    procs = {"node0": _launch(tmp_path, port, 0, logs["node0"])}
    time.sleep(1.0)  # node 0 hosts the store the others connect to
    procs["node1"] = _launch(tmp_path, port, 1, logs["node1"])
    procs["spare"] = _launch(tmp_path, port, 2, logs["spare"], "--spare-node")

    def tails() -> str:
        return "\n".join(f"==== {n}\n{log.read_text()[-2500:]}" for n, log in logs.items())

    def wait_committed(node: int, step: int, why: str) -> int:
        deadline = time.time() + 120
        while (got := _committed(port, token, node)) < step:
            assert time.time() < deadline, f"{why}\n{tails()}"
            assert procs["node0"].poll() is None, f"the job ended early\n{tails()}"
            time.sleep(0.1)
        return got

    try:
        wait_committed(1, 3, "node 1 never reached step 3")
        orphans = _group_alive(procs["node1"].pid)
        os.kill(procs["node1"].pid, signal.SIGKILL)  # node 1's agent alone
        assert procs["node1"].wait(10) == -signal.SIGKILL
        at = wait_committed(2, 1, "the spare node never took ranks 2 and 3")
        later = wait_committed(2, at + 2, "training did not go on on the spare node")
        deadline = time.time() + 30
        while _group_alive(procs["node1"].pid) and time.time() < deadline:
            time.sleep(0.2)
        assert _group_alive(procs["node1"].pid) == [], f"orphans of node 1 left\n{tails()}"

        os.killpg(procs["node0"].pid, signal.SIGKILL)  # the controller's machine dies
        # a collective timeout would take minutes; the fence (twice the node timeout) is seconds
        rc = procs["spare"].wait(60)
    finally:
        for p in procs.values():
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert len(orphans) >= 3  # the agent and its two workers were running
    out = logs["spare"].read_text()
    assert rc == 1, tails()
    m = re.search(r"node=2 has not reached the controller .* last good step (\d+)", out)
    assert m and int(m.group(1)) >= later, tails()
    # the launcher waits for every process it killed before it exits
    assert _group_alive(procs["spare"].pid) == [], "the spare node left processes running"
