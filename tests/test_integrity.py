"""State that cannot be trusted is never trained on: a corrupted snapshot or transfer is detected
by its checksum, reported, and the job stops cleanly instead of continuing from wrong state. A
rank's snapshot in the node's shared memory outlives the rank: two ranks lost together (one of
them the holder of the other's copy in process memory) are both recovered from it."""

import pytest

from jobs import TORCH_RECIPE, TORCH_STEPS, assert_same_training, run_job

from fr_megatron.launcher.controller import MAX_FAILED_RESTARTS


@pytest.mark.timeout(300)
@pytest.mark.parametrize("snapshots", ["shared-memory", "process-memory"])
def test_corrupted_state_stops_the_job(tmp_path, snapshots):
    # every rank flips one byte of each snapshot after checksumming it, as bad memory would: the
    # replacement refuses its predecessor's snapshot in shared memory; without one, it refuses
    # the state its peers send from their (equally bad) snapshots
    extra = [] if snapshots == "shared-memory" else ["--snapshot-dir", ""]
    job = run_job(tmp_path, TORCH_RECIPE, ["--steps", "6"], inject="kill:rank=2:step=3",
                  env={"FR_CORRUPT_SNAPSHOTS": "1"}, extra=extra)
    assert job.rc == 1, job.failure(3000)
    assert "checksum mismatch" in (job.report["fatal"] or ""), job.report
    (fault,) = job.report["faults"]
    assert (fault["rank"], fault["step"]) == (2, 3)
    assert fault["recovery_s"] is None  # never resumed
    stopped = [e for e in job.journal if e["event"] == "job_stopped"]
    assert stopped and "checksum mismatch" in stopped[0]["reason"]
    assert not any(e["event"] == "recovered" for e in job.journal)
    assert job.result is None  # rank 0 never finished training on the corrupted state


LOSE_1_AND_2 = "kill:rank=1:step=3:phase=forward;kill:rank=2:step=3:phase=forward"


@pytest.mark.timeout(300)
def test_rank_and_holder_of_its_copy_lost_together_stops_cleanly(tmp_path):
    # snapshots in process memory: rank 1's copy lives on rank 2 (the next data-parallel rank),
    # so losing both loses what only rank 1 had (its meta: RNG state, counters) for good
    job = run_job(tmp_path, TORCH_RECIPE, ["--steps", "6"], inject=LOSE_1_AND_2,
                  extra=["--snapshot-dir", "", "--shrink", "never"])
    assert job.rc == 1, job.failure(3000)
    assert "every holder of their copies are lost" in (job.report["fatal"] or ""), job.report
    stopped = [e for e in job.journal if e["event"] == "job_stopped"]
    assert stopped and stopped[0]["last_good_step"] == 2
    assert not any(e["event"] == "recovered" for e in job.journal)
    assert job.result is None


# rank 1 raises in step 3 again and again, in every replacement (each spec fires once)
FAILS_EVERY_RESTART = ";".join(["exception:rank=1:step=3:phase=forward"] * (MAX_FAILED_RESTARTS + 2))


@pytest.mark.timeout(300)
def test_ranks_lost_with_every_copy_of_their_state_leave_with_their_replicas_and_come_back(
        tmp_path):
    # the same loss with the default --shrink no-spare: the replacements of ranks 1 and 2 find
    # nothing to restore, and the job goes on without their replicas from the last step the
    # others committed; their slots are sound (the processes died, not the devices), so the
    # replicas come back there at the next step boundary and take their state from the others
    # (steps sleep while the job is shrunk, so that it does not end before that)
    job = run_job(tmp_path, TORCH_RECIPE, ["--steps", "8", "--step-sleep-shrunk", "1.5"],
                  inject=LOSE_1_AND_2, extra=["--snapshot-dir", ""])
    assert job.rc == 0, job.failure(3000)
    faults = sorted((f["kind"], f["rank"], f["action"]) for f in job.report["faults"])
    assert faults == [("crash", 1, "replace"), ("crash", 2, "replace"),
                      ("state_lost", 1, "shrink"), ("state_lost", 2, "shrink")], faults
    shrunk = [f for f in job.report["faults"] if f["action"] == "shrink"]
    assert all(f["steps_lost"] == 0 and f["recovery_point"] == 2 for f in shrunk), shrunk
    assert all(f["world_size_after"] == 2 for f in shrunk), shrunk
    (grow,) = job.report["grows"]
    assert (grow["ranks"], grow["world_size_after"], grow["steps_lost"]) == ([1, 2], 4, 0), grow
    (decided,) = [e for e in job.journal if e["event"] == "grow_decided"]
    assert decided["nodes"] == [0], decided  # their own node: the job has no other
    back = grow["recovery_point"]
    assert 2 < back < 8, grow
    assert job.report["members"] == [0, 1, 2, 3] and job.report["fatal"] is None
    assert job.result["world_sizes"] == {s: 2 if 2 < s <= back else 4 for s in range(1, 9)}
    assert all(t == [1.0] * 4 for t in job.result["taken"].values()), job.result["taken"]


@pytest.mark.timeout(300)
def test_rank_that_fails_every_restart_stops_the_job_and_every_process(tmp_path):
    # the controller gives up after MAX_FAILED_RESTARTS and the whole job must end, not wait
    job = run_job(tmp_path, TORCH_RECIPE, ["--steps", "6"], inject=FAILS_EVERY_RESTART,
                  timeout=150, extra=["--shrink", "never"])
    assert job.rc == 1, job.failure(3000)
    assert f"failed {MAX_FAILED_RESTARTS + 1} times in a row" in (job.report["fatal"] or "")
    stopped = [e for e in job.journal if e["event"] == "job_stopped"]
    assert stopped and stopped[0]["rank"] == 1
    # the job stopped in the last generation it published: no generation without a plan
    assert job.report["generations"] == max(e["generation"] for e in job.journal
                                            if e["event"] == "fault_decided")
    assert job.result is None


@pytest.mark.timeout(300)
def test_rank_that_fails_every_restart_leaves_the_job_with_its_replica(tmp_path):
    # the default --shrink no-spare: a rank that cannot be restarted is no reason to stop; in
    # the world without it, rank 3 (the new world's rank 2) is lost too and replaced as usual,
    # from its own snapshot
    job = run_job(tmp_path, TORCH_RECIPE, ["--steps", "6"], timeout=150,
                  inject=FAILS_EVERY_RESTART + ";kill:rank=3:step=5:phase=backward")
    assert job.rc == 0, job.failure(3000)
    faults = job.report["faults"]
    assert [(f["rank"], f["kind"], f["action"]) for f in faults] == \
        [(1, "exception", "replace")] * MAX_FAILED_RESTARTS + [(1, "exception", "shrink"),
                                                               (3, "crash", "replace")]
    assert faults[-2]["world_size_after"] == 3 and faults[-2]["steps_lost"] == 0
    assert (faults[-1]["world_size_after"], faults[-1]["steps_lost"]) == (3, 0), faults[-1]
    assert faults[-1]["restored_from"] == {"replicated": 3, "unique": 3, "meta": 3}, faults[-1]
    assert job.report["members"] == [0, 2, 3] and job.report["fatal"] is None
    assert job.result["world_sizes"] == {s: 4 if s < 3 else 3 for s in range(1, 7)}
    assert all(t == [1.0] * 4 for t in job.result["taken"].values()), job.result["taken"]


@pytest.mark.timeout(300)
def test_two_ranks_lost_together_recover_from_their_snapshots(tmp_path, torch_baseline):
    # the same two faults with snapshots in shared memory: each replacement restores its own
    # predecessor's snapshot, no copy is needed, and training ends bit-identical
    job = run_job(tmp_path, TORCH_RECIPE, TORCH_STEPS, inject=LOSE_1_AND_2, spares=2)
    assert job.rc == 0, job.failure(3000)
    faults = job.report["faults"]
    assert sorted(f["rank"] for f in faults) == [1, 2]
    assert all(f["steps_lost"] == 0 and f["survivor_pids_unchanged"] for f in faults), faults
    (redundancy,) = [e for e in job.journal if e["event"] == "redundancy"]
    assert redundancy["snapshots"] == "shared memory" and redundancy["ranks_copying"] == []
    assert_same_training(torch_baseline, job.result)
