"""The hooks a Megatron-LM-style training loop calls around each step.

Megatron-LM's ``train()`` (through ``patches/megatron-lm``) and ``recipes/megatron/pretrain_gpt.py``
call the same five functions, so the recipe's tests exercise the code path the patch uses::

    iteration = on_train_start(model, optimizer, opt_param_scheduler, args, iteration)
    while iteration < args.train_iters:
        on_step_begin(iteration)
        try:
            loss_dict = train_step(...)
        except Exception as exc:
            iteration = on_step_failure(exc, iteration)   # the iteration to redo
            continue
        on_step_end(iteration, loss_dict)
        iteration += 1
    on_train_end()

Megatron's ``iteration`` counts finished iterations; the runtime's step ``iteration + 1`` is the one
being run, so the recovery point R (last step every rank committed) means "redo iteration R".
Without ``--flash-recovery`` every hook is a no-op and ``iteration`` passes through unchanged.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

log = logging.getLogger("fr_megatron.megatron.hooks")

_session = None
_progress_names = ("consumed_train_samples", "skipped_train_samples")


def enabled(args) -> bool:
    return bool(getattr(args, "flash_recovery", False))


def init_process_group(backend: str, args=None, **_ignored):
    """Create the default group for the current generation (replaces Megatron-LM's env:// init,
    whose un-prefixed rendezvous keys a replacement process would collide with)."""
    global _session
    from fr_megatron.config import FlashRecoveryConfig
    from fr_megatron.runtime import Session

    cfg = FlashRecoveryConfig.from_env()
    if args is not None:
        from fr_megatron.settings_args import config_from_args

        cfg = config_from_args(args, base=cfg)
    _session = Session.from_env(config=cfg)
    _session.init_process_group(backend)
    return _session


def session():
    return _session


def _mark(phase: str) -> None:
    """Phase marker handed to megatron's objects. A plain function on purpose: the group rebinder
    walks closures and bound methods, and must not wander from the model into the session."""
    if _session is not None:
        _session.phase(phase)


def on_train_start(model, optimizer, opt_param_scheduler, args, iteration: int = 0,
                   progress: Any = None, forward_step_wrapper: Optional[Callable] = None) -> int:
    """Attach the job to the runtime; returns the iteration to start from (a replacement
    process starts at the recovery point it restored)."""
    if not enabled(args):
        return iteration
    if _session is None:
        raise RuntimeError("--flash-recovery: the default process group must be created by "
                           "fr_megatron.megatron.training_hooks.init_process_group (apply the "
                           "patch: `fr-megatron patch --megatron-lm DIR`)")
    from megatron.core.utils import get_model_config

    from . import phases
    from .integration import MegatronIntegration

    model = list(model) if isinstance(model, (list, tuple)) else [model]
    integration = MegatronIntegration(
        model, optimizer, opt_param_scheduler, progress=progress if progress is not None else args,
        progress_attrs=("iteration", "consumed_samples") if progress is not None else
        tuple(n for n in _progress_names if hasattr(args, n)))
    phases.install(get_model_config(model[0]), optimizer, _mark)
    _session.attach(integration)
    step = _session.start()
    log.info("rank=%d generation=%d step=%d phase=start flash recovery on; first iteration %d",
             _session.rank, _session.generation, step, step - 1)
    return step - 1


def wrap_forward_step(forward_step_func: Callable) -> Callable:
    """Mark forward/backward phases inside Megatron's schedules (no-op without a session)."""
    if _session is None:
        return forward_step_func
    from .phases import wrap_forward_step as wrap

    return wrap(forward_step_func, _mark)


def on_step_begin(iteration: int) -> None:
    if _session is not None:
        _session.begin_step(iteration + 1)


def on_step_end(iteration: int, loss_dict: Any = None) -> None:
    if _session is not None:
        _session.commit(iteration + 1, _plain(loss_dict))


def on_step_failure(exc: BaseException, iteration: int) -> int:
    """Recover from a failed step (or re-raise when flash recovery is off); the iteration to redo."""
    if _session is None:
        raise exc
    return _session.recover(exc) - 1


def on_train_end() -> None:
    if _session is not None:
        _session.close()


def history() -> dict:
    """step -> what on_step_end was given, for every step of the run (replacements included)."""
    return dict(_session.history) if _session is not None else {}


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
