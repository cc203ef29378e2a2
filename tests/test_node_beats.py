"""Rank heartbeats reach the controller through their node's agent, and only genuine ones.

The real path, in one process: ranks' signed datagrams on the agent's Unix socket, the agent's
signed node beat in a real TCPStore, the real controller's sweep. A forged or malformed datagram
is dropped at the agent; a beat for a rank the node does not host is not relayed; a forged node
beat is rejected and journaled; a genuine node beat played again changes nothing.
"""

import os
import threading
import time

import pytest

from fr_megatron.config import FlashRecoveryConfig
from fr_megatron.events import Journal
from fr_megatron.launcher.agent import NodeAgent
from fr_megatron.launcher.controller import Controller
from fr_megatron.protocol import keys
from fr_megatron.protocol.auth import Signer, new_token
from fr_megatron.protocol.node_beats import BeatSender
from fr_megatron.protocol.store import connect


def _rank_beat(signer: Signer, rank: int, step: int) -> bytes:
    return signer.sign("heartbeat", rank=rank, pid=1000 + rank, hb_interval=0.1, generation=0,
                       step=step, phase="forward", state="running", committed=step - 1,
                       inject_t=None, hang_timeout=1e9)


def _until(pred, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@pytest.mark.timeout(60)
def test_node_beat_relays_only_genuine_beats_of_the_nodes_own_ranks(tmp_path):
    token = new_token().encode()
    journal = tmp_path / "journal.jsonl"
    cfg = FlashRecoveryConfig(wandb={"enabled": False}, journal=str(journal),
                              heartbeat_interval=0.1, node_timeout=30)
    ctl = Controller(4, 2, 2, "127.0.0.1", 0, token, cfg)  # node 1 hosts ranks 2 and 3
    threading.Thread(target=ctl.serve, daemon=True).start()
    agent = NodeAgent(node_rank=1, nnodes=2, nproc=2, controller=(ctl.host, ctl.port),
                      token=token, token_file=str(tmp_path / "token"), cfg=cfg,
                      script="unused.py", script_args=[], spares=0, run_dir=str(tmp_path))
    try:
        agent._send("agent_started", node=1, spare=False, pid=0)
        loops = [threading.Thread(target=loop, daemon=True) for loop in (agent._inbox, agent._beat)]
        for t in loops:
            t.start()
        ranks, rank2 = BeatSender(agent.inbox.path), Signer(token, "rank2")
        ranks.send(_rank_beat(rank2, 2, 7))
        ranks.send(_rank_beat(Signer(b"not the token", "rank3"), 3, 99))  # forged
        ranks.send(b"\x00 not a message")                                 # malformed
        ranks.send(_rank_beat(Signer(token, "rank0"), 0, 5))  # rank 0 lives on node 0
        assert _until(lambda: ctl.views[2].step == 7), "the controller never saw rank 2's beat"
        assert _until(lambda: agent._rejected_beats == 2)
        assert ctl.views[3].step == -1 and ctl.views[0].step == -1
        assert set(agent.beats) == {2}
        assert _until(lambda: 1 in ctl.agents and ctl.agents[1].pid == os.getpid())

        store = connect(ctl.host, ctl.port)
        old = store.get(keys.agent(1))
        ranks.send(_rank_beat(rank2, 2, 8))
        assert _until(lambda: ctl.views[2].step == 8)
        agent._done.set()  # the agent stops beating: what the store holds next is ours
        loops[1].join(10)
        assert not loops[1].is_alive()
        seen = ctl.views[2].seen_t
        store.set(keys.agent(1), old)  # a genuine node beat, played again
        time.sleep(1.0)  # several controller sweeps
        assert ctl.views[2].step == 8 and ctl.views[2].seen_t == seen

        rejected = ctl.rejected
        store.set(keys.agent(1), Signer(b"not the token", "agent1").sign(
            "agent_heartbeat", node=1, seq=10**9, pid=os.getpid(), spare=False,
            ranks={"2": {"rank": 2, "pid": 1002, "seq": 10**9, "step": 50}}))
        assert _until(lambda: ctl.rejected > rejected)
        assert ctl.views[2].step == 8
        reasons = [r["reason"] for r in Journal.read(str(journal))
                   if r["event"] == "message_rejected"]
        assert any("node heartbeat fr/agent/1" in r and "HMAC" in r for r in reasons), reasons
    finally:
        agent._done.set()
        agent.inbox.close()
        ctl.stop()


@pytest.mark.timeout(30)
def test_rank_whose_agent_is_gone_is_told_once_its_beats_fail_for_the_orphan_timeout():
    from fr_megatron.runtime.heartbeat import Heartbeat

    gone = BeatSender("/nonexistent/fr-agent.sock")  # every send fails, as after the agent died
    orphaned: list[float] = []
    hb = Heartbeat(gone.send, Signer(new_token().encode(), "rank0"), 0, 0.05,
                   lambda: {"step": 1}, orphan_timeout=0.5, orphaned=orphaned.append)
    t0 = time.time()
    hb.start()
    try:
        assert _until(lambda: orphaned, 10.0), "the heartbeat never gave up on its agent"
    finally:
        hb.stop()
        hb.join(5)
    assert 0.5 < orphaned[0] and time.time() - t0 >= 0.5


@pytest.mark.timeout(30)
def test_changes_close_together_share_a_beat_and_the_last_one_is_sent():
    """A step marks several phases per micro-batch; each would be a signed beat relayed by the
    agent and written to the store. Changes within a quarter interval share one beat, and the
    newest status is never held back."""
    from fr_megatron.runtime.heartbeat import Heartbeat

    sent: list[dict] = []
    signer = Signer(new_token().encode(), "rank0")
    status = {"step": 0, "phase": "forward"}
    hb = Heartbeat(lambda raw: sent.append(signer.verify(raw)), signer, 0, 2.0,
                   lambda: dict(status))
    hb.start()
    try:
        assert _until(lambda: sent, 5.0)  # the first beat
        first = len(sent)
        t0 = time.time()
        for i in range(1, 41):  # 40 changes in about 0.2 s
            status.update(step=i, phase=("forward", "backward")[i % 2])
            hb.poke()
            time.sleep(0.005)
        assert _until(lambda: sent[-1]["step"] == 40, 10.0), sent[-3:]
        # at most one beat per quarter interval (0.5 s), however long a busy machine took
        gaps = (time.time() - t0) / (hb.interval * hb.MIN_GAP_FRACTION)
        assert len(sent) - first <= 2 + int(gaps), [b["step"] for b in sent]
    finally:
        hb.stop()
        hb.join(5)


@pytest.mark.timeout(60)
def test_agent_fences_when_cut_off_but_not_in_the_controllers_own_process(tmp_path):
    """A node agent that has not reached the controller for twice the node timeout kills its
    workers. The agent that runs in the controller's process cannot be cut off from it: there
    a long stall of the process (6 s with 32 ranks on 2 cores) killed every rank of node 0."""
    token = new_token().encode()
    cfg = FlashRecoveryConfig(wandb={"enabled": False}, journal=str(tmp_path / "j.jsonl"),
                              node_timeout=1.0)
    ctl = Controller(4, 2, 2, "127.0.0.1", 0, token, cfg)
    agents = []
    try:
        for node, with_controller in ((0, True), (1, False)):
            run_dir = tmp_path / f"node{node}"
            run_dir.mkdir()
            agents.append(NodeAgent(node_rank=node, nnodes=2, nproc=2,
                                    controller=(ctl.host, ctl.port), token=token,
                                    token_file=str(tmp_path / "token"), cfg=cfg,
                                    script="unused.py", script_args=[], spares=0,
                                    run_dir=str(run_dir), with_controller=with_controller))
        now = time.monotonic()
        for agent in agents:
            agent._beat_ok_t = now - 2.5  # no beat through for 2.5 s: over twice the timeout
        assert [a.cut_off(now) for a in agents] == [False, True]
        for agent in agents:
            agent._beat_ok_t = now - 1.5
        assert [a.cut_off(now) for a in agents] == [False, False]
    finally:
        for agent in agents:
            agent._done.set()
            agent.inbox.close()
        ctl.stop()


@pytest.mark.timeout(60)
def test_inbox_keeps_a_dead_process_open_until_its_last_beats_are_taken(tmp_path):
    """A rank that sends a beat and dies at once: its beat is still read, and the inbox says
    its process is open until the pass that read its connection's end is settled."""
    import subprocess
    import sys

    from fr_megatron.protocol.node_beats import BeatInbox

    inbox = BeatInbox(str(tmp_path / "beats.sock"))
    child = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, sys; from fr_megatron.protocol.node_beats import BeatSender; "
        "s = BeatSender(sys.argv[1]); s.send(b'first'); sys.stdin.readline(); "
        "s.send(b'last'); os.kill(os.getpid(), signal.SIGKILL)"), inbox.path],
        stdin=subprocess.PIPE)
    got: list[bytes] = []
    deadline = time.time() + 30
    while not got and time.time() < deadline:
        got += inbox.receive(0.2)
    assert got == [b"first"] and child.pid in inbox.open_pids
    child.stdin.write(b"go\n")
    child.stdin.flush()
    assert child.wait(30) == -9
    while child.pid in inbox.open_pids and time.time() < deadline:
        got += inbox.receive(0.2)
        assert child.pid in inbox.open_pids  # not before the messages read are taken
        inbox.settle()
    assert got == [b"first", b"last"] and child.pid not in inbox.open_pids
    inbox.close()
