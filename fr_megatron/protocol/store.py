"""Connecting to the job's TCPStore: hosting it bound to one address, and clients with a deadline.

torch's TCPStore server listens on every interface unless it is handed a socket that is
already bound; the controller binds loopback for single-node jobs that way.
"""

from __future__ import annotations

import datetime
import socket

from torch.distributed import TCPStore


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
    """Block until ``key`` exists or ``timeout`` seconds pass; True if it exists."""
    try:
        store.wait([key], datetime.timedelta(seconds=timeout))
        return True
    except Exception:
        return store.check([key])
