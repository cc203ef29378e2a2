"""How a job ends when it is told to, or cannot start: real launchers in sessions of their own,
real signals, every process of the job checked gone afterwards.

- Ctrl-C (SIGINT to the launcher's process group) stops the job at once: exit code 130, the
  report and the journal with the last committed step, nothing left running. Before that, the
  same job shows that a warm spare imports the script's own modules by itself once training has
  started: the rank it takes over starts warm, with no --preload.
- A second Ctrl-C while the ranks save (they said they save on a stop, and do not finish) stops
  the job at once instead of waiting for them. A crash of a rank in the job's first step is a
  start-up crash: it is replaced.
- SIGTERM to the launcher alone (scancel, a preemption) of a Megatron job run with
  --exit-signal-handler --save: every rank saves a checkpoint at the same iteration, then the job
  ends with exit code 143 and says which iteration was saved.
- A start-up failure (a bad flag, an import error, an exception in the first step) stops the job
  at once, with the failing rank's error in the last line and the report, exit code 1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fr_megatron.events import Journal
from jobs import MEGATRON_RECIPE, REPO, TORCH_RECIPE, run_job


class Launched:
    """``fr-megatron run`` in a session of its own (as a terminal's foreground job would be
    a process group of its own), its output in a file."""

    def __init__(self, tmp: Path, script: Path, script_args: list[str], extra: list[str]):
        self.tmp, self.report, self.journal = tmp, tmp / "report.json", tmp / "journal.jsonl"
        self.log = tmp / "launcher.log"
        cmd = [sys.executable, "-m", "fr_megatron.cli", "run", "--no-wandb", "--report",
               str(self.report), "--journal", str(self.journal), *extra, str(script),
               *script_args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=open(self.log, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text()

    def events(self, name: str) -> list[dict]:
        return [e for e in Journal.read(str(self.journal)) if e["event"] == name] \
            if self.journal.exists() else []

    def wait_for(self, what: str, ready, timeout: float = 240) -> None:
        """Wait until ``ready()`` holds (state the job reaches, not a time)."""
        deadline = time.time() + timeout
        while not ready():
            assert self.proc.poll() is None, f"the job ended before {what}:\n{self.output()[-4000:]}"
            assert time.time() < deadline, f"no {what} within {timeout} s:\n{self.output()[-4000:]}"
            time.sleep(0.1)

    def processes(self) -> list[psutil.Process]:
        """Every process of the job: those of its session, whoever their parent is now."""
        out = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == self.proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except (OSError, psutil.Error):
                pass
        return out

    def rank_pid(self, rank: int) -> int:
        """The process that runs ``rank`` now (the journal's worker_started and
        replacement_started events name it)."""
        events = [e for e in Journal.read(str(self.journal))
                  if e["event"] in ("worker_started", "replacement_started") and e["rank"] == rank]
        assert events, f"no process runs rank {rank}:\n{self.output()[-4000:]}"
        return events[-1]["pid"]

    def ended(self, timeout: float = 90) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        for p in self.processes():
            try:
                p.kill()
            except psutil.Error:
                pass


def summary(out: str) -> str:
    """The launcher's one line on how the job ended."""
    (line,) = [ln for ln in out.splitlines() if ln.startswith("fr-megatron run: the job ")]
    return line


def assert_nothing_left(job: Launched) -> None:
    """Every process of the job is gone once its launcher has exited (waited for briefly:
    a killed process leaves the table when its new parent reaps it)."""
    left = job.processes()
    if left:
        psutil.wait_procs(left, timeout=10)
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], [p.cmdline() for p in left]


def ended_with(job: Launched, rc: int, expected: int) -> tuple[str, dict]:
    """A stopped job: its exit code as expected, none of its processes left; its output and
    report."""
    out = job.output()
    assert rc == expected, out[-4000:]
    assert_nothing_left(job)
    return out, json.loads(job.report.read_text())


@pytest.mark.timeout(300)
def test_ctrl_c_stops_the_job_and_a_spare_had_learned_the_scripts_modules(tmp_path):
    # the script imports a module of its own; importing it records who did, and how
    (tmp_path / "probe_mod.py").write_text(
        "import os\n"
        "with open(os.path.join(os.path.dirname(__file__), f'imported.{os.getpid()}'), 'w') as f:\n"
        "    f.write('rank' if 'RANK' in os.environ else 'spare')\n")
    script = tmp_path / "train_with_probe.py"
    script.write_text(f"import runpy\nimport probe_mod  # noqa: F401\n"
                      f"runpy.run_path({str(TORCH_RECIPE)!r}, run_name='__main__')\n")
    job = Launched(tmp_path, script, ["--steps", "2000", "--step-sleep", "0.05"],
                   ["--nproc-per-node", "2", "--spares", "1"])
    try:
        def spare_imported() -> list[int]:
            return [int(p.name.split(".")[1]) for p in tmp_path.glob("imported.*")
                    if p.read_text() == "spare"]

        job.wait_for("a spare importing the script's module", spare_imported)
        (spare,) = spare_imported()
        (learned,) = job.events("spare_modules_learned")
        assert learned["modules"] > 100 and learned["source"] == "rank0"
        os.kill(job.rank_pid(1), signal.SIGKILL)
        job.wait_for("the recovery", lambda: job.events("recovered"))
        (started,) = job.events("replacement_started")
        assert (started["how"], started["pid"]) == ("spare", spare)  # warm: no import of its own

        os.killpg(job.proc.pid, signal.SIGINT)  # Ctrl-C in the job's terminal
        rc = job.ended()
    finally:
        job.kill()
    out, report = ended_with(job, rc, 130)
    stopped = report["stopped"]
    assert stopped["signal"] == "SIGINT" and stopped["save"] is False, stopped
    assert stopped["last_committed_step"] >= 1 and report["exit_code"] == 130
    (end,) = job.events("job_stopped")
    assert end["last_good_step"] == stopped["last_committed_step"]
    assert job.events("job_interrupted")
    line = summary(out)
    assert line.startswith("fr-megatron run: the job was stopped by SIGINT"), line
    assert f"last committed step {stopped['last_committed_step']} " in line
    assert "KeyboardInterrupt" not in out and "terminate called" not in out, out[-4000:]


# a rank that saves on a stop (as Megatron-LM's --exit-signal-handler) but never finishes: its
# SIGTERM handler does nothing
NEVER_SAVES = """
import runpy, signal
from fr_megatron.runtime import Session
from fr_megatron.runtime.stop_signal import save_on_stop

attach = Session.attach
def attach_and_save_on_stop(self, integration):
    attach(self, integration)
    signal.signal(signal.SIGTERM, lambda *_: None)
    save_on_stop(self)
Session.attach = attach_and_save_on_stop
runpy.run_path({recipe!r}, run_name="__main__")
"""


@pytest.mark.timeout(300)
def test_a_second_ctrl_c_stops_the_job_at_once_and_a_startup_crash_is_replaced(tmp_path):
    script = tmp_path / "never_saves.py"
    script.write_text(NEVER_SAVES.format(recipe=str(TORCH_RECIPE)))
    job = Launched(tmp_path, script, ["--steps", "2000", "--step-sleep", "0.05"],
                   ["--nproc-per-node", "2", "--spares", "1", "--stop-timeout", "600",
                    "--inject", "kill:rank=1:step=1:phase=forward"])
    try:
        # killed in the first step, before the job has committed one: a start-up crash, which
        # is replaced (a start-up failure would stop the job: test below)
        job.wait_for("the recovery of the start-up crash", lambda: job.events("recovered"))
        os.killpg(job.proc.pid, signal.SIGINT)
        job.wait_for("the stop", lambda: job.events("stop_requested"))
        (request,) = job.events("stop_requested")
        assert request["save"] is True  # the ranks got SIGTERM and are "saving"
        os.killpg(job.proc.pid, signal.SIGINT)
        rc = job.ended()
    finally:
        job.kill()
    out, report = ended_with(job, rc, 130)
    (fault,) = report["faults"]
    assert (fault["rank"], fault["step"], fault["kind"], fault["replacement"]) == \
        (1, 1, "crash", "spare")
    assert report["stopped"]["forced"] is True and report["stopped"]["save"] is True
    assert report["stopped"]["checkpoint_iteration"] is None
    assert "no checkpoint saved" in summary(out), out[-2000:]


@pytest.mark.timeout(400)
def test_sigterm_to_the_launcher_saves_a_megatron_checkpoint_then_stops(tmp_path):
    ckpt = tmp_path / "ckpt"
    job = Launched(tmp_path, MEGATRON_RECIPE,
                   ["--train-iters", "5000", "--save", str(ckpt), "--save-interval", "3",
                    "--exit-signal-handler", "--flash-recovery", "--dataloader-type", "synthetic"],
                   ["--nproc-per-node", "2", "--spares", "0"])
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    try:
        job.wait_for("the first checkpoint", tracker.exists, timeout=300)
        os.kill(job.proc.pid, signal.SIGTERM)  # the launcher alone, as a scheduler would
        rc = job.ended(timeout=200)
    finally:
        job.kill()
    out, report = ended_with(job, rc, 143)
    stopped = report["stopped"]
    assert stopped["signal"] == "SIGTERM" and stopped["save"] is True and not stopped["forced"]
    saved = int(tracker.read_text())
    # both ranks saved the iteration they stopped after (the newest checkpoint), and said so
    assert stopped["checkpoint_iteration"] == saved >= 3, (stopped, saved)
    assert saved in [e["iteration"] for e in job.events("checkpoint_saved")]
    assert stopped["last_committed_step"] == saved and stopped["ranks_exited"] == 2
    assert f"newest checkpoint: iteration {saved}" in summary(out), out[-2000:]


IMPORT_ERROR = "import no_such_module_for_fr_megatron_tests  # noqa: F401\n"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["bad-flag", "import-error", "exception-in-step-1"])
def test_a_startup_failure_stops_the_job_at_once_with_its_error(tmp_path, case):
    script, args, inject = TORCH_RECIPE, ["--steps", "4"], None
    if case == "bad-flag":
        args, error = ["--steps", "4", "--no-such-flag"], \
            "error: unrecognized arguments: --no-such-flag"
    elif case == "import-error":
        script = tmp_path / "broken.py"
        script.write_text(IMPORT_ERROR)
        error = "ModuleNotFoundError: No module named 'no_such_module_for_fr_megatron_tests'"
    else:
        inject, error = "exception:rank=1:step=1:phase=backward", \
            "InjectedFault: injected exception at step 1 phase backward"
    job = run_job(tmp_path, script, args, nproc=2, spares=1, inject=inject, timeout=240)
    assert job.rc == 1, job.failure()
    assert job.report["fatal"].count(error) == 1 and "during start-up" in job.report["fatal"]
    assert error in job.report["startup_error"]
    assert job.report["generations"] == 0 and job.report["faults"] == []  # nothing replaced
    (reported,) = [e for e in job.journal if e["event"] == "fault_reported"]
    (stopped,) = [e for e in job.journal if e["event"] == "job_stopped"]
    assert stopped["startup"] is True and stopped["rank"] == reported["rank"]
    line = summary(job.output)
    assert line.startswith("fr-megatron run: the job failed: rank ") and error in line, line


# a script whose rank 1 fails after training, as a final save that raises would
FAILS_AFTER_TRAINING = """
import os, runpy, sys
runpy.run_path({recipe!r}, run_name="__main__")
if os.environ["RANK"] == "1":
    sys.exit(3)
"""


@pytest.mark.timeout(120)
def test_a_rank_whose_script_fails_after_training_fails_the_job(tmp_path):
    script = tmp_path / "fails_after_training.py"
    script.write_text(FAILS_AFTER_TRAINING.format(recipe=str(TORCH_RECIPE)))
    job = run_job(tmp_path, script, ["--steps", "3"], nproc=2, spares=0, timeout=100)
    assert job.rc == 1, job.failure()
    assert job.report["finished_ranks"] == 2 and job.report["faults"] == [], job.report
    (failed,) = job.report["failed_after_training"]
    assert (failed["rank"], failed["kind"], failed["exit_code"]) == (1, "exit", 3), failed
    (event,) = [e for e in job.journal if e["event"] == "rank_failed_after_training"]
    assert (event["rank"], event["exit_code"]) == (1, 3), event
    assert ("fr-megatron run: training finished, then the script failed on rank 1 (exit code "
            "3)") in job.output, job.output[-3000:]
