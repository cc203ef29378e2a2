"""A warm spare: a process with the interpreter up and the job's modules imported, waiting for a
rank.

The agent keeps a few of these per node. Importing torch (and a framework) costs a fresh process
seconds; a spare has paid that before the fault. CUDA it leaves to the script, which starts it
once the rank, and with it the device, is known (a fraction of a second). It imports
``DEFAULT_PRELOAD`` and the ``--preload`` additions at once, then what the job's ranks had
imported once training started (``protocol.modules``; the agent hands it the list as a file).
It reads JSON lines from stdin, which only its agent holds: ``{"preload_file": PATH}`` (the
learned list), or its assignment (environment and argv), after which it runs the training script
as ``__main__`` exactly as a freshly spawned worker would. An assignment that comes while the
spare is still importing the learned list stops that import: the script imports the rest.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import select
import sys
import warnings

DEFAULT_PRELOAD = "torch,torch.distributed,fr_megatron.runtime"
# optional: megatron-core at the spare's start instead of after the job's first step
MEGATRON_PRELOAD = f"{DEFAULT_PRELOAD},fr_megatron.megatron.preload"
PRELOAD_ENV = "FR_SPARE_PRELOAD"   # what a spare (and the worker template) imports at its start
MODULES_ENV = "FR_SPARE_MODULES"   # the learned list, once the agent has it
SCRIPT_ENV = "FR_SPARE_SCRIPT"     # the training script: its directory holds its own modules


def preload(modules: str) -> None:
    for name in filter(None, (m.strip() for m in modules.split(","))):
        try:
            importlib.import_module(name)
        except Exception as e:  # a preload is an optimisation, never a failure
            print(f"fr-megatron spare: preload {name} failed: {e}", file=sys.stderr)


class _Stdin:
    """Lines from the agent, read from the file descriptor so that a line already sent can be
    told apart from none (``ready``) while the spare imports."""

    def __init__(self, fd: int = 0):
        self.fd, self.buf = fd, b""

    def ready(self) -> bool:
        return b"\n" in self.buf or bool(select.select([self.fd], [], [], 0)[0])

    def readline(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                line, self.buf = self.buf, b""
                return line
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"


@contextlib.contextmanager
def _quiet():
    """stdout and stderr to /dev/null at the file descriptors, not by swapping ``sys.stdout``:
    a module that keeps the stream it found at import (a logging handler) must keep a live
    one."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def preload_learned(path: str, stdin: _Stdin) -> int:
    """Import what the job's ranks imported (in their order), quietly: they printed any warning
    already. Stops early when the agent sends the next line. Returns the count imported."""
    try:
        with open(path) as f:
            listing = json.load(f)
    except (OSError, ValueError):
        return 0
    script = os.environ.get(SCRIPT_ENV)
    if script and os.path.dirname(script) not in sys.path:
        sys.path.insert(0, os.path.dirname(script))  # where the assignment puts it too
    sys.path.extend(p for p in listing.get("path", []) if p not in sys.path)
    n = 0
    with _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in listing.get("modules", []):
            if name in sys.modules:
                continue
            if stdin.ready():
                break
            try:
                importlib.import_module(name)
                n += 1
            except BaseException:  # noqa: BLE001 - a module that will not load alone: the
                pass               # script imports it in its own context
    return n


def main() -> None:
    preload(os.environ.get(PRELOAD_ENV, DEFAULT_PRELOAD))
    stdin = _Stdin()
    if os.environ.get(MODULES_ENV):
        preload_learned(os.environ[MODULES_ENV], stdin)
    while True:
        line = stdin.readline()
        if not line.strip():
            return  # the agent closed our stdin: the job is over
        msg = json.loads(line)
        if "preload_file" in msg:
            preload_learned(msg["preload_file"], stdin)
            continue
        break
    os.environ.update(msg["env"])
    sys.argv = list(msg["argv"])
    sys.stdin = open(os.devnull)
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
