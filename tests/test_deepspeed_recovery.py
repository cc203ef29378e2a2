"""DeepSpeed ZeRO-1/2 jobs under ``fr-megatron run`` losing a rank, recovered bit-exact.

Each test runs ``recipes/deepspeed/train_tiny.py`` on 4 ranks (gloo, ``DS_ACCELERATOR=cpu``) with
injected faults and compares every rank's losses, module parameters, ZeRO fp32 shard, Adam moments and
engine counters with a fault-free run of the same configuration (module-scoped baselines).

Faults: a kill mid-training (forward / backward: the survivors fail in ZeRO's gradient reduction and
must forget its half-filled buckets); a kill at the optimizer phase just before ``engine.step()``; a
kill and an exception *inside* DeepSpeed's step (the ``optimizer`` phase marked from a post-hook of
the inner optimizer: the faulty rank has updated its shard, the survivors roll back theirs); hangs
(beating, and holding the GIL) before ZeRO-2's gradient reduction while the others block inside
it, each blamed on the hung rank alone; and Megatron-core's parallel_state as DeepSpeed's mpu
(TP=2 x DP=2), rebuilt on the new generation.
"""

from __future__ import annotations

import subprocess

import pytest
import torch

from jobs import DEEPSPEED_RECIPE as DS_RECIPE, run_job

STEPS = 6
JOB_TIMEOUT = 300  # one job takes 20-40 s on an idle 2-core machine; generous for a shared one
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
CONFIGS = {
    "zero1": ["--zero-stage", "1"],
    "zero2": ["--zero-stage", "2"],
    "tp2": ["--zero-stage", "2", "--mpu", "megatron", "--tp", "2"],
}


def ds_job(tmp, config: str, inject: str | None = None, spares: int = 1, extra_args=(),
           name: str = "job", launcher_args=()):
    try:
        job = run_job(tmp, DS_RECIPE, ["--steps", str(STEPS), *CONFIGS[config], *extra_args],
                      inject=inject, spares=spares, env=ENV, name=name, timeout=JOB_TIMEOUT,
                      extra=list(launcher_args))
    except subprocess.TimeoutExpired as e:
        out = b"".join(x if isinstance(x, bytes) else x.encode() for x in (e.stdout, e.stderr) if x)
        pytest.fail(f"job {name} ({config}, {inject}) ran past {JOB_TIMEOUT}s; output tail:\n"
                    + out.decode(errors="replace")[-6000:])
    assert job.rc == 0, job.failure(5000)
    ranks = [job.result]
    for r in range(1, 4):
        path = tmp / f"{name}.pt.rank{r}"
        assert path.exists(), f"rank {r} wrote no results\n" + job.failure(3000)
        ranks.append(torch.load(path, weights_only=False))
    job.ranks = ranks
    return job


def _baseline(tmp_path_factory, config):
    job = ds_job(tmp_path_factory.mktemp(f"base_{config}"), config, spares=0, name="base")
    assert job.report["faults"] == []
    assert sorted(job.ranks[0]["losses"]) == list(range(1, STEPS + 1))
    return job.ranks


@pytest.fixture(scope="module")
def baseline_zero1(tmp_path_factory):
    return _baseline(tmp_path_factory, "zero1")


@pytest.fixture(scope="module")
def baseline_zero2(tmp_path_factory):
    return _baseline(tmp_path_factory, "zero2")


@pytest.fixture(scope="module")
def baseline_tp2(tmp_path_factory):
    return _baseline(tmp_path_factory, "tp2")


def assert_same_rank_state(base: dict, got: dict, rank: int) -> None:
    """Bit-identical losses at every step, parameters, ZeRO shard + optimizer state, counters."""
    assert got["losses"] == base["losses"], (rank, base["losses"], got["losses"])
    assert got["params"].keys() == base["params"].keys()
    for k, v in base["params"].items():
        assert torch.equal(v, got["params"][k]), f"rank {rank}: parameter {k} differs"
    sb, sg = base["optim"]["state"], got["optim"]["state"]
    assert sg.keys() == sb.keys() and sb, (rank, sb.keys(), sg.keys())
    for slot in sb:
        assert sg[slot].keys() == sb[slot].keys(), (rank, slot)
        for k, v in sb[slot].items():
            assert torch.equal(v, sg[slot][k]), f"rank {rank}: optimizer state {slot}/{k} differs"
    assert got["optim"]["param_groups"] == base["optim"]["param_groups"], rank
    assert got["engine"] == base["engine"], (rank, base["engine"], got["engine"])


# one job per configuration, several faults each (one per step, each its own generation), so
# the suite pays for three start-ups, not six
JOBS = {
    # id: (config, --optimizer-phase, [(inject, kind)])
    "zero1-before-step": ("zero1", "before-step", [
        ("kill:rank=3:step=2:phase=optimizer", "crash"),  # just before engine.step()
        ("kill:rank=1:step=3:phase=forward", "crash")]),
    # inside DeepSpeedZeroOptimizer.step: the faulty rank has updated its shard, the survivors
    # roll back theirs; rank 0 is data-parallel rank 0, whose fresh engine broadcasts its
    # initial parameters to the survivors (they must keep their own). Then hangs in the gradient
    # reduction, which ZeRO-2 runs at the end of engine.backward (the integration marks it
    # grad_reduce): one rank stops before it while the others block inside, then the same
    # holding the GIL; each is blamed on the hung rank alone.
    "zero2-inside-step": ("zero2", "inside-step", [
        ("kill:rank=2:step=2:phase=backward", "crash"),  # survivors forget half-filled buckets
        ("kill:rank=0:step=3:phase=optimizer", "crash"),
        ("exception:rank=1:step=4:phase=optimizer", "exception"),
        ("hang:rank=2:step=5:phase=grad_reduce", "hang"),
        ("hang_gil:rank=1:step=6:phase=grad_reduce", "hang_gil")]),
    # Megatron-core parallel_state as the mpu, TP=2 x DP=2: replica groups {0,2} and {1,3}
    "tp2-zero2": ("tp2", "before-step", [("kill:rank=1:step=3:phase=backward", "crash")]),
}


@pytest.mark.timeout(2 * JOB_TIMEOUT + 60)  # includes the baseline run of its configuration
@pytest.mark.parametrize("name", list(JOBS))
def test_deepspeed_faults_recovered_bit_exact(tmp_path, request, name):
    config, where, faults = JOBS[name]
    base = request.getfixturevalue(f"baseline_{config}")
    hangs = any(kind.startswith("hang") for _, kind in faults)
    job = ds_job(tmp_path, config, inject=";".join(spec for spec, _ in faults),
                 spares=2, extra_args=["--optimizer-phase", where],
                 launcher_args=["--hang-timeout", "4", "--heartbeat-interval", "0.2"] if hangs else ())
    reported = [e for e in job.journal if e["event"] == "fault_reported"]
    assert len(job.report["faults"]) == len(faults), job.report["faults"]
    for fault, (spec, kind) in zip(job.report["faults"], faults):
        rank, step, phase = (int(spec.split("rank=")[1].split(":")[0]),
                             int(spec.split("step=")[1].split(":")[0]), spec.split("phase=")[1])
        assert (fault["rank"], fault["kind"], fault["step"], fault["phase"]) == \
            (rank, kind, step, phase)
        assert fault["replacement"] == "spare"
        assert fault["survivor_pids_unchanged"] is True
        assert fault["steps_lost"] == 0 and fault["recovery_point"] == step - 1
        if kind == "exception":  # raised from the inner optimizer's hook, inside ZeRO's step
            (rep,) = [e for e in reported if (e["rank"], e["step"]) == (rank, step)]
            tb = rep["traceback"]
            assert f"InjectedFault: injected exception at step {step}" in tb, tb
            assert "deepspeed/runtime/zero/stage_1_and_2.py" in tb and "in step" in tb, tb
        if kind.startswith("hang"):  # the others blocked inside the reduction it never entered
            assert fault["evidence"][0] == "not_in_collective", fault
            assert {r for w in fault["waits"] for r in w["waiting"]} == {0, 1, 2, 3} - {rank}
    assert job.report["finished_ranks"] == 4
    for fault in job.report["faults"]:  # the rank finished in its replacement process
        assert job.ranks[fault["rank"]]["pid"] not in {e["pid"] for e in reported}
    for r in range(4):
        assert_same_rank_state(base[r], job.ranks[r], r)
    if config == "tp2":  # TP shards differ, data-parallel replicas agree
        p0, p1, p2 = (job.ranks[r]["params"]["fc1.weight"] for r in (0, 1, 2))
        assert torch.equal(p0, p2) and not torch.equal(p0, p1)
