"""Fixtures shared by several test files."""

import pytest

from jobs import TORCH_RECIPE, TORCH_STEPS, run_job


@pytest.fixture(scope="session")
def torch_baseline(tmp_path_factory):
    """The fault-free 4-rank run of recipes/torch_ddp/train.py that fault runs are compared to."""
    job = run_job(tmp_path_factory.mktemp("torch_base"), TORCH_RECIPE, TORCH_STEPS, name="base",
                  spares=0)  # no fault: a spare would only take CPU
    assert job.rc == 0, job.failure(3000)
    assert job.report["faults"] == []
    return job.result
