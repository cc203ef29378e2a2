"""A tiny DeepSpeed ZeRO job with a ``"flash_recovery"`` section, runnable on CPU.

Run (any torchrun-like launcher that sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK):

    DS_ACCELERATOR=cpu torchrun --nproc-per-node 4 recipes/deepspeed/train_tiny.py --zero-stage 2 --steps 20

The model is a small MLP; its data is a pure function of (step, micro-batch, data-parallel rank), so a
redone step sees the same micro-batches. ``fr_megatron.deepspeed.initialize`` validates the section
before any process group exists and leaves ``engine.flash_recovery`` (a DeepSpeedIntegration) for
the recovery runtime. ``--out`` writes the losses and a digest of the final parameters as JSON.
"""

import argparse
import json
import logging
import os
from pathlib import Path

import torch

import fr_megatron.deepspeed as frds

HERE = Path(__file__).resolve().parent
DIM, HIDDEN = 16, 64


def batch(step: int, micro: int, dp_rank: int, n: int):
    g = torch.Generator().manual_seed((step * 64 + micro) * 4096 + dp_rank)
    x = torch.randn(n, DIM, generator=g)
    return x, torch.sin(x[:, :4] * 2.0).sum(dim=1, keepdim=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(HERE / "ds_config.json"), help="DeepSpeed config (JSON)")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None,
                   help="override zero_optimization.stage (3 is refused by flash recovery)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--out", default=None, help="write losses and a parameter digest (JSON) here")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    cfg = json.loads(Path(a.config).read_text())
    if a.zero_stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = a.zero_stage
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.setdefault("train_batch_size", cfg["train_micro_batch_size_per_gpu"]
                   * cfg.get("gradient_accumulation_steps", 1) * world)

    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # DeepSpeed's CPU shared-memory all-reduce is used for inference only; skip its JIT build.
        import deepspeed

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.GELU(),
                                torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, 1))
    # A torch optimizer (instead of a config "optimizer") avoids compiling DeepSpeed's CPU Adam.
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    engine, _, _, _ = frds.initialize(model=model, optimizer=optimizer, config=cfg)
    fr = engine.flash_recovery
    dp_rank = torch.distributed.get_rank(group=engine.data_parallel_group)
    log = logging.getLogger("train_tiny")
    if fr is not None:
        log.info("flash recovery: replicas %d, replica group %s", fr.cfg.replicas, fr.replica_ranks())

    dtype = next(engine.module.parameters()).dtype  # bf16/fp16 when the config enables them

    def train_step(step: int) -> float:
        total = 0.0
        for micro in range(engine.gradient_accumulation_steps()):
            x, y = batch(step, micro, dp_rank, engine.train_micro_batch_size_per_gpu())
            out = engine(x.to(engine.device, dtype))
            loss = torch.nn.functional.mse_loss(out.float(), y.to(engine.device))
            engine.backward(loss)
            engine.step()
            total += loss.item()
        return total / engine.gradient_accumulation_steps()

    losses = []
    for step in range(engine.global_steps, a.steps):
        losses.append(train_step(step))
        if engine.global_rank == 0:
            log.info("step %d loss %.6f lr %.5f", step, losses[-1], engine.get_lr()[0])

    if a.out and engine.global_rank == 0:
        digest = float(sum(p.detach().double().sum() for p in engine.module.parameters()))
        Path(a.out).write_text(json.dumps({"losses": losses, "param_digest": digest,
                                           "zero_stage": engine.zero_optimization_stage()}))


if __name__ == "__main__":
    main()
