"""Nobody outside the job can steer it: forged, malformed and replayed control messages pushed
into a live job's store are rejected and journaled, the job is unaffected, and the token never
appears in the logs, the journal or the report."""

import json
import subprocess
import sys
import time

import pytest

from fr_megatron.events import Journal
from fr_megatron.protocol import keys
from fr_megatron.protocol.auth import Signer
from fr_megatron.protocol.store import connect
from jobs import REPO, TORCH_RECIPE


def _wait_for_address(journal, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if journal.exists():
            for rec in Journal.read(str(journal)):
                if rec["event"] == "controller_started":
                    return rec["address"]
        time.sleep(0.2)
    raise AssertionError("controller did not start")


@pytest.mark.timeout(300)
def test_forged_and_replayed_messages_are_rejected(tmp_path):
    token = "f" * 64
    token_file = tmp_path / "token"
    token_file.write_text(token)
    journal, report = tmp_path / "j.jsonl", tmp_path / "r.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fr_megatron.cli", "run", "--nproc-per-node", "2", "--spares", "0",
         "--no-wandb", "--token-file", str(token_file), "--journal", str(journal), "--report",
         str(report), str(TORCH_RECIPE), "--steps", "40", "--step-sleep", "0.1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    host, port = _wait_for_address(journal, proc).rsplit(":", 1)
    store = connect(host, int(port))
    forger = Signer(b"not the token", "rank1")
    store.queue_push(keys.EVENTS, forger.sign("fault", rank=1, fault="crash", pid=1))  # wrong key
    store.queue_push(keys.EVENTS, json.dumps({"body": '{"kind":"fault","rank":1}'}).encode())
    store.queue_push(keys.EVENTS, b"\x00garbage")
    store.queue_push(keys.EVENTS, b"x" * (70 * 1024))  # oversized
    # a captured genuine message played again: the controller's own generation record
    genuine = store.get(keys.GENERATION)
    store.queue_push(keys.EVENTS, genuine)
    store.queue_push(keys.EVENTS, genuine)
    forged_plan = forger.sign("plan", generation=1, replaced=[0, 1], faults=[])
    store.set(keys.plan(1), forged_plan)  # where the workers wait
    store.set(keys.agent_wake(1), forged_plan)  # where the agent waits
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-4000:]
    rep = json.loads(report.read_text())
    assert rep["faults"] == [] and rep["generations"] == 0 and rep["finished_ranks"] == 2
    assert rep["rejected_messages"] >= 5, rep
    reasons = [r["reason"] for r in Journal.read(str(journal)) if r["event"] == "message_rejected"]
    assert any("HMAC" in r for r in reasons) and any("malformed" in r for r in reasons)
    assert any("oversized" in r for r in reasons) and any("replayed" in r for r in reasons)
    # the agent and both workers ignored the forged plan
    assert "node=0 rejected plan for generation 1" in err
    assert err.count("rejected plan for generation 1") >= 3, err[-4000:]
    for text in (out, err, journal.read_text(), report.read_text()):
        assert token not in text
