"""Tearing down and rebuilding a process's communicators on a new store generation.

Abort: NCCL communicators are aborted (``_abort_process_group``), which makes a blocked collective
raise. gloo has no working abort (``abort()``/``shutdown()`` leave an in-flight op blocked), so for
gloo the process shuts down the sockets its process groups opened: its in-flight op raises at
once and every peer blocked on it sees the connection close. Which sockets those are is recorded
as each group is created (``track_group_sockets``); store connections and the script's own
sockets (a metrics client, a data loader's) are never touched.

Rebuild: the old world is destroyed, but its group objects are kept alive for one more
generation (destroying a gloo group with a failed op in flight blocks for ~20 s) and then dropped
on a background thread once the recovery after that is over (``defer_release``): each gloo group
holds three threads and its sockets, which would otherwise pile up with every recovery, and
destroying them during a rebuild slowed it down. A new default group is initialised on
``PrefixStore("gen{g}/")`` because gloo cannot reuse a prefix on which a peer died.

Interrupt: a peer can die while a generation's groups are being built; the rendezvous would then
wait out the whole timeout for it. Each generation rendezvouses on a store connection of its own,
which ``interrupt_rendezvous`` shuts down when a newer plan arrives, so the wait fails at once.
"""

from __future__ import annotations

import datetime
import functools
import logging
import threading
from typing import Callable

import torch.distributed as dist

from ..protocol import keys
from ..protocol.store import shutdown_sockets, socket_ids, tcp_peers
from . import comm_progress

log = logging.getLogger("fr_megatron.comms")


_DEFERRED: list = []  # batches of old groups and backends waiting for release_deferred()


def defer_release(objs: list) -> None:
    """Keep ``objs`` (old groups or gloo backends) until ``release_deferred``: their destructors
    join threads and close sockets, which must not compete with a rebuild."""
    if objs:
        _DEFERRED.append(objs)


def release_deferred() -> None:
    """Drop what ``defer_release`` kept, on a background thread (the runtime calls this once a
    recovery has committed its first step)."""
    batches = list(_DEFERRED)
    _DEFERRED.clear()
    if batches:
        # not a daemon: a destructor cut short at interpreter exit aborts the process
        threading.Thread(target=batches.clear, name="fr-release-groups").start()


_GROUP_SOCKETS: set[str] = set()  # the identities of the sockets process groups opened


def track_group_sockets() -> None:
    """Record the sockets every process group opens as it is created (gloo connects each pair
    of members then), once per process: torch creates every group, the default one included,
    through ``_new_process_group_helper``."""
    c10d = dist.distributed_c10d
    create = c10d._new_process_group_helper
    if getattr(create, "_fr_tracked", False):
        return

    @functools.wraps(create)
    def tracked(*args, **kwargs):
        before = set(socket_ids().values())
        try:
            return create(*args, **kwargs)
        finally:  # a rendezvous cut short leaves sockets too
            _GROUP_SOCKETS.update(set(socket_ids().values()) - before)

    tracked._fr_tracked = True
    c10d._new_process_group_helper = tracked


def group_socket_fds() -> set[int]:
    """The fds of this process's process-group sockets that are still open."""
    ids = socket_ids()
    _GROUP_SOCKETS.intersection_update(ids.values())  # closed ones go: their ids may be reused
    return {fd for fd, i in ids.items() if i in _GROUP_SOCKETS}


class RendezvousInterrupted(ConnectionError):
    """A newer generation was opened while this one's groups were being built."""


class Communicators:
    """``connect_store`` makes a store client and returns it with its sockets
    (``protocol.store.connect_cuttable``)."""

    def __init__(self, connect_store: Callable, store_port: int, rank: int, world_size: int,
                 backend: str, timeout_s: float = 300.0):
        self.connect_store, self.store_port = connect_store, store_port
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.generation = -1
        self.graveyard: list = []  # the last world's groups, kept one generation (module doc)
        track_group_sockets()
        self._rdzv_lock = threading.Lock()
        self._rdzv_fds: set[int] = set()
        self._rdzv_stores: list = []  # kept open: a shut-down client must not be reused or freed

    def resize(self, rank: int, world_size: int) -> None:
        """This process's rank in, and the size of, the worlds it joins from now on (they change
        when the job goes on with fewer replicas)."""
        self.rank, self.world_size = rank, world_size

    def init_world(self, generation: int, superseded: Callable[[], bool] = lambda: False) -> None:
        """Create the default process group of ``generation`` on a store connection of its own.

        ``superseded`` says whether a newer generation exists already: checked once the
        connection is open, it closes the race with ``interrupt_rendezvous``.
        """
        with self._rdzv_lock:
            store, self._rdzv_fds = self.connect_store()
            self._rdzv_stores.append(store)
        if superseded():
            raise RendezvousInterrupted(f"generation {generation} superseded before its rendezvous")
        # torch names groups "0", "1", ... by a counter that only destroying the default group
        # resets; a rendezvous cut short by a newer plan leaves it advanced, and the group of the
        # next generation would then be named (and rendezvous) apart from a fresh replacement's
        dist.distributed_c10d._world.group_count = 0
        try:
            dist.init_process_group(self.backend, store=dist.PrefixStore(
                keys.generation_prefix(generation), store), rank=self.rank,
                world_size=self.world_size, timeout=self.timeout)
        except Exception as e:
            if superseded():
                raise RendezvousInterrupted(f"rendezvous of generation {generation} "
                                            f"interrupted: {e}") from e
            raise
        self.generation = generation

    def interrupt_rendezvous(self) -> int:
        """Make a rendezvous (world or subgroup) that waits for a peer fail now."""
        with self._rdzv_lock:
            fds, self._rdzv_fds = self._rdzv_fds, set()
        return shutdown_sockets(fds)

    def abort(self) -> int:
        """Make every blocked collective of this process, and of peers blocked on it, fail now."""
        if self.backend == "nccl" and dist.is_initialized():
            try:
                dist.distributed_c10d._abort_process_group()
            except Exception as e:
                log.warning("NCCL abort: %s", e)
        # connected TCP sockets only: gloo's listening socket and its own socket pairs are its
        # machinery, and shutting those aborts the process
        return shutdown_sockets(set(tcp_peers(group_socket_fds())))

    def destroy_world(self) -> list:
        """Destroy every group of the current world; returns the old group objects.

        They stay referenced until the next call, which hands them to ``defer_release``."""
        old = []
        if dist.is_initialized():
            old = list(dist.distributed_c10d._world.pg_map.keys())
            try:
                dist.destroy_process_group()
            except Exception as e:
                log.warning("destroy_process_group: %s", e)
        comm_progress.TRACKER.reset()  # its counts were the old groups'; the new start at 0
        defer_release(self.graveyard)
        self.graveyard = list(old)
        return old

