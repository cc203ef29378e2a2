"""Recovery time, host memory of the redundancy and step-time overhead, 8-rank tiny megatron GPT.

The job is ``recipes/megatron/pretrain_gpt.py`` (TP=2 x PP=2 x DP=2, DistributedOptimizer, gloo on
CPU) under ``fr-megatron run --nproc-per-node 8``, started through ``benchmarks/recovery_probe.py``,
which runs the recipe unchanged and reads the runtime's buffers when training ends.

(a) recovery: one job with ``--flash-recovery``, ``--trials`` SIGKILLs in backward, one per step, at
    different steps and ranks, warm spares preloaded with megatron-core. Per fault, from the job's
    ``--report``: fault to the first step completed after it (``recovery_s``; it contains the
    redone step, ``resume``) and its phases (detect, abort, rebuild, restore, resume).
(b) memory: per rank, the bytes of the snapshot ring (``Session.ring``, depth 2) and of the
    redundant copies the rank holds for its wards (``Session.copies``, 1 replica x depth 2), next
    to the state they protect (``MegatronIntegration.capture()``: parameters and buffers, which
    are replicated over DP; optimizer shards, which are unique), read from the live objects at the
    end of job (a); plus the resident memory of each rank with recovery on and off (from (c)).
(c) overhead: ``--reps`` runs with and ``--reps`` runs without ``--flash-recovery``, interleaved
    (off/on, on/off, ...), no faults, no spares (an idle spare blocks on its stdin; its start-up
    would only compete with the first steps). Both under ``fr-megatron run`` with
    ``TORCHELASTIC_USE_AGENT_STORE=True`` (what torchrun sets: the plain env:// init then joins the
    controller's store instead of binding MASTER_PORT a second time). Per-step time is parsed from
    rank 0's log lines ``iteration N/M | lm loss X | T s`` (T: the time since the previous line, so
    it includes the commit), without the first ``--skip`` steps. Next to it the CPU seconds of a
    step per rank (the recipe's ``--cpu-timings``: the process, and its training thread), medians
    over every rank and step: with 8 ranks on 2 cores the wall time is the CPU shared out by the
    scheduler and moves by 10 % and more between runs, a rank's CPU per step much less.

Targets are printed next to the figures, never asserted: recovery under 1.5 s, overhead at most 3 %.

    python -m benchmarks.recovery [--trials 2] [--reps 2] [--steady-iters 10]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fr_megatron.launcher.spare import MEGATRON_PRELOAD as PRELOAD

from .common import (REPO, cpu_per_rank_step, percentile, read_cpu_timings, summary, table,
                     write)

PROBE = REPO / "benchmarks" / "recovery_probe.py"
WORLD = 8
FAULT_RANKS = (5, 2, 6, 1, 7, 3, 4, 0)  # both pipeline stages, both TP and DP positions
RECOVERY_TARGET_S = 1.5
OVERHEAD_TARGET = 0.03
LINE = re.compile(r"iteration (\d+)/(\d+) \| lm loss (\S+) \| ([0-9.]+) s")


def model_args(a) -> list[str]:
    return ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
            "--num-layers", str(a.num_layers), "--hidden-size", str(a.hidden_size),
            "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--use-distributed-optimizer"]


def run_job(a, work: Path, *, flash: bool, iters: int, spares: int, inject: str | None) -> dict:
    """One ``fr-megatron run`` job; its log lines, report and probe read-outs."""
    work.mkdir(parents=True, exist_ok=True)
    probe_dir = work / "probe"
    probe_dir.mkdir(exist_ok=True)
    report, journal = work / "report.json", work / "journal.jsonl"
    cmd = [sys.executable, "-m", "fr_megatron.cli", "run", "--nproc-per-node", str(WORLD),
           "--spares", str(spares), "--no-wandb", "--report", str(report), "--journal",
           str(journal), "--preload", PRELOAD]
    if inject:
        cmd += ["--inject", inject]
    cmd += [str(PROBE), *model_args(a), "--train-iters", str(iters),
            "--cpu-timings", str(work / "cpu")]
    if flash:
        cmd.append("--flash-recovery")
    env = dict(os.environ, TORCHELASTIC_USE_AGENT_STORE="True", FR_BENCH_PROBE_DIR=str(probe_dir))
    load_before = os.getloadavg()
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=a.timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"job timed out after {a.timeout}s: {' '.join(cmd)}") from e
    wall = time.time() - t0
    out = p.stdout + p.stderr
    (work / "output.log").write_text(out)
    if p.returncode != 0:
        raise RuntimeError(f"job failed ({p.returncode}), output in {work / 'output.log'}:\n"
                           f"{out[-3000:]}")
    lines = [(int(m[1]), float(m[4]), m[3]) for m in LINE.finditer(out)]
    probes = [json.loads(f.read_text()) for f in sorted(probe_dir.glob("rank*.json"))]
    return {"flash": flash, "wall_s": wall, "load_before": load_before,
            "load_after": os.getloadavg(), "lines": lines,
            "report": json.loads(report.read_text()) if report.exists() else None,
            "probes": probes, "cpu": read_cpu_timings(work / "cpu")}


# ---------------------------------------------------------------- (a) recovery


def fault_spec(trials: int, first: int, spacing: int) -> str:
    return ";".join(f"kill:rank={FAULT_RANKS[t % len(FAULT_RANKS)]}:step={first + spacing * t}"
                    ":phase=backward" for t in range(trials))


def recovery_rows(job: dict) -> list[dict]:
    rows = []
    for f in job["report"]["faults"]:
        ph = f.get("phases") or {}
        rec = f.get("recovery_s")
        rows.append({"rank": f["rank"], "step": f["step"], "phase": f["phase"],
                     "recovery_s": rec, "detect_s": ph.get("detect"), "abort_s": ph.get("abort"),
                     "rebuild_s": ph.get("rebuild"), "restore_s": ph.get("restore"),
                     "resume_s": ph.get("resume"),
                     "recovery_minus_resume_s": None if rec is None or ph.get("resume") is None
                     else rec - ph["resume"],
                     "replacement": f.get("replacement"),
                     "spare_join_s": f.get("replacement_join_s"),
                     "steps_lost": f.get("steps_lost"),
                     "survivors_kept": f.get("survivor_pids_unchanged"),
                     "target_s": RECOVERY_TARGET_S,
                     "met": None if rec is None else rec < RECOVERY_TARGET_S})
    return rows


# ---------------------------------------------------------------- (b) memory


def memory_rows(probes: list[dict]) -> list[dict]:
    rows = []
    for pr in sorted(probes, key=lambda p: p["rank"]):
        if not pr.get("flash_recovery"):
            continue
        st, ring, cp = pr["state"], pr["ring"], pr["copies"]
        protected = st["replicated_bytes"] + st["unique_bytes"]
        ring_b = ring["tensor_bytes"]
        held = cp["data_bytes"]
        rows.append({
            "rank": pr["rank"], "replacement": pr["replacement"],
            "params_KiB": st["replicated_bytes"] / 1024,
            "optim_shard_KiB": st["unique_bytes"] / 1024,
            "meta_KiB": st["meta_pickled_bytes"] / 1024,
            "ring_KiB": ring_b / 1024, "ring_steps": len(ring["steps"]),
            "ring_x_state": ring_b / protected if protected else None,
            "ring_meta_KiB": ring["meta_pickled_bytes"] / 1024,
            "copies_KiB": held / 1024,
            "wards": ",".join(map(str, cp["wards"])),
            "copies_x_optim": held / st["unique_bytes"] if st["unique_bytes"] else None,
            "total_KiB": (ring_b + ring["meta_pickled_bytes"] + held) / 1024,
            "total_x_state": (ring_b + ring["meta_pickled_bytes"] + held) / protected
            if protected else None,
            "rss_MiB": pr["rss_bytes"] / 2**20,
        })
    return rows


# ---------------------------------------------------------------- (c) overhead


def step_times(job: dict, skip: int) -> list[float]:
    return [t for it, t, _ in job["lines"] if it > skip]


def overhead(on_jobs: list[dict], off_jobs: list[dict], pairs: list[tuple], skip: int) -> dict:
    res = {}
    for name, jobs in (("on", on_jobs), ("off", off_jobs)):
        pooled = [t for j in jobs for t in step_times(j, skip)]
        medians = [statistics.median(step_times(j, skip)) for j in jobs]
        rss = [p["rss_bytes"] / 2**20 for j in jobs for p in j["probes"]]
        # CPU of the runtime's own threads (heartbeat, plan monitor, copy exchange) per rank and
        # step; the commit itself runs on the training thread and shows in the step time
        fr_ms = [1e3 * sum(v for pr in j["probes"] for k, v in pr.get("thread_cpu_s", {}).items()
                           if k.startswith("fr-")) / max(1, len(j["probes"]) * len(j["lines"]))
                 for j in jobs]
        # CPU seconds per rank and step: with 8 ranks on 2 cores the wall time is the machine's
        # CPU shared out, this what a step costs
        cpu, cpu_thread = cpu_per_rank_step([j["cpu"] for j in jobs], skip)
        res[name] = {"steps": len(pooled), "median_s": statistics.median(pooled),
                     "p25_s": percentile(pooled, 0.25), "p75_s": percentile(pooled, 0.75),
                     "min_s": min(pooled), "max_s": max(pooled),
                     "cpu_ms_per_rank_step": None if cpu is None else 1e3 * cpu,
                     "cpu_thread_ms_per_rank_step": None if cpu is None else 1e3 * cpu_thread,
                     "run_medians_s": medians, "rss_median_MiB": statistics.median(rss)
                     if rss else None, "fr_threads_ms_per_rank_step": statistics.median(fr_ms),
                     "load_1m": [j["load_after"][0] for j in jobs]}
    pooled = res["on"]["median_s"] / res["off"]["median_s"] - 1
    paired = [statistics.median(step_times(on, skip)) / statistics.median(step_times(off, skip)) - 1
              for on, off in pairs]
    res["overhead_pooled"] = pooled
    on_cpu, off_cpu = (res[m]["cpu_ms_per_rank_step"] for m in ("on", "off"))
    res["cpu_overhead"] = on_cpu / off_cpu - 1 if on_cpu and off_cpu else None
    res["overhead_paired"] = paired
    res["overhead_paired_median"] = statistics.median(paired)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=3, help="faults in the recovery job")
    p.add_argument("--first-fault", type=int, default=4, help="step of the first fault")
    p.add_argument("--spacing", type=int, default=80,
                   help="steps between faults (~20 s here: the spares refilled after a fault "
                        "import torch and megatron-core meanwhile, on the same cores)")
    p.add_argument("--spares", type=int, default=None,
                   help="warm spares in the recovery job (default: one per fault, so every "
                        "replacement is warm)")
    p.add_argument("--reps", type=int, default=3, help="runs per mode for the overhead")
    p.add_argument("--steady-iters", type=int, default=25, help="steps per overhead run")
    p.add_argument("--skip", type=int, default=3, help="first steps left out of the step time")
    p.add_argument("--hidden-size", type=int, default=32)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--no-recovery", action="store_true", help="skip (a) and (b)")
    p.add_argument("--no-overhead", action="store_true", help="skip (c)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per job")
    p.add_argument("--keep", default=None, help="keep the jobs' logs here")
    a = p.parse_args(argv)
    if a.steady_iters <= a.skip:
        p.error("--steady-iters must be larger than --skip")
    base = Path(a.keep or tempfile.mkdtemp(prefix="bench_recovery_"))
    t_all = time.time()
    data: dict = {"config": {**vars(a), "world": WORLD, "tp": 2, "pp": 2, "dp": 2,
                             "preload": PRELOAD},
                  "targets": {"recovery_s": RECOVERY_TARGET_S, "overhead": OVERHEAD_TARGET}}

    if not a.no_recovery:
        spec = fault_spec(a.trials, a.first_fault, a.spacing)
        iters = a.first_fault + a.spacing * (a.trials - 1) + 3
        spares = a.spares if a.spares is not None else a.trials
        job = run_job(a, base / "faults", flash=True, iters=iters, spares=spares, inject=spec)
        rep = job["report"]
        if rep.get("fatal") or len(rep["faults"]) != a.trials:
            raise RuntimeError(f"recovery job: fatal={rep.get('fatal')}, "
                               f"{len(rep['faults'])}/{a.trials} faults; see {base / 'faults'}")
        rows = recovery_rows(job)
        rec = [r["recovery_s"] for r in rows if r["recovery_s"] is not None]
        # steady steps of this job: past the first ones, neither a faulty step nor the one after
        faulty = {a.first_fault + a.spacing * t + d for t in range(a.trials) for d in (0, 1)}
        pre = [t for it, t, _ in job["lines"] if it > a.skip and it not in faulty]
        print(f"\n(a) Recovery, kill in backward, 8 ranks TP2xPP2xDP2, {spares} warm spare(s); "
              f"load {job['load_before'][0]:.1f} -> {job['load_after'][0]:.1f}; "
              f"median step time between faults: "
              f"{statistics.median(pre) if pre else float('nan'):.3f} s\n")
        print(table(rows, ["rank", "step", "recovery_s", "detect_s", "abort_s", "rebuild_s",
                           "restore_s", "resume_s", "recovery_minus_resume_s", "replacement",
                           "spare_join_s", "steps_lost", "survivors_kept", "target_s", "met"]))
        s = summary(rec)
        if rec:
            print(f"\nrecovery p50 {s['p50']:.3f} s, max {max(rec):.3f} s (target < "
                  f"{RECOVERY_TARGET_S} s: {'met' if max(rec) < RECOVERY_TARGET_S else 'NOT met'})")
        else:
            print("\nno fault has a recovery time in the report")
        mem = memory_rows(job["probes"])
        print("\n(b) Host memory per rank held by flash recovery, next to the state it protects "
              "(ring: depth 2 x params+optimizer shard; copies: 1 replica x depth 2 of each ward's "
              "optimizer shard and pickled RNG/scheduler meta; none on one node with shared-memory "
              "snapshots)\n")
        print(table(mem, ["rank", "params_KiB", "optim_shard_KiB", "ring_KiB", "ring_x_state",
                          "ring_meta_KiB", "copies_KiB", "wards",
                          "copies_x_optim", "total_KiB", "total_x_state", "rss_MiB"]))
        data.update(recovery={"inject": spec, "iters": iters, "spares": spares,
                              "rows": rows, "summary": s, "report": rep,
                              "steady_step_median_s": statistics.median(pre) if pre else None,
                              "load": [job["load_before"], job["load_after"]],
                              "wall_s": job["wall_s"]},
                    memory={"rows": mem, "probes": job["probes"]})

    if not a.no_overhead:
        on_jobs, off_jobs, pairs = [], [], []
        for r in range(a.reps):
            order = (False, True) if r % 2 == 0 else (True, False)
            got = {}
            for flash in order:
                name = f"{'on' if flash else 'off'}{r}"
                got[flash] = run_job(a, base / name, flash=flash, iters=a.steady_iters, spares=0,
                                     inject=None)
                j = got[flash]
                st = step_times(j, a.skip)
                print(f"run {name}: median step {statistics.median(st):.3f} s over {len(st)} "
                      f"steps, load {j['load_after'][0]:.1f}, {j['wall_s']:.0f} s", flush=True)
            on_jobs.append(got[True])
            off_jobs.append(got[False])
            pairs.append((got[True], got[False]))
        ov = overhead(on_jobs, off_jobs, pairs, a.skip)
        rows = [{"mode": m, "steps": ov[m]["steps"], "median_s": ov[m]["median_s"],
                 "p25_s": ov[m]["p25_s"], "p75_s": ov[m]["p75_s"], "min_s": ov[m]["min_s"],
                 "max_s": ov[m]["max_s"], "cpu_ms_per_rank_step": ov[m]["cpu_ms_per_rank_step"],
                 "cpu_thread_ms_per_rank_step": ov[m]["cpu_thread_ms_per_rank_step"],
                 "run_medians_s": " ".join(f"{x:.3f}" for x in ov[m]["run_medians_s"]),
                 "rss_median_MiB": ov[m]["rss_median_MiB"],
                 "fr_threads_ms_per_rank_step": ov[m]["fr_threads_ms_per_rank_step"],
                 "load_1m": " ".join(f"{x:.1f}" for x in ov[m]["load_1m"])}
                for m in ("on", "off")]
        print(f"\n(c) Steady-state step time, recovery on vs off, {a.reps} interleaved runs each "
              f"of {a.steady_iters} steps, first {a.skip} left out\n")
        print(table(rows, list(rows[0])))
        paired = ", ".join(f"{x * 100:+.1f}%" for x in ov["overhead_paired"])
        print(f"\noverhead: pooled medians {ov['overhead_pooled'] * 100:+.1f}%, per pair "
              f"{paired} (median {ov['overhead_paired_median'] * 100:+.1f}%); "
              f"target <= {OVERHEAD_TARGET * 100:.0f}%: "
              f"{'met' if ov['overhead_pooled'] <= OVERHEAD_TARGET else 'NOT met'}; "
              + (f"CPU per rank-step {ov['cpu_overhead'] * 100:+.1f}%"
                 if ov["cpu_overhead"] is not None else "no CPU timings"))
        data["overhead"] = {**ov, "rows": rows,
                            "jobs": [{"flash": j["flash"], "wall_s": j["wall_s"],
                                      "load_before": j["load_before"],
                                      "load_after": j["load_after"], "lines": j["lines"]}
                                     for j in on_jobs + off_jobs]}

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = ru.ru_utime + ru.ru_stime
    data["wall_s"] = time.time() - t_all
    data["children_cpu_s"] = cpu
    print(f"\nwall {data['wall_s']:.0f} s, CPU of the jobs {cpu:.0f} s "
          f"(~{cpu / (os.cpu_count() or 1):.0f} s of wall on this many idle cores); "
          f"load average now {os.getloadavg()[0]:.1f}")
    path = write("recovery", data)
    print(f"\nwrote {path} (job logs in {base})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
