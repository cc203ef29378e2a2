"""``fr-megatron patch``: apply fr_megatron's hook patch to a Megatron-LM checkout.

The patch is a few lines in ``pretrain_gpt.py`` (the ``--flash-recovery`` argument
group) and in ``megatron/training/training.py`` (the ``training_hooks`` calls in
``train()``); ``patches/megatron-lm/README.md`` describes every hunk.  It is made
against one Megatron-LM release tag, :data:`EXPECTED_TAG`, whose megatron-core
version is :data:`EXPECTED_VERSION`; other versions are refused unless ``force``.

The ``.patch`` file is package data (``fr_megatron/megatron/patches/``), so the tool
works from a wheel as well as from a source checkout.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = [
    "EXPECTED_TAG",
    "EXPECTED_VERSION",
    "PatchError",
    "apply_patch",
    "detect_version",
    "main",
    "patch_path",
]

#: Megatron-LM git tag the patch is made against.
EXPECTED_TAG = "core_v0.16.1"
#: ``megatron/core/package_info.py`` version at that tag (== the megatron-core release).
EXPECTED_VERSION = "0.16.1"

PATCH_NAME = f"{EXPECTED_TAG}.patch"
_MARKER_FILES = ("pretrain_gpt.py", "megatron/training/training.py")
_PACKAGE_INFO = "megatron/core/package_info.py"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class PatchError(Exception):
    """A one-line, user-facing error; ``exit_code`` is what ``main`` returns for it."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def patch_path() -> Path:
    """Path of the shipped ``.patch`` file (package data)."""
    candidate = Path(__file__).resolve().parent / "patches" / PATCH_NAME
    if not candidate.is_file():
        raise PatchError(
            f"patch file {PATCH_NAME} is missing from the fr_megatron install ({candidate}); "
            "reinstall fr_megatron (the wheel must include fr_megatron/megatron/patches/*.patch)",
            EXIT_FAILED,
        )
    return candidate


_VERSION_FIELD = re.compile(r"^(MAJOR|MINOR|PATCH|PRE_RELEASE)\s*=\s*(.+?)\s*(?:#.*)?$", re.M)


def _package_info_version(root: Path) -> str | None:
    """``MAJOR.MINOR.PATCH[PRE_RELEASE]`` read (not executed) from package_info.py."""
    path = root / _PACKAGE_INFO
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    fields = {k: v.strip().strip("'\"") for k, v in _VERSION_FIELD.findall(text)}
    if not all(k in fields for k in ("MAJOR", "MINOR", "PATCH")):
        return None
    return f"{fields['MAJOR']}.{fields['MINOR']}.{fields['PATCH']}{fields.get('PRE_RELEASE', '')}"


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    """Run git in ``root`` without letting it discover a repository above ``root``."""
    git = shutil.which("git")
    if git is None:
        raise PatchError("git was not found on PATH; install git to apply the patch", EXIT_FAILED)
    env = dict(os.environ)
    # root/.git is still found; a repository that merely contains root is not, so
    # `git apply` never resolves the patch's paths against some outer work tree.
    env["GIT_CEILING_DIRECTORIES"] = str(root.parent)
    env.setdefault("LC_ALL", "C")
    return subprocess.run(
        [git, *args], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


def _git_describe(root: Path) -> str | None:
    if not (root / ".git").exists():
        return None
    try:
        proc = _git(root, "describe", "--tags", "--always")
    except (PatchError, OSError, subprocess.SubprocessError):
        return None
    out = proc.stdout.strip()
    return out if proc.returncode == 0 and out else None


def detect_version(root: Path | str) -> tuple[str | None, str | None]:
    """``(package_info version, git describe)`` of a Megatron-LM checkout; None when unknown."""
    root = Path(root)
    return _package_info_version(root), _git_describe(root)


def _check_checkout(megatron_lm_dir: Path | str) -> Path:
    raw = str(megatron_lm_dir)
    root = Path(raw).expanduser()
    if not root.exists():
        raise PatchError(
            f"--megatron-lm {raw}: no such directory; pass the root of a Megatron-LM clone "
            f"(git clone --branch {EXPECTED_TAG} https://github.com/NVIDIA/Megatron-LM)"
        )
    if not root.is_dir():
        raise PatchError(f"--megatron-lm {raw}: not a directory; pass the root of a Megatron-LM clone")
    missing = [m for m in _MARKER_FILES if not (root / m).is_file()]
    if missing:
        raise PatchError(
            f"--megatron-lm {raw}: not a Megatron-LM checkout (missing {', '.join(missing)}); "
            "pass the repository root, the directory that holds pretrain_gpt.py"
        )
    return root.resolve()


def _check_version(root: Path, raw: str, force: bool) -> str:
    """Refuse a checkout of another version unless ``force``; returns a description."""
    version, describe = detect_version(root)
    found = ", ".join(
        x for x in (f"megatron-core {version}" if version else None,
                    f"git {describe}" if describe else None) if x
    ) or "unknown version"
    if version is not None:
        ok = version == EXPECTED_VERSION
    elif describe is not None:
        ok = describe == EXPECTED_TAG
    else:
        ok = False
    if not ok and not force:
        raise PatchError(
            f"--megatron-lm {raw}: found {found}, the patch is for Megatron-LM {EXPECTED_TAG} "
            f"(megatron-core {EXPECTED_VERSION}); check out that tag "
            f"(git -C {raw} checkout {EXPECTED_TAG}) or pass --force to try anyway"
        )
    return found


def apply_patch(megatron_lm_dir: Path | str, check_only: bool = False, force: bool = False) -> str:
    """Apply (or with ``check_only``, dry-run) the hook patch to a Megatron-LM checkout.

    Returns a one-line description of what was done.  Raises :class:`PatchError`
    (``exit_code`` 2 for a bad directory or version, 1 when the patch does not apply).
    A tree that is already patched is not an error: the message says so.
    """
    raw = str(megatron_lm_dir)
    root = _check_checkout(megatron_lm_dir)
    found = _check_version(root, raw, force)
    patch = str(patch_path())

    forward = _git(root, "apply", "--check", patch)
    if forward.returncode != 0:
        reverse = _git(root, "apply", "--reverse", "--check", patch)
        if reverse.returncode == 0:
            return f"{root} ({found}) is already patched with {PATCH_NAME}; nothing to do"
        detail = _first_error_line(forward.stderr)
        raise PatchError(
            f"--megatron-lm {raw}: {PATCH_NAME} does not apply ({detail}); "
            f"start from a clean checkout of {EXPECTED_TAG} (git -C {raw} status shows local edits)",
            EXIT_FAILED,
        )
    if check_only:
        return f"{PATCH_NAME} applies cleanly to {root} ({found}); run without --check to apply"

    done = _git(root, "apply", patch)
    if done.returncode != 0:  # pragma: no cover - --check just succeeded
        raise PatchError(
            f"--megatron-lm {raw}: git apply {PATCH_NAME} failed ({_first_error_line(done.stderr)})",
            EXIT_FAILED,
        )
    return f"applied {PATCH_NAME} to {root} ({found}); launch with --flash-recovery"


def _first_error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("error:"):
            return ln[len("error:"):].strip()
    return lines[0] if lines else "no output from git apply"


def build_parser(prog: str = "fr-megatron patch") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            f"Apply fr_megatron's flash-recovery hooks to a Megatron-LM checkout at tag {EXPECTED_TAG}."
        ),
    )
    parser.add_argument(
        "--megatron-lm", required=True, metavar="DIR", help="root of the Megatron-LM checkout"
    )
    parser.add_argument(
        "--check", action="store_true", help="only check that the patch applies; change nothing"
    )
    parser.add_argument(
        "--force", action="store_true", help=f"try even if the checkout is not {EXPECTED_TAG}"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fr-megatron patch``; returns 0 ok, 1 failed apply, 2 bad input."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on bad usage, 0 for --help
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    try:
        message = apply_patch(ns.megatron_lm, check_only=ns.check, force=ns.force)
    except PatchError as exc:
        print(f"fr-megatron patch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(message)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
