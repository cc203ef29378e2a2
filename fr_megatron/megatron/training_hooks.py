"""The hooks a Megatron-LM-style training loop calls around each step.

Megatron-LM's ``train()`` (through ``patches/megatron-lm``) and ``recipes/megatron/pretrain_gpt.py``
call the same functions, so the recipe's tests exercise the code path the patch uses::

    iteration = on_train_start(model, optimizer, opt_param_scheduler, args, iteration)
    forward_step_func = wrap_forward_step(forward_step_func)
    while iteration < args.train_iters:
        try:
            on_step_begin(iteration)
            loss_dict = train_step(...)
        except Exception as exc:
            iteration = on_step_failure(exc, iteration)   # the iteration to redo
            continue
        try:
            on_step_end(iteration, loss_dict)
        except Exception as exc:
            iteration = on_step_failure(exc, iteration)
            continue
        iteration += 1
    on_train_end()

``on_step_begin`` and ``on_step_end`` can raise as well: both are phase markers (a rank that
notices a fault plan there raises ``RecoveryRequested``), and ``on_step_end``'s commit exchanges
copies with peers, one of which may be gone. The Megatron-LM patch routes both through
``on_step_failure`` as above.

Megatron's ``iteration`` counts finished iterations; the runtime's step ``iteration - first + 1``
is the one being run, where ``first`` is the iteration the job started at: the ``iteration``
given to ``on_train_start`` (0, or that of the checkpoint the caller loaded). ``first`` travels
with the progress counters in every snapshot, so a replacement, which loads no checkpoint, numbers
its steps as its peers do. The recovery point R (last step every rank committed) thus means
"redo iteration first + R". Without ``--flash-recovery`` every hook is a no-op and
``iteration`` passes through unchanged.

Megatron-LM's ``train()`` passes ``train_data_iterator`` to ``on_train_start`` (the recipe does
not). That switches on what a real Megatron-LM loop needs besides the runtime's rollback
(``_MegatronLM``): ``args.consumed_train_samples``/``skipped_train_samples`` kept equal to the
restored iteration, the rerun state machine reset, the data iterator rewound to the first
micro-batch of the redone step, timers a failed step left running stopped.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import functools
import logging
import os
from typing import Any, Callable, Optional

import torch

from fr_megatron.megatron import cpu, gloo_cuda
from fr_megatron.runtime import startup_calls

log = logging.getLogger("fr_megatron.megatron.hooks")

_session = None
_first_iteration = 0  # Megatron iteration of runtime step 1, minus 1 (see module docstring)
_lm: Optional["_MegatronLM"] = None  # set when Megatron-LM's train() is the caller
_progress_names = ("consumed_train_samples", "skipped_train_samples")
_NOT_GIVEN = object()


def local_cuda_device(local_rank: Optional[int] = None) -> int:
    """The GPU of the node's rank ``local_rank`` (default ``LOCAL_RANK``): its own where the node
    has a GPU per rank, else shared round-robin (gloo moves CUDA tensors between ranks that share
    a GPU; NCCL refuses two ranks on one)."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return local_rank % torch.cuda.device_count()


def enabled(args) -> bool:
    return bool(getattr(args, "flash_recovery", False))


def init_process_group(backend: str, args=None, **_ignored):
    """Create the default group for the current generation (replaces Megatron-LM's env:// init,
    whose un-prefixed rendezvous keys a replacement process would collide with).

    With Megatron-LM's ``args``: ``--inprocess-restart`` and ``--fake-process-group`` (which bring
    their own store or backend) are refused, and ``--distributed-timeout-minutes`` becomes the
    timeout of the default group of this and every later generation (the runtime's default is
    300 s; megatron-core's own groups get the flag's value from ``initialize_model_parallel``).
    """
    global _session
    from fr_megatron.config import FlashRecoveryConfig
    from fr_megatron.runtime import Session

    for flag in ("inprocess_restart", "fake_process_group"):
        if getattr(args, flag, False):
            raise RuntimeError(f"--flash-recovery cannot be combined with "
                               f"--{flag.replace('_', '-')}")
    cfg = FlashRecoveryConfig.from_env()
    instances = getattr(args, "num_distributed_optimizer_instances", 1) or 1
    if instances > 1:  # Megatron-LM checks this only after the groups exist, with an assert
        world = int(os.environ.get("WORLD_SIZE", "1"))
        model_parallel = 1
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "context_parallel_size"):
            model_parallel *= getattr(args, name, 1) or 1
        check_optimizer_instances(instances, max(world // model_parallel, 1))
    if args is not None:
        from fr_megatron.settings_args import config_from_args

        cfg = config_from_args(args, base=cfg)
        if cfg.checkpoint_dir is None and getattr(args, "save", None):
            # Megatron-LM's --save checkpoints are the fallback when live copies are lost too
            cfg = cfg.model_copy(update={"checkpoint_dir": args.save})
    _session = Session.from_env(config=cfg)
    _session.init_process_group(backend)
    gloo_cuda.install(backend)  # ranks sharing a GPU over gloo
    if args is not None and replacing():
        # Megatron-LM builds its TransformerConfig from args: no random weights to overwrite
        vars(args).update(NO_RANDOM_INIT, init_method_xavier_uniform=False)
    minutes = getattr(args, "distributed_timeout_minutes", None)
    if minutes:
        _set_world_timeout(datetime.timedelta(minutes=minutes))
    # from here to on_train_start the script starts up; a replacement's collectives are answered
    # from the replaced rank's record, since the survivors wait in the runtime
    # (a rank that joins as the job grows back builds with the survivors, which build again
    # at the new data-parallel size: its collectives are real, and it records them)
    how = startup_calls.begin(_session.store, _session.signer, _session.rank,
                              _session.replacement and not _session.fresh, _session.members)
    log.info("rank=%d generation=%d step=0 phase=startup start-up collectives: %s",
             _session.rank, _session.generation, how)
    return _session


def _set_world_timeout(timeout: datetime.timedelta) -> None:
    import torch.distributed as dist

    comms = getattr(_session, "comms", None)
    if comms is not None and hasattr(comms, "timeout"):
        comms.timeout = timeout  # the default group of every later generation
    try:
        dist.distributed_c10d._set_pg_timeout(timeout, dist.distributed_c10d._get_default_group())
    except Exception as e:  # noqa: BLE001 - an older torch or a backend without it
        log.warning("could not set the default group's timeout to %s: %s", timeout, e)


def session():
    return _session


def replacing() -> bool:
    """True in a process that takes over a lost rank: its parameters, optimizer state and RNG
    come from its peers, so its model is built without random weights (``NO_RANDOM_INIT``)."""
    return _session is not None and _session.replacement


def _leave_as_allocated(tensor):
    """An init method that draws nothing: the tensor's values come from the peers."""
    return tensor


# A replacement's TransformerConfig settings. Its init methods draw nothing, and it allocates
# each weight partition in place instead of building the whole weight on the CPU and splitting it
# (``use_cpu_initialization``: every tensor-parallel rank touches the full weight, a copy the
# survivors wait for). Not ``perform_initialization=False``: megatron-core (0.16) then also skips
# ``set_tensor_model_parallel_attributes``, the grad norm stops counting the tensor-parallel
# weights of tensor ranks > 0, clipping differs and the job leaves the fault-free trajectory.
NO_RANDOM_INIT = {"init_method": _leave_as_allocated,
                  "output_layer_init_method": _leave_as_allocated,
                  "embedding_init_method": _leave_as_allocated,
                  "use_cpu_initialization": False}


def check_optimizer_instances(instances: int, data_parallel_size: int) -> None:
    """``--num-distributed-optimizer-instances`` must split the data-parallel ranks evenly."""
    if instances < 1 or data_parallel_size % instances:
        allowed = [n for n in range(1, data_parallel_size + 1) if data_parallel_size % n == 0]
        raise SystemExit(
            f"--num-distributed-optimizer-instances {instances} does not divide the "
            f"data-parallel size {data_parallel_size}; use one of {allowed} (2 keeps each "
            "optimizer shard on two ranks, so flash recovery needs no copy of it)")


def _mark(phase: str) -> None:
    """Phase marker handed to megatron's objects. A plain function on purpose: the group rebinder
    walks closures and bound methods, and must not wander from the model into the session."""
    if _session is not None:
        _session.phase(phase)


def _forward_issued() -> None:
    """After a micro-batch's forward is queued (a plain function, as ``_mark``)."""
    if _session is not None:
        _session.forward_issued()


def on_train_start(model, optimizer, opt_param_scheduler, args, iteration: int = 0,
                   progress: Any = None, forward_step_wrapper: Optional[Callable] = None,
                   train_data_iterator: Any = _NOT_GIVEN,
                   resize: Optional[Callable] = None,
                   rebuild_data: Optional[Callable[[int], Any]] = None) -> int:
    """Attach the job to the runtime; returns the iteration to start from (a replacement
    process starts at the recovery point it restored).

    ``resize``: builds the model, optimizer and scheduler again on the current parallel state
    and returns them, for a job that can go on at another data-parallel size (a shrink or a
    grow, ``runtime.batch_split``): its data must then be spread over any data-parallel size,
    and its training loop use the objects it holds, not ones it kept from before.

    ``train_data_iterator`` (even None, on ranks that read no data) says the caller is Megatron-LM's
    ``train()``: ``args`` carries the sample counters and the hooks keep Megatron-LM's own
    step-level state consistent with each rollback (see ``_MegatronLM``). With ``resize``, such a
    job also gives ``rebuild_data``: it builds the training data iterator(s) on the current
    parallel state from a number of consumed samples, as Megatron-LM's
    ``build_train_valid_test_data_iterators`` does from ``args.consumed_train_samples``; after a
    shrink or grow each rank reads its slice of the same global batches from there.
    """
    global _lm, _first_iteration
    if not enabled(args):
        return iteration
    if _session is None:
        raise RuntimeError("--flash-recovery: the default process group must be created by "
                           "fr_megatron.megatron.training_hooks.init_process_group (apply the "
                           "patch: `fr-megatron patch --megatron-lm DIR`)")
    from megatron.core.utils import get_model_config

    from . import phases
    from .integration import MegatronIntegration

    startup_calls.end(lambda record: record.publish(_session.store, _session.signer,
                                                    _session.rank))
    model = list(model) if isinstance(model, (list, tuple)) else [model]
    config = get_model_config(model[0])
    lm = None
    if train_data_iterator is not _NOT_GIVEN and progress is None:
        if resize is not None and rebuild_data is None:
            raise ValueError("on_train_start: a job reading Megatron-LM's training data iterator "
                             "that gives resize (to go on at another data-parallel size) must "
                             "give rebuild_data too, to build the iterator for that size")
        lm = _MegatronLM(args, iteration, train_data_iterator, getattr(config, "timers", None),
                         keep=_session.cfg.snapshot_depth + 1, rebuild_data=rebuild_data)
    if lm is not None:
        progress, progress_attrs = lm.counters, lm.counters.names
    else:
        if progress is not None:
            progress_attrs = ("iteration", "consumed_samples")
        else:
            progress = args
            progress_attrs = tuple(n for n in _progress_names if hasattr(args, n))
        progress = _StartedAt(progress, iteration)
        progress_attrs = ("start_iteration", *progress_attrs)
    integration = MegatronIntegration(model, optimizer, opt_param_scheduler, progress=progress,
                                      progress_attrs=progress_attrs,
                                      resize=_marked(resize) if resize else None)
    phases.install(config, optimizer, _mark)
    _session.attach(integration)
    _lm = lm
    if getattr(args, "exit_signal_handler", False):
        # Megatron-LM's SIGTERM handler saves (with --save) and exits: a stopped job sends
        # every rank SIGTERM and waits for that
        from fr_megatron.runtime.stop_signal import save_on_stop

        save_on_stop(_session)
    step = _session.start()
    _first_iteration = progress.start_iteration  # a replacement's came from its peers
    _session.iteration_offset = _first_iteration
    first = _first_iteration + step - 1
    if lm is not None and _session.replacement:
        lm.recovered(first, replacement=True)
    log.info("rank=%d generation=%d step=%d phase=start flash recovery on; first iteration %d",
             _session.rank, _session.generation, step, first)
    return first


def _marked(resize: Callable) -> Callable:
    """``resize`` whose new optimizer and config mark the phases as the first ones do. Its
    collectives (every rank of the new world builds at once) are recorded as the rank's
    start-up record: a later replacement of the rank starts in this world, not the first."""
    def resize_and_mark():
        from megatron.core.utils import get_model_config

        from . import phases

        startup_calls.begin(_session.store, _session.signer, _session.rank, replacement=False)
        try:
            model, optimizer, scheduler = resize()
        except BaseException:
            startup_calls.end()
            raise
        startup_calls.end(lambda record: record.publish(_session.store, _session.signer,
                                                        _session.rank))
        phases.install(get_model_config(model[0]), optimizer, _mark)
        return model, optimizer, scheduler
    return resize_and_mark


def wrap_forward_step(forward_step_func: Callable) -> Callable:
    """Mark forward/backward phases inside Megatron's schedules (no-op without a session)."""
    if _session is None:
        return forward_step_func
    from .phases import wrap_forward_step as wrap

    _session.defer_snapshot_copy()
    return wrap(forward_step_func, _mark, _forward_issued)


def on_step_begin(iteration: int) -> None:
    if _session is not None:
        if _lm is not None:
            _lm.begin(iteration)
        _session.begin_step(iteration - _first_iteration + 1)


def on_step_end(iteration: int, loss_dict: Any = None) -> None:
    if _session is not None:
        if _lm is not None:
            _lm.end()
        with cpu.bypassed():  # the commit copies CPU tensors only: no CUDA call to map
            _session.commit(iteration - _first_iteration + 1, _plain(loss_dict))


@contextlib.contextmanager
def saving_checkpoint(iteration: Optional[int] = None):
    """Around a disk checkpoint save between steps: the rank reports the phase "checkpoint",
    judged by ``checkpoint_timeout`` instead of the hang timeout of a step. Rank 0 journals
    the save of ``iteration`` once it is done (``checkpoint_saved``: a stopped job's last line
    names it)."""
    if _session is not None:
        _session.phase("checkpoint")
    yield
    if _session is not None and isinstance(iteration, int) and _session.rank == 0:
        _session.event("checkpoint_saved", iteration=iteration)


def checkpoint_phase(save: Callable) -> Callable:
    """``save`` run inside ``saving_checkpoint``. The Megatron-LM patch wraps
    ``save_checkpoint_and_time`` with it, the function every save of ``train()`` and
    ``pretrain()`` goes through."""
    if getattr(save, "_fr_checkpoint_phase", False):
        return save

    @functools.wraps(save)
    def save_as_checkpoint_phase(*args, **kwargs):
        with saving_checkpoint(args[0] if args else kwargs.get("iteration")):
            return save(*args, **kwargs)

    save_as_checkpoint_phase._fr_checkpoint_phase = True
    return save_as_checkpoint_phase


def on_step_failure(exc: BaseException, iteration: int) -> int:
    """Recover from a failed step (or re-raise when flash recovery is off); the iteration to redo."""
    if _session is None:
        raise exc
    redo = _first_iteration + _session.recover(exc) - 1
    if _lm is not None:
        _lm.recovered(redo, failed=iteration)
    return redo


def on_train_end() -> None:
    """Close the session. After Megatron-LM's ``train()`` returns, ``pretrain()`` still saves the
    final checkpoint and evaluates on the same groups, so there the default group is kept."""
    if _session is None:
        return
    if _lm is None:
        _session.close()
        return
    import torch.distributed as dist

    destroy = dist.destroy_process_group
    own = getattr(_session, "group", None)

    def destroy_only_the_runtime_group(group=None):
        if group is None and own is not None:
            destroy(own)
        elif group is not None:
            destroy(group)

    dist.destroy_process_group = destroy_only_the_runtime_group
    try:
        _session.close()
    finally:
        dist.destroy_process_group = destroy


def history() -> dict:
    """Iteration (as ``train()`` counts it once the step is done) -> what ``on_step_end`` was
    given, for every step of the run, a replacement's included (it has its peers' history)."""
    if _session is None:
        return {}
    return {_first_iteration + step: v for step, v in _session.history.items()}


class _StartedAt:
    """A caller's progress object plus ``start_iteration``, the iteration the job started at.

    The integration snapshots ``start_iteration`` with the caller's counters, so it reaches a
    replacement with them; every other attribute is the caller's own."""

    def __init__(self, inner: Any, start_iteration: int):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "start_iteration", start_iteration)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "start_iteration":
            object.__setattr__(self, name, value)
        else:
            setattr(self._inner, name, value)


def _plain(value):
    """Loss dicts hold tensors; the runtime keeps plain numbers."""
    try:
        import torch

        if torch.is_tensor(value):
            return value.item() if value.numel() == 1 else value.tolist()
    except ImportError:
        pass
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------ Megatron-LM's train() only


class _Counters:
    """The progress the runtime snapshots for Megatron-LM (``MegatronIntegration(progress=...)``).

    Megatron-LM adds a step's samples to ``args.consumed_train_samples`` (and
    ``skipped_train_samples``) only after ``iteration += 1``, i.e. after ``on_step_end`` has
    committed the step. So the values committed with step ``i`` are the ones ``train()`` *will*
    have once it has counted iteration ``i`` (``count_step``), computed the way ``train()`` does;
    they are what ``args`` must hold when iteration ``i + 1`` begins. ``start_iteration`` travels
    with them so that a replacement maps runtime steps to the same iterations as its peers.

    ``data_start`` and ``data_positions`` say where this rank's training data stood: its loaders
    were built at ``data_start`` consumed samples for ``data_parallel_size`` replicas, and had
    handed out ``data_positions[j]`` micro-batches each when the step was committed
    (``_DataLog.delivered``). A rank restored from them reads on from the same micro-batch,
    whatever position its own loaders started at. A disk checkpoint keeps no positions (None):
    they follow from the consumed samples then.
    """

    names = ("start_iteration", "consumed_train_samples", "skipped_train_samples",
             "data_start", "data_positions", "data_parallel_size")

    def __init__(self, args, start_iteration: int, loaders: int):
        self.start_iteration = start_iteration
        self.read(args)
        self.data_start = self.consumed_train_samples
        self.data_positions: Optional[list[int]] = [0] * loaders
        self.data_parallel_size = _data_parallel_size()

    def from_checkpoint(self, view) -> None:
        """The counters a disk checkpoint restored (``MegatronIntegration.load_checkpoint``)."""
        self.consumed_train_samples = getattr(view, "consumed_samples", 0) or 0
        self.data_positions = None

    def read(self, args) -> None:
        self.consumed_train_samples = getattr(args, "consumed_train_samples", 0) or 0
        self.skipped_train_samples = getattr(args, "skipped_train_samples", 0) or 0

    def write(self, args) -> None:
        args.consumed_train_samples = self.consumed_train_samples
        if hasattr(args, "skipped_train_samples"):
            args.skipped_train_samples = self.skipped_train_samples

    def count_step(self, args) -> None:
        """The counters after ``train()`` has counted the current iteration (training.py, after
        ``iteration += 1``; the RL sequence-packing path is not covered)."""
        from megatron.core.num_microbatches_calculator import (
            get_current_global_batch_size,
            get_current_running_global_batch_size,
            get_num_microbatches,
        )

        self.read(args)
        self.consumed_train_samples += self.samples_per_micro_batch(args) * get_num_microbatches()
        self.skipped_train_samples += (get_current_global_batch_size()
                                       - get_current_running_global_batch_size())

    @staticmethod
    def samples_per_micro_batch(args) -> int:
        """How far one micro-batch moves Megatron-LM's pretraining samplers."""
        return _data_parallel_size() * args.micro_batch_size


def _data_parallel_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size()


class _DataLog:
    """Stands in for a ``RerunDataIterator``'s source: keeps what was fetched since the start of
    the oldest iteration a recovery can return to, and queues it again on a rollback.

    ``RerunDataIterator`` cannot do this itself: it keeps one iteration's micro-batches, only
    outside ``--rerun-mode disabled``, and its ``rewind()`` cannot read past them. Attributes it
    lacks (e.g. an external loader's ``save_state``) are the source's.
    """

    def __init__(self, source):
        self.source = source
        self.fetched: list = []
        self.marks: dict[int, int] = {}  # iteration -> len(fetched) at on_step_begin(iteration)
        self.queued: collections.deque = collections.deque()
        self.delivered = 0  # micro-batches handed out since the loader was built, net of rewinds

    def __iter__(self):
        return self

    def __next__(self):
        item = self.queued.popleft() if self.queued else next(self.source)
        self.fetched.append(item)
        self.delivered += 1
        return item

    def __getattr__(self, name):
        if name in ("source", "fetched", "marks", "queued", "delivered"):
            raise AttributeError(name)
        return getattr(self.source, name)

    def mark(self, iteration: int, keep: int) -> None:
        self.marks = {i: p for i, p in self.marks.items() if iteration - keep <= i < iteration}
        self.marks[iteration] = len(self.fetched)
        start = min(self.marks.values())
        if start:
            del self.fetched[:start]
            self.marks = {i: p - start for i, p in self.marks.items()}

    def seek(self, position: int) -> bool:
        """Hand out micro-batch ``position`` next: queue again what was fetched since then, or
        read ahead and drop; False when that lies before what is kept."""
        if position < self.delivered:
            back = self.delivered - position
            if back > len(self.fetched):
                return False
            self.queued.extendleft(reversed(self.fetched[-back:]))
            del self.fetched[-back:]
        else:
            for _ in range(position - self.delivered):
                if self.queued:
                    self.queued.popleft()
                else:
                    next(self.source)
            self.fetched.clear()
        self.delivered = position
        self.marks = {i: p for i, p in self.marks.items() if p <= len(self.fetched)} \
            if self.fetched else {}
        return True


class _MegatronLM:
    """Megatron-LM ``train()`` state that must follow a rollback to iteration ``r``.

    * ``args.consumed_train_samples``/``skipped_train_samples``: restored with the snapshot
      (``_Counters``) and written back to ``args``.
    * the rerun state machine: a step that failed inside ``train_step`` leaves it in
      ``INITIAL_RUN`` (or a rerun state), and the redo would then skip forward/backward; it goes
      back to ``NOT_RUNNING_YET`` with ``current_iteration = r``, as ``train()`` sets it up.
    * the training data iterator(s) (``RerunDataIterator``, a list of them with virtual
      pipelining) go back to the micro-batch iteration ``r`` began with: a survivor queues again
      what it fetched since then (``_DataLog``); a replacement, whose loaders were built at its
      own start-up position, reads ahead to its peers' position (``_Counters.data_positions``);
      after a disk-checkpoint fallback the position follows from the consumed samples. The
      wrapper's own replay buffer is dropped.
    * timers a failed step left started (``Timer.start`` asserts otherwise); ``interval-time``
      runs across steps and is left alone. ``stop()`` is not called: it synchronises the device.
    * after a shrink or grow, the micro-batch calculator and the iterators: the calculator is
      set up again for the new data-parallel size, and the iterators' sources are built again
      (``rebuild_data``) at the recovery point's consumed samples, in place inside the
      ``RerunDataIterator`` that ``train()`` holds. The same is done whenever the position
      cannot be told otherwise.
    """

    def __init__(self, args, iteration: int, train_data_iterator, timers, keep: int,
                 rebuild_data: Optional[Callable[[int], Any]] = None):
        self.args, self.timers, self.keep = args, timers, keep
        self.rebuild_data = rebuild_data
        self.iterators: list = []
        self.logs: list[_DataLog] = []
        its = train_data_iterator
        for it in its if isinstance(its, list) else [its]:
            if it is None:
                continue
            if _is_rerun_data_iterator(it):
                if not isinstance(it.iterable, _DataLog):
                    it.iterable = _DataLog(it.iterable)
                self.iterators.append(it)
                self.logs.append(it.iterable)
            else:
                log.warning("flash recovery cannot rewind a training data iterator of type %s (not "
                            "a RerunDataIterator): a redone step will read new micro-batches",
                            type(it).__name__)
        self.counters = _Counters(args, iteration, loaders=len(self.logs))
        self.own_start = self.counters.data_start  # where this process's loaders were built
        self.own_data_parallel_size = self.counters.data_parallel_size  # and for how many
        self.micro_batches_for = self.own_data_parallel_size  # the calculator's data-parallel size

    def begin(self, iteration: int) -> None:
        self.counters.read(self.args)
        for dl in self.logs:
            dl.mark(iteration, self.keep)

    def end(self) -> None:
        self.counters.count_step(self.args)
        self.counters.data_positions = [dl.delivered for dl in self.logs]

    def recovered(self, redo: int, failed: Optional[int] = None, replacement: bool = False) -> None:
        self.counters.write(self.args)
        self._reset_rerun_state_machine(redo)
        dp = _data_parallel_size()
        if dp != self.micro_batches_for:
            self._fit_micro_batches(dp)
        targets = self._data_targets(dp)
        if targets is None and self.rebuild_data is not None:
            self._rebuild_data(dp)
            targets = [0] * len(self.logs)
        for j, (it, dl) in enumerate(zip(self.iterators, self.logs)):
            was = dl.delivered
            if targets is None or not dl.seek(targets[j]):
                log.error("flash recovery: cannot put training data iterator %d at iteration %s "
                          "(it is at micro-batch %d%s; only the last %d iterations are kept); "
                          "the redone steps read other micro-batches", j, redo, was,
                          "" if failed is None else f", in iteration {failed}", self.keep)
            elif replacement and targets[j] != was:
                log.info("replacement: training data iterator %d moved from micro-batch %d to %d "
                         "(consumed_train_samples=%s)", j, was, targets[j],
                         self.counters.consumed_train_samples)
            it.saved_microbatches = []
            it.replaying = False
            it.replay_pos = 0
        self.counters.data_start = self.own_start
        self.counters.data_positions = [dl.delivered for dl in self.logs]
        self.counters.data_parallel_size = self.own_data_parallel_size
        self._stop_timers()

    def _fit_micro_batches(self, dp: int) -> None:
        """Megatron-LM's micro-batch calculator for ``dp`` replicas. A global batch that
        ``micro_batch_size x dp`` does not divide runs as the largest multiple of it, as
        ``--decrease-batch-size-if-needed`` does: no sample is dropped, the next step reads on
        from the last one taken (``args.consumed_train_samples``), and the learning-rate schedule
        still counts the configured global batch."""
        from megatron.core.num_microbatches_calculator import (
            get_current_running_global_batch_size,
            reconfigure_num_microbatches_calculator,
        )

        a = self.args
        gbs, mbs = a.global_batch_size, a.micro_batch_size
        reconfigure_num_microbatches_calculator(
            _session.world_rank, getattr(a, "rampup_batch_size", None), gbs, mbs, dp,
            decrease_batch_size_if_needed=bool(getattr(a, "decrease_batch_size_if_needed", False)
                                               or gbs % (mbs * dp)))
        running = get_current_running_global_batch_size()
        log.log(logging.WARNING if running != gbs else logging.INFO,
                "rank=%d generation=%d phase=restore micro-batches for data-parallel size %d: "
                "%d samples per step of the global batch %d%s", _session.rank,
                _session.generation, dp, running, gbs,
                "" if running == gbs else f" (not a multiple of micro-batch x data-parallel "
                f"size {mbs}x{dp}; no sample is dropped, the next step reads on)")
        self.micro_batches_for = dp

    def _rebuild_data(self, dp: int) -> None:
        """The iterators' sources built again at the recovery point's consumed samples for the
        current parallel state, in place in the iterators ``train()`` holds."""
        consumed = self.counters.consumed_train_samples
        built = self.rebuild_data(consumed)
        built = [b for b in (built if isinstance(built, list) else [built]) if b is not None]
        if len(built) != len(self.iterators):
            raise RuntimeError(f"rebuild_data built {len(built)} training data iterators, the "
                               f"job reads {len(self.iterators)}")
        for it, new in zip(self.iterators, built):
            it.iterable = _DataLog(new.iterable if _is_rerun_data_iterator(new) else new)
        self.logs = [it.iterable for it in self.iterators]
        self.own_start, self.own_data_parallel_size = consumed, dp
        log.info("rank=%d generation=%d phase=restore training data built again at %d consumed "
                 "samples for data-parallel size %d", _session.rank, _session.generation,
                 consumed, dp)

    def _data_targets(self, dp: int) -> Optional[list[int]]:
        """Each loader's micro-batch at the start of the redone iteration, counted from its own
        first one, at data-parallel size ``dp``; None when they cannot be told."""
        c, per = self.counters, _Counters.samples_per_micro_batch(self.args)
        if self.own_data_parallel_size != dp:
            return None  # this process's loaders were built for another data-parallel size
        if c.data_positions is None:  # restored from a disk checkpoint
            ahead, rest = divmod(c.consumed_train_samples - self.own_start, per)
            return None if rest or ahead < 0 else [ahead] * len(self.logs)
        if len(c.data_positions) != len(self.logs) or c.data_parallel_size != dp:
            return None  # counted in another loader's micro-batches
        behind, rest = divmod(self.own_start - c.data_start, per)
        if rest:
            return None
        targets = [p - behind for p in c.data_positions]
        if any(t < 0 < p for t, p in zip(targets, c.data_positions)):
            return None  # this process's loaders start past the redone iteration
        # an iterator nobody has read (a middle virtual-pipeline chunk) may stay where it is
        return [max(t, 0) for t in targets]

    @staticmethod
    def _reset_rerun_state_machine(redo: int) -> None:
        try:
            from megatron.core.rerun_state_machine import RerunState, get_rerun_state_machine
        except ImportError:
            return
        rsm = get_rerun_state_machine()
        rsm.state = RerunState.NOT_RUNNING_YET
        rsm.current_iteration = redo

    def _stop_timers(self) -> None:
        for name, timer in (getattr(self.timers, "_timers", None) or {}).items():
            if name != "interval-time" and getattr(timer, "_started", False):
                timer._started = False


def _is_rerun_data_iterator(it) -> bool:
    try:
        from megatron.core.rerun_state_machine import RerunDataIterator
    except ImportError:
        return False
    return isinstance(it, RerunDataIterator)
