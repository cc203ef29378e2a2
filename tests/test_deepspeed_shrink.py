"""A DeepSpeed ZeRO-2 job with Megatron-core's parallel_state as its mpu (TP=2 x DP=4, 8 ranks)
that loses a rank and goes on with three data-parallel replicas (``--shrink always``), then grows
back to four when a spare node joins. The survivors keep their processes; at each change of size
they build the engine again (the recipe's ``resize``) and take ZeRO's master partitions and Adam
moments re-partitioned from the old partition's shards, the removed replica's included (from the
snapshots it left in the node's shared memory). Every step trains on the same rows of the global
batch as the fault-free run, spread over the replicas there are."""

from __future__ import annotations

import json

import pytest
import torch

from fr_megatron.events import Journal
from jobs import DEEPSPEED_RECIPE as RECIPE, assert_stuck_survivors_recovered, run_job, \
    shrink_then_grow

WORLD, STEPS, ROWS = 8, 14, 16  # the config's 4 rows per rank x 4 data-parallel ranks
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
ARGS = ["--zero-stage", "2", "--mpu", "megatron", "--tp", "2", "--steps", str(STEPS)]

# After the shrink, a step's gradient sums the same rows' errors grouped over three ranks instead
# of four: fp32 additions in another order, which moves losses by about 5e-7 and parameters by
# about 3e-8 over these steps. One global row of the sixteen left out of a step moves them by
# about 1e-3: 1e-5 lies well apart from either.
TOLERANCE = 1e-5


def _load(path, world: int = WORLD) -> dict:
    return {r: torch.load(p, weights_only=False) for r in range(world)
            if (p := path.parent / (path.name + (f".rank{r}" if r else ""))).exists()}


@pytest.mark.timeout(600)
def test_zero2_shrinks_to_three_replicas_and_grows_back_to_four(tmp_path):
    base = run_job(tmp_path, RECIPE, [*ARGS, "--out", str(tmp_path / "base.pt")], nproc=WORLD,
                   spares=0, env=ENV, name="base", timeout=300)
    assert base.rc == 0, base.failure(5000)
    out = tmp_path / "grown.pt"
    rcs, logs = shrink_then_grow(tmp_path, RECIPE, [*ARGS, "--step-sleep-shrunk", "2", "--out",
                                                    str(out)],
                                 inject="kill:rank=5:step=3:phase=backward", nproc=WORLD,
                                 spares=0, env=ENV)
    assert rcs == [0, 0], (rcs, logs)
    report = json.loads((tmp_path / "report.json").read_text())
    fault, *stuck = report["faults"]
    assert (fault["rank"], fault["kind"], fault["action"]) == (5, "crash", "shrink"), fault
    assert (fault["world_size_after"], fault["data_parallel_size_after"]) == (6, 3), fault
    assert fault["survivor_pids_unchanged"] is True and fault["steps_lost"] == 0, fault
    # a survivor that the abort left inside a cut gloo message leaves as stuck (megatron's
    # larger tensor-parallel messages show it): its replica leaves too, recovered the same way,
    # and comes back with the grow
    # (or it is replaced, where that would leave no replica)
    journal = Journal.read(str(tmp_path / "journal.jsonl"))
    replaced = assert_stuck_survivors_recovered(stuck, journal)
    removed = sorted({r for f in report["faults"] if f["action"] == "shrink"
                      for r in (f["rank"], f["rank"] ^ 1)})
    (grow,) = report["grows"]
    assert (grow["ranks"], grow["world_size_after"], grow["data_parallel_size_after"]) == \
        (removed, 8, 4), grow
    assert grow["steps_lost"] == 0 and grow["survivor_pids_unchanged"] is True, grow
    assert report["members"] == list(range(WORLD)) and report["finished_ranks"] == WORLD, logs
    shrunk, back = fault["recovery_point"], grow["recovery_point"]
    last = max(f["recovery_point"] for f in report["faults"])
    assert shrunk == 2 and last < back < STEPS, (shrunk, last, back)

    ranks, baseline = _load(out), _load(tmp_path / "base.pt")
    assert sorted(ranks) == list(range(WORLD))
    started = {}
    for e in journal:
        if e["event"] == "worker_started":
            started.setdefault(e["rank"], e["pid"])
    for r, got in ranks.items():
        if r not in removed and r not in replaced:  # survivors wrote their results from
            # their first process
            assert got["pid"] == started[r], r
    # rows of the global batch per step, read on tensor rank 0 (a rank that left and came
    # back wrote the steps after the grow): never a row twice; the fault-free run's rows before
    # the shrink; every row exactly once over the replicas left after the last shrink, and
    # over all four after the grow
    takers = {r: got for r, got in ranks.items() if got["tensor_rank"] == 0}
    for step in range(1, STEPS + 1):
        rows = sorted(row for got in takers.values() for row in got["taken"].get(step, []))
        assert len(set(rows)) == len(rows), (step, rows)
        if step <= shrunk:
            assert all(got["taken"][step] == baseline[r]["taken"][step]
                       for r, got in takers.items() if r not in removed and r not in replaced), \
                step
        elif step > last:
            replicas = [r for r, got in takers.items() if step in got["taken"]]
            assert len(replicas) == (4 if step > back else 4 - len(removed) // 2), (step, replicas)
            assert rows == list(range(ROWS)), (step, rows)
    # bit-identical before the shrink, within TOLERANCE after it, for every rank
    for r, got in ranks.items():
        assert got["losses"].keys() == baseline[r]["losses"].keys()
        for step, loss in got["losses"].items():
            want = baseline[r]["losses"][step]
            assert (loss == want) if step <= shrunk else abs(loss - want) <= TOLERANCE, \
                (r, step, loss, want)
        for k, p in got["params"].items():
            assert (p - baseline[r]["params"][k]).abs().max().item() <= TOLERANCE, (r, k)
        for slot, state in got["optim"]["state"].items():
            for key, t in state.items():
                assert t.shape == baseline[r]["optim"]["state"][slot][key].shape, (r, slot, key)


@pytest.mark.timeout(300)
def test_the_healthy_rank_of_a_removed_replica_becomes_a_spare_that_replaces_a_later_loss(
        tmp_path):
    """TP=2 x DP=2 without spares: rank 3 is lost and its replica leaves (DP=1); rank 2, its
    healthy partner, leaves its slot to a warm spare of the job. Rank 1, of the last replica, is
    lost later: that cannot shrink the job, so it is replaced, by that spare."""
    args = ["--zero-stage", "2", "--mpu", "megatron", "--tp", "2", "--steps", "8"]
    base = run_job(tmp_path, RECIPE, [*args, "--out", str(tmp_path / "base.pt")], nproc=4,
                   spares=0, env=ENV, name="base", timeout=240)
    assert base.rc == 0, base.failure(5000)
    job = run_job(tmp_path, RECIPE, [*args, "--step-sleep", "0.5", "--out",
                                     str(tmp_path / "job.pt")], nproc=4, spares=0, env=ENV,
                  inject="kill:rank=3:step=3:phase=backward;kill:rank=1:step=6:phase=forward",
                  extra=["--shrink", "always"], timeout=240)
    assert job.rc == 0, job.failure(5000)
    shrink, replace = job.report["faults"]
    assert (shrink["rank"], shrink["action"], shrink["data_parallel_size_after"],
            shrink["steps_lost"]) == (3, "shrink", 1, 0), shrink
    assert (replace["rank"], replace["action"], replace["replacement"],
            replace["steps_lost"]) == (1, "replace", "spare", 0), replace
    (in_place,) = [e for e in job.journal if e["event"] == "spare_in_place_of_removed_rank"]
    assert in_place["rank"] == 2 and len(in_place["pids"]) == 1, in_place
    (started,) = [e for e in job.journal if e["event"] == "replacement_started"]
    assert (started["rank"], started["how"], started["pid"]) == (1, "spare", in_place["pids"][0])
    ranks, baseline = _load(tmp_path / "job.pt", 4), _load(tmp_path / "base.pt", 4)
    assert sorted(ranks) == [0, 1] and ranks[1]["pid"] == in_place["pids"][0]
    for r, got in ranks.items():
        for step, loss in got["losses"].items():
            want = baseline[r]["losses"][step]
            assert (loss == want) if step <= shrink["recovery_point"] else \
                abs(loss - want) <= TOLERANCE, (r, step, loss, want)
        for k, p in got["params"].items():
            assert (p - baseline[r]["params"][k]).abs().max().item() <= TOLERANCE, (r, k)
