"""A tiny, deterministic megatron-core GPT training job (TP x PP x DP, DistributedOptimizer).

It is the workload the recovery machinery is tested and demonstrated on: megatron-core's own
GPTModel (local layer spec, CPU initialisation), megatron DDP, the DistributedOptimizer (Adam;
fp32, or bf16 with fp32 main params) and the pipeline schedules, driven by synthetic data that is
a pure function of (step, the micro-batch's index in the global batch), so that a step redone
after a recovery sees exactly the same micro-batches and two runs with the same seed are
bit-identical. The global batch stays the same when the data-parallel size changes (a shrink or a
grow): its micro-batches are spread over the ranks there are (``runtime.batch_split``), and the
loss is a mean over the global batch's tokens (megatron-core's per-token loss), so only the order
of the additions changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from fr_megatron.megatron import parallel_state_hook, training_hooks
from fr_megatron.megatron.cpu import enable_cpu_mode, import_megatron_core
from fr_megatron.megatron.data import learnable_labels, micro_batch
from fr_megatron.runtime.batch_split import micro_batches

@dataclass
class TinyGPTConfig:
    """Sizes and hyper-parameters of the tiny job; ``num_layers`` must divide by ``pp``."""

    tp: int = 1                     # tensor-parallel size
    pp: int = 1                     # pipeline-parallel size; the rest of the world is DP
    num_layers: int = 2
    hidden_size: int = 32           # divides by num_attention_heads and by tp
    num_attention_heads: int = 4
    ffn_hidden_size: int = 64
    vocab_size: int = 64            # the learnable labels' alphabet (``data``)
    seq_length: int = 16
    micro_batch_size: int = 2       # samples per micro-batch per data-parallel rank
    num_microbatches: int = 2       # micro-batches per step and rank at the starting DP size
    global_batch_size: int = 0      # samples per step; 0: micro_batch_size x num_microbatches x DP
    lr: float = 1e-3                # the schedule: linear warm-up, cosine decay to min_lr
    min_lr: float = 1e-4
    lr_warmup_steps: int = 2
    lr_decay_steps: int = 50
    # regularisation and randomness
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    dropout: float = 0.1
    seed: int = 1234
    bf16: bool = False  # bf16 params with fp32 main params in the DistributedOptimizer
    # deterministic kernels (Megatron-LM's --deterministic-mode): a step redone after a fault
    # on a GPU equals its first run only with them
    deterministic: bool = False
    # optimizer instances: each shard held and updated by one rank per instance (must divide DP)
    num_distributed_optimizer_instances: int = 1
    extra_init_kwargs: dict = field(default_factory=dict)  # more initialize_model_parallel kwargs


def initialize_parallel(cfg: TinyGPTConfig) -> None:
    """CPU mode (if no CUDA), the parallel_state hook, megatron groups and the RNG seeds."""
    import_megatron_core()
    from megatron.core import parallel_state

    enable_cpu_mode()
    parallel_state_hook.install()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        num_distributed_optimizer_instances=cfg.num_distributed_optimizer_instances,
        **cfg.extra_init_kwargs,
    )
    seed_rngs(cfg)


def _device():
    """Where the job's tensors live: the current GPU, or the CPU without CUDA (CPU mode)."""
    return torch.cuda.current_device() if torch.cuda.is_available() else "cpu"


def seed_rngs(cfg: TinyGPTConfig) -> None:
    """Seed the CPU generator and megatron's RNG tracker as Megatron-LM does.

    One seed per pipeline stage, the same across TP and DP ranks (so CPU-initialised TP weights
    agree before they are split). Calling it again before building a new job replays the run.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    seed = cfg.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def _transformer_config(cfg: TinyGPTConfig, initialize: bool = True):
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=cfg.bf16,
        # a replacement's weights come from its peers: megatron-core still allocates and tags
        # them as tensor-parallel, but draws nothing
        **({"use_cpu_initialization": True} if initialize else training_hooks.NO_RANDOM_INIT),
        hidden_dropout=cfg.dropout,
        # the gradient is a mean over the global batch's tokens however many micro-batches each
        # data-parallel rank takes (``runtime.batch_split``)
        calculate_per_token_loss=True,
        attention_dropout=cfg.dropout,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        deallocate_pipeline_outputs=False,
        deterministic_mode=cfg.deterministic,
    )


class TinyGPTJob:
    """Model chunks (DDP-wrapped), DistributedOptimizer, LR scheduler and ``train_step``.

    Call ``initialize_parallel`` first. ``iteration`` counts finished steps. A replacement
    process builds it as every rank does (its collectives are answered from the replaced rank's
    start-up record, ``runtime.startup_calls``) and then gets its state restored; with
    ``initialize=False`` (``training_hooks.replacing()``) it skips the random weights.
    """

    def __init__(self, cfg: TinyGPTConfig, initialize: bool = True):
        from megatron.core import parallel_state

        if not cfg.global_batch_size:
            cfg.global_batch_size = (cfg.micro_batch_size * cfg.num_microbatches
                                     * parallel_state.get_data_parallel_world_size())
        if cfg.global_batch_size % cfg.micro_batch_size:
            raise ValueError(f"global_batch_size {cfg.global_batch_size} is not a multiple of "
                             f"micro_batch_size {cfg.micro_batch_size}")
        self._build(cfg, initialize)
        # step -> the global batch's micro-batches taken, or with a data iterator, samples read
        self.taken: dict[int, list[int]] = {}
        self._reading: list[int] = []
        self.iteration = 0
        self.consumed_samples = 0

    def _build(self, cfg: TinyGPTConfig, initialize: bool = True) -> None:
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.transformer.module import Float16Module

        if cfg.num_layers % cfg.pp:
            raise ValueError("num_layers must be divisible by pp")
        self.cfg = cfg
        self.config = _transformer_config(cfg, initialize)
        gpt = GPTModel(
            config=self.config,
            transformer_layer_spec=get_gpt_layer_local_spec(),
            vocab_size=cfg.vocab_size,
            max_sequence_length=cfg.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=True,
            position_embedding_type="learned_absolute",
        )
        if cfg.bf16:
            gpt = Float16Module(self.config, gpt)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=True,
            # the configured number, or fewer on a world it does not divide (a shrink)
            num_distributed_optimizer_instances=parallel_state_hook.optimizer_instances(
                cfg.num_distributed_optimizer_instances),
        )
        # No broadcast_params(): the init is deterministic, and a replacement process must not
        # enter collectives its survivors never join.
        self.model = [DistributedDataParallel(self.config, ddp_config, gpt)]
        self.config.no_sync_func = self.model[0].no_sync
        self.config.finalize_model_grads_func = finalize_model_grads

        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            clip_grad=cfg.clip_grad,
            use_distributed_optimizer=True,
            bf16=cfg.bf16,
            params_dtype=self.config.params_dtype,
        )
        self.optimizer = get_megatron_optimizer(opt_config, self.model)
        gbs = self.global_batch_size
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=cfg.lr,
            min_lr=cfg.min_lr,
            lr_warmup_steps=cfg.lr_warmup_steps * gbs,
            lr_decay_steps=cfg.lr_decay_steps * gbs,
            lr_decay_style="cosine",
            start_wd=cfg.weight_decay,
            end_wd=cfg.weight_decay,
            wd_incr_steps=cfg.lr_decay_steps * gbs,
            wd_incr_style="constant",
        )

    def resize(self):
        """Model, optimizer and scheduler built again on the current parallel state, whose
        data-parallel size changed (a shrink or a grow): megatron DDP's buffers and the
        DistributedOptimizer's shards depend on it. Nothing is drawn: the recovery restores
        every value from the old shards (``MegatronIntegration.reshard``)."""
        self._build(self.cfg, initialize=False)
        return self.model, self.optimizer, self.scheduler

    @property
    def global_batch_size(self) -> int:
        return self.cfg.global_batch_size

    # ------------------------------------------------------------------ data

    def micro_batch_indices(self) -> range:
        """The global batch's micro-batches that this data-parallel rank takes."""
        from megatron.core import parallel_state

        return micro_batches(self.cfg.global_batch_size // self.cfg.micro_batch_size,
                             parallel_state.get_data_parallel_rank(),
                             parallel_state.get_data_parallel_world_size())

    def batch(self, step: int, microbatch: int) -> dict[str, torch.Tensor]:
        """The micro-batch ``microbatch`` of the global batch of step ``step``."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1009 + microbatch)
        tokens = torch.randint(0, cfg.vocab_size, (cfg.micro_batch_size, cfg.seq_length),
                               generator=gen)
        return micro_batch(tokens, learnable_labels(tokens, cfg.vocab_size))

    def _forward_step(self, data_iterator, model):
        # batches are made on the CPU (the same tokens on any machine) and used where the model
        # is, as Megatron-LM's get_batch moves each one to the GPU
        batch = next(data_iterator)
        if "sample_ids" in batch:
            self._reading.extend(batch.pop("sample_ids").tolist())
        batch = {k: v.to(_device(), non_blocking=True) for k, v in batch.items()}
        output = model(
            batch["tokens"],
            batch["position_ids"],
            batch["attention_mask"],
            labels=batch["labels"],
        )
        loss_mask = batch["loss_mask"]

        def loss_func(output_tensor):
            losses = output_tensor.float().view(-1)
            loss = torch.sum(losses * loss_mask.view(-1))
            num_tokens = loss_mask.sum().to(torch.int)
            return loss, num_tokens, {"lm loss": torch.stack([loss.detach(), num_tokens.float()])}

        return output, loss_func

    # ------------------------------------------------------------------ training

    def train_step(self, step: int, data_iterator=None) -> float:
        """One optimizer step; the global mean token loss.

        The micro-batches are this rank's of ``step`` (``batch``, ``micro_batch_indices``), or the
        next ``num_microbatches`` of ``data_iterator`` (a ``RerunDataIterator``, read inside the rerun state machine's loop as
        Megatron-LM's ``train_step`` does). The loss is reduced over data-parallel ranks and
        broadcast from the last pipeline stage, so every rank returns the same float.
        """
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.rerun_state_machine import get_rerun_state_machine

        cfg = self.cfg
        if data_iterator is None:
            mine = self.micro_batch_indices()
            num_microbatches = len(mine)
            self.taken[step] = list(mine)
            data_iterator = iter([self.batch(step, m) for m in mine])
            rerun = iter((True, False)).__next__
        else:
            from megatron.core.num_microbatches_calculator import get_num_microbatches

            num_microbatches = get_num_microbatches()  # Megatron-LM's, for the current DP size
            self._reading = self.taken[step] = []  # its samples (``data.train_data_iterator``)
            rsm = get_rerun_state_machine()
            rerun = lambda: rsm.should_run_forward_backward(data_iterator)  # noqa: E731
        while rerun():
            for chunk in self.model:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
            losses = get_forward_backward_func()(
                forward_step_func=self._forward_step,
                data_iterator=data_iterator,
                model=self.model,
                num_microbatches=num_microbatches,
                seq_length=cfg.seq_length,
                micro_batch_size=cfg.micro_batch_size,
                forward_only=False,
            )
        ok, _grad_norm, _ = self.optimizer.step()
        if not ok:
            raise RuntimeError(f"optimizer step {step} was skipped")
        self.scheduler.step(increment=self.global_batch_size)
        self.iteration = step + 1
        self.consumed_samples += self.global_batch_size

        summed = torch.zeros(2, dtype=torch.float64, device=_device())  # NCCL reduces on the GPU
        if parallel_state.is_pipeline_last_stage():
            for item in losses:
                summed += item["lm loss"].double()
            dist.all_reduce(summed, group=parallel_state.get_data_parallel_group())
        dist.broadcast(
            summed,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        return float(summed[0] / summed[1])
