"""Rank heartbeats travel to their node's agent, and the agent's node beat carries them all.

A rank sends each signed beat as one datagram on a Unix socket that its agent owns (the path is
in ``FR_AGENT_SOCKET``). The agent verifies it, keeps the newest beat of each of its ranks, and
publishes them together in its own signed node beat (``keys.agent(node)``). The store and the
controller so see one key per node instead of one per rank: at 2,048 nodes x 8 ranks the
controller reads 2,048 keys per sweep instead of 16,384 (and checks 2,048 signatures), and the
store takes one write per node and beat instead of nine.

Datagrams need no connection state: a rank that dies leaves nothing open, and an agent that is
gone makes ``send`` fail quietly (the node is then lost to the controller anyway). The socket
lives in the launcher's private run directory (mode 0700); every datagram is verified all the
same, so a forged one is dropped and logged, never relayed.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

from .auth import MAX_MESSAGE_BYTES

SOCKET_ENV = "FR_AGENT_SOCKET"

# what the controller reads from a rank's beat (the rest of the signed message stays on the node)
RANK_FIELDS = ("rank", "pid", "seq", "generation", "step", "phase", "state", "committed",
               "hang_timeout", "hb_interval", "inject_t")
# a change in any of these is progress: the agent publishes it at once instead of at its next beat
PROGRESS_FIELDS = ("pid", "generation", "step", "phase", "state", "committed")


def socket_path(run_dir: str) -> str:
    return os.path.join(run_dir, "beats.sock")


class BeatSender:
    """A rank's end: one unbound datagram socket aimed at its agent."""

    def __init__(self, path: str):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)  # an agent that stopped reading costs a beat, not a thread

    @classmethod
    def from_env(cls, env=os.environ) -> "BeatSender":
        if SOCKET_ENV not in env:
            raise RuntimeError(f"{SOCKET_ENV} is not set: start this script with "
                               "`fr-megatron run --nproc-per-node N script.py ...`")
        return cls(env[SOCKET_ENV])

    def send(self, raw: bytes) -> None:
        self._sock.sendto(raw, self.path)

    def close(self) -> None:
        self._sock.close()


class BeatInbox:
    """The agent's end: a bound datagram socket, read by one thread."""

    def __init__(self, path: str):
        if os.path.exists(path):
            os.unlink(path)  # left by a launcher that did not end cleanly
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)
        os.chmod(path, 0o600)
        # a node's ranks beat a few times a second each: room for bursts of pokes
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

    def receive(self, timeout: float) -> Optional[bytes]:
        """The next datagram, or None after ``timeout`` seconds."""
        try:
            self._sock.settimeout(timeout)
            return self._sock.recv(MAX_MESSAGE_BYTES + 1)
        except (socket.timeout, BlockingIOError):
            return None
        except OSError:
            if self._sock.fileno() == -1:
                return None  # closed: the agent is shutting down
            raise

    def close(self) -> None:
        self._sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def rank_entry(beat: dict) -> dict:
    """The part of a verified rank beat that the node beat relays."""
    return {k: beat[k] for k in RANK_FIELDS if k in beat}


def progressed(old: Optional[dict], new: dict) -> bool:
    return old is None or any(old.get(k) != new.get(k) for k in PROGRESS_FIELDS)
