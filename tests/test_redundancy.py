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
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fr_megatron.events import Journal
from fr_megatron.protocol.auth import new_token, write_token_file
from jobs import REPO, TORCH_RECIPE, TORCH_STEPS, assert_same_training, free_port
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
    assert [(f["step"], f["phase"]) for f in faults] == list(zip(range(2, 7), PHASES)), faults
    peer = {0: 2, 2: 0, 5: 7, 7: 5}
    for f in faults:
        assert f["steps_lost"] == 0 and f["recovery_point"] == f["step"] - 1, f
        assert f["survivor_pids_unchanged"] is True
        assert f["restored_from"]["unique"] == peer[f["rank"]], f
        assert f["restored_from"]["replicated"] == peer[f["rank"]], f
    assert_ranks_equal(load_ranks(tmp_path, "base"), load_ranks(tmp_path, "inst"))


def _node(tmp: Path, port: int, node: int, inject: str, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fr_megatron.cli", "run", "--nnodes", "2", "--node-rank",
           str(node), "--nproc-per-node", "2", "--controller", f"127.0.0.1:{port}",
           "--token-file", str(tmp / "token"), "--no-wandb", "--spares", "1",
           "--inject", inject]
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
