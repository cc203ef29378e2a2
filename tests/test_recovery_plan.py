"""Who copies what where (``failure_domains.copy_plan``), and where a lost rank's state comes from
after a fault (``recovery_point.decide``): pure functions of the job's layout and of what every
rank reports, so every rank computes the same answer without another round of messages."""

import pytest

from fr_megatron.runtime.failure_domains import CopyPlan, PlacementError, copy_plan
from fr_megatron.runtime.recovery_point import RankReport, decide

# 4 ranks, TP=2 x DP=2: data-parallel replicas {0, 2} and {1, 3}
DP4 = [[0, 2], [1, 3], [0, 2], [1, 3]]
ALONE4 = [[r] for r in range(4)]


def test_one_node_with_snapshots_in_shared_memory_copies_nothing():
    plan = copy_plan(4, 4, DP4, ALONE4, [True] * 4, replicas=1)
    assert plan.holders == {r: [] for r in range(4)}
    assert plan.summary()["ranks_copying"] == []


def test_snapshots_in_process_memory_copy_to_the_next_data_parallel_rank():
    plan = copy_plan(4, 4, DP4, ALONE4, [False] * 4, replicas=1)
    assert plan.holders == {0: [2], 1: [3], 2: [0], 3: [1]}
    assert plan.parts == {r: ("unique",) for r in range(4)} and plan.wards(2) == [0]
    with pytest.raises(PlacementError, match="lower replicas"):
        copy_plan(2, 2, [[0, 1], [0, 1]], [[0], [1]], [False, False], replicas=2)


def test_several_nodes_copy_to_another_node_against_the_loss_of_one():
    world, nproc = 8, 4
    dp = [[r % 2, r % 2 + 2, r % 2 + 4, r % 2 + 6] for r in range(world)]
    plan = copy_plan(world, nproc, dp, [[r] for r in range(world)], [True] * world, replicas=2)
    for r, hs in plan.holders.items():
        assert len(hs) == 2 and all(h // nproc != r // nproc for h in hs)


def test_optimizer_instances_on_other_nodes_leave_only_the_meta_to_copy():
    # 2 nodes of 2 ranks, TP=2 x DP=2, 2 instances: rank r's shard is also on r + 2 (other node)
    inst = [[0, 2], [1, 3], [0, 2], [1, 3]]
    plan = copy_plan(4, 2, DP4, inst, [True] * 4, replicas=1)
    assert all(plan.holders[r] and plan.parts[r] == () for r in range(4))
    assert plan.summary()["ranks_copying_tensors"] == []
    # on one node the processes are the failure domains: instances are fine there too
    assert copy_plan(4, 4, DP4, inst, [False] * 4, replicas=1).parts[0] == ()


def test_optimizer_instances_on_one_node_of_several_are_refused_naming_the_flag():
    # 2 nodes of 4: ranks 0 and 2 hold the same shard, both on node 0
    inst = [[r, r ^ 2] for r in range(8)]
    dp = [[r % 4, (r % 4) ^ 2] for r in range(8)]
    with pytest.raises(PlacementError, match="--num-distributed-optimizer-instances.*node 0"):
        copy_plan(8, 4, dp, inst, [True] * 8, replicas=1)


def reports(*specs):
    return [RankReport(lost, ring, held, committed) for lost, ring, held, committed in specs]


def test_a_lost_rank_restores_its_own_snapshot_when_its_predecessor_left_one():
    plan = CopyPlan({r: [] for r in range(4)}, {r: ("unique",) for r in range(4)})
    got = decide(reports((False, [4, 5], {}, 5), (True, [4, 5], {}, -1), (False, [4, 5], {}, 5),
                         (False, [4, 5], {}, 5)), DP4, ALONE4, plan)
    assert got.point == 5 and got.steps_lost == 0 and got.transfers(plan) == {}
    assert got.sources == {1: {"replicated": 1, "unique": 1, "meta": 1}}


def test_without_a_snapshot_state_comes_from_a_replica_and_a_holder_in_parallel():
    plan = copy_plan(4, 4, DP4, ALONE4, [False] * 4, replicas=1)  # 1's copy is on 3
    got = decide(reports((False, [3, 4], {2: [3, 4]}, 4), (True, [], {}, -1),
                         (False, [3, 4], {0: [3, 4]}, 4), (False, [4, 5], {1: [3, 4]}, 5)),
                 DP4, ALONE4, plan)
    # rank 3 committed 5 but rank 0 did not: everyone goes back to 4, the newest all have
    assert got.point == 4 and got.steps_lost == 0
    assert got.sources == {1: {"replicated": 3, "unique": 3, "meta": 3}}
    assert got.transfers(plan) == {(3, 1): [("held", ("unique", "meta")), ("ring", ("replicated",))]}
    # 1's holder (3) has 1's copy of 4 already; 1 holds 3's copy and its replacement has none
    assert got.resend == {3: [1]}


def test_a_holder_replaced_gets_its_wards_copies_again_before_training_resumes():
    plan = copy_plan(4, 4, DP4, ALONE4, [False] * 4, replicas=1)
    # rank 2 (holder of 0's copy) was replaced; its successor holds nothing
    got = decide(reports((False, [3, 4], {2: [3, 4]}, 4), (False, [3, 4], {3: [3, 4]}, 4),
                         (True, [], {}, -1), (False, [3, 4], {1: [3, 4]}, 4)), DP4, ALONE4, plan)
    assert got.point == 4 and got.sources[2]["unique"] == 0  # 2's own copy is held by 0
    assert got.resend == {0: [2]}


def test_a_rank_lost_with_every_holder_of_its_copy_has_no_recovery_point():
    plan = copy_plan(4, 4, DP4, ALONE4, [False] * 4, replicas=1)
    assert decide(reports((False, [3, 4], {2: [3, 4]}, 4), (True, [], {}, -1),
                          (False, [3, 4], {0: [3, 4]}, 4), (True, [], {}, -1)),
                  DP4, ALONE4, plan) is None


def test_with_optimizer_instances_the_shard_comes_from_the_instance_peer():
    inst = [[0, 2], [1, 3], [0, 2], [1, 3]]
    plan = copy_plan(4, 4, DP4, inst, [False] * 4, replicas=1)
    got = decide(reports((False, [4], {2: [4]}, 4), (False, [4], {3: [4]}, 4),
                         (True, [], {}, -1), (False, [4], {1: [4]}, 4)), DP4, inst, plan)
    assert got.sources == {2: {"replicated": 0, "unique": 0, "meta": 0}}
    assert got.transfers(plan) == {(0, 2): [("held", ("meta",)), ("ring", ("replicated",
                                                                          "unique"))]}


def test_a_rank_that_grows_back_takes_everything_from_one_replica_meta_included():
    # shared-memory snapshots on one node: nobody copies, nobody holds a copy of rank 2
    plan = CopyPlan({r: [] for r in range(4)}, {r: ("unique",) for r in range(4)})
    grown = RankReport(True, [], {}, -1, fresh=True)
    got = decide([RankReport(False, [4, 5], {}, 5), RankReport(False, [4, 5], {}, 5), grown,
                  RankReport(False, [5], {}, 5)], DP4, ALONE4, plan)
    assert got.point == 5 and got.steps_lost == 0 and got.fresh == {2}
    assert got.sources == {2: {"replicated": 0, "unique": 0, "meta": 0}}  # its replica
    assert got.transfers(plan) == {(0, 2): [("ring", ("replicated", "unique", "meta"))]}
    # the same rank lost in a fault has no state to come back from: it had no copy
    assert decide([RankReport(False, [4, 5], {}, 5), RankReport(False, [4, 5], {}, 5),
                   RankReport(True, [], {}, -1), RankReport(False, [5], {}, 5)],
                  DP4, ALONE4, plan) is None
    assert RankReport.from_wire(grown.to_wire()) == grown
