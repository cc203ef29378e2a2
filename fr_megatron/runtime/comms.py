"""Tearing down and rebuilding a process's communicators on a new store generation.

Abort: NCCL communicators are aborted (``_abort_process_group``), which makes a blocked collective
raise. gloo has no working abort (``abort()``/``shutdown()`` leave an in-flight op blocked), so for
gloo the process shuts down its own peer sockets: its in-flight op raises at once and every peer
blocked on it sees the connection close. Store connections are never touched.

Rebuild: the old world is destroyed, but the old group objects are kept alive (destroying a gloo
group with a failed op in flight blocks for ~20 s); a new default group is initialised on
``PrefixStore("gen{g}/")`` because gloo cannot reuse a prefix on which a peer died.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket

import psutil
import torch.distributed as dist

from ..protocol import keys

log = logging.getLogger("fr_megatron.comms")


class Communicators:
    def __init__(self, store, store_port: int, rank: int, world_size: int, backend: str,
                 timeout_s: float = 300.0):
        self.store, self.store_port = store, store_port
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.generation = -1
        self.graveyard: list = []  # old groups, kept referenced on purpose (see module doc)
        self._baseline = self._sockets()

    def _sockets(self) -> set[int]:
        try:
            return {c.fd for c in psutil.Process().net_connections(kind="tcp") if c.raddr}
        except psutil.Error:
            return set()

    def init_world(self, generation: int) -> None:
        """Create the default process group of ``generation``."""
        dist.init_process_group(self.backend, store=dist.PrefixStore(
            keys.generation_prefix(generation), self.store), rank=self.rank,
            world_size=self.world_size, timeout=self.timeout)
        self.generation = generation

    def abort(self) -> int:
        """Make every blocked collective of this process, and of peers blocked on it, fail now."""
        if self.backend == "nccl" and dist.is_initialized():
            try:
                dist.distributed_c10d._abort_process_group()
            except Exception as e:
                log.warning("NCCL abort: %s", e)
        n = 0
        try:
            conns = psutil.Process().net_connections(kind="tcp")
        except psutil.Error:
            conns = []
        for c in conns:
            if not c.raddr or c.raddr.port == self.store_port or c.fd in self._baseline or c.fd < 0:
                continue
            try:
                s = socket.socket(fileno=os.dup(c.fd))
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    n += 1
                finally:
                    s.close()
            except OSError:
                pass
        return n

    def destroy_world(self) -> list:
        """Destroy every group of the current world; returns the old group objects."""
        old = []
        if dist.is_initialized():
            old = list(dist.distributed_c10d._world.pg_map.keys())
            self.graveyard.extend(old)
            try:
                dist.destroy_process_group()
            except Exception as e:
                log.warning("destroy_process_group: %s", e)
        return old
