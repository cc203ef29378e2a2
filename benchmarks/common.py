"""Shared by the benchmarks: running jobs, percentiles, tables, where results go."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summary(values: list[float]) -> dict:
    return {"n": len(values), "p50": percentile(values, 0.5), "p95": percentile(values, 0.95),
            "mean": statistics.fmean(values) if values else None}


def read_cpu_timings(directory: Path) -> list[dict[int, list[float]]]:
    """The recipe's ``--cpu-timings DIR``: per rank, iteration -> [CPU seconds of the process,
    of its training thread]."""
    return [{int(k): v for k, v in json.loads(f.read_text()).items()}
            for f in sorted(Path(directory).glob("rank*.json"))]


def cpu_per_rank_step(runs: list[list[dict]], skip: int) -> tuple[float, float] | tuple[None, None]:
    """Medians over every rank and iteration past ``skip`` of ``read_cpu_timings`` outputs: the
    process's and the training thread's CPU seconds per rank-step."""
    cpu = [c for ranks in runs for r in ranks for i, c in r.items() if i > skip]
    if not cpu:
        return None, None
    return statistics.median(c[0] for c in cpu), statistics.median(c[1] for c in cpu)


def run_fr_job(script: Path, args: list[str], *, nproc: int, inject: str | None, spares: int,
               report: Path, extra: list[str] = (), timeout: float = 900,
               log: Path | None = None, check: bool = True) -> dict:
    """Run one ``fr-megatron run`` job; its JSON report. ``check=False``: a job that failed
    returns its report all the same (it says why, in ``fatal``), with ``rc`` added."""
    cmd = [sys.executable, "-m", "fr_megatron.cli", "run", "--nproc-per-node", str(nproc),
           "--spares", str(spares), "--no-wandb", "--report", str(report), *extra]
    if inject:
        cmd += ["--inject", inject]
    cmd += [str(script), *args]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if log is not None:
        log.write_text(p.stdout + p.stderr)
    if p.returncode != 0 or not report.exists():
        if check:
            raise RuntimeError(f"job failed ({p.returncode}): {p.stderr[-2000:]}")
        if not report.exists():
            return {"rc": p.returncode, "faults": [],
                    "fatal": f"no report (exit {p.returncode}): {p.stderr[-500:]}"}
    return {**json.loads(report.read_text()), "rc": p.returncode}


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def write(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2))
    return path
