"""A replacement's start-up collectives are answered from the replaced rank's record.

Two real gloo processes run a Megatron-LM-like start-up (the ``do_train`` flags broadcast from
rank 0, a start-time all-reduce, an all_gather_object, a barrier, an async all-reduce, a tensor
over the record limit), record it and publish it on a real TCPStore. Then a third process, alone,
replays rank 1's start-up: it must see exactly what rank 1 saw, including the flags only rank 0
knew, without communicating; a start-up that differs from the record, a forged record, and a
missing one are each handled as documented.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp

import pytest
import torch
import torch.distributed as dist

from fr_megatron.protocol.auth import AuthError, Signer
from fr_megatron.runtime import startup_calls
from jobs import free_port

TOKEN = "startup-test-token"
BIG = startup_calls.RECORD_LIMIT_BYTES // 4 + 1  # float32 elements: just over the limit
# taken at import, as megatron-core's timers keep it (a warm spare imports them before it becomes
# a replacement): a replacement calling it must not reach gloo either
ALL_GATHER_TAKEN_AT_IMPORT = dist.all_gather_into_tensor



def _startup(rank: int, variant: str = "same") -> dict:
    """What a script's start-up computes from its collectives (the order is the script's)."""
    flags = torch.tensor([1, 1, 0] if rank == 0 else [0, 0, 0])
    if variant == "shape":
        flags = torch.zeros(4, dtype=torch.long)
    dist.broadcast(flags, 0)
    start = torch.tensor([100.0 + rank], dtype=torch.float64)
    dist.all_reduce(start, op=dist.ReduceOp.MIN)
    keys = [None, None]
    dist.all_gather_object(keys, {"rank": rank, "groups": ["decay", "no_decay"]})
    dist.barrier()
    total = torch.tensor([10 * (rank + 1)])
    work = dist.all_reduce(total, async_op=True)
    work.wait()
    big = torch.full((BIG,), float(rank))
    dist.all_reduce(big)
    times = torch.zeros(2, dtype=torch.long)
    ALL_GATHER_TAKEN_AT_IMPORT(times, torch.tensor([7 * (rank + 1)]))
    if variant == "extra":
        dist.all_reduce(torch.zeros(2))
    return {"flags": flags.tolist(), "start": start.item(), "keys": keys, "total": total.item(),
            "big_first": big[0].item(), "times": times.tolist()}


def _original(rank: int, port: int, q) -> None:
    store = dist.TCPStore("127.0.0.1", port, 3, False)
    dist.init_process_group("gloo", store=dist.PrefixStore("gen0/", store), rank=rank,
                            world_size=2)
    how = startup_calls.begin(store, Signer(TOKEN, f"rank{rank}"), rank, replacement=False)
    kept = dist.all_reduce  # as a module imported during start-up keeps it
    seen = _startup(rank)
    startup_calls.end(lambda record: record.publish(store, Signer(TOKEN, f"rank{rank}"), rank))
    after = torch.tensor([rank + 1])
    kept(after)  # communicates for real again, and is not recorded
    seen["after"] = after.item()
    dist.destroy_process_group()
    q.put((rank, how, seen))


def _survivor(port: int, prefix: str, done) -> None:
    """Rank 0 of the replacement's world: joins it, then makes no collective (it waits in the
    runtime's recovery), so a replacement's collective that reached gloo would block."""
    store = dist.TCPStore("127.0.0.1", port, 3, False)
    dist.init_process_group("gloo", store=dist.PrefixStore(prefix, store), rank=0, world_size=2)
    done.wait(60)


def _replacement(port: int, prefix: str, variant: str, token: str, q) -> None:
    store = dist.TCPStore("127.0.0.1", port, 3, False)
    dist.init_process_group("gloo", store=dist.PrefixStore(prefix, store), rank=1,
                            world_size=2, timeout=datetime.timedelta(seconds=20))
    try:
        how = startup_calls.begin(store, Signer(token, "rank1"), 1, replacement=True)
        try:
            q.put(("ok", how, _startup(1, variant)))
        finally:
            startup_calls.end()
    except Exception as e:  # noqa: BLE001 - reported to the test
        q.put(("error", type(e).__name__, str(e)))


@pytest.fixture(scope="module")
def recorded():
    """Port of a store on which ranks 0 and 1 published their start-up records."""
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, 3, True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_original, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, (how, seen)) for r, how, seen in (q.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    yield port, got
    del server


def _replay(port: int, variant: str = "same", token: str = TOKEN):
    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    prefix = f"{variant}-{token}/"
    survivor = ctx.Process(target=_survivor, args=(port, prefix, done))
    p = ctx.Process(target=_replacement, args=(port, prefix, variant, token, q))
    survivor.start()
    p.start()
    try:
        return q.get(timeout=60)
    finally:
        done.set()
        p.join(30)
        survivor.join(30)


@pytest.mark.timeout(120)
def test_replacement_sees_what_the_replaced_rank_saw(recorded):
    port, got = recorded
    assert got[0][0] == got[1][0] == "recording"
    original = got[1][1]
    assert original.pop("after") == got[0][1].pop("after") == 3
    assert original["flags"] == [1, 1, 0]  # only rank 0 knew them
    status, how, seen = _replay(port)
    assert status == "ok", (how, seen)
    assert how == "replaying 7 calls"
    assert original["times"] == [7, 14]  # rank 0's part too, from the record
    big = seen.pop("big_first")
    assert seen == {k: v for k, v in original.items() if k != "big_first"}
    # over the limit: not recorded, the replacement keeps its local value (restored later)
    assert original["big_first"] == 1.0 and big == 1.0


@pytest.mark.timeout(120)
def test_start_up_that_differs_from_the_record_stops_the_replacement(recorded):
    port, _ = recorded
    status, name, msg = _replay(port, "extra")
    assert (status, name) == ("error", "StartupMismatch")
    assert "call #8 (all_reduce) is past the end of rank 1's record (7 calls)" in msg
    status, name, msg = _replay(port, "shape")
    assert (status, name) == ("error", "StartupMismatch")
    assert "start-up call #1 is {'op': 'broadcast', 'group_size': 2, 'signature': [((4,), " \
        "'torch.int64')]}, rank 1's record has {'op': 'broadcast', 'group_size': 2, " \
        "'signature': [((3,), 'torch.int64')]}" in msg, msg


@pytest.mark.timeout(120)
def test_a_record_signed_with_another_token_is_refused(recorded):
    port, _ = recorded
    status, name, msg = _replay(port, token="not-the-job-token")
    assert (status, name) == ("error", AuthError.__name__), msg


@pytest.mark.timeout(60)
def test_tampered_or_missing_record():
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, 1, True, wait_for_workers=False)
    signer = Signer(TOKEN, "rank3")
    assert startup_calls.load_record(store, signer, 3) is None
    assert startup_calls.begin(store, signer, 3, replacement=True) == "none"
    assert startup_calls._active is None  # nothing intercepted: the start-up communicates
    rec = startup_calls.Recorder()
    rec.close()
    rec.publish(store, signer, 3)
    assert startup_calls.load_record(store, signer, 3) == []
    from fr_megatron.protocol import keys

    store.set(keys.startup_record(3), b"\x80\x04N.")  # another pickle: digest no longer matches
    with pytest.raises(startup_calls.StartupMismatch, match="does not match its signed digest"):
        startup_calls.load_record(store, signer, 3)
    with pytest.raises(AuthError):
        startup_calls.load_record(store, Signer("other", "x"), 3)


@pytest.mark.timeout(60)
def test_a_replacement_in_a_world_of_another_size_replays_a_record_made_in_that_size():
    # rank 0 recorded its start-up in the first world of 4 ranks and was lost after a shrink to
    # 2 ranks before it built again; rank 1 recorded its build in the world of 2
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, 1, True, wait_for_workers=False)
    signer = Signer(TOKEN, "rank0")
    for rank, size in ((0, 4), (1, 2)):
        rec = startup_calls.Recorder()
        rec.close()
        rec.publish(store, signer, rank, world_size=size)
    assert startup_calls.load_record(store, signer, 0, world_size=2) is None
    try:
        assert startup_calls.begin(store, signer, 0, replacement=True, members=[0, 1]) == \
            "replaying 0 calls of rank 1"
        assert startup_calls.begin(store, signer, 0, replacement=True,
                                   members=[0, 1, 2, 3]) == "replaying 0 calls"
        assert startup_calls.begin(store, signer, 0, replacement=True, members=[0, 2, 3]) == "none"
    finally:
        startup_calls.end()
