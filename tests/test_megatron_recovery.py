"""Checkpoint-free recovery of megatron-core 3D-parallel training (TP=2 x PP=2 x DP=2, the
DistributedOptimizer), faults and hangs inside the optimizer step, the gradient reduction, a
tensor-parallel collective and the commit, each hang blamed on the hung rank alone: the job ends with every rank's parameters and optimizer shards torch.equal to a fault-free run,
the same loss at every step, the same consumed samples, steps_lost 0, and survivors that kept
their processes. The recipe reads its data through a loader built at start-up, as Megatron-LM
does, so the replacements must also put their loaders at the recovery point. The warm spares
are given no --preload list: they learn what to import from the ranks (megatron-core the way
the ranks load it). The last rank logs its loss to a wandb run of its own (--wandb-project, as
Megatron-LM does), and each recovery is in that run too, at its iteration."""

import json
from pathlib import Path

import pytest
import torch

from fr_megatron.protocol import progress
from fr_megatron.protocol.auth import new_token, write_token_file
from fr_megatron.wandb_reader import read_run
from jobs import MEGATRON_RECIPE as RECIPE, run_job

WORLD = 8
ARGS = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--train-iters", "8", "--use-distributed-optimizer", "--flash-recovery",
        "--deterministic-mode",  # a no-op for these CPU kernels; on GPUs bit-exactness needs it
        # 8 ranks and spares importing megatron on 2 cores stall a rank for seconds at times:
        # a job with injected hangs gives its own --hang-timeout
        "--flash-recovery-hang-timeout-min", "30"]


def load_ranks(tmp: Path, name: str, world: int = WORLD) -> list[dict]:
    return [torch.load(tmp / f"{name}.rank{r}.pt", weights_only=False) for r in range(world)]


def assert_ranks_equal(base: list[dict], got: list[dict]) -> None:
    for r, (a, b) in enumerate(zip(base, got)):
        assert a["losses"] == b["losses"], (r, a["losses"], b["losses"])
        assert a["consumed_samples"] == b["consumed_samples"]
        assert a["params"].keys() == b["params"].keys()
        for k in a["params"]:
            assert torch.equal(a["params"][k], b["params"][k]), f"rank {r} param {k} differs"
        assert a["optim"].keys() == b["optim"].keys()
        for k in a["optim"]:
            assert torch.equal(a["optim"][k], b["optim"][k]), f"rank {r} optimizer {k} differs"


def megatron_job(tmp: Path, name: str, args=ARGS, inject=None, nproc=WORLD, spares=1,
                 wandb_dir=None, extra=(), preload=None):
    job = run_job(tmp, RECIPE, [*args, "--out", str(tmp / name)], nproc=nproc, spares=spares,
                  inject=inject, name=name, timeout=600, extra=list(extra),
                  wandb_dir=wandb_dir, preload=preload)
    assert job.rc == 0, job.failure(5000)
    return job


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mbase")
    job = megatron_job(tmp, "base", spares=0)  # no fault: a spare would only take CPU
    assert job.report["faults"] == []
    return load_ranks(tmp, "base")


# several faults in one job, each in its own step, phase and generation (one start-up for all):
# - a kill inside optimizer.step (after the local Adam update, before the parameter all-gather: a
#   partial update) on the last pipeline stage, an exception in the gradient reduction on the
#   first, and a fault between the step and its commit (forward and backward faults:
#   test_faults_torch, test_deepspeed_recovery);
# - hangs, each with every other rank of its groups blocked in an operation it never entered: in
#   the first tensor-parallel collective of a forward, in the distributed optimizer's parameter
#   all-gather (the first operation on its group after the local Adam update) and in the gradient
#   reduction.
FAULTS = ("kill:rank=5:step=2:phase=optimizer;"
          "exception:rank=1:step=3:phase=grad_reduce;"
          "hang:rank=2:step=4:phase=forward:group=tp;"
          "kill:rank=3:step=5:phase=after_step;"
          "hang:rank=1:step=6:phase=optimizer:group=dist_opt;"
          "hang:rank=5:step=7:phase=grad_reduce")
KINDS = {"kill": "crash", "exception": "exception", "hang": "hang"}
# ranks 0-7 at TP=2 x PP=2 x DP=2: tensor groups {0,1} {2,3} ..., data-parallel {0,2} {1,3} ...
PEERS = {"tp": {2: [2, 3]}, "dist_opt": {1: [1, 3]}}


@pytest.mark.timeout(900)
def test_faults_and_hangs_anywhere_in_the_step_are_recovered_bit_exact(tmp_path, baseline):
    token = new_token()
    write_token_file(str(tmp_path / "token"), token)
    script_wandb = tmp_path / "script_wandb"
    job = megatron_job(tmp_path, "f", args=[*ARGS, "--wandb-project", "fr-tests",
                                            "--wandb-save-dir", str(script_wandb)],
                       inject=FAULTS, spares=2, wandb_dir=tmp_path, preload="",
                       extra=["--token-file", str(tmp_path / "token"),
                              "--hang-timeout", "8", "--heartbeat-interval", "0.5"])
    faults = job.report["faults"]
    # a survivor whose aborted gloo send never ends (benchmarks/results/gloo_abort_stuck.md)
    # reports itself stuck and is replaced in the same recovery, from the same recovery point
    stuck = [f for f in faults if f["kind"] == "stuck"]
    injected = [f for f in faults if f["kind"] != "stuck"]
    for f in stuck:
        assert f["steps_lost"] == 0 and f["survivor_pids_unchanged"] is True, f
        assert any(g["recovery_point"] == f["recovery_point"] for g in injected), f
    expected = [s.split(":") for s in FAULTS.split(";")]
    assert len(injected) == len(expected), faults
    for f, parts in zip(sorted(injected, key=lambda f: f["step"]), expected):
        fields = dict(p.split("=") for p in parts[1:])
        assert (f["rank"], f["step"], f["phase"]) == (int(fields["rank"]), int(fields["step"]),
                                                      fields["phase"])
        assert f["kind"] == KINDS[parts[0]]
        assert f["survivor_pids_unchanged"] is True
        assert set(f["phases"]) >= {"detect", "abort", "rebuild", "restore", "resume"}
        assert f["steps_lost"] == 0 and f["recovery_point"] == f["step"] - 1, f
        assert f["fallback_to_checkpoint"] is False
        # the ranks replaced restore their snapshots; a survivor whose optimizer has not stepped
        # since the last commit keeps its live tensors and restores only the meta, as every
        # survivor of a fault in a forward does (the step's collectives need the faulty rank)
        replaced = {g["rank"] for g in faults if g["generation"] == f["generation"]}
        assert not set(f["ranks_kept_live_state"]) & replaced, f
        if f["phase"] == "forward":
            assert f["ranks_kept_live_state"] == sorted(set(range(WORLD)) - replaced), f
        if f["kind"] == "hang":  # blamed alone, on the evidence of its waiting peers
            assert f["evidence"][0] == "not_in_collective", f
            for w in f["waits"]:  # each wait is on an operation the hung rank is a member of
                assert f["rank"] in progress.members(w["key"]) and w["its_count"] < w["their_count"]
            if "group" in fields:  # its peer in that group waits inside the operation
                members = PEERS[fields["group"]][f["rank"]]
                peer = [r for r in members if r != f["rank"]]
                assert any(progress.members(w["key"]) == members and w["waiting"] == peer
                           for w in f["waits"]), f
    # the recipe reads its data as Megatron-LM does, from a loader built at start-up: each
    # replacement read its loader ahead to the recovery point (2 micro-batches a step)
    for f in faults:
        assert (f"training data iterator 0 moved from micro-batch 0 to {2 * f['recovery_point']} "
                in job.output), f
    assert_ranks_equal(baseline, load_ranks(tmp_path, "f"))
    # every recovery is an event in the offline wandb run, read back from the file wandb wrote
    run = read_run(str(tmp_path / "wandb"))
    logged = [h for h in run["history"] if "recovery/rank" in h]
    assert sorted((h["recovery/rank"], h["recovery/fault_step"], h["recovery/kind"],
                   h["recovery/fault_phase"], h["recovery/steps_lost"]) for h in logged) == \
        sorted((f["rank"], f["step"], f["kind"], f["phase"], 0) for f in faults)
    assert all(h["recovery/phase_rebuild_s"] > 0 for h in logged)
    assert run["summary"]["recoveries"] == len(faults) and "flash-recovery" in run["tags"]
    # and in the script's own run, in the row of the iteration training resumed with, beside
    # that iteration's loss; the two runs are one wandb group
    script_run = read_run(str(script_wandb))
    assert script_run["group"] and script_run["group"] == run["group"]
    rows = {h["_step"]: h for h in script_run["history"]}
    for f in injected:  # the row of a recovery point shows one of its faults
        row = rows[f["recovery_point"] + 1]
        assert (row["recovery/rank"], row["recovery/kind"], row["recovery/fault_step"],
                row["recovery/steps_lost"]) in [(g["rank"], g["kind"], g["step"], 0)
                                                 for g in faults
                                                 if g["recovery_point"] == f["recovery_point"]], row
        assert row["recovery/phase_rebuild_s"] > 0 and row["recovery/phase_detect_s"] >= 0
        assert row["lm loss"] == load_ranks(tmp_path, "f")[WORLD - 1]["losses"][f["step"]]
    assert {h["_step"] for h in script_run["history"] if "lm loss" in h} == set(range(1, 9))
    # the job token is in none of what the job wrote: the wandb run's files, its log, the journal
    written = [p for p in (tmp_path / "wandb").rglob("*") if p.is_file()]
    assert written and all(token.encode() not in p.read_bytes() for p in written)
    assert token not in job.output and token not in json.dumps(job.journal)
