"""Connecting to the job's TCPStore: hosting it bound to one address, and clients with a deadline.

torch's TCPStore server listens on every interface unless it is handed a socket that is
already bound; the controller binds loopback for single-node jobs that way.

A store call blocks in C++ until its timeout, whatever happens meanwhile. A client made with
``connect_cuttable`` comes with the file descriptors of its sockets: shutting them down
(``shutdown_sockets``) makes a call blocked on it, from any thread, fail at once.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Iterable

import psutil
from torch.distributed import DistStoreError, TCPStore


def host_store(host: str, port: int) -> tuple[TCPStore, socket.socket]:
    """Start the job's store server on exactly ``host:port`` (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    store = TCPStore(host, sock.getsockname()[1], is_master=True, wait_for_workers=False,
                     master_listen_fd=sock.fileno(), timeout=datetime.timedelta(seconds=60))
    return store, sock


def connect(host: str, port: int, timeout: float = 30.0) -> TCPStore:
    """A client of the job's store; raises ConnectionError naming the address if unreachable."""
    try:
        return TCPStore(host, port, is_master=False, wait_for_workers=False,
                        timeout=datetime.timedelta(seconds=timeout))
    except Exception as e:  # torch raises DistNetworkError / RuntimeError variants
        raise ConnectionError(f"cannot reach the controller store at {host}:{port} ({e}); "
                              "check --controller HOST:PORT and that the controller runs") from None


def wait_key(store: TCPStore, key: str, timeout: float) -> bool:
    """Block until ``key`` exists (True) or ``timeout`` seconds pass (False).

    A timed-out wait costs the store two messages (the wait and its cancel); a caller that loops
    waits again, so no ``check`` follows it. A lost connection raises as it would elsewhere."""
    try:
        store.wait([key], datetime.timedelta(seconds=timeout))
        return True
    except DistStoreError:
        return False


def _socket_fds() -> list[int]:
    """This process's socket fds (its TCP sockets, from psutil, where there is no ``/proc``)."""
    if not os.path.isdir("/proc/self/fd"):
        try:
            return [c.fd for c in psutil.Process().net_connections(kind="tcp") if c.fd >= 0]
        except psutil.Error:
            return []
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                fds.append(int(name))
        except OSError:  # closed meanwhile
            pass
    return fds


def socket_ids() -> dict[int, str]:
    """This process's sockets: fd -> the socket's identity (``socket:[inode]``), which, unlike
    an fd number, is not reused while the socket exists."""
    out = {}
    for name in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:"):
            out[int(name)] = target
    return out


def tcp_peers(fds: Iterable[int] | None = None) -> dict[int, int]:
    """This process's connected TCP sockets (among ``fds``, if given): fd -> the peer's port.

    From ``/proc/self/fd`` and ``getpeername`` on a duplicate of each socket, which costs what
    this process holds; psutil's ``net_connections`` parses the whole machine's ``/proc/net/tcp``
    instead, which grows with every other rank's sockets on the node. Every rank scans at least
    twice per recovery."""
    peers = {}
    for fd in _socket_fds() if fds is None else fds:
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:  # closed meanwhile
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET,
                                                                   socket.AF_INET6):
                peers[fd] = sock.getpeername()[1]
        except OSError:  # not connected (a listening socket)
            pass
        finally:
            sock.close()
    return peers


def tcp_fds(port: int | None = None) -> set[int]:
    """This process's connected TCP sockets (to ``port`` only, if given)."""
    return {fd for fd, p in tcp_peers().items() if port is None or p == port}


def connect_cuttable(host: str, port: int, timeout: float = 30.0) -> tuple[TCPStore, set[int]]:
    """A client of the store and its sockets (open no other connection to ``port`` meanwhile).

    Only the sockets that the connect opened are looked at."""
    before = set(_socket_fds())
    store = connect(host, port, timeout)
    new = [fd for fd in _socket_fds() if fd not in before]
    return store, {fd for fd, p in tcp_peers(new).items() if p == port}


def shutdown_sockets(fds: set[int]) -> int:
    """Shut down (not close: the owner still holds the fd) each socket; how many were."""
    n = 0
    for fd in fds:
        try:
            s = socket.socket(fileno=os.dup(fd))
            try:
                s.shutdown(socket.SHUT_RDWR)
                n += 1
            finally:
                s.close()
        except OSError:
            pass
    return n
