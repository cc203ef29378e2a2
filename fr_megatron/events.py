"""Recovery events: one record per event, to the JSON-lines journal, the log and wandb.

The controller is the one writer of the journal. Every record carries time, generation, rank,
step and phase, so the journal alone can replay what happened to the job. wandb is optional: the
controller's run lives behind a queue on its own thread, and a missing or failing wandb never
blocks or breaks training.

A training script that logs its metrics to a wandb run of its own (Megatron-LM's
``--wandb-project``, written by the last rank) also gets each recovery in that run, at the
iteration training resumed from (``log_to_script_run``), so the loss curve and its faults are
on one page; the launcher's run is in the same wandb group (``WANDB_RUN_GROUP``).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from typing import Any, Callable, Optional

log = logging.getLogger("fr_megatron.events")

# keys that must never leave the process in an event (the job token travels as a file path)
_SECRET_KEYS = {"token", "FR_TOKEN", "mac"}


def _clean(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if k not in _SECRET_KEYS}


class Journal:
    """Append-only JSON-lines event journal."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.records: list[dict] = []
        self._lock = threading.Lock()
        self._file = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open(path, "a", buffering=1)

    def write(self, event: str, *, generation: int, rank: Any = None, step: Any = None,
              phase: Any = None, **fields) -> dict:
        rec = {"time": time.time(), "generation": generation, "rank": rank, "step": step,
               "phase": phase, "event": event, **_clean(fields)}
        with self._lock:
            self.records.append(rec)
            if self._file:
                self._file.write(json.dumps(rec, default=str) + "\n")
        log.info("event=%s generation=%s rank=%s step=%s phase=%s %s", event, generation, rank,
                 step, phase, " ".join(f"{k}={v}" for k, v in _clean(fields).items()
                                       if k not in ("traceback", "stderr")))
        return rec

    def close(self):
        with self._lock:
            if self._file:
                self._file.close()
                self._file = None

    @staticmethod
    def read(path: str) -> list[dict]:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    @staticmethod
    def wait_for(path: str, event: str, timeout: float,
                 alive: Callable[[], bool] = lambda: True) -> Optional[dict]:
        """The first ``event`` a running job's journal gets, read as it grows; None when it has
        not come within ``timeout`` seconds or ``alive()`` turned false (the job ended)."""
        deadline = time.monotonic() + timeout
        pos, partial = 0, ""
        while time.monotonic() < deadline and alive():
            if os.path.exists(path):
                with open(path) as f:
                    f.seek(pos)
                    partial += f.read()
                    pos = f.tell()
                *lines, partial = partial.split("\n")
                for line in filter(str.strip, lines):
                    entry = json.loads(line)
                    if entry["event"] == event:
                        return entry
            time.sleep(0.1)
        return None


class WandbSink:
    """Logs recoveries to wandb from a background thread; never raises into the caller."""

    def __init__(self, cfg, run_name: str, config: dict | None = None,
                 group: Optional[str] = None):
        self._q: queue.Queue = queue.Queue()
        self.cfg = cfg
        self.run_name = run_name
        self.config = config or {}
        self.group = group
        self.run_dir: Optional[str] = None
        self.error: Optional[str] = None
        self._counts: dict[str, int] = {}
        self._thread = threading.Thread(target=self._loop, name="fr-wandb", daemon=True)
        self._thread.start()

    def recovery(self, fault: dict, phases: dict, steps_lost: int, replacement: str,
                 generation: int):
        self._q.put(("recovery", dict(fault=fault, phases=phases, steps_lost=steps_lost,
                                      replacement=replacement, generation=generation)))

    def sizes(self, step: int, sizes: dict):
        """The job's world and data-parallel sizes from ``step`` on, a row on the ``job/step``
        axis (see ``Controller._show_sizes``)."""
        self._q.put(("sizes", {"job/step": step, **{f"job/{k}": v for k, v in sizes.items()}}))

    def close(self, timeout: float = 60.0):
        self._q.put(("close", None))
        self._thread.join(timeout)

    def _loop(self):
        run = None
        try:
            os.environ.setdefault("WANDB_MODE", self.cfg.mode or "offline")
            if self.cfg.mode:
                os.environ["WANDB_MODE"] = self.cfg.mode
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            run = wandb.init(project=self.cfg.project, name=self.run_name, dir=self.cfg.dir,
                             tags=["flash-recovery", *self.cfg.tags], config=self.config,
                             group=self.group, reinit=True)
            self.run_dir = getattr(run, "dir", None)
            run.define_metric("job/step")
            run.define_metric("job/*", step_metric="job/step")
        except Exception as e:  # wandb missing or broken: recoveries still go to the journal
            self.error = f"{type(e).__name__}: {e}"
            log.warning("wandb disabled: %s", self.error)
        n = 0
        while True:
            kind, item = self._q.get()
            if kind == "close":
                break
            if run is None:
                continue
            try:
                if kind == "sizes":
                    run.log(item)
                    continue
                n += 1
                f = item["fault"]
                kind_key = f"recovery/faults_{f.get('kind')}"
                self._counts[kind_key] = self._counts.get(kind_key, 0) + 1
                row = {"recovery/index": n, **recovery_row(f, item["phases"], item["steps_lost"],
                                                            item["generation"]),
                       "recovery/replacement_spare": int(item["replacement"] == "spare")}
                run.log(row)
                run.summary["recoveries"] = n
                run.summary.update(self._counts)
                run.summary["last_fault"] = {**f, "replacement": item["replacement"]}
                run.summary["steps_lost_total"] = run.summary.get("steps_lost_total", 0) + item["steps_lost"]
            except Exception as e:
                log.warning("wandb logging failed, going on: %s", e)
        try:
            if run is not None:
                run.finish()
        except Exception as e:
            log.warning("wandb finish failed: %s", e)


def recovery_row(fault: dict, phases: dict, steps_lost: int, generation: int) -> dict:
    """One recovery as wandb metrics (``recovery/...``): the fault, each phase's seconds, the
    steps lost."""
    row = {"recovery/generation": generation, "recovery/rank": fault.get("rank"),
           "recovery/fault_step": fault.get("step"), "recovery/kind": fault.get("kind"),
           "recovery/fault_phase": fault.get("phase"), "recovery/steps_lost": steps_lost}
    if "action" in fault:  # what was done: "replace", or "shrink" with the sizes after it
        row["recovery/action"] = fault["action"]
        row.update({f"recovery/{k}": fault[k] for k in ("world_size", "data_parallel_size")
                    if fault.get(k) is not None})
    row.update({f"recovery/phase_{k}_s": v for k, v in phases.items() if v is not None})
    return row


def log_recovery_to_script_run(rep: dict, faults: list[dict], generation: int,
                               iteration: int) -> bool:
    """A rank's report of a recovery (``Session``) in the script's own wandb run, if it has one:
    the fault (the first, when several were recovered together) with its detection time from
    the plan, the phases, the steps lost."""
    f = (faults or [{}])[0]
    row = {**recovery_row(f, {"detect": f.get("detect_s"), **rep.get("phases", {})},
                          rep.get("steps_lost", 0), generation),
           "recovery/faults": len(faults), "recovery/recovery_point": rep.get("recovery_point")}
    return log_to_script_run(row, iteration)


def log_to_script_run(row: dict, iteration: int) -> bool:
    """Log ``row`` into the wandb run this process's training script opened, if it has one, at
    ``iteration`` (or the run's current step, when it is already past it: wandb drops rows
    logged at an older step), uncommitted, so that the script's own metrics of that iteration
    join the same row. wandb is never imported here; any error is logged, not raised. Returns
    whether the row went to a run."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return False
    try:
        step = max(int(iteration), int(getattr(run, "step", 0) or 0))
        run.log({**row, "recovery/iteration": iteration}, step=step, commit=False)
        return True
    except Exception as e:  # noqa: BLE001 - the script's run must never break training
        log.warning("could not log the recovery into the script's wandb run: %s", e)
        return False
