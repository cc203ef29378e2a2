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


def tcp_fds(port: int | None = None) -> set[int]:
    """This process's connected TCP sockets (to ``port`` only, if given)."""
    try:
        return {c.fd for c in psutil.Process().net_connections(kind="tcp")
                if c.raddr and c.fd >= 0 and (port is None or c.raddr.port == port)}
    except psutil.Error:
        return set()


def connect_cuttable(host: str, port: int, timeout: float = 30.0) -> tuple[TCPStore, set[int]]:
    """A client of the store and its sockets (open no other connection to ``port`` meanwhile)."""
    before = tcp_fds(port)
    store = connect(host, port, timeout)
    return store, tcp_fds(port) - before


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
