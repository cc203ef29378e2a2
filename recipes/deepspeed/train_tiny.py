"""A tiny DeepSpeed ZeRO job that survives faults under ``fr-megatron run``, runnable on CPU.

Run with flash recovery (a fault injected into rank 2 at step 3, a warm spare takes its place):

    DS_ACCELERATOR=cpu fr-megatron run --nproc-per-node 4 --spares 1 \\
        --inject kill:rank=2:step=3:phase=backward \\
        recipes/deepspeed/train_tiny.py --zero-stage 2 --steps 8

(The warm spare learns from rank 0 what to import once training has started: DeepSpeed, and the
Muon module that the first ``deepspeed.initialize`` imports, which pulls in torch.compile/inductor,
about 5 s of a replacement's set-up on a 2-core CPU, paid before the fault instead of during
recovery. ``--preload deepspeed`` would import DeepSpeed at the spare's start already.)

Tensor parallelism from Megatron-core's ``parallel_state`` given to DeepSpeed as its mpu
(TP=2 x DP=2 on 4 ranks):

    DS_ACCELERATOR=cpu fr-megatron run --nproc-per-node 4 recipes/deepspeed/train_tiny.py \\
        --mpu megatron --tp 2 --zero-stage 1

Going on with fewer data-parallel replicas instead of replacing a lost rank, with ZeRO's
partitions re-partitioned in memory (``build`` is the engine's ``resize``), and growing back when
a spare node joins (``fr-megatron run --spare-node`` on another node):

    DS_ACCELERATOR=cpu fr-megatron run --nproc-per-node 4 --spares 0 --shrink always \\
        --inject kill:rank=2:step=3:phase=backward recipes/deepspeed/train_tiny.py --zero-stage 2

Under a plain launcher (``torchrun``, no ``FR_CONTROLLER``) it trains without recovery.

Set-up follows the order a replacement process repeats from the top: the Session joins the
current generation's default group; Megatron's parallel_state is initialised (``--mpu megatron``);
``fr_megatron.deepspeed.initialize`` builds the engine on that group (``dist_init_required=False``:
DeepSpeed must not create its own) and returns it with its integration, which the Session takes.
On a new generation the survivors' ``rebuild`` repeats exactly that: ``rebuild_mpu`` (destroy and
re-initialise parallel_state), DeepSpeed's groups, and the model broadcast of a fresh engine.

Data is a pure function of (step, micro-batch, row). Each step takes the job's global batch
(``--global-batch``, by default the configured micro-batch size times gradient accumulation times
the configured data-parallel size): each of its gradient-accumulation micro-steps takes one global
micro-batch, whose rows are spread over the ranks of the current world (``batch_split``), so a
redone step sees the same rows, and after a shrink (``--shrink always``, or no spare left) fewer
ranks take the same rows. ``--out PATH`` writes (torch.save) on rank 0: ``losses`` {step: loss
averaged over the global batch}, ``params`` (rank 0's module parameters), ``optim`` (rank 0's ZeRO
fp32 shard and its Adam moments, ``{"state": {slot: {key: tensor}}}``), ``engine`` counters,
``taken`` {step: the global row indices this rank trained on}, ``step_t`` and ``world_sizes``
{step: when it ended, the world's size then}; every other rank r writes the same
for itself to ``PATH.rank{r}``.

``--optimizer-phase inside-step`` marks the ``optimizer`` phase (where ``--inject ...:phase=optimizer``
fires) from a post-hook of the inner torch optimizer, i.e. inside ``DeepSpeedZeroOptimizer.step``:
this rank has updated its fp32 shard and moments, its peers are about to all-gather the parameters.
The default marks it just before ``engine.step()``.
"""

import argparse
import gc
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import fr_megatron.deepspeed as frds
from fr_megatron.runtime.batch_split import loss_scale, micro_batches

HERE = Path(__file__).resolve().parent
DIM = 16


def batch(step: int, micro: int, rows: range, total: int):
    """Rows ``rows`` of the step's micro-batch ``micro``, which has ``total`` rows in all."""
    g = torch.Generator().manual_seed(step * 64 + micro)
    x = torch.randn(total, DIM, generator=g)[rows.start:rows.stop]
    return x, torch.sin(x[:, :4] * 2.0).sum(dim=1, keepdim=True)


# ---- tensor parallelism over Megatron's TP group (looked up at call time: it is rebuilt) ------------
from fr_megatron.deepspeed.mpu import CopyToTP as _CopyToTP, ReduceFromTP as _ReduceFromTP  # noqa: E402


class TPMLP(torch.nn.Module):
    """Megatron's MLP layout: column-parallel fc1, row-parallel fc2, then a replicated head. The
    shards are cut from full-size weights made with the same seed on every rank (a "master weight")."""

    def __init__(self, tp: int, tp_rank: int, hidden: int):
        super().__init__()
        full = torch.nn.Sequential(torch.nn.Linear(DIM, hidden), torch.nn.Linear(hidden, hidden),
                                   torch.nn.Linear(hidden, 1))
        part = hidden // tp
        rows = slice(tp_rank * part, (tp_rank + 1) * part)
        self.fc1 = torch.nn.Linear(DIM, part)
        self.fc2 = torch.nn.Linear(part, hidden, bias=False)
        self.fc2_bias = torch.nn.Parameter(full[1].bias.detach().clone())
        self.head = torch.nn.Linear(hidden, 1)
        with torch.no_grad():
            self.fc1.weight.copy_(full[0].weight[rows])
            self.fc1.bias.copy_(full[0].bias[rows])
            self.fc2.weight.copy_(full[1].weight[:, rows])
            self.head.load_state_dict(full[2].state_dict())
        for p in (self.fc1.weight, self.fc1.bias, self.fc2.weight):
            p.tensor_model_parallel = True  # DeepSpeed counts these in the grad norm on every TP rank

    def forward(self, x):
        h = torch.nn.functional.gelu(self.fc1(_CopyToTP.apply(x)))
        h = torch.nn.functional.gelu(_ReduceFromTP.apply(self.fc2(h)) + self.fc2_bias)
        return self.head(h)


def mlp(hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(DIM, hidden), torch.nn.GELU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))


# ---- without fr-megatron run ---------------------------------------------------------------------
class NoRecovery:
    """The few Session calls this script makes, for a plain launcher: no recovery."""

    def __init__(self):
        self.rank, self.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.job_size = self.world_size

    def init_process_group(self, backend: str) -> None:
        dist.init_process_group(backend)

    def phase(self, name: str) -> None:
        pass

    def attach(self, integration) -> None:
        pass

    def run(self, train_step, num_steps: int) -> dict:
        out = {step: train_step(step) for step in range(1, num_steps + 1)}
        dist.destroy_process_group()
        return out


def _results(engine, fr, losses, rank: int, taken: dict, steps: dict) -> dict:
    """This rank's final state: module parameters, ZeRO shard + optimizer state, counters."""
    def t(v):
        return v.detach().clone() if torch.is_tensor(v) else torch.tensor(v)

    state = fr.capture()
    optim: dict = {}
    for key, v in list(state.unique.items()) + [(k, v) for k, v in state.replicated.items()
                                                if not k.startswith("param/")]:
        slot, _, name = key.rpartition("/state/") if "/state/" in key else key.rpartition("/")
        optim.setdefault(slot, {})[name] = t(v)
    for key, v in state.meta.get("optim_scalars", {}).items():
        slot, _, name = key.rpartition("/state/")
        optim.setdefault(slot, {})[name] = t(v)
    return {"losses": losses,
            "params": {k: v.detach().clone() for k, v in engine.module.named_parameters()},
            "optim": {"state": optim, "param_groups": state.meta["param_groups"]},
            "engine": {**state.meta["counters"], "lr": engine.get_lr()},
            "rank": rank, "pid": os.getpid(), "taken": taken,
            "step_t": {k: t for k, (t, _) in steps.items()},
            "world_sizes": {k: n for k, (_, n) in steps.items()},
            "tensor_rank": fr.mpu.get_tensor_model_parallel_rank() if fr.mpu else 0}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(HERE / "ds_config.json"), help="DeepSpeed config (JSON)")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None,
                   help="override zero_optimization.stage (3 is refused by flash recovery)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--global-batch", type=int, default=None,
                   help="rows per step (default: the config's micro-batch size x gradient "
                        "accumulation x the configured data-parallel size)")
    p.add_argument("--step-sleep", type=float, default=0.0, help="extra seconds per step")
    p.add_argument("--step-sleep-shrunk", type=float, default=0.0,
                   help="extra seconds per step while the world is smaller than the configured "
                        "one (tests: time for a spare node to join, and none after the grow)")
    p.add_argument("--hidden", type=int, default=64, help="the model's hidden width")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--mpu", choices=["none", "megatron"], default="none",
                   help="give DeepSpeed megatron.core.parallel_state as its mpu")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size with --mpu megatron")
    p.add_argument("--optimizer-phase", choices=["before-step", "inside-step"], default="before-step",
                   help="where the 'optimizer' phase is marked: before engine.step(), or inside "
                        "DeepSpeed's step (after this rank's inner optimizer step, before the all-gather)")
    p.add_argument("--out", default=None, help="write losses, parameters and optimizer state here")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log = logging.getLogger("train_tiny")

    if "FR_CONTROLLER" in os.environ:
        from fr_megatron.runtime import Session

        session = Session.from_env()
    else:
        session = NoRecovery()
    session.init_process_group("gloo")  # the current generation's default group

    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # DeepSpeed's CPU shared-memory all-reduce is used for inference only; skip its JIT build.
        import deepspeed

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    mpu = rebuild_mpu = None
    tp, tp_rank = 1, 0
    if a.mpu == "megatron":
        from megatron.core import parallel_state as ps

        from fr_megatron.deepspeed.mpu import MegatronCoreMPU, parallel_state_rebuilder

        init_args = {"tensor_model_parallel_size": a.tp}
        ps.initialize_model_parallel(**init_args)
        mpu, rebuild_mpu = MegatronCoreMPU(), parallel_state_rebuilder(**init_args)
        tp, tp_rank = a.tp, ps.get_tensor_model_parallel_rank()

    cfg = json.loads(Path(a.config).read_text())
    if a.zero_stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = a.zero_stage
    rows_per_rank = cfg["train_micro_batch_size_per_gpu"]
    accumulation = cfg.get("gradient_accumulation_steps", 1)
    global_batch = a.global_batch or rows_per_rank * accumulation * (session.job_size // tp)
    if global_batch % accumulation:
        raise SystemExit(f"--global-batch {global_batch}: not a multiple of the config's "
                         f"gradient_accumulation_steps {accumulation}")
    micro_rows = global_batch // accumulation  # rows of one global micro-batch

    def build():
        """The engine on the current world; also what a shrink or a grow calls (``resize``)."""
        dp_size = mpu.get_data_parallel_world_size() if mpu else dist.get_world_size()
        cfg["train_batch_size"] = rows_per_rank * accumulation * dp_size  # DeepSpeed's check
        torch.manual_seed(0)
        model = TPMLP(tp, tp_rank, a.hidden) if tp > 1 else mlp(a.hidden)
        # A torch optimizer (instead of a config "optimizer") avoids compiling DeepSpeed's CPU Adam.
        optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
        engine, _, _, _ = frds.initialize(model=model, optimizer=optimizer, config=cfg, mpu=mpu,
                                          rebuild_mpu=rebuild_mpu, dist_init_required=False,
                                          resize=build)
        if a.optimizer_phase == "inside-step" and engine.flash_recovery is not None:
            # Fires after this rank's inner optimizer step, inside DeepSpeed's step (fp32 shard
            # and moments already updated, the parameter all-gather still to come).
            engine.flash_recovery.optimizers()[0].register_step_post_hook(
                lambda *_: session.phase("optimizer"))
        return engine

    engine = build()
    fr = engine.flash_recovery
    if fr is None:
        raise SystemExit(f"{a.config}: the \"flash_recovery\" section is missing or disabled")
    session.attach(fr)
    log.info("rank %d: ZeRO-%d, tp %d, %d rows per step, replica group %s", dist.get_rank(),
             engine.zero_optimization_stage(), tp, global_batch, fr.replica_ranks())
    taken: dict[int, list[int]] = {}
    steps: dict[int, tuple[float, int]] = {}  # step -> (when it ended, the world's size)

    def train_step(step: int) -> float:
        engine = fr.engine  # built again when the job shrinks or grows
        group = fr.replica_ranks()
        dp_rank, dp_size = group.index(dist.get_rank()), len(group)
        dtype = next(engine.module.parameters()).dtype  # bf16/fp16 when the config enables them
        total = torch.zeros(())
        taken[step] = []
        for micro in range(accumulation):
            rows = micro_batches(micro_rows, dp_rank, dp_size)
            x, y = batch(step, micro, rows, micro_rows)
            taken[step] += [micro * micro_rows + r for r in rows]
            session.phase("forward")
            out = engine(x.to(engine.device, dtype))
            # DeepSpeed averages gradients over the data-parallel ranks: each rank's sum of
            # squared errors is scaled so that the step's gradient is the global batch's mean
            err = torch.nn.functional.mse_loss(out.float(), y.to(engine.device), reduction="sum")
            loss = err * loss_scale(micro_rows, dp_size)
            session.phase("backward")
            engine.backward(loss)
            total += loss.detach().float()
            if a.optimizer_phase == "before-step":
                session.phase("optimizer")
            engine.step()
        shrunk = dist.get_world_size() < session.job_size
        if a.step_sleep or (shrunk and a.step_sleep_shrunk):
            time.sleep(a.step_sleep + (a.step_sleep_shrunk if shrunk else 0.0))
        # the same value on every rank (a replacement's history comes from a data-parallel peer)
        dist.all_reduce(total)
        steps[step] = (time.time(), dist.get_world_size())
        return total.item() / (dist.get_world_size() * accumulation)

    losses = session.run(train_step, a.steps)
    if session.rank == 0:
        for step in sorted(losses):
            log.info("step %d loss %.6f", step, losses[step])
    if a.out:
        path = a.out if session.rank == 0 else f"{a.out}.rank{session.rank}"
        torch.save(_results(fr.engine, fr, losses, session.rank, taken, steps), path)


if __name__ == "__main__":
    main()
    gc.freeze()  # no last full collection at exit (see recipes/megatron/pretrain_gpt.py)
