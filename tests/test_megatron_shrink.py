"""A megatron-core job (TP=2 x DP=4, the DistributedOptimizer) that loses a rank and goes on with
three data-parallel replicas (``--shrink always``): the lost rank's tensor-parallel partner leaves
with it, the survivors keep their processes, build model and optimizer again at DP=3 and take the
re-partitioned shards of all four old replicas, the two that left included (from the snapshots
they left in the node's shared memory). The same global batch is spread over three replicas.
And a TP=2 x DP=2 job that shrinks to one replica and grows back to two when a spare node joins.
Both run two distributed-optimizer instances (each shard held and updated by two ranks): three
replicas, or one, hold one instance (``parallel_state_hook.fit_optimizer_instances``), and the
job grows back to two."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs import MEGATRON_RECIPE as RECIPE, run_job, shrink_then_grow

WORLD, MICRO_BATCHES = 8, 12
ARGS = ["--tensor-model-parallel-size", "2", "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "1",
        "--global-batch-size", str(MICRO_BATCHES), "--train-iters", "8", "--hidden-dropout", "0",
        "--dataloader-type", "synthetic", "--use-distributed-optimizer",
        "--num-distributed-optimizer-instances", "2", "--flash-recovery"]

# After the shrink, the gradient of a step sums the same tokens' losses grouped over three ranks
# instead of four: fp32 additions in another order, which moves losses and parameters by about
# 1e-7 over these steps. A micro-batch of the twelve left out of each step moves them by about
# 1e-3: 1e-5 lies two orders of magnitude from either.
TOLERANCE = 1e-5


def _load(tmp: Path, name: str, world: int = WORLD) -> dict:
    return {r: torch.load(p, weights_only=False)
            for r in range(world) if (p := tmp / f"{name}.rank{r}.pt").exists()}


def _job(tmp: Path, name: str, nproc: int = WORLD, **kw):
    job = run_job(tmp, RECIPE, [*ARGS, "--out", str(tmp / name)], nproc=nproc, spares=0,
                  name=name, timeout=420, **kw)
    assert job.rc == 0, job.failure(5000)
    return job, _load(tmp, name, nproc)


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


@pytest.mark.timeout(900)
def test_a_lost_rank_takes_its_replica_out_and_training_goes_on_at_three_replicas(
        tmp_path, baseline):
    job, ranks = _job(tmp_path, "shrunk", extra=["--shrink", "always"],
                      inject="kill:rank=5:step=4:phase=after_step")
    fault, *stuck = job.report["faults"]
    assert (fault["rank"], fault["kind"], fault["action"]) == (5, "crash", "shrink"), fault
    assert (fault["world_size_after"], fault["data_parallel_size_after"]) == (6, 3), fault
    assert fault["survivor_pids_unchanged"] is True and fault["replacement"] is None, fault
    # killed after its step 4, before committing it: its optimizer instance peer committed the
    # same shard of step 4, so the job goes on from step 4 and no step is lost
    point = fault["recovery_point"]
    assert fault["steps_lost"] == 0 and point == 4, fault
    # a survivor whose operation the abort left waiting (gloo: a message cut in the middle)
    # leaves as stuck: with --shrink always, its replica leaves as well, recovered the same way
    for f in stuck:
        assert (f["kind"], f["action"], f["steps_lost"]) == ("stuck", "shrink", 0), f
    gone = {r for f in job.report["faults"] for r in (f["rank"], f["rank"] ^ 1)}
    members = [r for r in range(WORLD) if r not in gone]  # TP pairs 0-1, 2-3, 4-5, 6-7
    assert job.report["members"] == members and sorted(ranks) == members, job.report["members"]
    assert job.report["data_parallel_size"] == len(members) // 2
    # no rank was started again: each survivor wrote its results from its first process
    started = {e["rank"]: e["pid"] for e in job.journal if e["event"] == "worker_started"}
    assert {r: got["pid"] for r, got in ranks.items()} == {r: started[r] for r in ranks}
    # the micro-batches of each step, read on tensor rank 0: before the shrink each survivor
    # took what it took in the fault-free run (the ranks that left wrote nothing: their share
    # shows in the bit-identical losses of steps 1-4 below); after the last shrink the ranks
    # left took every micro-batch of the global batch exactly once; never one twice
    last = max(f["recovery_point"] for f in job.report["faults"])
    mine = [r for r in ranks.values() if r["tensor_rank"] == 0]
    for step in range(1, 9):
        taken = sorted(m for r in mine for m in r["taken"][step])
        assert len(set(taken)) == len(taken), (step, taken)
        if step <= point:
            assert all(r["taken"][step] == baseline[rank]["taken"][step]
                       for rank, r in ranks.items()), step
        if step > last:
            assert taken == list(range(MICRO_BATCHES)), (step, taken)
    _assert_close(ranks, baseline, first_changed=point + 1)


@pytest.mark.timeout(600)
def test_a_shrunk_job_grows_back_to_two_replicas_when_a_spare_node_joins(tmp_path):
    args = [*ARGS[:ARGS.index("--train-iters")], "--train-iters", "10",
            *ARGS[ARGS.index("--train-iters") + 2:]]
    base = run_job(tmp_path, RECIPE, [*args, "--out", str(tmp_path / "base")], nproc=4,
                   spares=0, name="base", timeout=420)
    assert base.rc == 0, base.failure(5000)
    rcs, logs = shrink_then_grow(tmp_path, RECIPE, [*args, "--step-sleep", "2", "--out",
                                                    str(tmp_path / "grown")],
                                 inject="kill:rank=3:step=3:phase=backward", spares=0)
    assert rcs == [0, 0], (rcs, logs)
    report = json.loads((tmp_path / "report.json").read_text())
    fault, *stuck = report["faults"]
    assert (fault["rank"], fault["action"], fault["world_size_after"],
            fault["data_parallel_size_after"]) == (3, "shrink", 2, 1), fault
    # a survivor that the abort left inside a cut gloo message leaves as stuck; the last
    # replica cannot leave, so it is replaced, in the shrunk world, from its own snapshot
    for f in stuck:
        assert (f["kind"], f["action"], f["world_size_after"], f["steps_lost"]) == \
            ("stuck", "replace", 2, 0), f
    (grow,) = report["grows"]
    assert (grow["ranks"], grow["world_size_after"], grow["data_parallel_size_after"]) == \
        ([2, 3], 4, 2), grow
    assert grow["steps_lost"] == 0 and grow["survivor_pids_unchanged"] is True, grow
    assert report["members"] == [0, 1, 2, 3] and report["finished_ranks"] == 4, logs
    shrunk, back = fault["recovery_point"], grow["recovery_point"]
    assert shrunk == 2 and shrunk < back < 10, (shrunk, back)
    ranks = _load(tmp_path, "grown", 4)
    # one replica took the whole global batch while the job was shrunk, two after the grow
    for step in range(shrunk + 1, 11):
        takers = [ranks[0]] if step <= back else [ranks[0], ranks[2]]
        taken = sorted(m for r in takers for m in r["taken"][step])
        assert taken == list(range(MICRO_BATCHES)), (step, taken)
    _assert_close(ranks, _load(tmp_path, "base", 4), first_changed=shrunk + 1)
