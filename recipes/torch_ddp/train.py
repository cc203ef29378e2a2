"""A small model trained data-parallel with plain torch.distributed on gloo, surviving injected faults.

Run:  fr-megatron run --nproc-per-node 4 --inject kill:rank=2:step=5 recipes/torch_ddp/train.py --steps 10

Data is a pure function of (step, micro-batch), so a redone step sees the same micro-batches and
the trajectory with a fault is bit-identical to one without. Each step takes the job's global
batch, one micro-batch per configured rank, spread over the ranks of the current world
(``batch_split``): after a shrink (``--shrink``) fewer ranks take the same samples. ``--out``
writes the final parameters, optimizer state, per-step losses, and per step how often each
micro-batch was taken and the world's size.
"""

import argparse
import gc
import logging
import os
import time

import torch
import torch.distributed as dist

from fr_megatron.runtime import Session, TorchIntegration
from fr_megatron.runtime.batch_split import micro_batches


def batch(step: int, micro_batch: int, n: int = 16, dim: int = 32):
    g = torch.Generator().manual_seed(step * 1000 + micro_batch)
    x = torch.randn(n, dim, generator=g)
    return x, x.sum(dim=1, keepdim=True).tanh()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--step-sleep", type=float, default=0.0, help="extra seconds per step")
    p.add_argument("--step-sleep-shrunk", type=float, default=0.0,
                   help="extra seconds per step while the world is smaller than the configured "
                        "one (tests: time for a spare node to join, none after)")
    p.add_argument("--width", type=int, default=64, help="hidden width of the model")
    p.add_argument("--micro-batch-size", type=int, default=16, help="samples per micro-batch")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(0)
    session = Session.from_env()
    session.init_process_group("gloo")
    module = torch.nn.Sequential(torch.nn.Linear(32, a.width), torch.nn.ReLU(),
                                 torch.nn.Linear(a.width, 1))
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    # Gradients are averaged over one flat buffer: a DDP wrapper rebuilt on a new generation
    # re-buckets at its first step, which changes gloo's summation order in the last bits.
    fr = TorchIntegration(module, opt, ddp=False)
    session.attach(fr)

    total = session.job_size  # micro-batches per step: one per configured rank

    def train_step(step):
        mine = micro_batches(total, session.world_rank, session.world_size)
        opt.zero_grad()
        loss_sum = torch.zeros(())
        for m in mine:  # gradients of the rank's micro-batches add up
            x, y = batch(step, m, n=a.micro_batch_size)
            session.phase("forward")
            loss = torch.nn.functional.mse_loss(fr.model(x), y)
            session.phase("backward")
            loss.backward()
            loss_sum += loss.detach()
        session.phase("grad_reduce")
        grads = [p.grad for p in module.parameters()]
        # one buffer: the gradients, the losses, and how often each micro-batch was taken
        taken = torch.zeros(total)
        taken[mine.start:mine.stop] = 1
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss_sum.reshape(1), taken])
        dist.all_reduce(flat)
        flat[:-total] /= total  # the mean over the global batch, whatever the world's size
        off = 0
        for g in grads:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()
        session.phase("optimizer")
        opt.step()
        shrunk = session.world_size < session.job_size
        if a.step_sleep or (shrunk and a.step_sleep_shrunk):
            time.sleep(a.step_sleep + (a.step_sleep_shrunk if shrunk else 0.0))
        return {"loss": flat[off].item(), "taken": flat[-total:].tolist(),
                "world_size": session.world_size, "t": time.time()}

    steps = session.run(train_step, a.steps)
    if a.out and session.world_rank == 0:
        torch.save({"losses": {k: v["loss"] for k, v in steps.items()},
                    "taken": {k: v["taken"] for k, v in steps.items()},
                    "world_sizes": {k: v["world_size"] for k, v in steps.items()},
                    "step_t": {k: v["t"] for k, v in steps.items()},
                    "params": {k: v.clone() for k, v in module.state_dict().items()},
                    "optim": opt.state_dict(), "pid": os.getpid()}, a.out)


if __name__ == "__main__":
    main()
    gc.freeze()  # no last full collection at exit (see recipes/megatron/pretrain_gpt.py)
