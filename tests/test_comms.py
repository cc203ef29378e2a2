"""A rendezvous cut short by a newer plan leaves nothing behind that the next generation sees.

Found by the soak benchmark: torch names groups by a counter that only destroying the default
group resets. A rank whose generation-g rendezvous was interrupted (a newer plan came while it
waited for a peer) then created generation g+1's group under the name "1", while a fresh
replacement used "0": the two waited for each other under different keys until the timeout.
Here one rank of a 2-rank world is interrupted in generation 1, then must publish generation 2's
rendezvous key under the same name a fresh process would.
"""

import threading
import time

import pytest
import torch.distributed as dist

from fr_megatron.protocol.store import connect_cuttable
from fr_megatron.runtime.comms import Communicators, RendezvousInterrupted, release_deferred


def _communicators(world_size: int) -> tuple[dist.TCPStore, Communicators]:
    """A store on a free port and rank 0's communicators on it."""
    server = dist.TCPStore("127.0.0.1", 0, world_size, True, wait_for_workers=False)
    port = server.port
    return server, Communicators(lambda: connect_cuttable("127.0.0.1", port), port, rank=0,
                                 world_size=world_size, backend="gloo", timeout_s=30)


@pytest.mark.timeout(60)
def test_interrupted_rendezvous_does_not_rename_the_next_generation():
    server, comms = _communicators(2)
    errors: list = []

    def join(generation: int) -> None:
        try:
            comms.init_world(generation, superseded=cut.is_set)
        except RendezvousInterrupted as e:
            errors.append(e)

    def published(generation: int) -> list[str]:
        names = [f"gen{generation}//{n}//cpu//0/0" for n in range(3)]
        return [k for k in names if server.check([k])]

    cut = threading.Event()
    try:
        for generation in (1, 2):
            cut.clear()
            t = threading.Thread(target=join, args=(generation,), daemon=True)
            t.start()
            deadline = time.time() + 20  # rank 0 publishes its address, then waits for rank 1
            while not published(generation) and time.time() < deadline:
                time.sleep(0.05)
            assert published(generation) == [f"gen{generation}//0//cpu//0/0"]
            cut.set()  # a newer plan: rank 1 never comes
            comms.interrupt_rendezvous()
            t.join(20)
            assert not t.is_alive() and len(errors) == generation, errors
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _native_threads() -> int:
    import os

    return len(os.listdir("/proc/self/task"))


@pytest.mark.timeout(120)
def test_old_generations_groups_are_released_not_piled_up():
    """Each gloo group holds three native threads and its sockets. The world's groups are kept
    one generation (a destructor can block while an abandoned op fails), then released: over
    many recoveries a rank's thread count stays flat instead of growing by every group."""
    server, comms = _communicators(1)
    counts = []
    try:
        for generation in range(1, 8):
            comms.init_world(generation)
            extra = [dist.new_group([0], backend="gloo") for _ in range(4)]  # framework groups
            for g in extra:
                dist.barrier(group=g)
            del extra, g
            comms.destroy_world()
            release_deferred()  # as the runtime does once a recovery has committed a step
            for t in threading.enumerate():
                if t.name == "fr-release-groups":
                    t.join(30)
            counts.append(_native_threads())
        # generation 1's groups are still held after its destroy; from then on, one generation
        assert max(counts[2:]) <= counts[1] + 2, counts  # +2: a thread may be winding down
        assert len(comms.graveyard) == 5  # the last world's: default group and its 4 subgroups
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_socket_scan_finds_exactly_the_connected_tcp_sockets():
    # tcp_peers reads /proc/self/fd; psutil, which parses the machine's whole socket table, is
    # the reference it must agree with (listening and Unix sockets excluded)
    import socket

    import psutil

    from fr_megatron.protocol.store import shutdown_sockets, tcp_fds, tcp_peers

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    accepted = [listener.accept()[0] for _ in clients]
    unix = socket.socketpair()
    try:
        want = {c.fd: c.raddr.port for c in psutil.Process().net_connections(kind="tcp")
                if c.raddr and c.fd >= 0}
        assert tcp_peers() == want
        assert tcp_fds(port) == {c.fileno() for c in clients}
        store = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)
        client, fds = connect_cuttable("127.0.0.1", store.port)
        assert fds and fds <= tcp_fds(store.port)
        client.set("k", b"v")
        assert shutdown_sockets(fds) == len(fds)
        with pytest.raises(Exception):
            client.get("k")  # a cut client fails at once
    finally:
        for s in (listener, *clients, *accepted, *unix):
            s.close()


@pytest.mark.timeout(60)
def test_abort_cuts_the_groups_sockets_not_the_scripts():
    # a script's own connection (a metrics client, a data loader's) opened after the runtime
    # started must survive an abort, which cuts only what the process groups opened
    import socket

    from fr_megatron.runtime.comms import group_socket_fds

    server, comms = _communicators(1)
    listener = socket.create_server(("127.0.0.1", 0))
    user = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    try:
        comms.init_world(1)
        group = dist.new_group([0], backend="gloo")
        dist.barrier(group=group)
        assert not {user.fileno(), peer.fileno(), listener.fileno()} & group_socket_fds()
        comms.abort()
        user.sendall(b"x")
        assert peer.recv(1) == b"x"
    finally:
        for s in (listener, user, peer):
            s.close()
        if dist.is_initialized():
            dist.destroy_process_group()
