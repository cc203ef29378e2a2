"""One rank of the re-partitioning test (``test_reshard``), started by the test with the usual
``RANK``/``WORLD_SIZE``/``MASTER_*`` variables.

``save``: train a tiny megatron-core GPT with the DistributedOptimizer, then write this rank's
captured shards with their layout, and megatron's own per-parameter view of its shard (the
optimizer's ranges and tensors, read through its API, not through the layout) to compare with.
``load``: build the same job at another data-parallel size, restore it from every ``save`` file
(``MegatronIntegration.reshard``), and write the same per-parameter view of the new shard.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist


def megatron_view(integration) -> dict:
    """{(parameter, kind): (start, end, tensor)} of this rank's shard, from megatron's ranges,
    and every whole parameter."""
    from fr_megatron.megatron.integration import sub_optimizers

    names = {p: f"model{i}/{n}" for i, c in enumerate(integration.model)
             for n, p in c.named_parameters()}
    shard = {}
    for opt in sub_optimizers(integration.optimizer):
        for per_dtype in opt.gbuf_ranges:
            for per_bucket in per_dtype.values():
                for ranges in per_bucket:
                    for p, r in ranges["param_map"].items():
                        rng = r["param"]
                        for kind, t in opt._get_main_param_and_optimizer_states(p).items():
                            shard[(names[p], kind)] = (rng.start, rng.end, t.detach().clone())
    params = {name: p.detach().clone() for p, name in names.items()}
    return {"shard": shard, "params": params}


def main() -> None:
    a = argparse.ArgumentParser()
    a.add_argument("phase", choices=("save", "load"))
    a.add_argument("--dir", required=True)
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--bf16", action="store_true")
    a.add_argument("--steps", type=int, default=2)
    args = a.parse_args()
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps

    from fr_megatron.megatron.integration import MegatronIntegration
    from fr_megatron.megatron.model import TinyGPTConfig, TinyGPTJob, initialize_parallel

    # sizes that make the buckets' padding differ between data-parallel sizes
    cfg = TinyGPTConfig(tp=args.tp, hidden_size=48, num_attention_heads=4, ffn_hidden_size=80,
                        vocab_size=72, micro_batch_size=1, num_microbatches=1, dropout=0.0,
                        bf16=args.bf16)
    initialize_parallel(cfg)
    job = TinyGPTJob(cfg, initialize=args.phase == "save")
    integration = MegatronIntegration.from_job(job)
    rank, out = dist.get_rank(), Path(args.dir)
    position = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
    if args.phase == "save":
        for step in range(args.steps):
            job.train_step(step + 1)
        saved = {"layout": integration.shard_layout(),
                 "unique": {k: v.detach().clone()
                            for k, v in integration.capture(meta=False).unique.items()}}
        torch.save({**saved, **megatron_view(integration), "position": position},
                   out / f"old{rank}.pt")
    else:
        olds = [torch.load(p, weights_only=False) for p in sorted(out.glob("old*.pt"))]
        integration.capture(meta=False)  # the optimizer's state exists before its first step
        copied = integration.reshard([(o["layout"], o["unique"]) for o in olds])
        torch.save({**megatron_view(integration), "position": position, "copied": copied,
                    "dp": ps.get_data_parallel_world_size()}, out / f"new{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
