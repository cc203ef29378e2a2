"""CPU mode for megatron-core 0.16.1: train GPTModel with gloo on a CPU-only torch.

megatron-core assumes CUDA in a handful of places that a CPU run of the training path reaches.
``enable_cpu_mode()`` bridges exactly those, and nothing when CUDA is available:

* RNG: ``model_parallel_cuda_manual_seed`` / ``get_cuda_rng_tracker`` keep named CUDA generator
  states; on CPU every random op (dropout, init) draws from the CPU default generator, so the
  tracker forks *that* generator instead (``CpuRNGStatesTracker``).
* ``device="cuda"`` / ``device=torch.cuda.current_device()`` in tensor factories (schedules.py,
  clip_grads.py, p2p_communication.py, the optimizers, the grad buffers) and ``.cuda()``: a
  ``TorchFunctionMode`` maps them to the CPU.
* ``tensor.type() == 'torch.cuda.FloatTensor'`` dtype checks (clip_grads.py, distrib_optimizer.py,
  optimizer.py): the same mode reports CPU tensors under their CUDA type name, so the checks keep
  their meaning (which dtype) without the device.
* ``torch.cuda.current_device()`` / ``torch.cuda.synchronize()`` (p2p_communication.py, DDP) raise
  on a CPU-only build: they become ``0`` (mapped to the CPU by the mode) and a no-op.
* streams: DDP with ``num_distributed_optimizer_instances > 1`` creates a communication stream and
  orders it against the default one (``torch.cuda.Stream``, ``stream``, ``default_stream``,
  ``wait_stream``); on the CPU work runs in program order, so these become no-ops.

The function mode is pushed on the calling thread's mode stack (torch keeps it per thread): call
``enable_cpu_mode()`` from the thread that trains. Other threads (e.g. a snapshot thread that only
copies tensors) do not need it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_PATCHED = False
_THREAD = threading.local()  # .mode: the CudaToCpuMode pushed on this thread

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means "accelerator <n>", which on this build can only be a CUDA device.
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Runs tensor code written for CUDA on the CPU (see the module docstring for why)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        return func(*args, **kwargs)


def _install_rng_tracker() -> None:
    """Make megatron-core's RNG tracker fork the CPU generator instead of CUDA ones."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Named RNG states for the CPU default generator.

        Megatron keeps one generator state per role (data-parallel, model-parallel, expert) and
        forks into it around tensor-parallel random ops; on CPU the op draws from the default
        CPU generator, so that is the one swapped in and out.
        """

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed)
            self.states_[name] = gen.get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    original_initialize = mrandom.initialize_rng_tracker

    def initialize_rng_tracker(
        use_te_rng_tracker=False,
        inference_rng_tracker=False,
        use_cudagraphable_rng=False,
        force_reset=False,
    ):
        if force_reset:
            mrandom._CUDA_RNG_STATE_TRACKER = None
            mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
        if mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED:
            return
        if use_te_rng_tracker or inference_rng_tracker or use_cudagraphable_rng:
            return original_initialize(
                use_te_rng_tracker, inference_rng_tracker, use_cudagraphable_rng, force_reset
            )
        mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    mrandom.initialize_rng_tracker = initialize_rng_tracker
    mrandom.CpuRNGStatesTracker = CpuRNGStatesTracker
    # Activation recomputation saves and restores "the CUDA state": on CPU that is the CPU one.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    if isinstance(mrandom._CUDA_RNG_STATE_TRACKER, mrandom.CudaRNGStatesTracker) and not isinstance(
        mrandom._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker
    ):
        mrandom._CUDA_RNG_STATE_TRACKER = None
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


class _CpuStream:
    """A CUDA stream's interface where everything runs in program order."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _patch_torch_cuda() -> None:
    """``torch.cuda.current_device``/``synchronize`` raise on a CPU-only build; p2p calls them,
    and DDP's optimizer instances order a communication stream."""
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.Stream = _CpuStream
    torch.cuda.default_stream = lambda device=None: _CpuStream()
    torch.cuda.current_stream = lambda device=None: _CpuStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()


def _eager(model=None, **_options):
    """``torch.compile``'s signature, compiling nothing (used as a decorator or called)."""
    return model if model is not None else (lambda fn: fn)


def import_megatron_core() -> None:
    """Import megatron-core; on a CPU-only build without its import-time ``torch.compile``.

    megatron-core wraps its fusion kernels in ``torch.compile`` when its modules load
    (``megatron.core.jit.jit_fuser``), which imports dynamo and inductor: about 2.7 s of CPU in
    every process, paid by each rank of a CPU job at start-up. The CPU models turn those fusions
    off (``TinyGPTJob``), so there they stay plain functions. With CUDA, or when megatron-core is
    already loaded, this is a plain import."""
    if torch.cuda.is_available() or "megatron.core" in sys.modules:
        import megatron.core  # noqa: F401
        return
    compile_ = torch.compile
    torch.compile = _eager
    try:
        import megatron.core  # noqa: F401
    finally:
        torch.compile = compile_
    # a warm spare that learns this process's modules loads megatron-core the same way
    from fr_megatron.protocol import modules

    modules.loaded_through("megatron", "fr_megatron.megatron.preload")


def enable_cpu_mode() -> bool:
    """Bridge megatron-core's CUDA assumptions to the CPU for the calling thread.

    Returns True if CPU mode is active, False (and changes nothing) when CUDA is available.
    Idempotent: the process-wide patches are installed once, the function mode once per thread.
    """
    global _PATCHED
    if torch.cuda.is_available():
        return False
    if not _PATCHED:
        _install_rng_tracker()
        _patch_torch_cuda()
        _PATCHED = True
        logger.info("megatron-core CPU mode: RNG tracker and torch.cuda shims installed")
    if getattr(_THREAD, "mode", None) is None:
        _THREAD.mode = CudaToCpuMode()
        _THREAD.mode.__enter__()
    return True


def cpu_mode_enabled() -> bool:
    """Whether ``enable_cpu_mode()`` is active on the calling thread."""
    return getattr(_THREAD, "mode", None) is not None


@contextlib.contextmanager
def bypassed():
    """Run torch calls without the CPU mode's ``__torch_function__`` (no-op when it is off).

    For code that only copies CPU tensors it never maps (the runtime's commit): every torch call
    through the mode is a Python round trip, and a commit makes hundreds of them."""
    if getattr(_THREAD, "mode", None) is None:
        yield
        return
    with torch._C.DisableTorchFunction():
        yield
