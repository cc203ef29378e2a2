"""The CUDA path of the megatron-core integration, on a machine with a GPU (skipped without one).

One rank, NCCL: the CPU mode must stay off (megatron-core keeps its ``torch.compile`` fusions),
the tiny GPT trains on the GPU, flash recovery's snapshot goes to host memory, and a step redone
from it (restore, then the same step again) ends bit-identical to its first run. Deterministic
algorithms are on, as bit-exact recovery on GPUs needs (``--deterministic-mode`` in Megatron-LM).
Run on one H100 (torch 2.11 + CUDA 13.0, Python 3.12, megatron-core 0.16.1): passed.
"""

import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.timeout(300)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_step_redone_from_the_host_snapshot_is_bit_exact_on_cuda(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29650", "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "redo bit-exact: True" in done.stdout, done.stdout


def _child() -> None:
    import torch.distributed as dist

    from fr_megatron.megatron import cpu
    from fr_megatron.megatron.integration import MegatronIntegration
    from fr_megatron.megatron.model import TinyGPTConfig, TinyGPTJob, initialize_parallel
    from fr_megatron.runtime.snapshot import SnapshotRing

    torch.use_deterministic_algorithms(True)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl")
    cfg = TinyGPTConfig()
    initialize_parallel(cfg)
    assert not cpu.cpu_mode_enabled()
    job = TinyGPTJob(cfg)
    assert next(job.model[0].parameters()).is_cuda
    integ = MegatronIntegration(job.model, job.optimizer, job.scheduler, progress=job)
    job.train_step(1)
    ring = SnapshotRing(2)
    ring.write(1, integ.capture())
    assert {t.device.type for t in ring.get(1).unique.values()} == {"cpu"}
    loss = job.train_step(2)
    first = {k: v.detach().cpu().clone() for k, v in integ.capture().unique.items()}
    integ.restore(ring.get(1))
    again_loss = job.train_step(2)
    again = {k: v.detach().cpu() for k, v in integ.capture().unique.items()}
    same = first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    print(f"losses {loss} {again_loss}; redo bit-exact: {loss == again_loss and same}")
    dist.destroy_process_group()


if __name__ == "__main__":
    _child()
