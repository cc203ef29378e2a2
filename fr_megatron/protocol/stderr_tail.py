"""A worker's standard error during its start-up: passed through, and its tail kept.

A script that fails before its first step (a bad flag, an import error) says why on stderr and
exits; the job stops then, and its report and last line should say why too. So the agent starts
each worker with stderr on a pipe, copies what comes to its own stderr as it comes, and keeps
the last few KiB. The worker's recovery session hands the real stderr back
(``restore_stderr``, at its first committed training step): from then on the worker writes to
it directly, and a rank's own fault reports carry their tracebacks.
"""

from __future__ import annotations

import os
import sys
import threading

STDERR_FD_ENV = "FR_STDERR_FD"  # in a worker: the launcher's stderr, for ``restore_stderr``
TAIL_BYTES = 4096


class StderrTail(threading.Thread):
    """Copies a worker's stderr pipe to ``out_fd`` and keeps its last ``TAIL_BYTES``."""

    def __init__(self, pipe, out_fd: int, name: str):
        super().__init__(name=f"fr-stderr-{name}", daemon=True)
        self.pipe, self.out_fd = pipe, out_fd
        self._tail = b""

    def run(self) -> None:
        fd = self.pipe.fileno()
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return
                self._tail = (self._tail + chunk)[-TAIL_BYTES:]
                try:
                    while chunk:
                        chunk = chunk[os.write(self.out_fd, chunk):]
                except OSError:
                    pass  # nowhere to show it; the tail is still kept
        except OSError:
            return
        finally:
            self.pipe.close()

    def text(self, lines: int = 15) -> str:
        """The last ``lines`` non-empty lines written."""
        kept = [ln for ln in self._tail.decode(errors="replace").splitlines() if ln.strip()]
        return "\n".join(kept[-lines:])


def restore_stderr(env=os.environ) -> None:
    """In a worker: write to the launcher's stderr directly from now on (see the module doc)."""
    fd = env.pop(STDERR_FD_ENV, None)
    if fd is None:
        return
    try:
        sys.stderr.flush()
        os.dup2(int(fd), 2)
        os.close(int(fd))
    except (OSError, ValueError):
        pass
