"""A megatron-core job (TP=2 x DP=4, the DistributedOptimizer) that loses a rank and goes on with
three data-parallel replicas (``--shrink always``): the lost rank's tensor-parallel partner leaves
with it, the survivors keep their processes, build model and optimizer again at DP=3 and take the
re-partitioned shards of all four old replicas, the two that left included (from the snapshots
they left in the node's shared memory). The same global batch is spread over three replicas to
the job's last step; and, when a spare node joins, the job grows back to four, again in place.
The job runs two distributed-optimizer instances (each shard held and updated by two ranks):
three replicas hold one instance (``parallel_state_hook.fit_optimizer_instances``), four hold
two again. A TP=1 x PP=2 x DP=3 job reading Megatron-LM's training data iterator loses a whole
pipeline replica, builds its loader again for the replicas left, and reads the same samples per
step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fr_megatron.events import Journal
from jobs import (MEGATRON_RECIPE as RECIPE, assert_stuck_survivors_recovered, run_job,
                  shrink_then_grow)

WORLD, MICRO_BATCHES = 8, 12
ITERS = 12
ARGS = ["--tensor-model-parallel-size", "2", "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "1",
        "--global-batch-size", str(MICRO_BATCHES), "--train-iters", str(ITERS),
        "--hidden-dropout", "0",
        "--dataloader-type", "synthetic", "--use-distributed-optimizer",
        "--num-distributed-optimizer-instances", "2", "--flash-recovery"]

# After the shrink, the gradient of a step sums the same tokens' losses grouped over three ranks
# instead of four: fp32 additions in another order, which moves losses and parameters by about
# 1e-7 over these steps. A micro-batch of the twelve left out of each step moves them by about
# 1e-3: 1e-5 lies two orders of magnitude from either.
TOLERANCE = 1e-5


def _load(tmp: Path, name: str) -> dict:
    return {r: torch.load(p, weights_only=False)
            for r in range(WORLD) if (p := tmp / f"{name}.rank{r}.pt").exists()}


def _job(tmp: Path, name: str, **kw):
    job = run_job(tmp, RECIPE, [*ARGS, "--out", str(tmp / name)], nproc=WORLD, spares=0,
                  name=name, timeout=420, **kw)
    assert job.rc == 0, job.failure(5000)
    return job, _load(tmp, name)


def _assert_close(ranks: dict, baseline: dict, first_changed: int) -> None:
    """Bit-identical losses before ``first_changed``, then within TOLERANCE, as the parameters."""
    for r, got in ranks.items():
        base = baseline[r]
        assert got["losses"].keys() == base["losses"].keys()
        for step, loss in got["losses"].items():
            if step < first_changed:
                assert loss == base["losses"][step], (r, step)
            else:
                assert abs(loss - base["losses"][step]) <= TOLERANCE, (r, step, loss)
        for k, p in got["params"].items():
            assert (p - base["params"][k]).abs().max().item() <= TOLERANCE, (r, k)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    job, ranks = _job(tmp_path_factory.mktemp("mshrink"), "base")
    assert job.report["faults"] == [] and sorted(ranks) == list(range(WORLD))
    return ranks


@pytest.mark.timeout(600)
def test_a_lost_rank_takes_its_replica_out_and_training_goes_on_at_three_replicas(
        tmp_path, baseline):
    job, ranks = _job(tmp_path, "shrunk", extra=["--shrink", "always"],
                      inject="kill:rank=2:step=4:phase=backward")
    fault, *stuck = job.report["faults"]
    assert (fault["rank"], fault["kind"], fault["action"]) == (2, "crash", "shrink"), fault
    assert (fault["world_size_after"], fault["data_parallel_size_after"]) == (6, 3), fault
    assert fault["survivor_pids_unchanged"] is True and fault["replacement"] is None, fault
    # killed inside step 4: every rank goes back to step 3, and no finished step is lost
    point = fault["recovery_point"]
    assert fault["steps_lost"] == 0 and point == 3, fault
    # a survivor whose operation the abort left waiting (gloo: a message cut in the middle)
    # leaves as stuck: with --shrink always, its replica leaves as well, recovered the same way
    # (or it is replaced, where that would leave no replica)
    replaced = assert_stuck_survivors_recovered(stuck, job.journal)
    gone = {r for f in job.report["faults"] if f["action"] == "shrink"
            for r in (f["rank"], f["rank"] ^ 1)}
    members = [r for r in range(WORLD) if r not in gone]  # TP pairs 0-1, 2-3, 4-5, 6-7
    # the job ends at its last step on the replicas left
    assert job.report["members"] == members and sorted(ranks) == members, job.report["members"]
    assert job.report["data_parallel_size"] == len(members) // 2
    assert all(max(got["losses"]) == ITERS for got in ranks.values())
    # no survivor was started again: each wrote its results from its first process (a stuck
    # one replaced, from its replacement)
    first, last_started = {}, {}
    for e in job.journal:
        if e["event"] == "worker_started":
            first.setdefault(e["rank"], e["pid"])
            last_started[e["rank"]] = e["pid"]
    assert {r: got["pid"] for r, got in ranks.items()} == \
        {r: (last_started if r in replaced else first)[r] for r in ranks}
    # the micro-batches of each step, read on tensor rank 0: before the shrink each survivor
    # took what it took in the fault-free run (the ranks that left wrote nothing: their share
    # shows in the bit-identical losses of steps 1-3 below; a replacement wrote the steps after
    # its recovery point); after the last shrink the ranks left took every micro-batch of the
    # global batch exactly once; never one twice
    last = max(f["recovery_point"] for f in job.report["faults"])
    mine = [r for r in ranks.values() if r["tensor_rank"] == 0]
    for step in range(1, ITERS + 1):
        taken = sorted(m for r in mine for m in r["taken"].get(step, []))
        assert len(set(taken)) == len(taken), (step, taken)
        if step <= point:
            assert all(r["taken"][step] == baseline[rank]["taken"][step]
                       for rank, r in ranks.items() if rank not in replaced), step
        if step > last:
            assert taken == list(range(MICRO_BATCHES)), (step, taken)
    _assert_close(ranks, baseline, first_changed=point + 1)


@pytest.mark.timeout(600)
def test_a_lost_rank_takes_its_replica_out_and_the_job_grows_back_when_a_spare_node_joins(
        tmp_path, baseline):
    rcs, logs = shrink_then_grow(tmp_path, RECIPE, [*ARGS, "--step-sleep-shrunk", "3", "--out",
                                                    str(tmp_path / "grown")],
                                 inject="kill:rank=5:step=4:phase=after_step", nproc=WORLD,
                                 spares=0)
    assert rcs == [0, 0], (rcs, logs)
    report = json.loads((tmp_path / "report.json").read_text())
    fault, *stuck = report["faults"]
    assert (fault["rank"], fault["kind"], fault["action"]) == (5, "crash", "shrink"), fault
    assert (fault["world_size_after"], fault["data_parallel_size_after"]) == (6, 3), fault
    assert fault["survivor_pids_unchanged"] is True and fault["replacement"] is None, fault
    # killed after its step 4, before committing it: its optimizer instance peer committed the
    # same shard of step 4, so the job goes on from step 4 and no step is lost
    point = fault["recovery_point"]
    assert fault["steps_lost"] == 0 and point == 4, fault
    # a survivor whose operation the abort left waiting (gloo: a message cut in the middle)
    # leaves as stuck: with --shrink always, its replica leaves as well, recovered the same way
    # (or it is replaced, where that would leave no replica)
    journal = Journal.read(str(tmp_path / "journal.jsonl"))
    replaced = assert_stuck_survivors_recovered(stuck, journal)
    removed = sorted({r for f in report["faults"] if f["action"] == "shrink"
                      for r in (f["rank"], f["rank"] ^ 1)})
    shrunk_dp = (WORLD - len(removed)) // 2  # TP pairs 0-1, 2-3, 4-5, 6-7
    # the spare node's ranks take the removed ones' places: four replicas, two instances again
    (grow,) = report["grows"]
    assert (grow["ranks"], grow["world_size_after"], grow["data_parallel_size_after"]) == \
        (removed, WORLD, 4), grow
    assert grow["steps_lost"] == 0 and grow["survivor_pids_unchanged"] is True, grow
    assert report["members"] == list(range(WORLD)) and report["finished_ranks"] == WORLD, logs
    last, back = max(f["recovery_point"] for f in report["faults"]), grow["recovery_point"]
    assert last < back < ITERS, (last, back)
    ranks = _load(tmp_path, "grown")
    assert sorted(ranks) == list(range(WORLD))
    # no survivor was started again: each wrote its results from its first process
    started = {}
    for e in journal:
        if e["event"] == "worker_started":
            started.setdefault(e["rank"], e["pid"])
    assert all(ranks[r]["pid"] == started[r] for r in ranks if r not in removed + [*replaced])
    # the micro-batches of each step, read on tensor rank 0 (a rank that came back with the
    # grow wrote the steps after it): before the shrink each survivor took what it took in the
    # fault-free run (the removed ranks' share shows in the bit-identical losses of steps 1-4
    # below); after the last shrink the replicas left took every micro-batch of the global batch
    # exactly once, and all four did after the grow; never one twice
    mine = {r: got for r, got in ranks.items() if got["tensor_rank"] == 0}
    for step in range(1, ITERS + 1):
        takers = [got for got in mine.values() if step in got["taken"]]
        taken = sorted(m for got in takers for m in got["taken"][step])
        assert len(set(taken)) == len(taken), (step, taken)
        if step <= point:
            assert all(got["taken"][step] == baseline[r]["taken"][step]
                       for r, got in mine.items() if r not in removed and r not in replaced), step
        elif step > last:
            assert len(takers) == (4 if step > back else shrunk_dp), (step, len(takers))
            assert taken == list(range(MICRO_BATCHES)), (step, taken)
    _assert_close(ranks, baseline, first_changed=point + 1)


# Megatron-LM's own data path (``--dataloader-type single``): a loader built at the consumed
# samples, each data-parallel rank taking its slice of every micro-batch x DP samples; a shrink
# builds it again at the recovery point for the replicas left (``on_train_start(rebuild_data)``)
SINGLE = [*ARGS[:ARGS.index("--dataloader-type")], "--dataloader-type", "single",
          *ARGS[ARGS.index("--dataloader-type") + 2:]]


def _samples(ranks: dict) -> dict[int, list[int]]:
    """The samples each step read, over the data-parallel ranks (on tensor rank 0 of the first
    pipeline stage)."""
    steps: dict[int, list[int]] = {}
    for got in ranks.values():
        if got["tensor_rank"] == 0 and got["pipeline_rank"] == 0:
            for step, ids in got["taken"].items():
                steps.setdefault(step, []).extend(ids)
    return {step: sorted(ids) for step, ids in steps.items()}


@pytest.mark.timeout(600)
def test_megatron_lm_data_is_read_again_for_the_replicas_left(tmp_path):
    """TP=1 x PP=2 x DP=3 (one optimizer instance), rank 3 (the second stage of replica 0)
    killed in backward at step 3: ranks 0 and 3 leave, and the global batch of 12 samples is read by two replicas from the
    recovery point on, the same samples in every step."""
    args = ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2",
            *SINGLE[SINGLE.index("--num-layers"):SINGLE.index("--train-iters")],
            "--train-iters", "6", *SINGLE[SINGLE.index("--train-iters") + 2:]]
    at = args.index("--num-distributed-optimizer-instances")  # one instance: 3 replicas
    del args[at:at + 2]
    base = run_job(tmp_path, RECIPE, [*args, "--out", str(tmp_path / "base")], nproc=6,
                   spares=0, name="base", timeout=300)
    assert base.rc == 0, base.failure(5000)
    job = run_job(tmp_path, RECIPE, [*args, "--out", str(tmp_path / "shrunk")], nproc=6,
                  spares=0, name="shrunk", timeout=300, extra=["--shrink", "always"],
                  inject="kill:rank=3:step=3:phase=backward")
    assert job.rc == 0, job.failure(5000)
    fault, *stuck = job.report["faults"]
    assert (fault["rank"], fault["action"], fault["data_parallel_size_after"],
            fault["steps_lost"]) == (3, "shrink", 2, 0), fault
    assert_stuck_survivors_recovered(stuck, job.journal)
    # megatron's rank order: tensor, data, then pipeline; replica 0 is ranks 0 and 3
    if not stuck:
        assert job.report["members"] == [1, 2, 4, 5], job.report["members"]
    point = fault["recovery_point"]
    assert point == 2, fault
    baseline, ranks = _load(tmp_path, "base"), _load(tmp_path, "shrunk")
    want, got = _samples(baseline), _samples(ranks)
    assert want == {s: list(range(12 * (s - 1), 12 * s)) for s in range(1, 7)}, want
    last = max(f["recovery_point"] for f in job.report["faults"])
    for step in range(last + 1, 7):
        assert got[step] == want[step], (step, got[step])
    for r, state in ranks.items():
        assert state["consumed_samples"] == baseline[r]["consumed_samples"] == 72, r
    _assert_close(ranks, baseline, first_changed=point + 1)


@pytest.mark.timeout(300)
def test_a_global_batch_the_replicas_left_cannot_split_evenly_runs_one_sample_short(tmp_path):
    """A global batch of 16 over three replicas of micro-batch 1: as Megatron-LM's
    --decrease-batch-size-if-needed, each step takes 15 samples; none is dropped or read twice,
    each step reading on from the last."""
    args = [*SINGLE[:SINGLE.index("--global-batch-size")], "--global-batch-size", "16",
            *SINGLE[SINGLE.index("--global-batch-size") + 2:SINGLE.index("--train-iters")],
            "--train-iters", "6", *SINGLE[SINGLE.index("--train-iters") + 2:]]
    job = run_job(tmp_path, RECIPE, [*args, "--out", str(tmp_path / "shrunk")], nproc=WORLD,
                  spares=0, name="shrunk", timeout=300, extra=["--shrink", "always"],
                  inject="kill:rank=6:step=4:phase=optimizer")
    assert job.rc == 0, job.failure(5000)
    faults = job.report["faults"]
    assert (faults[0]["rank"], faults[0]["action"], faults[0]["data_parallel_size_after"]) == \
        (6, "shrink", 3), faults
    point = faults[0]["recovery_point"]
    assert len(faults) == 1 and point == 3 and faults[0]["steps_lost"] == 0, faults
    ranks = _load(tmp_path, "shrunk")
    got = _samples(ranks)
    for step in range(point + 1, 7):
        start = 16 * point + 15 * (step - point - 1)
        assert got[step] == list(range(start, start + 15)), (step, got[step])
    assert all(state["consumed_samples"] == 16 * point + 15 * (6 - point)
               for state in ranks.values())
