"""Rank heartbeats travel to their node's agent, and the agent's node beat carries them all.

A rank sends each signed beat as one message on a Unix socket that its agent owns (the path is
in ``FR_AGENT_SOCKET``). The agent verifies it, keeps the newest beat of each of its ranks, and
publishes them together in its own signed node beat (``keys.agent(node)``). The store and the
controller so see one key per node instead of one per rank: at 2,048 nodes x 8 ranks the
controller reads 2,048 keys per sweep instead of 16,384 (and checks 2,048 signatures), and the
store takes one write per node and beat instead of nine.

The socket is ``SOCK_SEQPACKET``: message boundaries as with datagrams, but a connection per rank
with a byte-sized buffer. Datagram sockets queue only ``net.unix.max_dgram_qlen`` messages (10
here), which a busy agent overflowed at 32 ranks. A rank whose send fails or times out drops
that beat and reconnects for the next; each beat carries the rank's whole state. The socket
lives in the launcher's private run directory (mode 0700); every message is verified all the
same, so a forged one is dropped and logged, never relayed.

A rank that dies just after a beat (an injected fault sends one naming its step and phase first)
leaves that beat queued on its connection. The inbox knows each connection's process (its peer
credentials), so the agent can take what a dead process sent before it reports the death
(``open_pids``).
"""

from __future__ import annotations

import os
import selectors
import socket
import struct
from typing import Optional

from .auth import MAX_MESSAGE_BYTES

SOCKET_ENV = "FR_AGENT_SOCKET"

# what the controller reads from a rank's beat (the rest of the signed message stays on the node);
# "comm", the rank's collective progress (``protocol.progress``), is there only while it stalls
RANK_FIELDS = ("rank", "pid", "seq", "generation", "step", "phase", "state", "committed",
               "hang_timeout", "hb_interval", "inject_t", "comm")
# a change in any of these is progress: the agent publishes it at once instead of at its next
# beat, and the controller's hang clock for the rank starts again (``detector.RankView``)
PROGRESS_FIELDS = ("pid", "generation", "step", "phase", "state", "committed")


def socket_path(run_dir: str) -> str:
    return os.path.join(run_dir, "beats.sock")


class BeatSender:
    """A rank's end: one connection to its agent, opened again after a failed send."""

    def __init__(self, path: str, timeout: float = 1.0):
        self.path, self.timeout = path, timeout
        self._sock: Optional[socket.socket] = None

    @classmethod
    def from_env(cls, env=os.environ) -> "BeatSender":
        if SOCKET_ENV not in env:
            raise RuntimeError(f"{SOCKET_ENV} is not set: start this script with "
                               "`fr-megatron run --nproc-per-node N script.py ...`")
        return cls(env[SOCKET_ENV])

    def send(self, raw: bytes) -> None:
        """Send one beat; raises OSError when the agent cannot be reached (the next send tries
        a new connection)."""
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                sock.settimeout(self.timeout)  # a stalled agent costs a beat, not a thread
                sock.connect(self.path)
                self._sock = sock
            self._sock.send(raw)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class BeatInbox:
    """The agent's end: a listening socket and its ranks' connections, read by one thread."""

    def __init__(self, path: str):
        if os.path.exists(path):
            os.unlink(path)  # left by a launcher that did not end cleanly
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listener.bind(path)
        os.chmod(path, 0o600)
        self._listener.listen(256)
        self._listener.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._closed = False
        self._pid_of: dict = {}  # connection -> the process on its other end
        # process -> its connections whose end the caller has not taken yet (``settle``)
        self.open_pids: dict[int, int] = {}
        self._ended: list[int] = []

    def receive(self, timeout: float) -> list[bytes]:
        """The messages that arrive within ``timeout`` seconds (one wait), oldest first."""
        out: list[bytes] = []
        if self._closed:
            return out
        try:
            ready = self._sel.select(timeout)
        except (OSError, ValueError):
            return out  # closed meanwhile: the agent is shutting down
        for key, _ in ready:
            sock = key.fileobj
            if sock is self._listener:
                try:
                    conn, _ = self._listener.accept()
                except OSError:
                    continue
                conn.setblocking(False)
                self._sel.register(conn, selectors.EVENT_READ)
                pid = _peer_pid(conn)
                if pid is not None:
                    self._pid_of[conn] = pid
                    self.open_pids[pid] = self.open_pids.get(pid, 0) + 1
                continue
            while True:  # everything this connection has queued
                try:
                    msg = sock.recv(MAX_MESSAGE_BYTES + 1)
                except BlockingIOError:
                    break
                except OSError:
                    msg = b""
                if not msg:  # the rank went away
                    self._sel.unregister(sock)
                    sock.close()
                    if sock in self._pid_of:
                        self._ended.append(self._pid_of.pop(sock))
                    break
                out.append(msg)
        return out

    def settle(self) -> None:
        """The messages of the last ``receive`` are taken: the connections that ended in it
        leave ``open_pids``."""
        ended, self._ended = self._ended, []
        for pid in ended:
            left = self.open_pids.get(pid, 0) - 1
            if left > 0:
                self.open_pids[pid] = left
            else:
                self.open_pids.pop(pid, None)

    def close(self) -> None:
        self._closed = True
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()
        self._sel.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _peer_pid(conn: socket.socket) -> Optional[int]:
    """The pid of the process on the other end of a Unix socket (Linux), else None."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    return struct.unpack("3i", creds)[0]


def rank_entry(beat: dict) -> dict:
    """The part of a verified rank beat that the node beat relays."""
    return {k: beat[k] for k in RANK_FIELDS if k in beat}


def progressed(old: Optional[dict], new: dict) -> bool:
    return old is None or any(old.get(k) != new.get(k) for k in PROGRESS_FIELDS)
