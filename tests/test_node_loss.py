"""A whole node lost, across real hosts: network namespaces joined by a bridge on this machine.

Node 0 (the controller, ranks 0-1) runs in the root namespace on the bridge's address; node 1
(ranks 2-3) and a spare node each run in a namespace of their own, behind a veth pair, so every
gloo link and store connection between them is real TCP between distinct addresses. The test
builds and removes the namespaces itself, and skips (saying why) where the machine refuses them.

- node crash: every process of node 1 (launcher, agent, workers) is SIGKILLed at once;
- partition: node 1's link is cut; its agent fences itself (kills its workers) after the node
  timeout, so it cannot come back into a world that has moved on.

Either way the controller sees node 1's agent fall silent, moves ranks 2-3 to the spare node,
and training ends bit-identical to a fault-free run. Without a spare node, ranks 2-3 leave the
world with their data-parallel replicas and the job ends on node 0's two ranks, every step on the
same samples (``--shrink no-spare``, the default).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jobs import (REPO, TORCH_RECIPE, TORCH_STEPS as STEPS, assert_same_samples_close_training,
                  assert_same_training, free_port, node_beat)

BRIDGE, BRIDGE_ADDR = "fr-br0", "10.77.0.1"
NODES = {"node1": ("fr-node1", "fr-v1", "fr-v1h", "10.77.0.2"),
         "spare": ("fr-spare", "fr-v2", "fr-v2h", "10.77.0.3")}
NODE_TIMEOUT = "3"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _teardown() -> None:
    for ns, _, outer, _ in NODES.values():
        # deleting one end removes the pair, even while a dying namespace still holds the other
        subprocess.run(["ip", "link", "del", outer], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


@pytest.fixture(scope="module")
def hosts():
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2 (`ip`)")
    _teardown()
    try:
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{BRIDGE_ADDR}/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for ns, inner, outer, addr in NODES.values():
            _ip("netns", "add", ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", BRIDGE, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        _teardown()
        pytest.skip(f"this machine refuses network namespaces: {getattr(e, 'stderr', e)}")
    yield
    _teardown()



def _launch(tmp: Path, port: int, node: str | None, node_rank: int, extra: list[str],
            log: Path, script_extra: list[str] = ()) -> subprocess.Popen:
    """One node's launcher, in its namespace and its own process group."""
    iface = BRIDGE if node is None else NODES[node][1]
    cmd = [sys.executable, "-m", "fr_megatron.cli", "run", "--nnodes", "2", "--node-rank",
           str(node_rank), "--nproc-per-node", "2", "--controller", f"{BRIDGE_ADDR}:{port}",
           "--token-file", str(tmp / "token"), "--no-wandb", "--node-timeout", NODE_TIMEOUT,
           "--heartbeat-interval", "0.2", *extra, str(TORCH_RECIPE), *STEPS,
           *script_extra, "--out", str(tmp / "job.pt")]
    if node is not None:
        cmd = ["ip", "netns", "exec", NODES[node][0], *cmd]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": iface}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _rank_reached(port: int, token: Path, node: int, rank: int, step: int,
                  deadline: float) -> bool:
    """Watch a rank's heartbeat, relayed in its node's signed beat in the job's store, until it
    reports ``step``."""
    while time.time() < deadline:
        beat = node_beat(BRIDGE_ADDR, port, token.read_bytes().strip(), node).get(str(rank), {})
        if beat.get("step", -1) >= step:
            return True
        time.sleep(0.1)
    return False


def _run(tmp: Path, how: str) -> tuple[dict, list[dict], dict | None, str]:
    from fr_megatron.events import Journal
    from fr_megatron.protocol.auth import new_token, write_token_file

    write_token_file(str(tmp / "token"), new_token())
    port = free_port(BRIDGE_ADDR)
    # before node 1 crashes, two ranks of different nodes fail at once (rank 1 on node 0, rank 3
    # on node 1; neither holds the other's copy): each node replaces its own, and the node crash
    # then takes rank 3's replacement with it
    inject = ["--inject", "kill:rank=1:step=2:phase=forward;kill:rank=3:step=2:phase=forward;"
              "node_crash:rank=2:step=3:phase=backward"] if how == "crash" else \
        ["--inject", "node_crash:rank=2:step=3:phase=backward"] if how == "crash-no-spare" else []
    names = ("node0", "node1") if how == "crash-no-spare" else ("node0", "node1", "spare")
    # the cut must land while the job trains: its steps take milliseconds otherwise, and the
    # job may be over before the link goes down
    slow = ["--step-sleep", "0.5"] if how == "partition" else []
    logs = {n: tmp / f"{n}.log" for n in names}
    procs = {"node0": _launch(tmp, port, None, 0, ["--spares", "1", "--report",
                                                   str(tmp / "report.json"), "--journal",
                                                   str(tmp / "journal.jsonl"), *inject],
                              logs["node0"], slow)}
    time.sleep(1.0)  # node 0 hosts the store the others connect to
    procs["node1"] = _launch(tmp, port, "node1", 1, ["--spares", "0", *inject], logs["node1"],
                             slow)
    if "spare" in names:
        procs["spare"] = _launch(tmp, port, "spare", 2, ["--spare-node", *inject], logs["spare"],
                                 slow)
    try:
        if how == "partition":
            assert _rank_reached(port, tmp / "token", 1, 2, 3, time.time() + 120), \
                "never reached step 3"
            _ip("-n", NODES["node1"][0], "link", "set", NODES["node1"][1], "down")
        rc = procs["node0"].wait(240)
        rcs = {n: p.wait(60) for n, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        _ip("-n", NODES["node1"][0], "link", "set", NODES["node1"][1], "up")
    out = "\n".join(f"==== {n} (rc {procs[n].returncode})\n{logs[n].read_text()[-3000:]}"
                    for n in logs)
    assert rc == 0, out
    rep = __import__("json").loads((tmp / "report.json").read_text())
    result = torch.load(tmp / "job.pt", weights_only=False) if (tmp / "job.pt").exists() else None
    return rep, Journal.read(str(tmp / "journal.jsonl")), result, out + f"\nrcs={rcs}"


@pytest.mark.timeout(400)
@pytest.mark.parametrize("how", ["crash", "partition"])
def test_lost_node_moves_to_spare_node_bit_exact(tmp_path, hosts, torch_baseline, how):
    rep, journal, result, out = _run(tmp_path, how)
    pair = sorted((f for f in rep["faults"] if f["kind"] != "node_lost"), key=lambda f: f["rank"])
    faults = sorted((f for f in rep["faults"] if f["kind"] == "node_lost"), key=lambda f: f["rank"])
    assert [(f["rank"], f["kind"]) for f in faults] == [(2, "node_lost"), (3, "node_lost")], out
    if how == "crash":
        assert [(f["rank"], f["kind"], f["step"], f["replacement"]) for f in pair] == [
            (1, "crash", 2, "spare"), (3, "crash", 2, "spawn")], out  # node 1 has no spares
        for f in pair:
            assert (f["recovery_point"], f["steps_lost"]) == (1, 0), out
            assert f["survivor_pids_unchanged"] is True, out
    else:
        assert pair == [], out
    for f in faults:
        assert f["replacement"] == "spare" and f["survivor_pids_unchanged"] is True, out
        assert f["steps_lost"] == 0, out
        assert float(NODE_TIMEOUT) <= f["detect_s"] <= f["recovery_s"], out
    (lost,) = [e for e in journal if e["event"] == "node_lost"]
    assert (lost["node"], lost["ranks"]) == (1, [2, 3])
    assert rep["finished_ranks"] == 4, out
    if how == "partition":  # the cut-off node stopped its own workers
        assert "killing its workers" in out, out
    assert_same_training(torch_baseline, result)


@pytest.mark.timeout(400)
def test_lost_node_without_a_spare_node_leaves_the_job_on_fewer_replicas(tmp_path, hosts,
                                                                         torch_baseline):
    rep, journal, result, out = _run(tmp_path, "crash-no-spare")
    faults = sorted(rep["faults"], key=lambda f: f["rank"])
    assert [(f["rank"], f["kind"], f["action"]) for f in faults] == [
        (2, "node_lost", "shrink"), (3, "node_lost", "shrink")], out
    # the crash lands in rank 2's step 3: the job goes back to step 2, or to step 1 when
    # rank 3, a few milliseconds behind, had not yet copied its step 2 to node 0 (it then never
    # finished step 2 on every rank: no step is lost either way)
    point = faults[0]["recovery_point"]
    assert point in (1, 2), out
    for f in faults:
        assert f["replacement"] is None and f["survivor_pids_unchanged"] is True, out
        assert (f["world_size_after"], f["data_parallel_size_after"]) == (2, 2), out
        assert (f["recovery_point"], f["steps_lost"]) == (point, 0), out
    assert rep["fatal"] is None and rep["members"] == [0, 1], out
    assert rep["finished_ranks"] == 2, out
    assert result["world_sizes"] == {s: 4 if s <= point else 2 for s in range(1, 9)}
    assert_same_samples_close_training(torch_baseline, result, first_shrunk_step=point + 1)
