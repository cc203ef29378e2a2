"""A worker template: one process per node that imports torch and the runtime once and forks this
node's workers from itself.

A fresh worker spends seconds of CPU importing torch and the runtime before it runs a line of
the script; eight of them on one node pay that eight times, at the same moment, on the same
cores. The template pays it once. For each worker it forks twice: the first child forks the
worker and exits, so the worker is re-parented to the agent (a child subreaper,
``PR_SET_CHILD_SUBREAPER``) and the agent's ``waitpid`` sees its death as it sees any child's.
The worker takes the environment, argv, stderr pipe and launcher stderr the agent sends and
runs the script as ``__main__``, as ``python -u script`` would. Warm spares are forked the same
way (``spare.main`` then waits for a rank on the stdin pipe the agent sends).

The template imports what the spares import at their start (``spare.DEFAULT_PRELOAD`` and the
job's ``--preload`` list), so workers start with e.g. megatron-core already loaded. Forking is
safe only while the process has one thread and no CUDA context: when an import started either,
the template says so and exits, and the agent starts each worker as its own process, as it does
without ``prctl`` (not Linux) or when the template fails.
"""

from __future__ import annotations

import ctypes
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import threading
from typing import Optional

import psutil

from .spare import DEFAULT_PRELOAD, PRELOAD_ENV, preload

FD_ENV = "FR_TEMPLATE_FD"       # in the template: its end of the agent's socket
PR_SET_CHILD_SUBREAPER = 36
MAX_MESSAGE = 1 << 20


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (Linux); False where it cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class ForkedWorker:
    """A worker forked by the template, adopted by the agent: the part of ``subprocess.Popen``
    the agent uses. Its exit status is the agent's reaper's to collect (``returncode``)."""

    def __init__(self, pid: int, stdin=None, stderr=None):
        self.pid, self.stdin, self.stderr, self.returncode = pid, stdin, stderr, None

    def poll(self) -> Optional[int]:
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        if self.returncode is None:
            try:
                self.returncode = psutil.Process(self.pid).wait(timeout)
            except psutil.NoSuchProcess:
                pass  # the reaper collected it
            except psutil.TimeoutExpired:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout) from None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Template:
    """The agent's handle on its node's template process."""

    def __init__(self, python: str, env: dict, popen):
        self._sock, theirs = socket.socketpair()
        self.proc = popen([python, "-u", "-m", "fr_megatron.launcher.template"],
                          env={**env, FD_ENV: str(theirs.fileno())}, pass_fds=(theirs.fileno(),),
                          stdin=subprocess.DEVNULL)
        theirs.close()

    def fork(self, argv: list[str], env: dict, fds: dict[str, int], spare: bool = False,
             timeout: float = 60.0) -> int:
        """Start a worker (``argv``: the script and its arguments) or, with ``spare``, a warm
        spare; its pid. ``fds``: ``stdin`` and ``stderr`` become its 0 and 2, any other name is
        an environment variable that gets the number the descriptor has in the new process.
        Raises ``OSError`` when the template cannot."""
        self._sock.settimeout(timeout)
        msg = json.dumps({"argv": argv, "env": env, "fds": list(fds), "spare": spare}).encode()
        socket.send_fds(self._sock, [len(msg).to_bytes(4, "big") + msg], list(fds.values()))
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = self._sock.recv(64)
            if not chunk:
                raise OSError("the worker template exited")
            reply += chunk
        return int(reply)

    def close(self) -> None:
        self._sock.close()
        try:
            self.proc.kill()
        except OSError:
            pass


def _recv_exact(sock: socket.socket, n: int, first: bytes = b"") -> bytes:
    data = first
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _become(sock: socket.socket, msg: dict, fds: list[int]) -> None:
    """In the forked process: take the worker's (or spare's) environment and streams, then run
    the script as ``__main__`` (a spare: wait for its rank first)."""
    sock.close()
    given = dict(zip(msg["fds"], fds))
    stdin = given.pop("stdin", None)
    if stdin is None:
        stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    os.close(stdin)
    if "stderr" in given:
        stderr = given.pop("stderr")
        os.dup2(stderr, 2)
        os.close(stderr)
    env = {**msg["env"], **{name: str(fd) for name, fd in given.items()}}
    os.environ.clear()
    os.environ.update(env)
    if msg["spare"]:
        from .spare import main as spare_main

        spare_main()
    else:
        run_script(msg["argv"])
    sys.exit(0)


def run_script(argv: list[str]) -> None:
    """Run the script ``argv[0]`` as ``__main__`` with ``argv``, as ``python -u script`` would
    (its directory first on the path), in this already started process."""
    sys.argv = list(argv)
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    runpy.run_path(sys.argv[0], run_name="__main__")


def main() -> None:
    # torch.cuda.is_available() through NVML: the CUDA runtime's device count would initialise
    # the driver here, and a forked child could not use CUDA after that
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    preload(os.environ.get(PRELOAD_ENV, DEFAULT_PRELOAD))
    import torch

    unsafe = ("CUDA is initialised" if torch.cuda.is_initialized() else
              f"{threading.active_count()} threads run" if threading.active_count() > 1 else "")
    if unsafe:
        # a forked child would inherit a CUDA context it cannot use, or locks held by threads
        # it does not have; the agent starts its workers as processes of their own
        print(f"fr-megatron worker template: {unsafe} after the imports; not forking",
              file=sys.stderr)
        return
    sock = socket.socket(fileno=int(os.environ.pop(FD_ENV)))
    while True:
        try:
            head, fds, _, _ = socket.recv_fds(sock, 4, 8)
        except OSError:
            return
        if not head:
            return  # the agent is gone, or done with us
        size = int.from_bytes(_recv_exact(sock, 4, head), "big")
        if size > MAX_MESSAGE:
            return
        msg = json.loads(_recv_exact(sock, size))
        first = os.fork()
        if first == 0:
            worker = os.fork()
            if worker == 0:
                _become(sock, msg, fds)
            sock.sendall(f"{worker}\n".encode())
            os._exit(0)
        for fd in fds:
            os.close(fd)
        os.waitpid(first, 0)


if __name__ == "__main__":
    main()
