"""Units of the control plane that need no training job: signing, injection specs, hang blame,
failure domains, and the launcher's input checks (real CLI processes, exit code 2)."""

import hashlib
import hmac
import json
import subprocess
import sys
import time

import pytest

from fr_megatron.launcher import detector
from fr_megatron.launcher.detector import RankView
from fr_megatron.protocol.auth import AuthError, ReplayGuard, Signer
from fr_megatron.runtime import inject
from fr_megatron.runtime.abort_watch import AbortWatch

pytestmark = pytest.mark.timeout(120)


def test_signed_message_round_trip_and_rejections():
    a, b = Signer(b"k" * 32, "a"), Signer(b"k" * 32, "b")
    raw = a.sign("fault", rank=3, step=7)
    body = b.verify(raw)
    assert (body["kind"], body["rank"], body["step"], body["from"]) == ("fault", 3, 7, "a")
    with pytest.raises(AuthError, match="HMAC"):
        Signer(b"x" * 32, "evil").verify(raw)  # wrong token
    tampered = raw.replace(b'"rank":3', b'"rank":4')
    assert tampered != raw
    with pytest.raises(AuthError, match="HMAC"):
        b.verify(tampered)
    with pytest.raises(AuthError, match="HMAC"):
        b.verify(raw[:-1])  # cut short
    with pytest.raises(AuthError, match="malformed"):
        b.verify(b"not json")
    # a correct tag over a body that is not a message: refused all the same
    body_tag = hmac.new(b"k" * 32, b"[1, 2]", hashlib.sha256).hexdigest().encode()
    with pytest.raises(AuthError, match="malformed message body"):
        b.verify(body_tag + b"[1, 2]")
    with pytest.raises(AuthError, match="oversized"):
        b.verify(b"x" * (65 * 1024))
    guard = ReplayGuard()
    guard.check(body)
    with pytest.raises(AuthError, match="replayed"):
        guard.check(b.verify(raw))


def test_inject_spec_parsing_and_errors():
    (i,) = inject.parse("exit:code=7:rank=2:step=4:phase=optimizer")
    assert (i.kind, i.code, i.rank, i.step, i.phase) == ("exit", 7, 2, 4, "optimizer")
    assert len(inject.parse("kill:rank=1:step=2;hang:rank=0:step=3")) == 2
    (g,) = inject.parse("hang:rank=1:step=3:phase=optimizer:group=dist_opt:nth=2")
    assert (g.group, g.nth, g.phase) == ("dist_opt", 2, "optimizer")
    assert str(g) == "hang:rank=1:step=3:phase=optimizer:group=dist_opt:nth=2"
    for bad, msg in [("explode:rank=1", "unknown fault kind"), ("kill:rank=x", "integer"),
                     ("kill:when=3", "bad field"), ("kill:phase=lunch", "unknown phase"),
                     ("hang:group=fsdp", "unknown group 'fsdp'"),
                     ("hang:group=tp:nth=0", "nth must be 1 or more"),
                     ("hang:nth=2", "nth needs group=KIND"),
                     ("hang:group=tp:nth=two", "nth must be an integer"),
                     ("kill:group=dp:phase=restore", "phase restore has none"),
                     ("wedge:rank=1:step=3", "name its group with group=KIND")]:
        with pytest.raises(inject.InjectSpecError, match=msg):
            inject.parse(bad)


@pytest.mark.timeout(30)
def test_abort_watch_ends_only_a_rank_inside_an_operation_the_abort_did_not_end():
    """Stuck: inside one operation since before the abort. Not stuck: computing between
    operations, going from one operation to the next, or inside one that it left for recovery
    in time."""
    def watch(inside, training=lambda: True, wait_s=10.0):
        stuck = []
        w = AbortWatch(training, inside, stuck.append, stuck_s=0.2)
        w.start()
        w.join(wait_s)  # a watch that ends, ends at once
        return stuck, w

    same_op = ("all_reduce", 7)
    stuck, w = watch(lambda: same_op)
    assert len(stuck) == 1 and stuck[0] > 0.2 and not w.is_alive()
    computing = {"training": True}
    stuck, w = watch(lambda: None, lambda: computing["training"], wait_s=0.6)
    assert stuck == [] and w.is_alive()
    computing["training"] = False  # it reached a phase marker and entered recovery
    w.join(5)
    assert not w.is_alive()
    moving = {"left": 20}

    def next_op():  # a new operation at each look, 20 looks (about 1 s)
        moving["left"] -= 1
        return ("all_reduce", moving["left"])
    stuck, w = watch(next_op, lambda: moving["left"] > 0)
    assert stuck == [] and not w.is_alive()
    stuck, w = watch(lambda: same_op, lambda: False)
    assert stuck == [] and not w.is_alive()


def find_hang(views, generation, now, plan_t=0.0):
    """(rank, kind) of the blame, or None."""
    blame = detector.find_hang(views, generation, now, plan_t)
    return None if blame is None else (blame.rank, blame.kind)


def _view(rank, progress_t, seen_t, state="running", gen=0):
    v = RankView(rank, pid=100 + rank, generation=gen, step=5, phase="forward", state=state,
                 hang_timeout=2.0, hb_interval=0.2)
    v.progress_t, v.seen_t = progress_t, seen_t
    return v


def test_hang_blames_the_rank_whose_progress_stopped_first():
    now = 100.0
    views = {0: _view(0, 97.5, 99.9), 1: _view(1, 97.0, 99.9), 2: _view(2, 97.8, 99.9)}
    assert find_hang(views, 0, now) == (1, "hang")
    views[1].seen_t = 97.0  # its heartbeat stopped too: frozen with the GIL held
    assert find_hang(views, 0, now) == (1, "hang_gil")
    views = {0: _view(0, 99.0, 99.9), 1: _view(1, 97.0, 99.9, state="rebuilding")}
    assert find_hang(views, 0, now) is None  # a recovering rank is not hung
    # a rank of the old generation gets a timeout from the plan to notice it
    assert find_hang({0: _view(0, 90.0, 99.9, gen=0)}, 1, now, plan_t=99.5) is None


def test_hang_blames_the_rank_behind_not_the_one_waiting_longest():
    # rank 0 reached the gradient all-reduce first and waits there; rank 2 hung in forward
    now = 100.0
    views = {0: _view(0, 97.9, 99.9), 2: _view(2, 97.95, 99.9)}
    views[0].phase = "grad_reduce"
    assert find_hang(views, 0, now) == (2, "hang")
    views[2].progress_t = 98.5  # its own stall is not past its timeout yet: wait
    assert find_hang(views, 0, now) is None


def test_without_collective_progress_the_frozen_rank_is_blamed_first():
    # all in after_step of step 5, no rank reporting collective progress: rank 0 got there first
    # and waits (still beating); rank 3 got there last and froze holding the GIL (found by the
    # soak benchmark)
    now = 100.0
    views = {0: _view(0, 97.0, 99.9), 3: _view(3, 97.5, 97.5)}
    for v in views.values():
        v.phase = "after_step"
    assert find_hang(views, 0, now) == (3, "hang_gil")
    views[3].seen_t = 99.9  # beating: the last resort is the one whose progress stopped first
    assert find_hang(views, 0, now) == (0, "hang")
    assert detector.find_hang(views, 0, now).evidence == [detector.BEHIND_IN_STEP]


def test_rank_that_ignores_a_new_generation_is_hung():
    views = {0: _view(0, 95.0, 99.9, gen=1), 1: _view(1, 90.0, 99.9, gen=0)}
    views[0].progress_t = 99.0
    assert find_hang(views, 1, 100.0, plan_t=97.0) == (1, "hang")
    assert find_hang(views, 1, 100.0, plan_t=99.0) is None


def test_heartbeat_after_recovery_counts_as_progress():
    v = _view(0, 10.0, 10.0)
    v.update({"seq": 5, "pid": 100, "step": 5, "phase": "forward", "state": "running",
              "generation": 1}, now=20.0)
    assert v.progress_t == 20.0


def _stalled(rank, comm, progress_t=96.0, seen_t=99.9, phase="grad_reduce", step=13):
    v = _view(rank, progress_t, seen_t)
    v.step, v.phase, v.comm = step, phase, comm
    return v


def test_hang_blames_the_rank_that_did_not_enter_the_all_reduce_its_peers_wait_in():
    # the soak's seed 2026: rank 3 stopped before the gradient all-reduce of step 13, ranks 0-2
    # wait inside it; all four report (13, grad_reduce), and rank 0 got there first
    now = 100.0
    views = {r: _stalled(r, {"0@0-3": [40, 1], "1@0-3": [12, 0]}, progress_t=96.0 + r / 10)
             for r in range(3)}
    views[3] = _stalled(3, {"0@0-3": [39, 0], "1@0-3": [12, 0]}, progress_t=97.5)
    blame = detector.find_hang(views, 0, now)
    assert (blame.rank, blame.kind, blame.evidence) == (3, "hang", [detector.NOT_IN_COLLECTIVE])
    assert blame.waits == [{"key": "0@0-3", "waiting": [0, 1, 2], "their_count": 40,
                            "its_count": 39}]
    views[3].progress_t = 98.5  # its own stall is not past its timeout yet: nobody is blamed
    assert detector.find_hang(views, 0, now) is None


def test_a_chain_of_waits_blames_its_head_only():
    # rank 0 hung before a TP collective; rank 1 waits for it in TP; rank 3 waits for rank 1 in
    # DP, where rank 1 is behind: rank 1 waits, so it is not blamed
    tp, dp = "5@0-1", "7@1-3/2"
    views = {0: _stalled(0, {tp: [5, 0]}, phase="forward"),
             1: _stalled(1, {tp: [6, 1], dp: [2, 0]}, phase="forward"),
             3: _stalled(3, {dp: [3, 1]}, phase="grad_reduce")}
    blame = detector.find_hang(views, 0, 100.0)
    assert (blame.rank, blame.waits) == (0, [{"key": tp, "waiting": [1], "their_count": 6,
                                              "its_count": 5}])


def test_point_to_point_waits_compare_the_two_ends_of_one_direction():
    # a receiver waits for a send that never came, and a sender for a receive
    views = {0: _stalled(0, {"2:0>4": [2, 0], "2:4>0": [7, 0]}, phase="forward"),
             4: _stalled(4, {"2:0>4": [3, 1], "2:4>0": [7, 0]}, phase="forward")}
    assert find_hang(views, 0, 100.0) == (0, "hang")
    views = {0: _stalled(0, {"2:0>4": [3, 1]}, phase="forward"),
             4: _stalled(4, {"2:0>4": [2, 0]}, phase="backward")}
    assert find_hang(views, 0, 100.0) == (4, "hang")
    # traffic in the other direction, ahead or not, says nothing about this one
    views[4].comm["2:4>0"] = [9, 0]
    assert find_hang(views, 0, 100.0) == (4, "hang")


def test_a_frozen_rank_is_judged_by_its_last_report():
    now = 100.0
    waiting = {"0@0-3": [10, 1]}
    # rank 3 froze holding the GIL before it ever reported: behind on its peers' all-reduce
    views = {r: _stalled(r, dict(waiting)) for r in range(3)}
    views[3] = _stalled(3, None, progress_t=97.0, seen_t=97.0)
    blame = detector.find_hang(views, 0, now)
    assert (blame.rank, blame.kind) == (3, "hang_gil")
    assert blame.evidence == [detector.NOT_IN_COLLECTIVE, detector.HEARTBEAT_STOPPED]
    assert blame.waits[0]["its_count"] is None
    # rank 1's heartbeat stopped too, but its last beat had it waiting in the all-reduce: a
    # rank that beats and never entered it is blamed, not rank 1
    views[3] = _stalled(3, {"0@0-3": [9, 0]}, progress_t=97.0)
    views[1].seen_t = 96.5
    assert find_hang(views, 0, now) == (3, "hang")


def test_collective_progress_keys_carry_their_members():
    from fr_megatron.protocol import progress

    for ranks, text in [([0, 1, 2, 3], "0-3"), ([1, 3, 5, 7], "1-7/2"), ([0, 1, 4, 5], "0-1,4-5"),
                        ([0, 4], "0,4"), ([6], "6"), ([0, 4, 5], "0,4-5")]:
        assert progress.encode_ranks(ranks) == text
        assert progress.decode_ranks(text) == ranks
    long_name = "mcore_dp_cp_0123456789abcdef0123_0"
    key = progress.collective_key(long_name, range(0, 16384, 8))
    assert len(key) < 24 and progress.members(key) == list(range(0, 16384, 8))
    assert progress.members(progress.channel_key("3", 4, 0)) == [4, 0]
    assert progress.parse({"a": [1, 1], "c": [2, 0]}) == {"a": (1, True), "c": (2, False)}
    assert progress.parse({"a": [1, 1], "b": "x"}) == progress.parse([3]) == {}  # malformed
    v = _view(0, 10.0, 10.0)
    v.update({"seq": 1, "pid": 100, "comm": {"0@0-1": [3, 1]}}, now=11.0)
    assert v.comm == {"0@0-1": [3, 1]}
    v.update({"seq": 2, "pid": 100}, now=12.0)  # moving again: the beat carries none
    assert v.comm is None


def _run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "fr_megatron.cli", "run", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,needle", [
    (["--inject", "explode:rank=1", "recipes/torch_ddp/train.py"], "--inject: unknown fault kind"),
    (["--controller", "nohostport", "recipes/torch_ddp/train.py"], "--controller"),
    (["--nproc-per-node", "0", "recipes/torch_ddp/train.py"], "--nproc-per-node must be at least 1"),
    (["missing_script.py"], "not found"),
    (["--nnodes", "2", "recipes/torch_ddp/train.py"], "--controller HOST:PORT is required"),
    (["--heartbeat-interval", "-1", "recipes/torch_ddp/train.py"], "heartbeat"),
])
def test_bad_launcher_input_is_one_line_and_exit_2(args, needle, capsys):
    # in this process (each fails before it starts anything); the first also as a command
    from fr_megatron import cli

    assert cli.main(["run", *args]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], err
    if "--inject" in args:
        p = _run_cli(*args)
        assert p.returncode == 2 and p.stderr.strip() == lines[0], p.stderr


def test_unreachable_controller_is_exit_2(tmp_path):
    token = tmp_path / "token"
    token.write_text("t" * 64)
    p = _run_cli("--nnodes", "2", "--node-rank", "1", "--controller", "127.0.0.1:9",
                 "--token-file", str(token), "--connect-timeout", "3",
                 "recipes/torch_ddp/train.py", timeout=120)
    assert p.returncode == 2, p.stderr
    assert "cannot reach the controller" in p.stderr and "--controller" in p.stderr


@pytest.mark.timeout(180)
def test_unchanged_torchrun_script_runs_and_ends(tmp_path):
    """A script that only uses torchrun's environment (env:// rendezvous, no recovery session)
    runs under fr-megatron run and ends: its exit 0 is its normal end, not a fault."""
    script = tmp_path / "plain.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "t = torch.ones(1) * dist.get_rank()\n"
        "dist.all_reduce(t)\n"
        "assert t.item() == sum(range(dist.get_world_size()))\n"
        "dist.destroy_process_group()\n")
    report = tmp_path / "r.json"
    p = _run_cli("--nproc-per-node", "2", "--spares", "0", "--no-wandb", "--report", str(report),
                 str(script), timeout=170)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads(report.read_text())
    assert rep["faults"] == [] and rep["generations"] == 0


@pytest.mark.timeout(60)
def test_recovery_finished_but_for_ranks_the_next_fault_took_keeps_its_own_report(tmp_path):
    """Ranks 0-2 report the first step after generation 1's recovery; rank 3 dies (its node
    crashes) before it can. That recovery is complete, with its own recovery point, instead of
    being merged into generation 2's (found by test_node_loss: the node crash came right after
    the first step, and the earlier faults were reported with the later recovery point)."""
    from fr_megatron.config import FlashRecoveryConfig

    from fr_megatron.launcher.controller import Controller

    cfg = FlashRecoveryConfig(wandb={"enabled": False}, journal=str(tmp_path / "j.jsonl"))
    ctl = Controller(4, 1, 4, "127.0.0.1", 0, b"token", cfg)
    try:
        now = time.time()

        def fault(rank, generation, step):
            ctl._on_event({"kind": "fault", "rank": rank, "fault": "crash", "pid": 100 + rank,
                           "generation": generation, "step": step, "phase": "forward",
                           "fault_t": now, "ts": now})
            ctl._decide()

        def recovered(rank, generation, point):
            ctl._on_event({"kind": "recovered", "rank": rank, "generation": generation,
                           "pid": 200 + rank, "first_step_t": now + generation,
                           "phases": {"rebuild": 0.5}, "recovery_point": point,
                           "steps_lost": 0, "ts": now})

        fault(1, 0, 2)
        for rank in (0, 1, 2):
            recovered(rank, 1, 1)
        fault(3, 1, 3)
        for rank in range(4):
            recovered(rank, 2, 2)
        faults = {f["rank"]: f for f in ctl.report()["faults"]}
        assert (faults[1]["recovery_point"], faults[1]["resumed_generation"]) == (1, 1)
        assert (faults[3]["recovery_point"], faults[3]["resumed_generation"]) == (2, 2)
        assert faults[1]["steps_lost"] == faults[3]["steps_lost"] == 0
    finally:
        ctl.stop()


@pytest.mark.timeout(60)
def test_ranks_that_all_finish_while_a_grow_starts_end_the_job_and_abandon_the_grow(tmp_path):
    """Every rank of the world finishes while the rank of a grow is still starting (a grow
    decided in the job's last step): the grow's generation never opens, and the job ends,
    telling the agents so, instead of waiting for the node whose agent waits for the grown
    rank (found when a shrink after lost state was followed by a grow at the job's end)."""
    import threading

    from fr_megatron.config import FlashRecoveryConfig
    from fr_megatron.events import Journal
    from fr_megatron.launcher.controller import Controller
    from fr_megatron.protocol import keys

    cfg = FlashRecoveryConfig(wandb={"enabled": False}, journal=str(tmp_path / "j.jsonl"))
    ctl = Controller(4, 1, 4, "127.0.0.1", 0, b"token", cfg)
    served = threading.Thread(target=ctl.serve, daemon=True)
    try:
        # rank 2's replica left the world; its grow is decided and its process starts
        ctl.members, ctl.generation = [0, 1, 3], 4
        ctl.growing = {"generation": 4, "plan": {"grown": [2]}, "standby": set()}
        served.start()
        for rank in ctl.members:
            ctl._on_event({"kind": "finished", "rank": rank, "step": 6, "ts": time.time()})
        ctl._wake.set()
        served.join(20)
        assert not served.is_alive(), "the job waited for a grow that cannot open"
        events = [e["event"] for e in Journal.read(str(tmp_path / "j.jsonl"))]
        assert "grow_abandoned" in events and events[-1] == "job_finished", events
        end = ctl.signer.verify(ctl.store.get(keys.agent_wake(5)))  # where the agents wait
        assert end["kind"] == "done" and not end["fatal"], end
    finally:
        ctl.stop()


@pytest.mark.timeout(60)
def test_a_replacement_not_yet_heard_beating_is_a_survivor_of_the_next_fault_by_its_pid(
        tmp_path):
    """Rank 2's replacement recovers and training goes on; ranks 1 and 3 fail before the
    replacement's first beat reaches the controller. The replacement is one of that recovery's
    survivors, known by the pid its agent reported when it handed it the rank (found by
    test_faults_torch once in three runs: survivor_pids_unchanged was False)."""
    from fr_megatron.config import FlashRecoveryConfig

    from fr_megatron.launcher.controller import Controller

    cfg = FlashRecoveryConfig(wandb={"enabled": False}, journal=str(tmp_path / "j.jsonl"))
    ctl = Controller(4, 1, 4, "127.0.0.1", 0, b"token", cfg)
    pids = {r: 100 + r for r in range(4)}
    try:
        now = time.time()
        ctl._on_node_beat(0, {"node": 0, "ranks": {
            str(r): {"rank": r, "pid": pid, "seq": 1, "generation": 0, "step": 2,
                     "phase": "forward", "state": "running"} for r, pid in pids.items()}}, now)

        def fault(rank, generation):
            ctl._on_event({"kind": "fault", "rank": rank, "fault": "crash", "pid": pids[rank],
                           "generation": generation, "step": 2, "phase": "forward",
                           "fault_t": now, "ts": now})

        def recovered(generation):
            for rank, pid in pids.items():
                ctl._on_event({"kind": "recovered", "rank": rank, "generation": generation,
                               "pid": pid, "first_step_t": now + generation, "phases": {},
                               "recovery_point": 1, "steps_lost": 0, "ts": now})

        fault(2, 0)
        ctl._decide()
        pids[2] = 202
        ctl._on_event({"kind": "replaced", "rank": 2, "generation": 1, "how": "spare",
                       "pid": 202, "ts": now})
        recovered(1)
        for rank in (1, 3):
            fault(rank, 1)
        ctl._decide()
        assert ctl.recoveries[-1].survivor_pids == {0: 100, 2: 202}
        pids[1], pids[3] = 201, 203
        recovered(2)
        faults = ctl.report()["faults"]
        assert [(f["rank"], f["survivor_pids_unchanged"]) for f in faults] == \
            [(2, True), (1, True), (3, True)]
        # the pid a rank's restart reported is not taken for a later restart's process
        fault(2, 2)
        ctl._decide()
        ctl._on_event({"kind": "replaced", "rank": 2, "generation": 2, "how": "spare",
                       "pid": 999, "ts": now})
        assert ctl.views[2].pid == 0 and ctl.views[2].started_in == 3
    finally:
        ctl.stop()
