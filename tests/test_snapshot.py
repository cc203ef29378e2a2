"""The step transaction of one rank, in one process: a commit's snapshot is copied in the
background while the next step's forward and backward run, and the optimizer's step waits for it.

The copy is held back on a gate the test opens, so the order of events is the test's, not a
race: without the wait in the optimizer's step pre-hook, the step would change the parameters
before the copy reads them and the snapshot would hold the next step's values.
"""

import threading

import pytest
import torch

from fr_megatron.config import FlashRecoveryConfig
from fr_megatron.runtime import snapshot
from fr_megatron.runtime.integration import RankState, TorchIntegration
from fr_megatron.runtime.transaction import StepTransaction, capture

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def gate(monkeypatch):
    """Copies into a snapshot start only once the returned event is set."""
    opened = threading.Event()
    copy = snapshot._copy_and_hash

    def gated(*args):
        assert opened.wait(30), "the test never opened the gate"
        return copy(*args)

    monkeypatch.setattr(snapshot, "_copy_and_hash", gated)
    return opened


def _job(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    integration = TorchIntegration(model, opt, ddp=False)
    tx = StepTransaction(0, FlashRecoveryConfig(), str(tmp_path))
    tx.guard(integration.optimizers())

    def step():
        opt.zero_grad()
        model(torch.randn(8, 256)).square().mean().backward()
        opt.step()
    step()  # the optimizer has its moments from here on
    return integration, tx, step


def _copy(state):
    return {k: v.clone() for part in (state.replicated, state.unique) for k, v in part.items()}


def test_optimizer_step_waits_for_the_snapshot_copied_in_the_background(tmp_path, gate):
    integration, tx, step = _job(tmp_path)
    tx.commit(1, capture(integration, 1))
    committed = _copy(integration.capture())
    assert tx.durable_step < 1  # the copy is still waiting at the gate: not durable yet
    threading.Timer(0.3, gate.set).start()
    step()  # forward and backward go on; the optimizer's step waits for the copy
    assert tx.ring.steps() == [1]  # sealed before the optimizer changed the state
    saved = _copy(tx.ring.get(1))
    live = _copy(integration.capture())
    assert saved.keys() == committed.keys()
    assert all(torch.equal(saved[k], committed[k]) for k in committed)
    assert not all(torch.equal(live[k], committed[k]) for k in committed)  # the step did change it
    assert tx.ring.steps() == [1]


def test_fault_during_the_background_copy_keeps_the_committed_step(tmp_path, gate):
    """A fault while the copy runs: the recovery waits for it (``abandon``) before it reads the
    ring or restores the live tensors, and the step is there, checksums verified."""
    integration, tx, _ = _job(tmp_path)
    tx.commit(1, capture(integration, 1))
    committed = _copy(integration.capture())
    threading.Timer(0.3, gate.set).start()
    tx.abandon()
    assert tx.ring.steps() == [1]
    saved = _copy(tx.ring.get(1, verify=True))
    assert all(torch.equal(saved[k], committed[k]) for k in committed)


def test_live_state_is_the_commit_until_a_guarded_optimizer_steps(tmp_path):
    """A recovery to the last commit restores only the meta of a rank whose live tensors are
    still the commit's (``Recovery._live_state``): that holds from the commit (or a restore)
    until the next step of an optimizer the transaction guards, and never without one."""
    integration, tx, step = _job(tmp_path)
    assert not tx.live_is(0)  # nothing committed yet
    tx.commit(1, capture(integration, 1))
    assert tx.live_is(1) and not tx.live_is(0)
    committed = _copy(integration.capture())
    step()  # the optimizer steps: the live tensors are the next step's now
    assert not tx.live_is(1)
    assert not all(torch.equal(v, committed[k]) for k, v in _copy(integration.capture()).items())
    tx.settled(1)  # a recovery restored step 1 in place
    assert tx.live_is(1)
    tx.close()
    unguarded = StepTransaction(0, FlashRecoveryConfig(), str(tmp_path / "unguarded"))
    unguarded.commit(1, capture(integration, 1))  # nothing says when its tensors change
    assert not unguarded.live_is(1)
    unguarded.close()


def test_snapshot_that_fails_to_seal_is_not_a_step(tmp_path, monkeypatch):
    def broken(*args):
        raise OSError("no room")

    integration, tx, _ = _job(tmp_path)
    tx.commit(1, capture(integration, 1))
    tx.before_optimizer()
    monkeypatch.setattr(snapshot, "_copy_and_hash", broken)
    tx.commit(2, capture(integration, 2))
    with pytest.raises(OSError, match="no room"):
        tx.before_optimizer()  # the training thread learns of it before the state changes
    assert tx.ring.steps() == [1]
    tx.abandon()  # after a fault: nothing left to raise


def test_replacement_checks_the_slots_it_inherits_and_drops_a_corrupted_one(tmp_path):
    """A new process of the rank adopts the slots in shared memory, checks both (at once), and
    offers only the one whose bytes still match their checksums."""
    integration, tx, step = _job(tmp_path)
    tx.commit(1, capture(integration, 1))
    step()
    tx.commit(2, capture(integration, 2))
    tx.wait_durable()
    good = _copy(tx.ring.get(2))
    bad = tx.ring.slot(1)
    bad.region("replicated")[7] ^= 0xFF  # as bad memory would
    inherited = snapshot.SnapshotRing(tx.ring.depth, str(tmp_path), "rank0")
    assert inherited.steps() == [1, 2]
    dropped = inherited.validate()
    assert [s for s, _ in dropped] == [1] and "checksum mismatch" in dropped[0][1]
    assert inherited.steps() == [2]
    again = _copy(inherited.get(2))
    assert all(torch.equal(again[k], good[k]) for k in good)


def test_process_memory_snapshots_handed_over_to_the_replacement_and_checked(tmp_path):
    """A rank whose snapshots are in process memory writes them to the agent's hand-over
    directory as it leaves as faulty; its replacement loads them into its own memory, removes
    the files, and offers only what still matches its checksums."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    integration = TorchIntegration(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                   ddp=False)
    handover = tmp_path / "handover"
    handover.mkdir()
    cfg = FlashRecoveryConfig(snapshot_dir="")
    tx = StepTransaction(3, cfg, None, str(handover))
    assert not tx.ring.in_shared_memory
    for step in (1, 2):
        model.weight.data += step
        tx.commit(step, capture(integration, step))
    tx.wait_durable()
    assert tx.hand_over() == 2 * tx.ring.slot(2).layout.total
    good = _copy(tx.ring.get(2))
    # a byte of step 1's file goes bad before the replacement reads it
    files = sorted(p.name for p in handover.iterdir())
    assert files == [f"rank3.slot{i}.{ext}" for i in (0, 1) for ext in ("bin", "hdr")]
    slot_of_1 = tx.ring.slots.index(tx.ring.slot(1))
    with open(handover / f"rank3.slot{slot_of_1}.bin", "r+b") as f:
        f.seek(5)
        byte = f.read(1)
        f.seek(5)
        f.write(bytes([byte[0] ^ 0xFF]))
    replacement = StepTransaction(3, cfg, None, str(handover))
    assert replacement.ring.steps() == [1, 2] and not replacement.ring.in_shared_memory
    assert list(handover.iterdir()) == []  # taken: nothing is left behind on the node
    dropped = replacement.ring.validate()
    assert [s for s, _ in dropped] == [1] and "checksum mismatch" in dropped[0][1]
    again = _copy(replacement.ring.get(2))
    assert all(torch.equal(again[k], good[k]) for k in good)
    # another rank on the node finds nothing of rank 3's
    assert StepTransaction(2, cfg, None, str(handover)).ring.steps() == []


@pytest.mark.timeout(30)
def test_background_calls_share_one_thread_and_a_stuck_one_holds_nothing_up():
    """The snapshot's seal and the copies' exchange run on a thread started once (a thread
    start per step makes the training thread wait for the scheduler); a call handed over while
    the last one hangs (an exchange gloo never ends) runs on a new thread at once."""
    from fr_megatron.runtime.background import Worker

    worker = Worker("test-worker")
    threads = [worker.submit(threading.get_ident).result(5) for _ in range(5)]
    assert len(set(threads)) == 1 and threads[0] != threading.get_ident()
    with pytest.raises(ZeroDivisionError):
        worker.submit(lambda: 1 / 0).result(5)
    release = threading.Event()
    stuck = worker.submit(release.wait, 20)
    after = worker.submit(threading.get_ident).result(5)  # not behind the stuck call
    assert after != threads[0] and not stuck.done()
    assert worker.submit(threading.get_ident).result(5) == after  # the new thread serves on
    release.set()
    assert stuck.result(5) is True
    assert worker.submit(threading.get_ident).result(5) == after


def test_a_closed_transaction_leaves_no_seal_running(tmp_path, gate):
    """The job's end waits for the last commit's seal: its thread, still inside a copy or a
    checksum as the interpreter exits, would abort the process (seen on a GPU with 4.9 GB)."""
    integration, tx, _ = _job(tmp_path)
    tx.commit(1, capture(integration, 1))
    assert 1 not in [s.step for s in tx.ring.slots]  # held at the gate
    threading.Timer(0.3, gate.set).start()
    tx.close()
    assert 1 in [s.step for s in tx.ring.slots]  # sealed before close returned


def test_checksums_of_regions_over_one_block_are_hashed_by_block(tmp_path, monkeypatch):
    """A region longer than a block is hashed block by block (on several threads) and the copy
    that hashes as it goes gets the same checksum; a flipped byte in any block is caught."""
    from fr_megatron.runtime import layout

    monkeypatch.setattr(layout, "BLOCK", 4096)
    gen = torch.Generator().manual_seed(1)
    for n in (1, 4095, 4096, 4097, 3 * 4096 + 5):
        data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
        h = layout.BlockHasher()
        for piece in data.split(1000):
            h.update(piece.numpy())
        assert h.hexdigest() == layout.checksum(data), n
    integration, tx, _ = _job(tmp_path)  # a 256x256 fp32 layer and its moments: 192 blocks
    tx.commit(1, capture(integration, 1))
    tx.close()
    slot = tx.ring.slot(1)
    slot.verify(snapshot.PARTS)
    part = max(snapshot.PARTS, key=lambda p: slot.region(p).numel())
    region = slot.region(part)
    assert len(region) > 100 * layout.BLOCK
    region[len(region) - 10] ^= 0xFF  # in its last block
    slot.seal(dict(slot.header))  # as a process that adopts the slot finds it: not yet verified
    with pytest.raises(layout.ChecksumError, match=part):
        tx.ring.slot(1).verify(snapshot.PARTS)


def test_deferred_copy_waits_for_start_and_a_copy_holder_does_not_start_it(tmp_path):
    """A GPU commit's copy waits until the next step's first forward is queued (``start``):
    until then it has read nothing, a copy holder's exchange thread waiting for the seal does
    not start it, and a wait on the training thread does."""
    t = torch.arange(4096, dtype=torch.float32)
    ring = snapshot.SnapshotRing(2, str(tmp_path))
    ring.write(1, RankState({"w": t}, {}, {}), defer=True)
    holder = threading.Thread(target=ring.wait, kwargs={"start": False})
    holder.start()
    holder.join(0.3)
    assert holder.is_alive()  # not started, so not sealed
    t += 1  # nothing was copied yet: the snapshot takes the tensor as it is at ``start``
    ring.start()
    holder.join(30)
    assert not holder.is_alive()
    assert ring.steps() == [1]
    assert torch.equal(ring.get(1).replicated["w"], t)

    ring.write(2, RankState({"w": t}, {}, {}), defer=True)
    ring.wait()  # the training thread's wait starts it
    assert ring.steps() == [1, 2]


def test_copy_of_host_tensors_is_never_deferred(tmp_path, gate):
    """``defer_copy`` holds back device-to-host copies only: a copy on the host starts at the
    commit, as it needs all the time there is before the optimizer's step."""
    integration, tx, _ = _job(tmp_path)
    tx.defer_copy = True
    tx.commit(1, capture(integration, 1))
    gate.set()
    # a copy holder's wait starts nothing: it ends only because the copy started at the commit
    holder = threading.Thread(target=tx.ring.wait, kwargs={"start": False})
    holder.start()
    holder.join(30)
    assert not holder.is_alive()
    assert 1 in [s.step for s in tx.ring.slots]


def test_megatron_forward_step_reports_its_forward_queued_after_it_returns():
    """The megatron integration's word for ``Session.forward_issued``: after the forward step
    (its batch read, its kernels launched), never before."""
    from fr_megatron.megatron import phases

    calls = []

    def forward_step(data_iterator, model):
        calls.append("forward_step")
        return torch.zeros(1), None

    wrapped = phases.wrap_forward_step(forward_step, calls.append, lambda: calls.append("issued"))
    wrapped(None, None)
    assert calls == ["forward", "forward_step", "issued"]
