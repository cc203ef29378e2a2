"""Disk checkpoints of the megatron-core GPT recipe (``fr_megatron.megatron.checkpoint``, flags
``--save DIR --save-interval K`` / ``--load DIR`` as in Megatron-LM), under plain torchrun.

A 4-rank job (PP=2 x DP=2, DistributedOptimizer, dropout on) saves every 2 steps and stops at
step 4 of 6; a second job loads the latest checkpoint and trains steps 5-6, with flash recovery
on and rank 1 killed in step 6: its replacement loads nothing, and must take the iteration the
job started at (4) from its peers with the rest of its state. Both jobs together must equal one
uninterrupted 6-step job bit for bit: losses, every rank's parameters and optimizer shards,
consumed samples. The recipe reads its data as Megatron-LM does (a loader built at the consumed
samples, ``--dataloader-type single``), so the replacement must also move its loader to its
peers' position. Before the second job starts, the directory also holds an incomplete
``iter_0000006`` (a save that crashed before the tracker file was written), which must be ignored.

The same checkpoints are flash recovery's fallback: under ``fr-megatron run --flash-recovery``
with snapshots in process memory (``--snapshot-dir ''``, so they die with their process), ranks 2
and 3 (data-parallel replicas of the last pipeline stage, each holding the other's copy) die
together at step 6, so nothing live has their state; every rank loads the step-4 checkpoint,
redoes step 5, and the job still ends equal to the uninterrupted one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs import MEGATRON_RECIPE as RECIPE, REPO, run_job

from fr_megatron.megatron import checkpoint

WORLD = 4
ARGS = ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2",
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--train-iters", "6", "--use-distributed-optimizer"]


def torchrun(tmp: Path, name: str, extra: list[str], timeout: float = 240) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(WORLD), "--max-restarts", "0", str(RECIPE), *ARGS, *extra,
           "--out", str(tmp / name)]
    env = {**os.environ, "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu"}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    (tmp / f"{name}.log").write_text(out)
    assert p.returncode == 0, out[-5000:]
    return [torch.load(tmp / f"{name}.rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """One uninterrupted 6-step job."""
    return torchrun(tmp_path_factory.mktemp("whole"), "whole", [])


def assert_final_state_equal(w: dict, b: dict, r: int) -> None:
    assert b["consumed_samples"] == w["consumed_samples"] == 6 * 8
    assert b["params"].keys() == w["params"].keys()
    for k in w["params"]:
        assert torch.equal(b["params"][k], w["params"][k]), f"rank {r} param {k} differs"
    assert b["optim"].keys() == w["optim"].keys() and w["optim"]
    for k in w["optim"]:
        assert torch.equal(b["optim"][k], w["optim"][k]), f"rank {r} optimizer {k} differs"


@pytest.mark.timeout(600)
def test_save_at_4_load_and_continue_to_6_is_bit_identical(tmp_path, whole):
    ckpt = tmp_path / "ckpt"
    first = torchrun(tmp_path, "first", ["--save", str(ckpt), "--save-interval", "2",
                                         "--exit-interval", "4"])
    assert checkpoint.latest(ckpt) == 4
    assert (ckpt / checkpoint.TRACKER).read_text() == "4\n"
    for step in (2, 4):
        assert (checkpoint.checkpoint_dir(ckpt, step) / "metadata.json").exists()
    assert not list(ckpt.glob(".*tmp"))

    # a save of step 6 that died before the tracker file was written
    torn = checkpoint.checkpoint_dir(ckpt, 6)
    torn.mkdir()
    (torn / "__0_0.distcp").write_bytes(b"\0" * 100)

    job = run_job(tmp_path, RECIPE, [*ARGS, "--flash-recovery", "--load", str(ckpt), "--save",
                                      str(ckpt), "--out", str(tmp_path / "second")],
                  nproc=WORLD, spares=1, name="second", timeout=400,
                  inject="kill:rank=1:step=2:phase=forward")  # runtime step 2 = iteration 6
    assert job.rc == 0, job.failure(5000)
    assert "loaded checkpoint of step 4" in job.output
    # the replacement's loader starts at sample 0 (it loads no checkpoint); its peers' were
    # built at sample 32 and had read 2 micro-batches (4 samples each) by the recovery point
    assert "training data iterator 0 moved from micro-batch 0 to 10 " in job.output
    assert [(f["rank"], f["recovery_point"], f["steps_lost"])
            for f in job.report["faults"]] == [(1, 1, 0)], job.report["faults"]
    second = [torch.load(tmp_path / f"second.rank{r}.pt", weights_only=False)
              for r in range(WORLD)]
    # the final save (Megatron-LM saves at the end of training) replaced the torn directory
    assert checkpoint.latest(ckpt) == 6
    assert (torn / "metadata.json").exists()

    for r in range(WORLD):
        a, b, w = first[r], second[r], whole[r]
        assert sorted(a["losses"]) == [1, 2, 3, 4] and sorted(b["losses"]) == [5, 6]
        assert {**a["losses"], **b["losses"]} == w["losses"], (r, a["losses"], b["losses"],
                                                              w["losses"])
        assert_final_state_equal(w, b, r)
        # and the stop at step 4 really left something to redo: step 4's state is not step 6's
        assert any(not torch.equal(a["params"][k], w["params"][k]) for k in w["params"])


@pytest.mark.timeout(600)
def test_rank_lost_with_every_copy_falls_back_to_the_checkpoint_bit_exact(tmp_path, whole):
    ckpt = tmp_path / "ckpt"
    job = run_job(tmp_path, RECIPE, [*ARGS, "--flash-recovery", "--save", str(ckpt),
                                      "--save-interval", "2", "--out", str(tmp_path / "fb")],
                  nproc=WORLD, spares=2, name="fb", timeout=400, extra=["--snapshot-dir", ""],
                  inject="kill:rank=2:step=6:phase=forward;kill:rank=3:step=6:phase=forward")
    assert job.rc == 0, job.failure(5000)
    faults = job.report["faults"]
    assert sorted(f["rank"] for f in faults) == [2, 3], faults
    for f in faults:
        assert f["fallback_to_checkpoint"] is True, f
        assert (f["recovery_point"], f["steps_lost"]) == (4, 1), f  # step 5 redone
    (fb,) = [e for e in job.journal if e["event"] == "fallback_to_checkpoint"]
    # the replacements' loaders start at sample 0: the checkpoint's 32 samples put them at
    # micro-batch 8; the survivors queue again what they read since then
    assert job.output.count("training data iterator 0 moved from micro-batch 0 to 8 ") == 2
    assert (fb["checkpoint_step"], fb["steps_lost"], fb["lost"]) == (4, 1, [2, 3])
    for r in range(WORLD):
        got = torch.load(tmp_path / f"fb.rank{r}.pt", weights_only=False)
        assert got["losses"] == whole[r]["losses"], (r, got["losses"], whole[r]["losses"])
        assert_final_state_equal(whole[r], got, r)


@pytest.mark.timeout(10)
def test_latest_reads_only_the_tracker_file(tmp_path):
    assert checkpoint.latest(tmp_path) is None
    checkpoint.checkpoint_dir(tmp_path, 3).mkdir()  # a directory alone is not a checkpoint
    assert checkpoint.latest(tmp_path) is None
    (tmp_path / checkpoint.TRACKER).write_text("12\n")
    assert checkpoint.latest(tmp_path) == 12
    assert checkpoint.checkpoint_dir(tmp_path, 12).name == "iter_0000012"


@pytest.mark.timeout(600)
def test_rank_killed_a_step_after_its_copy_holder_was_replaced_is_bit_exact(tmp_path, whole):
    """With snapshots in process memory, ranks 2 and 3 (the last stage's data-parallel
    replicas) hold each other's copies. Rank 3 dies in step 3: its replacement holds nothing
    until rank 2's copy of step 2 is sent to it again, before training resumes. Rank 2 dies in
    step 4 and restores its unique state (its distributed-optimizer shard) from that
    replacement. The job ends equal to the uninterrupted one (it is also the reference here)."""
    job = run_job(tmp_path, RECIPE, [*ARGS, "--flash-recovery", "--out", str(tmp_path / "h")],
                  nproc=WORLD, spares=2, name="h", timeout=400, extra=["--snapshot-dir", ""],
                  inject="kill:rank=3:step=3:phase=backward;kill:rank=2:step=4:phase=forward")
    assert job.rc == 0, job.failure(5000)
    assert job.report["redundancy"]["holders"] == {"0": [1], "1": [0], "2": [3], "3": [2]}
    faults = sorted(job.report["faults"], key=lambda f: f["step"])
    assert [(f["rank"], f["step"], f["recovery_point"], f["steps_lost"]) for f in faults] == \
        [(3, 3, 2, 0), (2, 4, 3, 0)], faults
    assert faults[1]["restored_from"]["unique"] == 3, faults[1]  # the holder's replacement
    for r in range(WORLD):
        got = torch.load(tmp_path / f"h.rank{r}.pt", weights_only=False)
        assert got["losses"] == whole[r]["losses"], (r, got["losses"], whole[r]["losses"])
        assert_final_state_equal(whole[r], got, r)
