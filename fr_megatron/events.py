"""Recovery events: one record per event, to the JSON-lines journal, the log and wandb.

The controller is the one writer. Every record carries time, generation, rank, step and phase,
so the journal alone can replay what happened to the job. wandb is optional and lives behind
a queue on its own thread: a missing or failing wandb never blocks or breaks training.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from typing import Any, Optional

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
                                       if k not in ("traceback",)))
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


class WandbSink:
    """Logs recoveries to wandb from a background thread; never raises into the caller."""

    def __init__(self, cfg, run_name: str, config: dict | None = None):
        self._q: queue.Queue = queue.Queue()
        self.cfg = cfg
        self.run_name = run_name
        self.config = config or {}
        self.run_dir: Optional[str] = None
        self.error: Optional[str] = None
        self._counts: dict[str, int] = {}
        self._thread = threading.Thread(target=self._loop, name="fr-wandb", daemon=True)
        self._thread.start()

    def recovery(self, fault: dict, phases: dict, steps_lost: int, replacement: str,
                 generation: int):
        self._q.put(("recovery", dict(fault=fault, phases=phases, steps_lost=steps_lost,
                                      replacement=replacement, generation=generation)))

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
                             reinit=True)
            self.run_dir = getattr(run, "dir", None)
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
                n += 1
                f = item["fault"]
                kind_key = f"recovery/faults_{f.get('kind')}"
                self._counts[kind_key] = self._counts.get(kind_key, 0) + 1
                row = {"recovery/index": n, "recovery/generation": item["generation"],
                       "recovery/rank": f.get("rank"), "recovery/fault_step": f.get("step"),
                       "recovery/kind": f.get("kind"), "recovery/fault_phase": f.get("phase"),
                       "recovery/steps_lost": item["steps_lost"],
                       "recovery/replacement_spare": int(item["replacement"] == "spare")}
                row.update({f"recovery/phase_{k}_s": v for k, v in item["phases"].items()})
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
