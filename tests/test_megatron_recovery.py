"""Checkpoint-free recovery of megatron-core 3D-parallel training (TP=2 x PP=2 x DP=2, the
DistributedOptimizer), a fault in every phase of a step: the job ends with every rank's
parameters and optimizer shards torch.equal to a fault-free run, the same loss at every step,
the same consumed samples, steps_lost 0, and survivors that kept their processes."""

from pathlib import Path

import pytest
import torch

from fr_megatron.wandb_reader import read_run
from jobs import REPO, run_job

RECIPE = REPO / "recipes" / "megatron" / "pretrain_gpt.py"
WORLD = 8
ARGS = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--train-iters", "9", "--use-distributed-optimizer", "--flash-recovery"]


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


# a warm spare has megatron-core imported too, not only torch
PRELOAD = ["--preload", "torch,torch.distributed,fr_megatron.runtime,megatron.core,"
                        "megatron.core.models.gpt,megatron.core.optimizer"]


def megatron_job(tmp: Path, name: str, args=ARGS, inject=None, nproc=WORLD, spares=1,
                 wandb_dir=None):
    job = run_job(tmp, RECIPE, [*args, "--out", str(tmp / name)], nproc=nproc, spares=spares,
                  inject=inject, name=name, timeout=600, extra=PRELOAD, wandb_dir=wandb_dir)
    assert job.rc == 0, job.failure(5000)
    return job


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mbase")
    job = megatron_job(tmp, "base")
    assert job.report["faults"] == []
    return load_ranks(tmp, "base")


# several faults in one job, each in its own phase and generation: forward on the first
# pipeline stage, a kill inside optimizer.step (after the local Adam update, before the
# parameter all-gather: a partial update), the gradient reduction, backward, and a fault
# between the step and its commit on the last pipeline stage
PHASE_JOBS = {
    "forward-optimizer-after_step": "kill:rank=0:step=2:phase=forward;"
                                    "kill:rank=5:step=4:phase=optimizer;"
                                    "kill:rank=3:step=6:phase=after_step",
    "backward-grad_reduce": "kill:rank=6:step=3:phase=backward;"
                            "exception:rank=1:step=6:phase=grad_reduce",
}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(PHASE_JOBS))
def test_fault_in_every_phase_is_recovered_bit_exact(tmp_path, baseline, name):
    spec = PHASE_JOBS[name]
    job = megatron_job(tmp_path, "f", inject=spec, wandb_dir=tmp_path)
    faults = job.report["faults"]
    expected = [s.split(":") for s in spec.split(";")]
    assert len(faults) == len(expected)
    for f, parts in zip(faults, expected):
        fields = dict(p.split("=") for p in parts[1:])
        assert (f["rank"], f["step"], f["phase"]) == (int(fields["rank"]), int(fields["step"]),
                                                      fields["phase"])
        assert f["kind"] == {"kill": "crash", "exception": "exception"}[parts[0]]
        assert f["steps_lost"] == 0 and f["recovery_point"] == f["step"] - 1
        assert f["survivor_pids_unchanged"] is True
        assert f["fallback_to_checkpoint"] is False
        assert set(f["phases"]) >= {"detect", "abort", "rebuild", "restore", "resume"}
    assert_ranks_equal(baseline, load_ranks(tmp_path, "f"))
    # every recovery is an event in the offline wandb run, read back from the file wandb wrote
    run = read_run(str(tmp_path / "wandb"))
    logged = [h for h in run["history"] if "recovery/rank" in h]
    assert [(h["recovery/rank"], h["recovery/fault_step"], h["recovery/kind"],
             h["recovery/fault_phase"], h["recovery/steps_lost"]) for h in logged] == \
        [(f["rank"], f["step"], f["kind"], f["phase"], 0) for f in faults]
    assert all(h["recovery/phase_rebuild_s"] > 0 for h in logged)
    assert run["summary"]["recoveries"] == len(faults) and "flash-recovery" in run["tags"]


@pytest.mark.timeout(900)
def test_rank_lost_with_every_copy_falls_back_to_the_disk_checkpoint_bit_exact(tmp_path,
                                                                               baseline):
    # ranks 1 and 3 are data-parallel replicas and each holds the other's copy: losing both
    # loses every live copy of their state. With --save the job loads the latest checkpoint
    # (step 4) instead, redoes step 5, and still ends equal to the fault-free run.
    ckpt = tmp_path / "ckpt"
    job = megatron_job(tmp_path, "fb", args=[*ARGS, "--save", str(ckpt), "--save-interval", "4"],
                       inject="kill:rank=1:step=6:phase=forward;kill:rank=3:step=6:phase=forward",
                       spares=2)
    faults = job.report["faults"]
    assert sorted(f["rank"] for f in faults) == [1, 3], faults
    for f in faults:
        assert f["fallback_to_checkpoint"] is True, f
        assert f["recovery_point"] == 4 and f["steps_lost"] == 1, f
    (fb,) = [e for e in job.journal if e["event"] == "fallback_to_checkpoint"]
    assert (fb["checkpoint_step"], fb["steps_lost"], fb["lost"]) == (4, 1, [1, 3])
    assert_ranks_equal(baseline, load_ranks(tmp_path, "fb"))
