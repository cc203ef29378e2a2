"""GPT pretraining on megatron-core with Megatron-LM's flags, and ``--flash-recovery``.

    fr-megatron run --nproc-per-node 8 --spares 1 recipes/megatron/pretrain_gpt.py \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
        --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 \
        --micro-batch-size 2 --global-batch-size 16 --train-iters 20 --lr 1e-3 \
        --use-distributed-optimizer --flash-recovery

Runs on CPU (gloo, megatron-core's CPU mode switched on explicitly) and on GPUs (NCCL). The data
is synthetic. With ``--dataloader-type single`` (the default, as in Megatron-LM) it is read the way
Megatron-LM's ``train()`` reads it: a loader built once at ``args.consumed_train_samples``, wrapped
in a ``RerunDataIterator`` and handed to the hooks as ``train_data_iterator``, so flash recovery
must put the stream back itself (``fr_megatron.megatron.data``). ``--dataloader-type synthetic``
makes each micro-batch a pure function of (step, micro-batch, data-parallel rank) instead.
``--out PREFIX`` writes, per rank, the losses, the
parameters and the optimizer's state, to compare runs bit for bit. ``--save DIR --save-interval K``
and ``--load DIR`` checkpoint to disk as Megatron-LM does (``fr_megatron.megatron.checkpoint``:
megatron-core dist_checkpointing, ``DIR/iter_0000010/``, ``DIR/latest_checkpointed_iteration.txt``);
they work with and without ``--flash-recovery``, whose own recovery never reads them.
``--exit-signal-handler`` makes a SIGTERM (a stopped job sends one to every rank) save a
checkpoint (with ``--save``) and end training, as Megatron-LM's flag does. ``--wandb-project``
logs the loss from the last rank to a wandb run, as Megatron-LM does; flash recovery adds each
recovery to that run. ``--profile --use-pytorch-profiler --tensorboard-dir DIR`` writes PyTorch
profiler traces of iterations [``--profile-step-start``, ``--profile-step-end``), as Megatron-LM
does; flash recovery's own work is named ``fr_megatron.*`` in them.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from fr_megatron.config import ConfigError, FlashRecoveryConfig
from fr_megatron.megatron import checkpoint, gloo_cuda
from fr_megatron.megatron import training_hooks as flash_recovery
from fr_megatron.settings_args import add_flash_recovery_args, config_from_args

log = logging.getLogger("pretrain_gpt")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="megatron-core GPT pretraining with flash recovery",
                                allow_abbrev=False)
    g = p.add_argument_group("model and parallelism (Megatron-LM names)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=32)
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--seq-length", type=int, default=16)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--vocab-size", type=int, default=64)
    g.add_argument("--micro-batch-size", type=int, default=2)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=10)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=1e-4)
    g.add_argument("--lr-warmup-iters", type=int, default=2)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--deterministic-mode", action="store_true",
                   help="deterministic algorithms only (torch.use_deterministic_algorithms): a "
                        "step redone after a fault on a GPU equals its first run only with them")
    g.add_argument("--num-distributed-optimizer-instances", type=int, default=1,
                   help="split the data-parallel ranks into this many instances of the "
                        "distributed optimizer, each holding every shard (must divide the "
                        "data-parallel size); flash recovery then restores a shard from another "
                        "instance and copies none")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="accepted for Megatron-LM compatibility; the distributed optimizer is "
                        "always on here")
    g.add_argument("--dataloader-type", choices=("single", "synthetic"), default="single",
                   help="single: a loader from the consumed samples, read through a "
                        "RerunDataIterator as in Megatron-LM; synthetic: each micro-batch a "
                        "function of the step")
    g.add_argument("--distributed-backend", choices=("gloo", "nccl"), default=None)
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (saving first, with --save) once the iteration is a multiple of it")
    g = p.add_argument_group("checkpointing (Megatron-LM names)")
    g.add_argument("--save", default=None, help="save checkpoints to this directory")
    g.add_argument("--save-interval", type=int, default=None,
                   help="save every this many iterations (and at the end) with --save")
    g.add_argument("--load", default=None,
                   help="start from the latest checkpoint in this directory, if there is one")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM, save a checkpoint (with --save) and stop training, all "
                        "ranks at the same iteration")
    g = p.add_argument_group("logging (Megatron-LM names)")
    g.add_argument("--wandb-project", default="",
                   help="log the loss from the last rank to this wandb project")
    g.add_argument("--wandb-exp-name", default="", help="the wandb run's name")
    g.add_argument("--wandb-save-dir", default="", help="where wandb writes the run")
    g = p.add_argument_group("profiling (Megatron-LM names)")
    g.add_argument("--profile", action="store_true",
                   help="profile iterations [--profile-step-start, --profile-step-end): with "
                        "--use-pytorch-profiler into --tensorboard-dir, else for nsys")
    g.add_argument("--use-pytorch-profiler", action="store_true")
    g.add_argument("--profile-step-start", type=int, default=10)
    g.add_argument("--profile-step-end", type=int, default=12)
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0])
    g.add_argument("--tensorboard-dir", default=None,
                   help="where the PyTorch profiler writes its traces")
    p.add_argument("--out", default=None, help="write PREFIX.rank<R>.pt with losses and state")
    p.add_argument("--timings", default=None,
                   help="rank 0 writes each iteration's wall time (JSON) to this file")
    p.add_argument("--cpu-timings", default=None,
                   help="every rank writes each iteration's CPU seconds, of the process and of "
                        "its training thread, to DIR/rank<R>.json (on a machine with fewer "
                        "cores than ranks, what a step costs; wall time there is scheduling)")
    p.add_argument("--step-sleep", type=float, default=0.0,
                   help="extra seconds per iteration")
    p.add_argument("--step-sleep-shrunk", type=float, default=0.0,
                   help="extra seconds per iteration while the world is smaller than the "
                        "configured one (tests: time for a spare node to join, none after)")
    add_flash_recovery_args(p)
    return p


def tiny_config(args, job_size: int):
    """The model and batch of the job as configured, on ``job_size`` ranks: a job that went on
    with fewer replicas, and a process that joins it, spread the same global batch over the
    replicas there are (``TinyGPTJob.micro_batch_indices``)."""
    from fr_megatron.megatron.model import TinyGPTConfig

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if job_size % (tp * pp):
        raise SystemExit(f"--tensor-model-parallel-size x --pipeline-model-parallel-size "
                         f"({tp}x{pp}) must divide the world size {job_size}")
    dp = job_size // (tp * pp)
    flash_recovery.check_optimizer_instances(args.num_distributed_optimizer_instances, dp)
    gbs = args.global_batch_size or args.micro_batch_size * dp
    if gbs % (args.micro_batch_size * dp):
        raise SystemExit(f"--global-batch-size {gbs} must be a multiple of micro-batch-size x "
                         f"data-parallel size ({args.micro_batch_size}x{dp})")
    return TinyGPTConfig(
        tp=tp, pp=pp, num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size,
        vocab_size=args.vocab_size, seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        num_microbatches=max(1, gbs // (args.micro_batch_size * dp)), global_batch_size=gbs,
        lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=max(args.train_iters, 1),
        weight_decay=args.weight_decay, clip_grad=args.clip_grad, dropout=args.hidden_dropout,
        seed=args.seed, bf16=args.bf16, deterministic=args.deterministic_mode,
        num_distributed_optimizer_instances=args.num_distributed_optimizer_instances)


def save(prefix: str, rank: int, losses: dict, job, position: dict) -> None:
    """``position``: the rank's tensor and pipeline ranks, read while the groups exist (a job
    under flash recovery has destroyed them by now; a shrink or grow keeps them)."""
    state = {"losses": losses,
             "params": {f"{i}/{n}": p.detach().clone() for i, c in enumerate(job.model)
                        for n, p in c.named_parameters()},
             "optim": {k: v.clone() for k, v in _optimizer_tensors(job).items()},
             "consumed_samples": job.consumed_samples, "pid": os.getpid(),
             "taken": job.taken, **position}
    torch.save(state, f"{prefix}.rank{rank}.pt")


def _optimizer_tensors(job) -> dict:
    from fr_megatron.megatron.integration import MegatronIntegration

    st = MegatronIntegration(job.model, job.optimizer, job.scheduler, progress=job).capture()
    return st.unique


class ExitSignalHandler:
    """Megatron-LM's ``DistributedSignalHandler``: SIGTERM sets a flag, and every rank asks
    every other whether one got it (an all-reduce per iteration), so all stop at the same one."""

    def __init__(self):
        self.received = False
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, *_):
        self.received = True

    def signals_received(self) -> bool:
        flag = torch.tensor([int(self.received)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def wandb_writer(args, rank: int, world: int):
    """The last rank's wandb run, as Megatron-LM opens it (``--wandb-project``)."""
    if not args.wandb_project or rank != world - 1:
        return None
    import wandb

    return wandb.init(project=args.wandb_project, name=args.wandb_exp_name or None,
                      dir=args.wandb_save_dir or None, config=vars(args))


def megatron_lm_data(args, job, cfg, rank: int):
    """Megatron-LM's start of ``train()``'s data: the micro-batch calculator, the rerun state
    machine, ``args.consumed_train_samples`` (from the checkpoint loaded, if any) and a training
    iterator built at that position; and the function that builds the iterator again at another
    position and data-parallel size (``on_train_start(rebuild_data=...)``)."""
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator
    from megatron.core.rerun_state_machine import RerunMode, initialize_rerun_state_machine

    from fr_megatron.megatron.data import train_data_iterator

    args.global_batch_size = gbs = job.global_batch_size
    dp = parallel_state.get_data_parallel_world_size()
    # a process that joins a shrunk job may find a data-parallel size the global batch does not
    # divide (the flash recovery hooks set the calculator up the same way after a shrink)
    init_num_microbatches_calculator(rank, None, gbs, cfg.micro_batch_size, dp,
                                     decrease_batch_size_if_needed=bool(
                                         gbs % (cfg.micro_batch_size * dp)))
    # "disabled": the other modes reduce a flag on the GPU after every forward-backward
    initialize_rerun_state_machine(mode=RerunMode.DISABLED)
    args.consumed_train_samples = job.consumed_samples
    args.skipped_train_samples = 0

    def build(consumed_samples: int):
        return train_data_iterator(consumed_samples=consumed_samples,
                                   total_samples=args.train_iters * gbs,
                                   micro_batch_size=cfg.micro_batch_size,
                                   seq_length=cfg.seq_length, vocab_size=cfg.vocab_size,
                                   seed=cfg.seed)
    return build(args.consumed_train_samples), build


class Profiler:
    """Megatron-LM's ``--profile``: the PyTorch profiler's traces of iterations [start, end) (in
    ``--tensorboard-dir``), or ``cudaProfilerStart``/``Stop`` around them for nsys's
    ``--capture-range=cudaProfilerApi``."""

    def __init__(self, args, rank: int):
        self.args = args
        self.on = args.profile and rank in args.profile_ranks
        self.prof = None
        if self.on and args.use_pytorch_profiler:
            start, end = args.profile_step_start, args.profile_step_end
            self.prof = torch.profiler.profile(
                schedule=torch.profiler.schedule(wait=max(start - 1, 0),
                                                 warmup=1 if start > 0 else 0,
                                                 active=end - start, repeat=1),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(args.tensorboard_dir))
            self.prof.start()

    def step(self, iteration: int) -> None:
        """After iteration ``iteration`` (counted from 1) is done."""
        if self.prof is not None:
            self.prof.step()
        elif self.on and torch.cuda.is_available():
            if iteration == self.args.profile_step_start:
                torch.cuda.cudart().cudaProfilerStart()
            elif iteration == self.args.profile_step_end:
                torch.cuda.cudart().cudaProfilerStop()

    def stop(self) -> None:
        if self.prof is not None:
            self.prof.stop()
            self.prof = None


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.profile and args.use_pytorch_profiler and not args.tensorboard_dir:
        parser.error("--use-pytorch-profiler writes its traces to --tensorboard-dir; give one")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config_from_args(args, base=FlashRecoveryConfig.from_env())  # bad flags fail here, early
    except ConfigError as e:
        print(f"pretrain_gpt.py: error: {e}", file=sys.stderr)
        return 2
    if args.deterministic_mode:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
        torch.use_deterministic_algorithms(True)
    if torch.cuda.is_available():  # as Megatron-LM: the node's GPU of LOCAL_RANK, or a shared one
        torch.cuda.set_device(flash_recovery.local_cuda_device())
    backend = args.distributed_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    exit_handler = ExitSignalHandler() if args.exit_signal_handler else None
    if args.flash_recovery:
        session = flash_recovery.init_process_group(backend, args)
    else:
        session = None
        dist.init_process_group(backend)
        gloo_cuda.install(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    writer = wandb_writer(args, rank, world)

    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import get_num_microbatches

    from fr_megatron.megatron.model import TinyGPTJob, initialize_parallel

    cfg = tiny_config(args, session.job_size if session else world)
    initialize_parallel(cfg)
    position = {"tensor_rank": parallel_state.get_tensor_model_parallel_rank(),
                "pipeline_rank": parallel_state.get_pipeline_model_parallel_rank()}
    # a replacement draws no random weights (Megatron-LM: the hook sets args' init methods)
    job = TinyGPTJob(cfg, initialize=not flash_recovery.replacing())
    job._forward_step = flash_recovery.wrap_forward_step(job._forward_step)
    start = 0
    if args.load and not (session and session.replacement):  # a replacement's state is its peers'
        start = checkpoint.load(job, args.load)

    data_iterator = None
    # synthetic data is spread over any data-parallel size, and Megatron-LM's loader is built
    # again for it: the job can shrink and grow
    hook_kwargs = {"progress": job, "resize": job.resize}
    if args.dataloader_type == "single":
        data_iterator, rebuild_data = megatron_lm_data(args, job, cfg, rank)
        hook_kwargs = {"train_data_iterator": data_iterator, "resize": job.resize,
                       "rebuild_data": rebuild_data}
    # the same hook calls as Megatron-LM's train() with patches/megatron-lm applied; a
    # replacement starts at the recovery point it restored from its peers
    iteration = flash_recovery.on_train_start(job.model, job.optimizer, job.scheduler, args,
                                              start, **hook_kwargs)
    losses: dict[int, float] = {}
    timings: dict[int, float] = {}
    cpu_timings: dict[int, tuple[float, float]] = {}
    profiler = Profiler(args, rank)
    t_last = time.time()
    saved = start
    while iteration < args.train_iters:
        t_step = time.perf_counter()
        cpu_step = (time.process_time(), time.thread_time()) if args.cpu_timings else None
        try:
            # begin (a fault notice between steps) and end (the commit and its copies) can fail
            # too: a peer lost there is recovered like one lost inside the step
            flash_recovery.on_step_begin(iteration)
            loss = job.train_step(iteration + 1, data_iterator)
            flash_recovery.on_step_end(iteration, loss)
        except Exception as exc:
            iteration = flash_recovery.on_step_failure(exc, iteration)
            continue
        iteration += 1
        if data_iterator is not None:  # counted after the step, as Megatron-LM's train() does
            args.consumed_train_samples += (parallel_state.get_data_parallel_world_size()
                                            * args.micro_batch_size * get_num_microbatches())
            job.consumed_samples = args.consumed_train_samples
        losses[iteration] = loss
        shrunk = session is not None and session.world_size < session.job_size
        if args.step_sleep or (shrunk and args.step_sleep_shrunk):
            time.sleep(args.step_sleep + (args.step_sleep_shrunk if shrunk else 0.0))
        timings[iteration] = time.perf_counter() - t_step
        if cpu_step is not None:
            cpu_timings[iteration] = (time.process_time() - cpu_step[0],
                                      time.thread_time() - cpu_step[1])
        profiler.step(iteration)
        if writer is not None and iteration % args.log_interval == 0:
            writer.log({"lm loss": loss}, iteration)
        if rank == 0 and iteration % args.log_interval == 0:
            now = time.time()
            log.info("iteration %d/%d | lm loss %.6f | %.3f s", iteration, args.train_iters,
                     loss, now - t_last)
            t_last = now
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            try:
                with flash_recovery.saving_checkpoint(iteration):
                    checkpoint.save(job, iteration, args.save)
                saved = iteration
            except Exception as exc:  # a peer lost while saving: recovered as in a step
                iteration = flash_recovery.on_step_failure(exc, iteration)
        if args.exit_interval and iteration % args.exit_interval == 0:
            break
        if exit_handler is not None:
            try:
                stop = exit_handler.signals_received()
            except Exception as exc:  # a peer lost here: recovered as in a step
                iteration = flash_recovery.on_step_failure(exc, iteration)
                continue
            if stop:
                log.info("rank %d: exiting after iteration %d on SIGTERM", rank, iteration)
                break
    if args.save and iteration != saved:  # Megatron-LM saves at the end of training too
        with flash_recovery.saving_checkpoint(iteration):
            checkpoint.save(job, iteration, args.save)
    profiler.stop()
    losses = flash_recovery.history() or losses
    flash_recovery.on_train_end()
    if writer is not None:
        writer.finish()
    if args.out:
        save(args.out, rank, losses, job, position)
    if args.timings and rank == 0:
        with open(args.timings, "w") as f:
            json.dump(timings, f)
    if args.cpu_timings:
        os.makedirs(args.cpu_timings, exist_ok=True)
        with open(os.path.join(args.cpu_timings, f"rank{rank}.json"), "w") as f:
            json.dump(cpu_timings, f)
    if session is None:
        dist.destroy_process_group()
    return 0

if __name__ == "__main__":
    rc = main()
    # skip the interpreter's last full garbage collection over torch's and megatron-core's
    # objects: seconds of CPU per rank at exit, for memory the process is about to give back
    gc.freeze()
    sys.exit(rc)
