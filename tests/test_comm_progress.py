"""The runtime's count of collectives, on three real gloo processes.

What megatron-core and DeepSpeed do is done here with plain torch.distributed: collectives on
the world and on a subgroup, a function bound before the counting is installed (megatron-core's
``dist_all_gather_func``), send/recv and a batch of isend/irecv, an async all-reduce waited on
later. Then rank 2 stops before an all-reduce that ranks 0 and 1 block in: their reports say so,
and the controller's detector, fed the three reports, blames rank 2. An injection armed for the
second operation on a group fires just before it. ``main_inside`` says which operation the
training thread is inside.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fr_megatron.launcher import detector
from jobs import free_port

WORLD = 3



class Fired(Exception):
    pass


def _rank(rank: int, port: int, out) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    bound_before = dist.all_gather_into_tensor  # bound at import time, as megatron-core does
    from fr_megatron.runtime import comm_progress

    comm_progress.install()
    tracker = comm_progress.TRACKER
    store = dist.TCPStore("127.0.0.1", port, WORLD, rank == 0, wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    t = torch.ones(4)
    dist.all_reduce(t)
    bound_before(torch.empty(4 * WORLD), t)
    sub = dist.new_group([0, 2])
    if rank in (0, 2):
        dist.broadcast(t, src=0, group=sub)
    if rank == 0:
        dist.send(t, 1)
    elif rank == 1:
        dist.recv(t, 0)
    reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, t, (rank + 1) % WORLD),
                                   dist.P2POp(dist.irecv, t.clone(), (rank - 1) % WORLD)])
    for r in reqs:
        r.wait()
    work = dist.all_reduce(t, async_op=True)
    work.wait()
    counted = tracker.report()
    # an injection armed for the second operation on the subgroup fires before it
    fired = None
    if rank in (0, 2):
        phase = "forward"
        tracker.current_phase = lambda: phase

        def fire():
            raise Fired()
        tracker.arm([sub], "forward", 2, fire)
        dist.all_reduce(t, group=sub)
        try:
            dist.all_reduce(t, group=sub)
        except Fired:
            fired = tracker.report()[next(k for k in counted if k.endswith("@0,2"))][0]
        dist.all_reduce(t, group=sub)  # the peer's second one meets this (the injection fired)
    dist.barrier()
    # rank 2 stops before this all-reduce; ranks 0 and 1 report from inside it
    # (what ``abort_watch`` reads: the training thread is inside the all-reduce, then not)
    if rank == 2:
        time.sleep(1.5)
        blocked = tracker.report()
        inside = [tracker.main_inside() is not None]
    else:
        work = dist.all_reduce(t, async_op=True)
        time.sleep(1.0)
        blocked = tracker.report()
        inside = [tracker.main_inside() is not None]
    if rank == 2:
        dist.all_reduce(t)
    else:
        work.wait()
    inside.append(tracker.main_inside() is not None)
    tracker.reset()
    out.put((rank, counted, fired, blocked, tracker.report(), inside))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_collectives_counted_per_group_and_pair_and_the_laggard_blamed():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        got = {}
        for _ in range(WORLD):
            rank, *rest = out.get(timeout=90)
            got[rank] = rest
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    world = "0@0-2"
    sub = next(k for k in got[0][0] if k.endswith("@0,2"))
    # world: all_reduce, the pre-bound all_gather_into_tensor, the async all_reduce
    assert got[0][0] == {world: [3, 0], sub: [1, 0], "0:0>1": [2, 0], "0:2>0": [1, 0]}
    assert got[1][0] == {world: [3, 0], "0:0>1": [2, 0], "0:1>2": [1, 0]}
    assert got[2][0] == {world: [3, 0], sub: [1, 0], "0:1>2": [1, 0], "0:2>0": [1, 0]}
    assert got[0][1] == got[2][1] == 2  # fired before its second op: two entered (broadcast, 1)
    for r in (0, 1):
        assert got[r][2][world] == [5, 1], got[r][2]  # inside the 5th (the barrier was the 4th)
    assert got[2][2][world] == [4, 0]
    assert all(rep[3] == {} for rep in got.values())  # reset: a new world starts at zero
    assert [got[r][4] for r in range(WORLD)] == [[True, False], [True, False], [False, False]]
    views = {}
    for r, rep in got.items():
        v = detector.RankView(r, pid=100 + r, generation=0, step=5, phase="grad_reduce",
                              state="running", hang_timeout=2.0, hb_interval=0.2)
        v.progress_t, v.seen_t, v.comm = 90.0 + r, 99.9, rep[2]
        views[r] = v
    blame = detector.find_hang(views, 0, 100.0)
    assert (blame.rank, blame.evidence) == (2, [detector.NOT_IN_COLLECTIVE])
    assert blame.waits == [{"key": world, "waiting": [0, 1], "their_count": 5, "its_count": 4}]
