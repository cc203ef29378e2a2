"""The megatron recipe's ``--profile`` (Megatron-LM's flags): PyTorch profiler traces of the
iterations asked for, with flash recovery's work on the training thread named in them; and its
``--cpu-timings``: each iteration's CPU seconds, as the benchmarks read them."""

import json
import subprocess
import sys

import pytest

from jobs import MEGATRON_RECIPE, run_job

pytestmark = pytest.mark.timeout(240)


def test_profiled_iterations_name_flash_recoverys_work(tmp_path):
    traces, cpu = tmp_path / "traces", tmp_path / "cpu"
    job = run_job(tmp_path, MEGATRON_RECIPE,
                  ["--train-iters", "5", "--flash-recovery", "--profile",
                   "--use-pytorch-profiler", "--profile-step-start", "2",
                   "--profile-step-end", "4", "--tensorboard-dir", str(traces),
                   "--cpu-timings", str(cpu)],
                  nproc=1, spares=0)
    assert job.rc == 0, job.failure()
    (trace,) = traces.glob("*.json")
    names = [e.get("name", "") for e in json.loads(trace.read_text())["traceEvents"]]
    steps = sorted({n for n in names if n.startswith("ProfilerStep#")})
    assert len(steps) == 2  # iterations [2, 4)
    for work in ("fr_megatron.begin_step", "fr_megatron.commit",
                 "fr_megatron.wait_snapshot_read"):
        assert names.count(work) == 2, work  # once per profiled iteration
    # every iteration's CPU seconds: the process's (every thread), then the training thread's
    timings = json.loads((cpu / "rank0.json").read_text())
    assert sorted(map(int, timings)) == [1, 2, 3, 4, 5]
    for process, thread in timings.values():
        assert process >= thread > 0


def test_pytorch_profiler_without_a_directory_is_refused():
    p = subprocess.run([sys.executable, str(MEGATRON_RECIPE), "--profile",
                        "--use-pytorch-profiler"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "--use-pytorch-profiler writes its traces to --tensorboard-dir; give one" in p.stderr
