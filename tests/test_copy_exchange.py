"""A copy in flight when a fault plan arrives: the holder gives it up at once and seals nothing.

Two real processes on gloo. Rank 1 sends a 512 MB copy of its unique state to its holder, rank 0,
and is stopped (SIGSTOP, a hang) while the message streams. Rank 0 then does what a fault notice
does: it cuts its process-group sockets and waits for its copies with a fault plan in hand. gloo
does not fail a receive whose message was cut in the middle (it waits for the group's timeout,
set to 10 minutes here, far beyond the test's), so the wait has to give up by itself: it raises a
communication failure, ``abandon`` returns, and no copy of the step is sealed in the held ring.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from jobs import free_port

REPO = Path(__file__).resolve().parents[1]

RANK = textwrap.dedent("""
    import datetime, json, os, signal, sys, time
    import torch, torch.distributed as dist
    from fr_megatron.protocol.store import shutdown_sockets, tcp_peers
    from fr_megatron.runtime.comms import group_socket_fds, track_group_sockets
    from fr_megatron.runtime.errors import is_communication_failure
    from fr_megatron.runtime.integration import RankState
    from fr_megatron.runtime.redundancy import CopyExchange
    from fr_megatron.runtime.snapshot import SnapshotRing

    rank, port, go = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0)
    track_group_sockets()
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2,
                            timeout=datetime.timedelta(minutes=10))
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=10))
    fault_plan = []  # a fault plan arrived: ``interrupted()``
    ex = CopyExchange(rank, [0] if rank == 1 else [], [1] if rank == 0 else [],
                      {1: ("unique",)}, group, 2, None, interrupted=lambda: bool(fault_plan))
    ring = SnapshotRing(2, None, f"rank{rank}")
    if rank == 1:
        live = RankState()
        live.unique["w"] = torch.ones(128 * 2**20)  # 512 MB
        ring.write(1, live)
        ring.wait()
        del live
    dist.barrier(group=group)
    ex.start(1, ring)
    if rank == 1:
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGSTOP)  # hangs while its copy streams
        time.sleep(600)
    while not os.path.exists(go):  # the test saw rank 1 stopped: a fault notice
        time.sleep(0.01)
    cut = shutdown_sockets(set(tcp_peers(group_socket_fds())))
    fault_plan.append(True)
    try:
        ex.wait()
        raised = None
    except Exception as e:
        raised = {"type": type(e).__name__, "communication": is_communication_failure(e)}
    ex.abandon()
    print(json.dumps({"cut": cut, "raised": raised, "held": ex.held[1].steps()}), flush=True)
    os._exit(0)
""")



@pytest.mark.timeout(120)
def test_a_fault_plan_ends_the_wait_for_a_copy_cut_in_the_middle(tmp_path):
    port, go = free_port(), tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(r), str(port), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in (0, 1)]
    holder, ward = procs
    try:
        stopped = psutil.Process(ward.pid)
        while stopped.status() != psutil.STATUS_STOPPED:
            assert ward.poll() is None and holder.poll() is None, ward.stderr.read()[-3000:]
            time.sleep(0.01)
        go.touch()
        out, err = holder.communicate(timeout=90)
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
    assert holder.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["cut"] >= 1  # the holder's sockets to the ward were cut, as a notice does
    assert result["raised"] is not None and result["raised"]["communication"], result
    assert result["held"] == []  # nothing of the step the ward was sending is sealed
