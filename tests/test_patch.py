"""Tests of ``fr-megatron patch`` (fr_megatron.megatron.patch_tool).

The error paths run always.  The apply path needs a Megatron-LM checkout at the
pinned tag: set ``MEGATRON_LM_DIR`` to it (it is copied, never modified), e.g.

    git clone --branch core_v0.16.1 https://github.com/NVIDIA/Megatron-LM /tmp/mlm
    MEGATRON_LM_DIR=/tmp/mlm pytest tests/test_patch.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fr_megatron.megatron import patch_tool
from fr_megatron.megatron.patch_tool import EXPECTED_TAG, PatchError, apply_patch, main

MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR")
needs_checkout = pytest.mark.skipif(
    not MEGATRON_LM_DIR,
    reason=f"MEGATRON_LM_DIR is unset: point it at a Megatron-LM checkout of {EXPECTED_TAG} "
    "to test applying the patch",
)

TRAINING = "megatron/training/training.py"
INITIALIZE = "megatron/training/initialize.py"
PRETRAIN = "pretrain_gpt.py"
PATCHED = (PRETRAIN, TRAINING, INITIALIZE)


def _fake_megatron(root: Path, version=(0, 15, 0)) -> Path:
    """A directory with Megatron-LM's marker files (not the real contents)."""
    (root / "megatron/training").mkdir(parents=True)
    (root / "megatron/core").mkdir(parents=True)
    (root / PRETRAIN).write_text("print('pretrain')\n")
    (root / TRAINING).write_text("def train():\n    pass\n")
    major, minor, patch = version
    (root / "megatron/core/package_info.py").write_text(
        f'MAJOR = {major}\nMINOR = {minor}\nPATCH = {patch}\nPRE_RELEASE = ""\n'
    )
    return root


# ---------------------------------------------------------------- always run


@pytest.mark.timeout(60)
def test_patch_file_is_shipped_and_targets_the_two_files():
    path = patch_tool.patch_path()
    assert path.name == f"{EXPECTED_TAG}.patch"
    assert path.parent == Path(patch_tool.__file__).resolve().parent / "patches"
    text = path.read_text()
    assert "diff --git a/pretrain_gpt.py b/pretrain_gpt.py" in text
    assert f"diff --git a/{TRAINING} b/{TRAINING}" in text
    assert f"diff --git a/{INITIALIZE} b/{INITIALIZE}" in text
    for name in ("init_process_group", "on_train_start", "wrap_forward_step", "on_step_begin",
                 "on_step_failure", "on_step_end", "on_train_end"):
        assert f"flash_recovery.{name}(" in text
    assert "parallel_state_hook.install()" in text
    assert "from fr_megatron.settings_args import add_flash_recovery_args" in text
    # every hook the patch calls exists, with the arguments the patch passes
    import inspect

    from fr_megatron.megatron import training_hooks

    assert "train_data_iterator" in inspect.signature(training_hooks.on_train_start).parameters
    for name in ("init_process_group", "wrap_forward_step", "on_step_begin", "on_step_failure",
                 "on_step_end", "on_train_end"):
        assert callable(getattr(training_hooks, name))


@pytest.mark.timeout(60)
def test_nonexistent_dir_is_bad_input(tmp_path, capsys):
    missing = tmp_path / "no-such-megatron"
    with pytest.raises(PatchError) as info:
        apply_patch(missing)
    assert info.value.exit_code == 2
    assert "--megatron-lm" in str(info.value) and "no such directory" in str(info.value)
    assert "\n" not in str(info.value)

    assert main(["--megatron-lm", str(missing)]) == 2
    assert "--megatron-lm" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_file_instead_of_dir_is_bad_input(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert main(["--megatron-lm", str(f)]) == 2


@pytest.mark.timeout(60)
def test_dir_that_is_not_megatron_is_bad_input(tmp_path, capsys):
    (tmp_path / "pretrain_gpt.py").write_text("")  # one marker is not enough
    with pytest.raises(PatchError) as info:
        apply_patch(tmp_path, check_only=True)
    assert info.value.exit_code == 2
    assert "not a Megatron-LM checkout" in str(info.value)
    assert TRAINING in str(info.value)
    assert main(["--megatron-lm", str(tmp_path), "--check"]) == 2
    assert "not a Megatron-LM checkout" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_wrong_version_is_refused_naming_the_tag(tmp_path, capsys):
    root = _fake_megatron(tmp_path / "mlm", version=(0, 15, 0))
    with pytest.raises(PatchError) as info:
        apply_patch(root, check_only=True)
    msg = str(info.value)
    assert info.value.exit_code == 2
    assert EXPECTED_TAG in msg and "0.15.0" in msg and "--force" in msg
    assert main(["--megatron-lm", str(root), "--check"]) == 2
    assert EXPECTED_TAG in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_unknown_version_is_refused(tmp_path):
    root = _fake_megatron(tmp_path / "mlm")
    (root / "megatron/core/package_info.py").unlink()
    with pytest.raises(PatchError, match="unknown version"):
        apply_patch(root, check_only=True)


@pytest.mark.timeout(60)
def test_force_skips_the_version_check_but_not_git_apply(tmp_path, capsys):
    root = _fake_megatron(tmp_path / "mlm", version=(0, 15, 0))
    assert main(["--megatron-lm", str(root), "--check", "--force"]) == 1
    err = capsys.readouterr().err
    assert "does not apply" in err and "--megatron-lm" in err
    # Nothing was changed.
    assert (root / TRAINING).read_text() == "def train():\n    pass\n"


@pytest.mark.timeout(60)
def test_matching_version_but_foreign_files_fail_to_apply(tmp_path):
    root = _fake_megatron(tmp_path / "mlm", version=(0, 16, 1))
    with pytest.raises(PatchError) as info:
        apply_patch(root)
    assert info.value.exit_code == 1


@pytest.mark.timeout(60)
def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["--megatron-lm"]) == 2
    capsys.readouterr()


@pytest.mark.timeout(60)
def test_fr_megatron_cli_dispatches_patch(tmp_path, capsys):
    cli = pytest.importorskip("fr_megatron.cli", reason="fr_megatron.cli not written yet")
    assert cli.main(["patch", "--megatron-lm", str(tmp_path / "missing")]) == 2
    assert "fr-megatron patch: error: --megatron-lm" in capsys.readouterr().err


# ------------------------------------------------------ with a real checkout


@pytest.fixture
def megatron_copy(tmp_path) -> Path:
    src = Path(MEGATRON_LM_DIR).expanduser()
    dst = tmp_path / "Megatron-LM"
    # A worktree's .git is a file pointing at the original repository; copying it
    # is harmless here (git apply without --index never writes the index).
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _function(text: str, name: str) -> str:
    start = text.index(f"\ndef {name}(")
    end = text.index("\ndef ", start + 1)
    return text[start:end]


def _train_body(text: str) -> str:
    return _function(text, "train")


def _assert_in_order(body: str, needles: list, where: str) -> None:
    pos = 0
    for needle in needles:  # present, and in this order
        found = body.find(needle, pos)
        assert found >= 0, f"{needle!r} missing or out of order in {where}"
        pos = found + len(needle)


@needs_checkout
@pytest.mark.timeout(60)
def test_check_then_apply_on_real_checkout(megatron_copy, capsys):
    root = megatron_copy
    before = {p: (root / p).read_text() for p in PATCHED}

    assert main(["--megatron-lm", str(root), "--check"]) == 0
    assert "applies cleanly" in capsys.readouterr().out
    assert {p: (root / p).read_text() for p in PATCHED} == before  # --check changes nothing

    assert main(["--megatron-lm", str(root)]) == 0
    assert "applied" in capsys.readouterr().out

    pretrain = (root / PRETRAIN).read_text()
    assert "from fr_megatron.settings_args import add_flash_recovery_args" in pretrain
    assert "extra_args_provider=extra_args_provider," in pretrain
    assert "parser = add_modelopt_args(parser)" in pretrain  # ModelOpt's provider still composed

    body = _train_body((root / TRAINING).read_text())
    hooks = [
        "if getattr(args, 'flash_recovery', False):",
        "from fr_megatron.megatron import training_hooks as flash_recovery",
        "iteration = flash_recovery.on_train_start(",
        "model, optimizer, opt_param_scheduler, args, iteration,",
        "train_data_iterator=train_data_iterator,",
        "forward_step_func = flash_recovery.wrap_forward_step(forward_step_func)",
        "global save_checkpoint_and_time",
        "save_checkpoint_and_time = flash_recovery.checkpoint_phase(save_checkpoint_and_time)",
        "while iteration < args.train_iters:",
        "try:",
        "flash_recovery.on_step_begin(iteration)",
        "ft_integration.on_training_step_start()",
        ") = train_step(",
        "except Exception as exc:",
        "if flash_recovery is None:",
        "raise",
        "iteration = flash_recovery.on_step_failure(exc, iteration)",
        "continue",
        "ft_integration.on_training_step_end()",
        "try:",
        "flash_recovery.on_step_end(iteration, loss_dict)",
        "except Exception as exc:",
        "iteration = flash_recovery.on_step_failure(exc, iteration)",
        "continue",
        "iteration += 1",
        "args.consumed_train_samples += iteration_sequences",
        "if should_exit:\n            break\n\n    if flash_recovery is not None:",
        "flash_recovery.on_train_end()",
        "# Destroy CUDA Graphs.",
        "return iteration, num_floating_point_operations_so_far",
    ]
    _assert_in_order(body, hooks, "train()")
    # the hook set-up is the last thing before the loop; on_step_end's guard sits directly before
    # the iteration counter moves on
    assert re.search(r"checkpoint_phase\(save_checkpoint_and_time\)\n\n\s+# Run training "
                     r"iterations", body)
    assert re.search(r"continue\n\s+iteration \+= 1\n", body)

    init = _function((root / INITIALIZE).read_text(), "_initialize_distributed")
    _assert_in_order(init, [
        "if torch.distributed.is_initialized():",
        "torch.cuda.set_device(args.local_rank)",
        "init_process_group_kwargs = {",
        "if getattr(args, 'flash_recovery', False):",
        "from fr_megatron.megatron import training_hooks as flash_recovery",
        "flash_recovery.init_process_group(args.distributed_backend, args)",
        "else:",
        "torch.distributed.init_process_group(**init_process_group_kwargs)",
        "inprocess_restart.maybe_force_nccl_backend_init(device_id)",
        "if mpu.model_parallel_is_initialized():",
        "if getattr(args, 'flash_recovery', False):",
        "from fr_megatron.megatron import parallel_state_hook",
        "parallel_state_hook.install()",
        "mpu.initialize_model_parallel(",
    ], "_initialize_distributed()")

    compiled = subprocess.run(
        [sys.executable, "-m", "py_compile", *(str(root / p) for p in PATCHED)],
        capture_output=True, text=True, timeout=50,
    )
    assert compiled.returncode == 0, compiled.stderr

    # Applying again is a no-op that says so; --check on a patched tree says so too.
    assert main(["--megatron-lm", str(root)]) == 0
    assert "already patched" in capsys.readouterr().out
    assert main(["--megatron-lm", str(root), "--check"]) == 0
    assert "already patched" in capsys.readouterr().out


@needs_checkout
@pytest.mark.timeout(60)
def test_real_checkout_with_local_edits_fails_with_exit_1(megatron_copy, capsys):
    root = megatron_copy
    training = root / TRAINING
    text = training.read_text()
    training.write_text(text.replace("    # Run training iterations till done.\n", "    # edited\n", 1))
    assert main(["--megatron-lm", str(root), "--check"]) == 1
    assert "does not apply" in capsys.readouterr().err


def _compile_function(path: Path, name: str):
    """Only the function ``name`` of the patched file, to run with stubbed globals."""
    import ast

    tree = ast.parse(path.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    return compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec")


def _stub_globals(**given):
    """Globals where every name not given is a MagicMock (or a builtin)."""
    import builtins
    from unittest import mock

    class Globals(dict):
        def __missing__(self, name):
            if hasattr(builtins, name):
                return getattr(builtins, name)
            self[name] = mock.MagicMock(name=name)
            return self[name]

    return Globals(**given)


class _Args:
    def __getattr__(self, name):
        return None


def _install_hooks(monkeypatch, hooks) -> None:
    """Make ``from fr_megatron.megatron import training_hooks`` give ``hooks``."""
    import fr_megatron.megatron as fr_pkg

    monkeypatch.setitem(sys.modules, "fr_megatron.megatron.training_hooks", hooks)
    monkeypatch.setattr(fr_pkg, "training_hooks", hooks, raising=False)


def _run_patched_train(training_py: Path, train_step, flash_recovery_on: bool, *,
                       data_iterator=None, timers=None, rerun_state_machine=None, train_iters=5):
    """Run the patched ``train()`` with everything around the loop stubbed out.

    Only the function ``train`` is compiled from the patched file; every other global it touches
    is a MagicMock unless given below. ``train_step`` is called as Megatron-LM calls it. Returns
    (train's result or exception, args)."""
    from unittest import mock

    args = _Args()
    args.iteration, args.train_iters, args.iterations_to_skip = 0, train_iters, []
    args.consumed_train_samples = args.skipped_train_samples = 0
    args.num_floating_point_operations_so_far = 0
    args.flash_recovery, args.cuda_graph_impl, args.cuda_graph_scope = flash_recovery_on, "none", []
    args.micro_batch_size = 1

    mpu = mock.MagicMock()
    mpu.get_data_parallel_world_size.return_value = 2
    given = dict(
        get_args=lambda: args, train_step=lambda *a, **k: train_step(args, *a, **k), mpu=mpu,
        get_num_microbatches=lambda: 4,  # global batch 2 * 1 * 4 = 8 samples
        get_current_global_batch_size=lambda: 8, get_current_running_global_batch_size=lambda: 8,
        num_floating_point_operations=lambda a, b: 1.0,
        training_log=lambda *a, **k: False,
        post_training_step_callbacks=lambda *a, **k: 0.0,
        checkpoint_and_decide_exit=lambda *a, **k: False,
        should_disable_forward_pre_hook=lambda a: False,
        get_canonical_lr_for_logging=lambda pg: 1e-4,
        megatron_FSDP=type("FSDP", (), {}), DDP=type("DDP", (), {}),
        torch=mock.MagicMock(), sys=sys,
    )
    if timers is not None:
        given["get_timers"] = lambda: timers
    if rerun_state_machine is not None:
        given["get_rerun_state_machine"] = lambda: rerun_state_machine
    g = _stub_globals(**given)
    exec(_compile_function(training_py, "train"), g)
    optimizer = mock.MagicMock(is_stub_optimizer=True)
    config = mock.MagicMock()
    try:
        result = g["train"](None, [mock.MagicMock()], optimizer, mock.MagicMock(),
                            data_iterator if data_iterator is not None else iter(()),
                            None, None, config, None, None)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        result = exc
    return result, args


@needs_checkout
@pytest.mark.timeout(60)
def test_patched_train_loop_redoes_a_failed_step(megatron_copy, monkeypatch):
    """The loop's control flow, with recording stand-ins for the hooks."""
    import types

    assert main(["--megatron-lm", str(megatron_copy)]) == 0
    training_py = megatron_copy / TRAINING
    log, attempts = [], {}

    def train_step(args, *_a, iteration=None):
        attempts[iteration] = attempts.get(iteration, 0) + 1
        log.append(("train_step", iteration, args.consumed_train_samples))
        if iteration == 2 and attempts[iteration] == 1:
            raise RuntimeError(f"injected failure at {iteration}")
        # Megatron-LM's train_step asks for a save after iteration 4 (should_checkpoint)
        return ({"lm loss": float(iteration)}, 0, iteration == 4, False, 0, 1.0, None, 0)

    def checkpoint_phase(save):
        log.append(("checkpoint_phase",))
        return lambda iteration, *a, **k: log.append(("save in checkpoint phase", iteration))

    def on_step_failure(exc, iteration):
        log.append(("on_step_failure", iteration, str(exc), args_of[0].consumed_train_samples))
        return iteration

    args_of = []
    ends = {"failed": False}

    def on_step_end(it, ld):
        log.append(("on_step_end", it, ld, args_of[0].consumed_train_samples))
        if it == 3 and not ends["failed"]:  # a peer lost while step 3 was being committed
            ends["failed"] = True
            raise ConnectionError("peer lost during commit")

    def on_train_start(model, optimizer, scheduler, args, iteration, **kw):
        args_of.append(args)
        log.append(("on_train_start", iteration, sorted(kw)))
        return iteration

    hooks = types.SimpleNamespace(
        on_train_start=on_train_start,
        wrap_forward_step=lambda f: log.append(("wrap_forward_step",)) or f,
        on_step_begin=lambda it: log.append(("on_step_begin", it,
                                             args_of[0].consumed_train_samples)),
        on_step_failure=on_step_failure,
        on_step_end=on_step_end,
        on_train_end=lambda: log.append(("on_train_end",)),
        checkpoint_phase=checkpoint_phase,
    )
    _install_hooks(monkeypatch, hooks)

    result, args = _run_patched_train(training_py, train_step, True)
    # train() returns (iteration, flops): 5 steps, none lost; the flops of the step whose commit
    # failed were not counted the first time
    assert result == (5, 5.0)
    assert log[0] == ("on_train_start", 0, ["train_data_iterator"])
    assert log[1:3] == [("wrap_forward_step",), ("checkpoint_phase",)]
    assert ("save in checkpoint phase", 4) in log  # the save went through the wrapped function
    assert log[-1] == ("on_train_end",)
    assert ("on_step_failure", 2, "injected failure at 2", 16) in log
    assert ("on_step_failure", 3, "peer lost during commit", 24) in log
    # Iterations 2 and 3 are begun twice; the failed attempts did not advance consumed samples,
    # so each redo sees the samples of its first attempt.
    assert [e for e in log if e[0] == "on_step_begin"] == [
        ("on_step_begin", i, s)
        for i, s in [(0, 0), (1, 8), (2, 16), (2, 16), (3, 24), (3, 24), (4, 32)]
    ]
    assert [e[1] for e in log if e[0] == "on_step_end"] == [0, 1, 2, 3, 3, 4]
    assert args.consumed_train_samples == 40

    # Without --flash-recovery: the failure propagates unchanged and no hook runs.
    log.clear()
    attempts.clear()
    result, _ = _run_patched_train(training_py, train_step, False)
    assert isinstance(result, RuntimeError) and str(result) == "injected failure at 2"
    assert {e[0] for e in log} == {"train_step"}


def test_checkpoint_phase_marks_the_save_and_wraps_once(monkeypatch):
    from fr_megatron.megatron import training_hooks

    phases = []
    monkeypatch.setattr(training_hooks, "_session", type("Session", (), {
        "rank": 0, "phase": lambda self, name: phases.append(name),
        "event": lambda self, name, **fields: phases.append((name, fields))})())

    def save_checkpoint_and_time(iteration, *args, **kwargs):
        phases.append(f"saving {iteration}")
        return "saved"

    wrapped = training_hooks.checkpoint_phase(save_checkpoint_and_time)
    assert training_hooks.checkpoint_phase(wrapped) is wrapped
    assert wrapped.__name__ == "save_checkpoint_and_time"
    assert wrapped(7, model=None) == "saved"
    # rank 0 journals the save once it is done (a stopped job's last line names it)
    assert phases == ["checkpoint", "saving 7", ("checkpoint_saved", {"iteration": 7})]


class _FakeIntegration:
    """``MegatronIntegration`` reduced to the progress counters it snapshots."""

    def __init__(self, model, optimizer, scheduler=None, progress=None, progress_attrs=(),
                 resize=None):
        self.progress, self.progress_attrs = progress, tuple(progress_attrs)

    def capture(self) -> dict:
        return {a: getattr(self.progress, a) for a in self.progress_attrs}

    def restore(self, state: dict) -> None:
        for a, v in state.items():
            setattr(self.progress, a, v)


class _FakeSession:
    """The runtime's step transaction in one process: snapshots of the integration's state per
    committed step; ``recover`` rolls back to the newest one, or ``lose`` steps further (a lost
    rank whose copies lag behind)."""

    replacement, rank, generation = False, 0, 0

    def __init__(self, fail_commit_at=(), lose=None):
        import types

        self.cfg = types.SimpleNamespace(snapshot_depth=2)
        self.snaps, self.fail_commit_at, self.lose = {}, set(fail_commit_at), dict(lose or {})
        self.steps, self.closed = [], False

    def attach(self, integration):
        self.integration = integration

    def start(self) -> int:
        self.commit(0)
        return 1

    def phase(self, name):
        pass

    def begin_step(self, step):
        self.step = step
        self.steps.append(("begin", step))

    def commit(self, step, output=None):
        self.steps.append(("commit", step))
        if step in self.fail_commit_at:
            self.fail_commit_at.discard(step)
            raise ConnectionError(f"peer lost while committing step {step}")
        self.snaps[step] = self.integration.capture()
        for old in [s for s in self.snaps if s < step - self.cfg.snapshot_depth]:
            del self.snaps[old]

    def recover(self, exc) -> int:
        point = max(self.snaps) - self.lose.pop(self.step, 0)
        self.integration.restore(self.snaps[point])
        self.snaps = {s: v for s, v in self.snaps.items() if s <= point}
        self.steps.append(("recover", point))
        return point + 1

    def close(self):
        self.closed = True


class _Timer:
    def __init__(self):
        self._started = False

    def start(self, barrier=False):
        assert not self._started, "timer has already been started"
        self._started = True

    def stop(self, barrier=False):
        assert self._started, "timer is not started"
        self._started = False


class _Timers:
    def __init__(self):
        self._timers = {}

    def __call__(self, name, log_level=None):
        return self._timers.setdefault(name, _Timer())

    def log(self, *a, **k):
        pass


@needs_checkout
@pytest.mark.timeout(120)
@pytest.mark.parametrize("rerun_mode", ["validate_results", "disabled"])
def test_patched_train_with_the_real_hooks_restores_megatron_lm_state(
        megatron_copy, monkeypatch, rerun_mode):
    """The patched ``train()`` driving fr_megatron's real ``training_hooks`` (the runtime is a
    stand-in): after each rollback the sample counters match the redone iteration, the data
    iterator hands out the redone step's micro-batches again, the rerun state machine runs the
    redo's forward/backward, and a timer the failed step left running does not trip the redo."""
    pytest.importorskip("megatron.core")
    import megatron.core.utils as mcore_utils
    from megatron.core import parallel_state
    from megatron.core import rerun_state_machine as rsm_mod
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator,
        init_num_microbatches_calculator,
    )

    from fr_megatron.megatron import integration, phases, training_hooks

    assert main(["--megatron-lm", str(megatron_copy)]) == 0
    training_py = megatron_copy / TRAINING

    # megatron-core: 2 data-parallel ranks x micro-batch 1 x 4 micro-batches = 8 samples a step
    init_num_microbatches_calculator(0, None, 8, 1, 2, False)
    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda *a, **k: 2)
    mode = rsm_mod.RerunMode(rerun_mode)
    monkeypatch.setattr(rsm_mod, "_GLOBAL_RERUN_STATE_MACHINE",
                        rsm_mod.RerunStateMachine(mode=mode))
    # no GPU and no process group here: no rerun is ever requested
    monkeypatch.setattr(rsm_mod.RerunStateMachine, "_reduce_any",
                        lambda self, v: tuple(False for _ in v) if isinstance(v, list) else False)
    monkeypatch.setattr(rsm_mod.RerunStateMachine, "_save_state", lambda self: None)
    rsm = rsm_mod.get_rerun_state_machine()

    # the runtime, reduced to snapshots of the progress counters
    timers = _Timers()
    monkeypatch.setattr(mcore_utils, "get_model_config",
                        lambda m: __import__("types").SimpleNamespace(timers=timers))
    monkeypatch.setattr(integration, "MegatronIntegration", _FakeIntegration)
    monkeypatch.setattr(phases, "install", lambda *a, **k: None)
    # a peer is lost while step 4 (iteration 3) is committed; iteration 4 fails after one
    # micro-batch and the recovery point is one step older (iteration 3 is redone as well)
    session = _FakeSession(fail_commit_at={4}, lose={5: 1})
    monkeypatch.setattr(training_hooks, "_session", session)
    monkeypatch.setattr(training_hooks, "_lm", None)
    monkeypatch.setattr(training_hooks, "_first_iteration", 0)

    data = rsm_mod.RerunDataIterator(iter(range(1000)))
    attempts, seen = {}, []  # seen: (iteration, attempt, micro-batches, consumed samples)

    def train_step(args, forward_step_func, data_iterator, *_a, iteration=None):
        attempt = attempts[iteration] = attempts.get(iteration, 0) + 1
        got = []
        while rsm.should_run_forward_backward(data_iterator):
            assert rsm.current_iteration == iteration + 1
            timers("forward-backward").start()
            for k in range(4):
                got.append(next(data_iterator))
                if (iteration, attempt, k) in {(1, 1, 2), (4, 1, 0)}:
                    seen.append((iteration, attempt, got, args.consumed_train_samples))
                    raise ConnectionError(f"peer lost in iteration {iteration}")
            timers("forward-backward").stop()
        seen.append((iteration, attempt, got, args.consumed_train_samples))
        return ({"lm loss": float(iteration)}, 0, False, False, 0, 1.0, None, 0)

    try:
        result, args = _run_patched_train(training_py, train_step, True, data_iterator=data,
                                          timers=timers, rerun_state_machine=rsm, train_iters=6)
    finally:
        destroy_num_microbatches_calculator()
    assert not isinstance(result, Exception), repr(result)
    assert result[0] == 6
    assert args.consumed_train_samples == 48 and args.skipped_train_samples == 0
    assert session.closed
    assert [s for s in session.steps if s[0] == "recover"] == [
        ("recover", 1), ("recover", 3), ("recover", 3)]
    assert [(i, a) for i, a, _, _ in seen] == [
        (0, 1), (1, 1), (1, 2), (2, 1), (3, 1), (3, 2), (4, 1), (3, 3), (4, 2), (5, 1)]
    # every attempt of iteration i begins with micro-batch 4i and sees 8i consumed samples
    for i, a, got, consumed in seen:
        assert got == list(range(4 * i, 4 * i + len(got))), (i, a, got)
        assert consumed == 8 * i, (i, a, consumed)
    assert rsm.current_iteration == 6
    # the data log keeps only the iterations a recovery can return to
    assert set(data.iterable.marks) <= {2, 3, 4, 5}
    assert next(data) == 24  # nothing left queued, nothing skipped


@needs_checkout
@pytest.mark.timeout(60)
@pytest.mark.parametrize("flash_recovery_on", [True, False])
def test_patched_initialize_distributed(megatron_copy, monkeypatch, flash_recovery_on):
    """``_initialize_distributed`` with --flash-recovery: the default group comes from
    ``training_hooks.init_process_group`` and the parallel-state hook is installed before
    ``initialize_model_parallel``; without it, torch's own init runs with Megatron's arguments."""
    import types
    from unittest import mock

    assert main(["--megatron-lm", str(megatron_copy)]) == 0
    calls = []
    hooks = types.SimpleNamespace(
        init_process_group=lambda backend, args: calls.append(("hooks.init_process_group",
                                                               backend, args)),
        local_cuda_device=lambda local_rank: local_rank % 2)  # a node of 2 GPUs
    _install_hooks(monkeypatch, hooks)
    import fr_megatron.megatron as fr_pkg

    psh = types.SimpleNamespace(install=lambda: calls.append(("parallel_state_hook.install",)))
    monkeypatch.setitem(sys.modules, "fr_megatron.megatron.parallel_state_hook", psh)
    monkeypatch.setattr(fr_pkg, "parallel_state_hook", psh, raising=False)

    args = _Args()
    # the fourth rank of a node: with flash recovery it shares the node's second GPU
    args.flash_recovery, args.distributed_backend = flash_recovery_on, "nccl"
    args.local_rank = 3 if flash_recovery_on else 1
    args.rank, args.world_size, args.distributed_timeout_minutes = 3, 8, 10
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = 2, 2
    torch = mock.MagicMock()
    torch.cuda.device_count.return_value = 8
    torch.distributed.is_initialized.return_value = False
    torch.distributed.init_process_group.side_effect = lambda **kw: calls.append(
        ("torch.init_process_group", kw))
    mpu = mock.MagicMock()
    mpu.model_parallel_is_initialized.return_value = False
    mpu.initialize_model_parallel.side_effect = lambda *a, **k: calls.append(
        ("initialize_model_parallel", a[:2]))
    inprocess_restart = mock.MagicMock()
    inprocess_restart.maybe_force_nccl_backend_init.side_effect = lambda d: calls.append(
        ("maybe_force_nccl_backend_init",))
    g = _stub_globals(get_args=lambda: args, torch=torch, mpu=mpu,
                      inprocess_restart=inprocess_restart)
    exec(_compile_function(megatron_copy / INITIALIZE, "_initialize_distributed"), g)
    store = object()
    g["_initialize_distributed"](None, None, store)

    torch.cuda.set_device.assert_called_once_with(1)  # the device is bound either way
    if flash_recovery_on:
        assert calls == [("hooks.init_process_group", "nccl", args),
                         ("maybe_force_nccl_backend_init",),
                         ("parallel_state_hook.install",),
                         ("initialize_model_parallel", (2, 2))]
    else:
        assert [c[0] for c in calls] == ["torch.init_process_group",
                                         "maybe_force_nccl_backend_init",
                                         "initialize_model_parallel"]
        kw = calls[0][1]
        assert (kw["backend"], kw["store"], kw["rank"], kw["world_size"]) == ("nccl", store, 3, 8)
