"""Where a lost rank's state comes from, and that no finished step is lost on the way.

- Redundancy by computation: megatron-core's distributed optimizer with
  ``--num-distributed-optimizer-instances 2`` keeps every optimizer shard on two ranks. With the
  snapshots in process memory (so they die with the rank), a rank killed in each phase of the step
  on TP=2 x PP=2 x DP=2 takes its shard from its instance peer and only its meta (RNG, counters)
  from a holder: no tensor is copied per step, and the job ends bit-exact.
- Copies in flight: on a job of two nodes (two launchers on this machine) every rank copies its
  unique state to a rank on the other node in the background of the next step. A rank killed while
  the copy of its last commit is still on its way restores that commit from its snapshot in the
  node's shared memory, its holder gets the copy again before training resumes, and the job ends
  bit-exact with no step lost.
- A node lost while one of its ranks' copies is still on its way: no rank may commit the next step
  meanwhile (it would drop from its ring the step the holders can still give back), so the job
  goes back to the step before, which every holder has, and ends bit-exact.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fr_megatron.events import Journal
from fr_megatron.protocol.auth import new_token, write_token_file
from jobs import REPO, TORCH_RECIPE, TORCH_STEPS, assert_same_training, free_port, node_beat
from test_megatron_recovery import ARGS, load_ranks, assert_ranks_equal, megatron_job

INSTANCES = [*ARGS, "--num-distributed-optimizer-instances", "2"]
PHASES = ("forward", "backward", "grad_reduce", "optimizer", "after_step")
# ranks 0 and 2 are instance peers (data-parallel ranks of tensor rank 0, first stage), 5 and 7
# of the last stage
KILLS = ";".join(f"kill:rank={r}:step={s}:phase={p}"
                 for r, s, p in zip((2, 5, 0, 7, 2), range(2, 7), PHASES))


@pytest.mark.timeout(900)
def test_optimizer_instances_restore_every_phase_from_the_instance_peer(tmp_path):
    base = megatron_job(tmp_path, "base", args=INSTANCES, spares=0)
    assert base.report["faults"] == []
    job = megatron_job(tmp_path, "inst", args=INSTANCES, inject=KILLS, spares=2,
                       extra=["--snapshot-dir", ""])
    red = job.report["redundancy"]
    assert red["instances"] == 2 and red["snapshots"] == "process memory"
    assert red["ranks_copying_tensors"] == [], red  # only the meta travels each step
    faults = sorted(job.report["faults"], key=lambda f: f["step"])
    # a survivor whose abort cut a message in the middle (gloo then waits out its timeout)
    # leaves as "stuck" and is recovered like the killed rank, at the killed rank's step, from
    # the snapshots it handed over as it left (its instance peer may be the killed rank)
    injected = [f for f in faults if f["kind"] != "stuck"]
    assert [(f["step"], f["phase"]) for f in injected] == list(zip(range(2, 7), PHASES)), faults
    assert {f["step"] for f in faults} == {f["step"] for f in injected}, faults
    peer = {0: 2, 2: 0, 1: 3, 3: 1, 4: 6, 6: 4, 5: 7, 7: 5}  # instance peers
    for f in faults:
        assert f["steps_lost"] == 0 and f["recovery_point"] == f["step"] - 1, f
        assert f["survivor_pids_unchanged"] is True
        source = f["rank"] if f["kind"] == "stuck" else peer[f["rank"]]
        assert f["restored_from"]["unique"] == source, f
        assert f["restored_from"]["replicated"] == source, f
    assert_ranks_equal(load_ranks(tmp_path, "base"), load_ranks(tmp_path, "inst"))


def _node(tmp: Path, port: int, node: int, inject: str, env: dict,
          extra: tuple = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fr_megatron.cli", "run", "--nnodes", "2", "--node-rank",
           str(node), "--nproc-per-node", "2", "--controller", f"127.0.0.1:{port}",
           "--token-file", str(tmp / "token"), "--no-wandb", "--spares", "1",
           *(("--inject", inject) if inject else ()), *extra]
    if node == 0:
        cmd += ["--report", str(tmp / "report.json"), "--journal", str(tmp / "journal.jsonl")]
    cmd += [str(TORCH_RECIPE), *TORCH_STEPS, "--out", str(tmp / "job.pt")]
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(tmp / f"node{node}.log", "w"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


@pytest.mark.timeout(300)
def test_rank_killed_while_its_copy_is_in_flight_loses_no_step(tmp_path, torch_baseline):
    write_token_file(str(tmp_path / "token"), new_token())
    port = free_port()
    # step 3's copies are held back 2 s: rank 3 dies in step 4's forward while its copy of step
    # 3 is still on its way to its holder on node 0
    env = {**os.environ, "FR_TEST_COPY_DELAY": "3:2.0"}
    inject = "kill:rank=3:step=4:phase=forward"
    nodes = [_node(tmp_path, port, n, inject, env) for n in (0, 1)]
    try:
        rcs = [p.wait(240) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    logs = "".join((tmp_path / f"node{n}.log").read_text()[-3000:] for n in (0, 1))
    assert rcs == [0, 0], logs
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["redundancy"]["ranks_copying_tensors"] == [0, 1, 2, 3], report["redundancy"]
    (fault,) = report["faults"]
    assert (fault["rank"], fault["step"], fault["phase"]) == (3, 4, "forward")
    assert fault["steps_lost"] == 0 and fault["recovery_point"] == 3, fault
    assert fault["restored_from"] == {"replicated": 3, "unique": 3, "meta": 3}, fault
    journal = Journal.read(str(tmp_path / "journal.jsonl"))
    assert any(e["event"] == "recovered" and e["rank"] == 3 for e in journal)
    assert_same_training(torch_baseline, torch.load(tmp_path / "job.pt", weights_only=False))


@pytest.mark.timeout(300)
def test_node_lost_with_a_copy_in_flight_goes_back_to_a_step_every_holder_has(tmp_path,
                                                                              torch_baseline):
    write_token_file(str(tmp_path / "token"), new_token())
    token = (tmp_path / "token").read_bytes().strip()
    port = free_port()
    # rank 3's copy of step 3 (to rank 0) is held back, and node 1 is lost while it is: once rank
    # 1 has reached step 4's commit its own exchange (its copy to rank 2) is done. Without waiting
    # for rank 3's too it would commit step 4 and keep steps 3 and 4 only, while rank 0 holds
    # rank 3's copies of steps 1 and 2: no step would be common to all.
    env = {**os.environ, "FR_TEST_COPY_DELAY": "3:60:3"}
    fast = ("--node-timeout", "3", "--heartbeat-interval", "0.2")
    nodes = [_node(tmp_path, port, 0, "", env, fast), _node(tmp_path, port, 1, "", env, fast),
             _node(tmp_path, port, 2, "", env, (*fast, "--spare-node"))]
    try:
        deadline = time.time() + 120
        while True:
            beat = node_beat("127.0.0.1", port, token, 0).get("1", {})
            if (beat.get("step", -1), beat.get("phase")) == (4, "after_step") \
                    or beat.get("step", -1) > 4:
                break
            assert time.time() < deadline and nodes[0].poll() is None, "rank 1 never reached step 4"
            time.sleep(0.05)
        time.sleep(1.0)  # time enough for rank 1 to commit step 4, if it did not wait
        os.killpg(nodes[1].pid, signal.SIGKILL)
        rcs = [nodes[0].wait(240), nodes[1].wait(60), nodes[2].wait(60)]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    logs = "".join((tmp_path / f"node{n}.log").read_text()[-3000:] for n in (0, 1, 2))
    assert rcs[0] == 0 and rcs[2] == 0, (rcs, logs)
    report = json.loads((tmp_path / "report.json").read_text())
    faults = sorted(report["faults"], key=lambda f: f["rank"])
    assert [(f["rank"], f["kind"]) for f in faults] == [(2, "node_lost"), (3, "node_lost")], logs
    for f in faults:
        # rank 3's step 3 reached no holder: step 2 is the last it finished (no step is lost),
        # and steps 3 and 4 are redone
        assert f["recovery_point"] == 2 and f["steps_lost"] == 0, f
        assert f["survivor_pids_unchanged"] is True, f
        assert f["restored_from"]["unique"] == 0, f  # node 0's holder of both
    assert_same_training(torch_baseline, torch.load(tmp_path / "job.pt", weights_only=False))
