"""Every fault kind on a 4-rank plain torch.distributed job: detected and classified, only the
faulty rank replaced (by a warm spare, or a fresh process when none is left), survivors keep
their PIDs, and training ends bit-identical to a fault-free run.

Several faults share a job (one per step, each its own generation), so the suite pays for a few
process start-ups instead of one per kind."""

import pytest

from jobs import TORCH_RECIPE, TORCH_STEPS as STEPS, assert_same_training, run_job

HANG = ["--hang-timeout", "2", "--heartbeat-interval", "0.2"]

# job name: (faults, expected kinds, spares, extra launcher flags)
JOBS = {
    # the replacement of the first rank is killed too, while it restores step 1's state
    "crashes-and-exits": ("kill:rank=2:step=2:phase=forward;"
                          "kill:rank=2:step=2:phase=restore;"
                          "segv:rank=3:step=3:phase=optimizer;"
                          "exception:rank=1:step=4:phase=backward;"
                          "exit:code=7:rank=2:step=5:phase=grad_reduce;"
                          "exit0:rank=0:step=6:phase=after_step",
                          ["crash", "crash", "segv", "exception", "exit", "exit0_early"], 2, []),
    # no spares: every replacement is a freshly spawned process
    "hangs-and-stop-no-spare": ("hang:rank=2:step=3:phase=forward;"
                                "hang_gil:rank=1:step=5:phase=backward;"
                                "stop:rank=3:step=7:phase=optimizer",
                                ["hang", "hang_gil", "stop"], 0, HANG),
    # the soak's seed 2026: a rank stops before the gradient all-reduce that every other rank
    # is blocked in, all four at the same step and phase (then the same holding the GIL)
    "hangs-in-grad-reduce": ("hang:rank=3:step=3:phase=grad_reduce;"
                             "hang_gil:rank=0:step=5:phase=grad_reduce",
                             ["hang", "hang_gil"], 2, HANG),
    # rank 1 takes part in the all-reduce of gradients and losses and then never leaves it,
    # even once rank 3's crash has aborted its communicators: it reports itself stuck instead
    # of waiting to be blamed as hung. Its snapshots are in process memory: it hands them
    # over to its replacement as it leaves, while the killed rank's die with it
    "stuck-after-abort": ("wedge:rank=1:step=3:phase=grad_reduce:group=world:nth=1;"
                          "kill:rank=3:step=3:phase=optimizer",
                          ["stuck", "crash"], 2, ["--snapshot-dir", ""]),
}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", list(JOBS))
def test_faults_recovered_bit_exact(tmp_path, torch_baseline, name):
    spec, kinds, spares, extra = JOBS[name]
    # workers are forked from the node's worker template; the job without spares starts them
    # (and its spawned replacements) as processes of their own instead
    forked = bool(spares)
    job = run_job(tmp_path, TORCH_RECIPE, STEPS, inject=spec, spares=spares, extra=extra,
                  env={} if forked else {"FR_WORKER_TEMPLATE": "0"})
    assert job.rc == 0, job.failure(4000)
    started = [e for e in job.journal if e["event"] == "worker_started"]
    assert sorted(e["rank"] for e in started) == [0, 1, 2, 3]
    assert all(e["forked"] is forked for e in started), started
    faults = {(f["rank"], f["step"], f["phase"]): f for f in job.report["faults"]}
    assert len(faults) == len(kinds), job.report["faults"]
    for part, kind in zip(spec.split(";"), kinds):
        fields = dict(kv.split("=") for kv in part.split(":")[1:])
        fault = faults[(int(fields["rank"]), int(fields["step"]), fields["phase"])]
        assert fault["kind"] == kind
        assert fault["replacement"] == ("spare" if spares else "spawn")
        assert fault["survivor_pids_unchanged"] is True
        # faults close together recover together (one generation, or a recovery cut short by
        # the next fault): all roll back to the earliest one's step
        together = [f["step"] for f in faults.values()
                    if f["resumed_generation"] == fault["resumed_generation"]]
        assert fault["steps_lost"] == 0 and fault["recovery_point"] == min(together) - 1
        # a fault in a forward or a backward comes before any survivor's optimizer steps (the
        # gradients' all-reduce needs the faulty rank): every survivor keeps its live tensors
        # and restores only the point's meta; the replaced ranks restore their snapshots
        replaced = {f["rank"] for f in faults.values()
                    if f["resumed_generation"] == fault["resumed_generation"]}
        assert not set(fault["ranks_kept_live_state"]) & replaced, fault
        if len(together) == 1 and fault["phase"] in ("forward", "backward"):
            assert fault["ranks_kept_live_state"] == sorted({0, 1, 2, 3} - replaced), fault
        assert 0 <= fault["detect_s"] <= fault["recovery_s"]
        assert set(fault["phases"]) >= {"detect", "abort", "rebuild", "restore", "resume"}
        if kind.startswith("hang"):  # blamed after the hang timeout, not before
            assert fault["detect_s"] >= 2.0
            # ... for not entering the collective its peers wait in
            assert fault["evidence"][0] == "not_in_collective", fault
            assert (kind == "hang_gil") == ("heartbeat_stopped" in fault["evidence"]), fault
            (decided,) = [e for e in job.journal if e["event"] == "fault_decided"
                          and (e["rank"], e["step"]) == (fault["rank"], fault["step"])]
            assert decided["evidence"] == fault["evidence"]
            if fault["phase"] == "grad_reduce":  # everyone else is inside the all-reduce;
                # when the hung rank's copies of the last commit had not begun, they also wait
                # for it in the runtime group's agreement: each wait names all the others
                others = sorted({0, 1, 2, 3} - {fault["rank"]})
                assert fault["waits"] and all(w["waiting"] == others
                                              for w in fault["waits"]), fault
    if "exception" in kinds:
        (reported,) = [e for e in job.journal
                       if e["event"] == "fault_reported" and e["kind"] == "exception"]
        assert "InjectedFault: injected exception at step 4" in reported["traceback"]
    if "stuck" in kinds:  # it says where: the world group's all-reduce, and its stack
        (reported,) = [e for e in job.journal
                       if e["event"] == "fault_reported" and e["kind"] == "stuck"]
        assert reported["operation"].endswith("@0-3"), reported  # ranks 0 to 3
        assert "all_reduce" in reported["stack"] and "inject.py" in reported["stack"], reported
        # the stuck rank's replacement restores from what it handed over, the killed rank's
        # from a live peer
        assert reported["handed_over_bytes"] > 0, reported
        restored = {f["kind"]: f["restored_from"] for f in faults.values()}
        assert set(restored["stuck"].values()) == {1}, restored
        assert 1 not in restored["crash"].values() and 3 not in restored["crash"].values()
    if name == "crashes-and-exits":
        # two faults in step 2 empty the pool of 2: the agent starts a spare at once but held
        # stopped, and wakes it when it is handed a rank (the fault in step 3) or when a
        # recovery is over; the pool is topped up only after the replacement has committed a
        # step (each a journal event; whether a top-up happens before the job ends is timing)
        events = {name: [e for e in job.journal if e["event"] == name]
                  for name in ("spare_held", "spare_woken", "spare_pool_refilled")}
        held = {e["pid"] for e in events["spare_held"]}
        woken = {e["pid"] for e in events["spare_woken"]}
        assert held and woken and woken <= held, job.failure()
    for e in [e for e in job.journal if e["event"] == "spare_pool_refilled"]:
        assert e["after"] == "timeout" or e["committed"] > e["restored"], e
    assert job.report["finished_ranks"] == 4
    assert job.report["generations"] == len({f["generation"] for f in faults.values()})
    assert_same_training(torch_baseline, job.result)
