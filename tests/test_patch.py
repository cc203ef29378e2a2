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
PRETRAIN = "pretrain_gpt.py"


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
    for name in ("on_train_start", "on_step_begin", "on_step_failure", "on_step_end"):
        assert f"flash_recovery.{name}(" in text
    assert "from fr_megatron.settings_args import add_flash_recovery_args" in text


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


def _train_body(text: str) -> str:
    start = text.index("\ndef train(")
    end = text.index("\ndef ", start + 1)
    return text[start:end]


@needs_checkout
@pytest.mark.timeout(60)
def test_check_then_apply_on_real_checkout(megatron_copy, capsys):
    root = megatron_copy
    before = {p: (root / p).read_text() for p in (PRETRAIN, TRAINING)}

    assert main(["--megatron-lm", str(root), "--check"]) == 0
    assert "applies cleanly" in capsys.readouterr().out
    assert {p: (root / p).read_text() for p in (PRETRAIN, TRAINING)} == before  # --check changes nothing

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
        "flash_recovery.on_train_start(model, optimizer, opt_param_scheduler, args)",
        "while iteration < args.train_iters:",
        "flash_recovery.on_step_begin(iteration)",
        "try:",
        ") = train_step(",
        "except Exception as exc:",
        "if flash_recovery is None:",
        "raise",
        "iteration = flash_recovery.on_step_failure(exc, iteration)",
        "continue",
        "ft_integration.on_training_step_end()",
        "flash_recovery.on_step_end(iteration, loss_dict)",
        "iteration += 1",
        "args.consumed_train_samples += iteration_sequences",
    ]
    pos = 0
    for needle in hooks:  # present, and in this order inside train()
        found = body.find(needle, pos)
        assert found >= 0, f"{needle!r} missing or out of order in train()"
        pos = found + len(needle)
    # on_step_end sits directly before the iteration counter moves on.
    assert re.search(r"on_step_end\(iteration, loss_dict\)\n\s+iteration \+= 1\n", body)

    compiled = subprocess.run(
        [sys.executable, "-m", "py_compile", str(root / PRETRAIN), str(root / TRAINING)],
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


def _run_patched_train(training_py: Path, fail_at: set, flash_recovery_on: bool, monkeypatch):
    """Run the patched ``train()`` with everything around the loop stubbed out.

    Only the function ``train`` is compiled from the patched file; every other global
    it touches is a MagicMock unless overridden below, and ``train_step`` raises once
    at each iteration in ``fail_at``.  Returns (event log, train's result or exception).
    """
    import ast
    import builtins
    import types
    from unittest import mock

    tree = ast.parse(training_py.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    code = compile(ast.Module(body=[fn], type_ignores=[]), str(training_py), "exec")

    class Globals(dict):
        def __missing__(self, name):
            if hasattr(builtins, name):
                return getattr(builtins, name)
            self[name] = mock.MagicMock(name=name)
            return self[name]

    class Args:
        def __getattr__(self, name):
            return None

    args = Args()
    args.iteration, args.train_iters, args.iterations_to_skip = 0, 5, []
    args.consumed_train_samples = args.skipped_train_samples = 0
    args.num_floating_point_operations_so_far = 0
    args.flash_recovery, args.cuda_graph_impl, args.cuda_graph_scope = flash_recovery_on, "none", []
    args.micro_batch_size = 1

    log, attempts = [], {}

    def train_step(*_a, iteration=None):
        attempts[iteration] = attempts.get(iteration, 0) + 1
        log.append(("train_step", iteration, args.consumed_train_samples))
        if iteration in fail_at and attempts[iteration] == 1:
            raise RuntimeError(f"injected failure at {iteration}")
        return ({"lm loss": float(iteration)}, 0, False, False, 0, 1.0, None, 0)

    def on_step_failure(exc, iteration):
        log.append(("on_step_failure", iteration, str(exc), args.consumed_train_samples))
        return iteration

    hooks = types.SimpleNamespace(
        on_train_start=lambda *a: log.append(("on_train_start", len(a))),
        on_step_begin=lambda it: log.append(("on_step_begin", it, args.consumed_train_samples)),
        on_step_failure=on_step_failure,
        on_step_end=lambda it, ld: log.append(("on_step_end", it, ld, args.consumed_train_samples)),
    )
    import fr_megatron.megatron as fr_pkg

    monkeypatch.setitem(sys.modules, "fr_megatron.megatron.training_hooks", hooks)
    monkeypatch.setattr(fr_pkg, "training_hooks", hooks, raising=False)

    mpu = mock.MagicMock()
    mpu.get_data_parallel_world_size.return_value = 2
    g = Globals(
        get_args=lambda: args, train_step=train_step, mpu=mpu,
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
    exec(code, g)
    optimizer = mock.MagicMock(is_stub_optimizer=True)
    try:
        result = g["train"](None, [mock.MagicMock()], optimizer, mock.MagicMock(), iter(()),
                            None, None, mock.MagicMock(), None, None)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        result = exc
    return log, result, args


@needs_checkout
@pytest.mark.timeout(60)
def test_patched_train_loop_redoes_a_failed_step(megatron_copy, monkeypatch):
    assert main(["--megatron-lm", str(megatron_copy)]) == 0
    training_py = megatron_copy / TRAINING

    log, result, args = _run_patched_train(training_py, {2}, True, monkeypatch)
    assert result == (5, 5.0)  # train() returns (iteration, flops so far): 5 steps, none lost
    assert log[0] == ("on_train_start", 4)
    assert ("on_step_failure", 2, "injected failure at 2", 16) in log
    # Iteration 2 is begun twice and ends once; consumed samples were not advanced by the
    # failed attempt, so the redo sees the same 16 as the first attempt.
    assert [e for e in log if e[0] == "on_step_begin"] == [
        ("on_step_begin", i, s) for i, s in [(0, 0), (1, 8), (2, 16), (2, 16), (3, 24), (4, 32)]
    ]
    assert [e[1] for e in log if e[0] == "on_step_end"] == [0, 1, 2, 3, 4]
    assert args.consumed_train_samples == 40

    # Without --flash-recovery: the failure propagates unchanged and no hook runs.
    log, result, _ = _run_patched_train(training_py, {2}, False, monkeypatch)
    assert isinstance(result, RuntimeError) and str(result) == "injected failure at 2"
    assert {e[0] for e in log} == {"train_step"}
