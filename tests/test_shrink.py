"""Going on with fewer data-parallel replicas (``--shrink``): which ranks leave, how the global
batch is spread over the ranks left, a real job that loses a rank and goes on without it, and
one that grows back when a spare node joins."""

import json
import time

import pytest
import torch

from jobs import (TORCH_RECIPE, TORCH_STEPS, assert_same_samples_close_training, run_job,
                  shrink_then_grow)
from fr_megatron.events import Journal
from fr_megatron.launcher.controller import MAX_FAILED_RESTARTS
from fr_megatron.wandb_reader import read_run
from fr_megatron.launcher.shrink import ShrinkImpossible, shrink, shrinks
from fr_megatron.runtime.batch_split import BatchSplitError, micro_batches
from fr_megatron.runtime.transaction import model_replicas


def test_the_policy_says_when_a_lost_rank_is_removed_instead_of_replaced():
    assert shrinks("always", replaceable=True) and shrinks("always", replaceable=False)
    assert not shrinks("no-spare", replaceable=True) and shrinks("no-spare", replaceable=False)
    assert not shrinks("never", replaceable=True) and not shrinks("never", replaceable=False)
    with pytest.raises(ValueError, match="sometimes"):
        shrinks("sometimes", replaceable=True)


def test_a_lost_rank_takes_its_whole_replica_out_and_the_others_keep_their_order():
    # TP=2 x DP=4: replicas are the tensor-parallel pairs
    replicas = [[0, 1], [2, 3], [4, 5], [6, 7]]
    s = shrink(list(range(8)), replicas, lost=[5])
    assert s.removed == [4, 5]
    assert s.members == [0, 1, 2, 3, 6, 7]
    assert s.replicas == [[0, 1], [2, 3], [6, 7]]
    # two lost ranks of two replicas, then a later fault in the shrunk world
    s = shrink(list(range(8)), replicas, lost=[1, 6])
    assert (s.removed, s.members) == ([0, 1, 6, 7], [2, 3, 4, 5])
    s2 = shrink(s.members, s.replicas, lost=[2])
    assert (s2.removed, s2.members, s2.replicas) == ([2, 3], [4, 5], [[4, 5]])


def test_no_shrink_leaves_the_job_without_a_replica_or_with_ranks_it_does_not_know():
    with pytest.raises(ShrinkImpossible, match="no data-parallel replica"):
        shrink([0, 1, 2, 3], [[0, 1], [2, 3]], lost=[0, 3])
    with pytest.raises(ShrinkImpossible, match="not in the world"):
        shrink([0, 1], [[0], [1]], lost=[5])
    with pytest.raises(ShrinkImpossible, match="do not cover"):
        shrink([0, 1, 2], [[0], [1]], lost=[1])


@pytest.mark.parametrize("total", [1, 2, 3, 4, 7, 8, 12, 13])
def test_every_micro_batch_is_taken_exactly_once_at_every_data_parallel_size(total):
    for size in range(1, total + 1):
        runs = [micro_batches(total, r, size) for r in range(size)]
        assert [m for run in runs for m in run] == list(range(total))
        lengths = sorted(len(run) for run in runs)
        assert lengths[0] >= 1 and lengths[-1] - lengths[0] <= 1


def test_at_the_configured_size_each_rank_takes_what_it_took_before():
    assert [list(micro_batches(8, r, 4)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [list(micro_batches(8, r, 3)) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_a_batch_that_cannot_be_spread_is_refused_with_the_fix():
    with pytest.raises(BatchSplitError, match="at least 4 micro-batches"):
        micro_batches(3, 0, 4)
    with pytest.raises(BatchSplitError, match="not in 0..1"):
        micro_batches(4, 2, 2)


def test_replicas_are_found_from_each_ranks_data_parallel_peers():
    # plain DDP: every rank its own replica
    assert model_replicas([[0, 1, 2], [0, 1, 2], [0, 1, 2]]) == [[0], [1], [2]]
    # megatron TP=2 x DP=2 (tensor-parallel ranks adjacent): data-parallel groups [0, 2], [1, 3]
    assert model_replicas([[0, 2], [1, 3], [0, 2], [1, 3]]) == [[0, 1], [2, 3]]
    # TP=2 x PP=2 x DP=2: DP groups pair rank r with r + 4
    dp = [[r % 4, r % 4 + 4] for r in range(8)]
    assert model_replicas(dp) == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("phase", ["backward"])
def test_a_lost_rank_is_removed_and_the_job_ends_on_three_ranks_with_the_same_samples(
        tmp_path, torch_baseline, phase):
    job = run_job(tmp_path, TORCH_RECIPE, TORCH_STEPS, spares=0, extra=["--shrink", "always"],
                  inject=f"kill:rank=2:step=4:phase={phase}")
    assert job.rc == 0, job.failure(4000)
    (fault,) = job.report["faults"]
    assert (fault["rank"], fault["kind"], fault["action"]) == (2, "crash", "shrink"), fault
    assert (fault["world_size_after"], fault["data_parallel_size_after"]) == (3, 3), fault
    assert fault["replacement"] is None and fault["survivor_pids_unchanged"] is True, fault
    # killed in its backward, rank 2 never gave step 4 its gradients: every survivor goes back
    # to step 3; killed in its optimizer phase, it had: survivors that committed step 4 keep it
    point = fault["recovery_point"]
    assert fault["steps_lost"] == 0, fault
    assert point == 3 if phase == "backward" else point in (3, 4), fault
    assert job.report["members"] == [0, 1, 3] and job.report["data_parallel_size"] == 3
    assert job.report["finished_ranks"] == 3
    assert not [e for e in job.journal if e["event"] == "worker_started" and e["rank"] == 2
                and e["generation"] > 0], "rank 2 was started again"
    result = job.result
    assert result["world_sizes"] == {s: 4 if s <= point else 3 for s in range(1, 9)}
    assert_same_samples_close_training(torch_baseline, result, first_shrunk_step=point + 1)


@pytest.mark.timeout(300)
def test_a_shrunk_job_grows_back_when_a_spare_node_joins(tmp_path, torch_baseline):
    rcs, logs = shrink_then_grow(tmp_path, TORCH_RECIPE, [*TORCH_STEPS, "--step-sleep-shrunk", "3",
                                                          "--out", str(tmp_path / "job.pt")],
                                 inject="kill:rank=2:step=3:phase=backward")
    assert rcs == [0, 0], (rcs, logs)
    report = json.loads((tmp_path / "report.json").read_text())
    (fault,) = report["faults"]
    assert (fault["rank"], fault["action"], fault["world_size_after"]) == (2, "shrink", 3), logs
    (grow,) = report["grows"]
    assert (grow["ranks"], grow["nodes"], grow["world_size_after"],
            grow["data_parallel_size_after"]) == ([2], [1], 4, 4), grow
    assert grow["steps_lost"] == 0 and grow["survivor_pids_unchanged"] is True, grow
    assert report["members"] == [0, 1, 2, 3] and report["finished_ranks"] == 4, logs
    result = torch.load(tmp_path / "job.pt", weights_only=False)
    shrunk, back = fault["recovery_point"], grow["recovery_point"]
    assert shrunk == 2 and shrunk < back < len(result["world_sizes"]), (shrunk, back)
    assert result["world_sizes"] == {s: 3 if shrunk < s <= back else 4 for s in range(1, 9)}
    assert_same_samples_close_training(torch_baseline, result, first_shrunk_step=shrunk + 1)
    # the spare node started a node's worth of spares (4); the one handed rank 2 set up while
    # the other three were held (stopped), their imports kept off the cores it needed
    journal = Journal.read(str(tmp_path / "journal.jsonl"))
    (started,) = [e for e in journal if e["event"] == "replacement_started"]
    held = {e["pid"] for e in journal if e["event"] == "spare_held" and e["node"] == 1}
    assert (started["rank"], started["how"]) == (2, "spare") and len(held) == 3, journal
    assert started["pid"] not in held
    # the shrink and the grow are rows of the controller's wandb run, with the sizes after them
    rows = [h for h in read_run(str(tmp_path / "wandb"))["history"] if "recovery/action" in h]
    assert [(h["recovery/action"], h["recovery/rank"], h["recovery/world_size"],
             h["recovery/data_parallel_size"]) for h in rows] == [("shrink", 2, 3, 3),
                                                                  ("grow", 2, 4, 4)], rows
    # and the data-parallel size over the job's steps, a step function from the first step to
    # the last
    sizes = [(h["job/step"], h["job/world_size"], h["job/data_parallel_size"])
             for h in read_run(str(tmp_path / "wandb"))["history"] if "job/step" in h]
    assert sizes == [(0, 4, 4), (shrunk, 4, 4), (shrunk + 1, 3, 3), (back, 3, 3),
                     (back + 1, 4, 4), (8, 4, 4)], sizes


def test_always_shrinking_a_job_that_cannot_shrink_is_refused_at_start_up():
    from fr_megatron.config import ConfigError
    from fr_megatron.deepspeed.integration import DeepSpeedIntegration
    from fr_megatron.megatron.integration import MegatronIntegration
    from fr_megatron.runtime.integration import TorchIntegration, check_shrink_policy

    for cls in (MegatronIntegration, DeepSpeedIntegration):
        with pytest.raises(ConfigError, match=f"shrink: 'always'.*{cls.name} integration.*"
                                              "'no-spare'"):
            check_shrink_policy("always", cls)
        check_shrink_policy("no-spare", cls)  # stops where it cannot shrink, as it says
    check_shrink_policy("always", TorchIntegration)


def _controller(tmp_path, shrink_policy: str, shrinkable: bool = True,
                replicas=([0], [1], [2], [3])):
    from fr_megatron.config import FlashRecoveryConfig
    from fr_megatron.launcher.controller import Controller

    cfg = FlashRecoveryConfig(wandb={"enabled": False}, journal=str(tmp_path / "j.jsonl"),
                              shrink=shrink_policy)
    ctl = Controller(4, 2, 2, "127.0.0.1", 0, b"token", cfg)  # node 1 hosts ranks 2 and 3
    ctl._on_event({"kind": "event", "rank": 0, "event": "redundancy", "generation": 0,
                   "fields": {"shrink": shrinkable, "replicas": [list(r) for r in replicas]}})
    return ctl


def _lose_node_1(ctl, now: float) -> None:
    for rank in (2, 3):
        ctl._on_event({"kind": "fault", "rank": rank, "fault": "node_lost", "pid": 100 + rank,
                       "generation": ctl.generation, "step": 5, "phase": "backward", "node": 1,
                       "fault_t": now, "ts": now})
    ctl._decide()


def _plan(ctl, key: str):
    from fr_megatron.protocol.auth import Signer

    return Signer(b"token", "test").verify(ctl.store.get(key)) if ctl.store.check([key]) else None


@pytest.mark.timeout(60)
def test_the_controller_shrinks_then_grows_back_once_the_grown_ranks_stand_by(tmp_path):
    from fr_megatron.protocol import keys

    ctl = _controller(tmp_path, "no-spare")
    try:
        now = time.time()
        _lose_node_1(ctl, now)  # no spare node: ranks 2 and 3 leave with their replicas
        plan = _plan(ctl, keys.plan(1))
        assert (plan["replaced"], plan["removed"], plan["members"]) == ([], [2, 3], [0, 1])
        assert [(f["rank"], f["action"], f["world_size"]) for f in plan["faults"]] == \
            [(2, "shrink", 2), (3, "shrink", 2)]
        assert ctl.fatal is None and sorted(ctl.views) == [0, 1]
        for rank in (0, 1):
            ctl._on_event({"kind": "recovered", "rank": rank, "generation": 1, "pid": rank,
                           "first_step_t": now + 1, "phases": {}, "recovery_point": 4,
                           "steps_lost": 0, "ts": now})
        # a spare node joins: its agent is woken to start ranks 2 and 3, the ranks are not yet
        ctl._on_event({"kind": "agent_started", "node": 2, "spare": True, "pid": 1, "ts": now})
        ctl._grow()
        woken = _plan(ctl, keys.agent_wake(2))
        assert (woken["grown"], woken["placement"]) == ([2, 3], {"2": 2, "3": 2})
        assert _plan(ctl, keys.plan(2)) is None and ctl.members == [0, 1]
        ctl._on_event({"kind": "standby", "rank": 2, "generation": 2, "pid": 7, "ts": now})
        assert _plan(ctl, keys.plan(2)) is None  # rank 3 is still starting
        ctl._on_event({"kind": "standby", "rank": 3, "generation": 2, "pid": 8, "ts": now})
        assert _plan(ctl, keys.plan(2))["members"] == [0, 1, 2, 3]
        assert ctl.members == [0, 1, 2, 3] and ctl.node_of[2] == ctl.node_of[3] == 2
        assert ctl.report()["grows"][0]["prepare_s"] is not None
    finally:
        ctl.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy, faults, home", [
    ("no-spare", ["state_lost"], True),    # the process and its copies died, not the device
    ("always", ["crash"], False),          # growing back at once would undo the shrink
    ("no-spare", ["crash"] * (MAX_FAILED_RESTARTS + 1), False)])  # a broken device
def test_a_removed_replica_comes_back_in_its_own_slots_unless_they_are_unusable(
        tmp_path, policy, faults, home):
    """Rank 1's replica leaves; once the recovery is over, it comes back on its own node (with
    no spare node) only where its slot is usable."""
    from fr_megatron.protocol import keys

    ctl = _controller(tmp_path, policy)
    try:
        now = time.time()
        for node in (0, 1):
            ctl._on_event({"kind": "agent_started", "node": node, "spare": False,
                           "pid": 10 + node, "ts": now})
        for i, kind in enumerate(faults):
            ctl._on_event({"kind": "fault", "rank": 1, "fault": kind, "pid": 100 + i,
                           "generation": ctl.generation, "step": 5, "phase": "backward",
                           "fault_t": now, "ts": now})
            ctl._decide()
        assert ctl.members == [0, 2, 3] and ctl.removed_replicas == [[1]], ctl.members
        ctl._grow()
        assert ctl.growing is None  # not during the recovery
        for rank in ctl.members:
            ctl._on_event({"kind": "recovered", "rank": rank, "generation": ctl.generation,
                           "pid": rank, "first_step_t": now + 1, "phases": {},
                           "recovery_point": 4, "steps_lost": 0, "ts": now})
        ctl._grow()
        woken = _plan(ctl, keys.agent_wake(ctl.generation + (0 if home else 1)))
        if home:
            assert (woken["grown"], woken["placement"]) == ([1], {"1": 0}), woken
        else:
            assert woken is None and ctl.growing is None and ctl.removed_replicas == [[1]]
    finally:
        ctl.stop()


@pytest.mark.timeout(60)
def test_under_shrink_always_lost_ranks_that_would_leave_no_replica_are_replaced(tmp_path):
    """Two ranks stuck at once, one in each replica: removing both replicas would leave none,
    so the controller says why it does not shrink and replaces both on their own nodes."""
    from fr_megatron.events import Journal
    from fr_megatron.protocol import keys

    ctl = _controller(tmp_path, "always", replicas=([0, 2], [1, 3]))
    try:
        now = time.time()
        for rank in (0, 1):
            ctl._on_event({"kind": "fault", "rank": rank, "fault": "stuck", "pid": 100 + rank,
                           "generation": 0, "step": 5, "phase": "forward", "fault_t": now,
                           "ts": now})
        ctl._decide()
        plan = _plan(ctl, keys.plan(1))
        assert (plan["replaced"], plan["removed"], plan["members"]) == ([0, 1], [], [0, 1, 2, 3])
        assert [(f["rank"], f["action"]) for f in plan["faults"]] == [(0, "replace"),
                                                                      (1, "replace")]
        assert ctl.fatal is None and ctl.dp_replicas == [[0, 2], [1, 3]]
        (skipped,) = [e for e in Journal.read(str(tmp_path / "j.jsonl"))
                      if e["event"] == "shrink_skipped"]
        assert skipped["generation"] == 1 and skipped["ranks"] == [0, 1]
        assert "leave no data-parallel replica whole" in skipped["reason"]
    finally:
        ctl.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy, shrinkable, why", [
    ("never", True, "--shrink never keeps the job from going on"),
    ("no-spare", False, "cannot go on with fewer data-parallel replicas")])
def test_a_lost_node_stops_the_job_where_it_cannot_shrink_and_says_why(tmp_path, policy,
                                                                       shrinkable, why):
    ctl = _controller(tmp_path, policy, shrinkable)
    try:
        _lose_node_1(ctl, time.time())
        assert "node 1 is lost and no spare node is left" in ctl.fatal and why in ctl.fatal
        assert ctl.members == [0, 1, 2, 3]
    finally:
        ctl.stop()


def test_with_an_averaging_reduction_the_loss_scale_keeps_the_mean_over_the_global_batch():
    from fr_megatron.runtime.batch_split import loss_scale

    grads = [float(m + 1) for m in range(8)]  # one number per micro-batch
    for size in (8, 5, 3, 1):
        # each rank sums its scaled micro-batch gradients, then the ranks average (DDP)
        sums = [sum(grads[m] * loss_scale(8, size) for m in micro_batches(8, r, size))
                for r in range(size)]
        assert sum(sums) / size == pytest.approx(sum(grads) / 8)
    assert loss_scale(8, 4) == 0.5  # two micro-batches per rank: the usual 1/2
    with pytest.raises(BatchSplitError):
        loss_scale(2, 3)
