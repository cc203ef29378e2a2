"""Every fault kind on a 4-rank plain torch.distributed job: detected, classified, only the faulty
rank replaced, survivors keep their PIDs, and training ends bit-identical to a fault-free run."""

import pytest

from jobs import TORCH_RECIPE, assert_same_training, run_job

STEPS = ["--steps", "6"]
HANG = ["--hang-timeout", "2", "--heartbeat-interval", "0.2"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    job = run_job(tmp_path_factory.mktemp("base"), TORCH_RECIPE, STEPS, name="base")
    assert job.rc == 0, job.output[-3000:]
    assert job.report["faults"] == []
    return job.result


CASES = [
    # inject spec, expected kind, spares, extra flags
    ("kill:rank=2:step=3:phase=forward", "crash", 1, []),
    ("kill:rank=1:step=4:phase=backward", "crash", 0, []),
    ("segv:rank=3:step=3:phase=optimizer", "segv", 1, []),
    ("exception:rank=1:step=3:phase=backward", "exception", 1, []),
    ("exit:code=7:rank=2:step=3:phase=grad_reduce", "exit", 1, []),
    ("exit0:rank=0:step=3:phase=after_step", "exit0_early", 1, []),
    ("hang:rank=2:step=4:phase=forward", "hang", 1, HANG),
    ("hang_gil:rank=1:step=4:phase=backward", "hang_gil", 1, HANG),
    ("stop:rank=3:step=4:phase=optimizer", "stop", 1, HANG),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("spec,kind,spares,extra", CASES, ids=[c[0].split(":")[0] + f"-spares{c[2]}"
                                                             for c in CASES])
def test_fault_recovered_bit_exact(tmp_path, baseline, spec, kind, spares, extra):
    job = run_job(tmp_path, TORCH_RECIPE, STEPS, inject=spec, spares=spares, extra=extra)
    assert job.rc == 0, job.output[-4000:]
    rank = int(spec.split("rank=")[1].split(":")[0])
    step = int(spec.split("step=")[1].split(":")[0])
    phase = spec.split("phase=")[1]
    (fault,) = job.report["faults"]
    assert (fault["rank"], fault["kind"], fault["step"], fault["phase"]) == (rank, kind, step, phase)
    assert fault["replacement"] == ("spare" if spares else "spawn")
    assert fault["survivor_pids_unchanged"] is True
    assert fault["steps_lost"] == 0 and fault["recovery_point"] == step - 1
    assert fault["detect_s"] >= 0 and fault["recovery_s"] >= fault["detect_s"]
    assert set(fault["phases"]) >= {"detect", "abort", "rebuild", "restore", "resume"}
    if kind == "exception":
        (reported,) = [e for e in job.journal if e["event"] == "fault_reported"]
        assert "InjectedFault: injected exception at step 3" in reported["traceback"]
    assert job.report["finished_ranks"] == 4
    assert_same_training(baseline, job.result)
