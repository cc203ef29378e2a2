"""Cost at real state sizes: step time with and without flash recovery, commit, recovery, memory.

The job is ``recipes/megatron/pretrain_gpt.py`` at 4 CPU ranks (TP=2 x DP=2, distributed
optimizer, fp32), grown until each rank's unique state (its optimizer shard) is about 1, 25, 100
and 400 MB; each rank's parameters are about as large again. Every size runs in four modes,
interleaved (off, shm, copies, instances, then the other way round), no faults, no spares:

- ``off``: without ``--flash-recovery``;
- ``shm``: one node; each rank's snapshot in the node's shared memory, no copy made at all;
- ``copies``: two nodes of two ranks (two launchers on this machine); snapshots in shared memory,
  and each rank's unique state copied to a rank of the other node every step, in the background;
- ``instances``: two nodes and ``--num-distributed-optimizer-instances 2``: each optimizer shard
  is held and updated on both nodes (redundancy by computation), only the meta is copied;
- ``instances_off``: the same megatron-core settings without ``--flash-recovery``: the step time
  the second instance costs by itself.

Per size and mode: median step time (rank 0, first ``--skip`` steps left out), its ratio to
``off`` (``overhead``) and to the run with the same megatron-core settings without flash recovery
(``overhead_fr``: what flash recovery adds; the targets apply to it). The CPU seconds of a step,
per rank (``cpu_s``: the process, every thread; ``cpu_thread_s``: the training thread; medians over
ranks and steps), and their ratio to the same settings without flash recovery
(``cpu_overhead_fr``): with more ranks than cores the wall time of a step is the machine's CPU
shared out, and varies from run to run with the scheduler, while a rank's CPU per step is what
flash recovery adds to it. Next to it ``copy_floor_x_cpu``: copying and checksumming the
committed bytes once, at the machine's measured memcpy and xxh3 rates, and with copies sending the
unique state and receiving a ward's at the loopback rate, relative to the CPU of a step without
flash recovery: the least a snapshot (and copy) of every step can cost. The training thread's
time blocked in a commit (median over ranks); host memory per rank for the snapshots and the
copies held, next to the state. Then one run per size and mode with a
SIGKILL in backward and a warm spare: recovery time and phases, and the restore throughput (the
lost rank's bytes over the time from the recovery decision to its state restored in place). In
the same run, the machine's own limits: memcpy, xxh3 and gloo point-to-point bandwidth over
loopback between two processes.

Targets (printed, never asserted): overhead at most 5 % at 100 MB and 10 % at 400 MB, recovery at
100 MB under 1.5 s, restore at 1 GB/s or more.

    python -m benchmarks.state_scale [--sizes 1,25,100,400] [--modes off,shm,copies,instances]
                                     [--reps 2] [--steps 8] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fr_megatron.launcher.spare import MEGATRON_PRELOAD

from .common import REPO, RESULTS, cpu_per_rank_step, read_cpu_timings, table, write

RECIPE = REPO / "recipes" / "megatron" / "pretrain_gpt.py"
# unique MB per rank -> (hidden size, layers); TP=2 x DP=2 fp32: parameters 4P/2 bytes and the
# optimizer shard 8P/4 bytes per rank for P parameters (12 h^2 per layer)
SIZES = {1: (128, 2), 25: (512, 4), 100: (1024, 4), 400: (2048, 4)}
MODES = ("off", "shm", "copies", "instances_off", "instances")
# the run each mode is compared to for what flash recovery adds (``overhead_fr``)
SAME_SETTINGS_OFF = {"shm": "off", "copies": "off", "instances": "instances_off"}
TARGETS = {"overhead_100MB": 0.05, "overhead_400MB": 0.10, "recovery_100MB_s": 1.5,
           "restore_gb_s": 1.0}


def model_args(size: int, steps: int) -> list[str]:
    hidden, layers = SIZES[size]
    return ["--tensor-model-parallel-size", "2", "--num-layers", str(layers),
            "--hidden-size", str(hidden), "--num-attention-heads", "8", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(steps),
            "--use-distributed-optimizer", "--hidden-dropout", "0.0",
            "--flash-recovery-hang-timeout-min", "120"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(work: Path, size: int, mode: str, steps: int, inject: str | None = None,
        timeout: float = 1200) -> dict:
    """One job; its report (node 0's), rank 0's step timings and wall time."""
    work.mkdir(parents=True, exist_ok=True)
    args = [*model_args(size, steps), "--timings", str(work / "timings.json"),
            "--cpu-timings", str(work / "cpu")]
    if mode in SAME_SETTINGS_OFF:
        args.append("--flash-recovery")
    if mode.startswith("instances"):
        args += ["--num-distributed-optimizer-instances", "2"]
    nodes = 2 if mode in ("copies", "instances", "instances_off") else 1
    spares = 1 if inject else 0
    port = _free_port()
    from fr_megatron.protocol.auth import new_token, write_token_file

    write_token_file(str(work / "token"), new_token())
    procs = []
    t0 = time.time()
    for node in range(nodes):
        cmd = [sys.executable, "-m", "fr_megatron.cli", "run", "--nproc-per-node",
               str(4 // nodes), "--spares", str(spares), "--no-wandb",
               "--preload", MEGATRON_PRELOAD, "--token-file", str(work / "token")]
        if nodes > 1:  # a node whose ranks import megatron-core starves its agent for seconds
            cmd += ["--nnodes", str(nodes), "--node-rank", str(node),
                    "--controller", f"127.0.0.1:{port}", "--node-timeout", "30"]
        if node == 0:
            cmd += ["--report", str(work / "report.json")]
        if inject:
            cmd += ["--inject", inject]
        procs.append(subprocess.Popen([*cmd, str(RECIPE), *args], cwd=REPO,
                                      stdout=open(work / f"node{node}.log", "w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
    try:
        rcs = [p.wait(timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    if any(rcs):
        raise RuntimeError(f"{mode} {size} MB: exit codes {rcs}; see {work}")
    report = json.loads((work / "report.json").read_text())
    timings = {int(k): v for k, v in json.loads((work / "timings.json").read_text()).items()}
    return {"report": report, "timings": timings, "cpu": read_cpu_timings(work / "cpu"),
            "wall_s": time.time() - t0}


def _median(xs):
    return statistics.median(xs) if xs else None


def copy_floor_s(row: dict, lim: dict) -> float:
    """The least a commit costs a rank per step, in CPU seconds: copying and checksumming the
    bytes it commits once, at the machine's memcpy and xxh3 rates; where the rank copies its
    unique state to a holder, also sending it and receiving a ward's, each end of a transfer
    busy for its time at the loopback rate. Relative to the CPU of a step without flash
    recovery, the floor of ``cpu_overhead_fr``."""
    floor = row["committed_MB"] * 1e6 * (1 / (lim["memcpy_gb_s"] * 1e9)
                                         + 1 / (lim["xxh3_gb_s"] * 1e9))
    if row["ranks_copying_tensors"]:
        floor += 2 * row["unique_MB_measured"] * 1e6 / (lim["loopback_gloo_gb_s"] * 1e9)
    return floor


def steady_rows(jobs: dict, skip: int, lim: dict) -> list[dict]:
    """``lim``: the machine's limits, for the least a commit's copy and checksum can cost."""
    rows = []
    for size in sorted({s for s, _ in jobs}):
        def base_of(mode: str):
            return _median([t for j in jobs.get((size, mode), [])
                            for i, t in j["timings"].items() if i > skip])

        def cpu_of(mode: str) -> tuple:
            """CPU seconds per rank-step: the process's, the training thread's."""
            return cpu_per_rank_step([j["cpu"] for j in jobs.get((size, mode), [])], skip)

        base = base_of("off")
        for mode in MODES:
            runs = jobs.get((size, mode))
            if not runs:
                continue
            times = [t for j in runs for i, t in j["timings"].items() if i > skip]
            stats = [s for j in runs for s in j["report"].get("rank_stats", {}).values()]
            # the rank's whole training state; a commit copies less of it (``committed``)
            state = _median([s["state_bytes"] for s in stats])
            row = {"unique_MB": size, "mode": mode, "steps": len(times),
                   "step_s": _median(times),
                   "run_medians_s": " ".join(f"{_median([t for i, t in j['timings'].items() if i > skip]):.3f}"
                                             for j in runs),
                   **dict(zip(("cpu_s", "cpu_thread_s"), cpu_of(mode)))}
            if mode in SAME_SETTINGS_OFF:
                same = base_of(SAME_SETTINGS_OFF[mode])
                same_cpu = cpu_of(SAME_SETTINGS_OFF[mode])[0]
                row.update({
                    "overhead": row["step_s"] / base - 1 if base else None,
                    "overhead_fr": row["step_s"] / same - 1 if same else None,
                    "cpu_overhead_fr": row["cpu_s"] / same_cpu - 1 if same_cpu else None,
                    "commit_blocked_s": _median([s["commit_blocked_s_p50"] for s in stats
                                                 if s["commit_blocked_s_p50"] is not None]),
                    "state_MB": state / 1e6,
                    "committed_MB": _median([s["replicated_bytes"] + s["unique_bytes"]
                                             for s in stats]) / 1e6,
                    "unique_MB_measured": _median([s["unique_bytes"] for s in stats]) / 1e6,
                    "snapshots_MB": _median([s["snapshot_bytes"] for s in stats]) / 1e6,
                    "held_copies_MB": _median([s["held_copy_bytes"] for s in stats]) / 1e6,
                    "snapshots_x_state": _median([s["snapshot_bytes"] for s in stats]) / state,
                    "held_x_unique": _median([s["held_copy_bytes"] / s["unique_bytes"]
                                              for s in stats if s["unique_bytes"]]),
                    "shared_memory": all(s["snapshots_in_shared_memory"] for s in stats),
                    "ranks_copying_tensors": len(runs[0]["report"]["redundancy"]
                                                 ["ranks_copying_tensors"])})
                row["copy_floor_s"] = copy_floor_s(row, lim)
                row["copy_floor_x_cpu"] = row["copy_floor_s"] / same_cpu if same_cpu else None
            rows.append(row)
    return rows


def recovery_row(size: int, mode: str, job: dict) -> dict:
    (f,) = job["report"]["faults"]
    return {"unique_MB": size, "mode": mode, "recovery_s": f["recovery_s"],
            **{f"{k}_s": v for k, v in (f.get("phases") or {}).items()},
            "restore_MB": (f.get("restore_bytes") or 0) / 1e6, "restore_gb_s": f.get("restore_gb_s"),
            "from": "own snapshot" if set((f.get("restored_from") or {}).values()) == {f["rank"]}
            else json.dumps(f.get("restored_from")),
            "steps_lost": f["steps_lost"], "replacement": f["replacement"]}


# ---- the machine's own limits -------------------------------------------------------------------
def limits(nbytes: int = 256 << 20) -> dict:
    import torch
    import xxhash

    src = torch.randn(nbytes // 4).view(torch.uint8)
    dst = torch.empty_like(src)

    def best(f, n=3):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return nbytes / min(ts) / 1e9

    out = {"memcpy_gb_s": best(lambda: dst.copy_(src)),
           "xxh3_gb_s": best(lambda: xxhash.xxh3_128(src.numpy()).hexdigest())}
    port = _free_port()
    peers = [subprocess.Popen([sys.executable, "-m", "benchmarks.state_scale", "--loopback-peer",
                               str(r), str(port), str(nbytes)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    got = [p.communicate(timeout=300)[0] for p in peers]
    out["loopback_gloo_gb_s"] = float(got[1].strip().splitlines()[-1])
    return out


def loopback_peer(rank: int, port: int, nbytes: int) -> None:
    """One end of the loopback measurement: rank 0 sends ``nbytes`` to rank 1, three times."""
    import torch
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    buf = torch.ones(nbytes, dtype=torch.uint8)
    rates = []
    for _ in range(3):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
        else:
            dist.recv(buf, 0)
        rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
    dist.barrier()
    dist.destroy_process_group()
    print(max(rates))


# ---- the plot -----------------------------------------------------------------------------------
def plot(steady: list[dict], recovery: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, c, b) = plt.subplots(1, 3, figsize=(16, 4))
    color = {mode: f"C{i}" for i, mode in enumerate(MODES)}  # one colour per mode in every panel
    for mode in MODES:
        pts = [(r["unique_MB"], r["step_s"]) for r in steady if r["mode"] == mode]
        if pts:
            a.plot(*zip(*pts), marker="o", label=mode, color=color[mode])
    a.set(xscale="log", yscale="log", xlabel="unique state per rank (MB)",
          ylabel="median step time (s)", title="step time, 4 ranks TP2 x DP2")
    a.legend()
    for mode in SAME_SETTINGS_OFF:
        pts = [(r["unique_MB"], 100 * r["cpu_overhead_fr"]) for r in steady
               if r["mode"] == mode and r.get("cpu_overhead_fr") is not None]
        if pts:
            c.plot(*zip(*pts), marker="o", label=mode, color=color[mode])
    for mode, what in (("shm", "copy + checksum"), ("copies", "... + loopback transfers")):
        floor = [(r["unique_MB"], 100 * r["copy_floor_x_cpu"]) for r in steady
                 if r["mode"] == mode and r.get("copy_floor_x_cpu") is not None]
        if floor:
            c.plot(*zip(*floor), color=color[mode], ls=":", label=f"floor: {what}")
    for size, key in ((100, "overhead_100MB"), (400, "overhead_400MB")):
        c.plot([size], [100 * TARGETS[key]], marker="_", ms=20, color="black")
    c.axhline(0, color="grey", lw=0.5)
    c.set(xscale="log", xlabel="unique state per rank (MB)", ylabel="CPU per rank-step vs off (%)",
          title="what flash recovery adds to a step's CPU (targets: bars)")
    c.legend()
    for mode in SAME_SETTINGS_OFF:
        pts = [(r["unique_MB"], r["recovery_s"]) for r in recovery if r["mode"] == mode]
        if pts:
            b.plot(*zip(*pts), marker="o", label=mode, color=color[mode])
    b.axhline(TARGETS["recovery_100MB_s"], color="grey", ls="--", lw=1)
    b.set(xscale="log", xlabel="unique state per rank (MB)", ylabel="recovery (s)",
          title="kill in backward: fault to the first step after it")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)),
                   help=f"unique MB per rank, of {sorted(SIZES)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"of {','.join(MODES)}")
    p.add_argument("--reps", type=int, default=2, help="runs per size and mode")
    p.add_argument("--steps", type=int, default=8, help="steps per run")
    p.add_argument("--skip", type=int, default=2, help="first steps left out of the step time")
    p.add_argument("--no-recovery", action="store_true", help="skip the runs with a fault")
    p.add_argument("--quick", action="store_true", help="sizes 1 and 25, one run each")
    p.add_argument("--keep", default=None, help="keep the jobs' logs here")
    p.add_argument("--loopback-peer", nargs=3, type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.loopback_peer:
        loopback_peer(*a.loopback_peer)
        return 0
    sizes = [int(s) for s in a.sizes.split(",")]
    modes = [m for m in a.modes.split(",") if m]
    if a.quick:
        sizes, a.reps = [s for s in sizes if s <= 25] or [1], 1
    bad = [s for s in sizes if s not in SIZES] + [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown sizes or modes {bad}; sizes {sorted(SIZES)}, modes {MODES}")
    if a.steps <= a.skip + 1:
        p.error("--steps must exceed --skip by 2 or more")
    base = Path(a.keep or tempfile.mkdtemp(prefix="bench_state_scale_"))
    t_all = time.time()
    lim = limits()
    print("machine limits: " + ", ".join(f"{k} {v:.2f}" for k, v in lim.items()), flush=True)
    jobs: dict = {}
    for size in sizes:
        for rep in range(a.reps):
            for mode in (modes if rep % 2 == 0 else modes[::-1]):
                j = run(base / f"{size}MB-{mode}-{rep}", size, mode, a.steps)
                jobs.setdefault((size, mode), []).append(j)
                st = [t for i, t in j["timings"].items() if i > a.skip]
                print(f"{size:>4} MB {mode:<9} rep {rep}: median step {_median(st):.3f} s "
                      f"({j['wall_s']:.0f} s)", flush=True)
    steady = steady_rows(jobs, a.skip, lim)
    print("\nsteady state\n")
    print(table(steady, ["unique_MB", "mode", "step_s", "overhead", "overhead_fr",
                         "cpu_s", "cpu_thread_s", "cpu_overhead_fr", "copy_floor_x_cpu",
                         "commit_blocked_s",
                         "state_MB", "committed_MB", "unique_MB_measured", "snapshots_MB",
                         "held_copies_MB", "snapshots_x_state", "held_x_unique",
                         "ranks_copying_tensors"]))
    recovery = []
    if not a.no_recovery:
        for size in sizes:
            for mode in (m for m in modes if m in SAME_SETTINGS_OFF):
                j = run(base / f"{size}MB-{mode}-fault", size, mode, max(a.steps, 7),
                        inject="kill:rank=1:step=5:phase=backward")
                recovery.append(recovery_row(size, mode, j))
                print(f"{size:>4} MB {mode:<9} recovery {recovery[-1]['recovery_s']:.3f} s",
                      flush=True)
        print("\nrecovery (kill in backward, warm spare)\n")
        print(table(recovery, ["unique_MB", "mode", "recovery_s", "detect_s", "abort_s",
                               "rebuild_s", "restore_s", "resume_s", "restore_MB",
                               "restore_gb_s", "from", "steps_lost"]))
    met = {}
    for size, key in ((100, "overhead_100MB"), (400, "overhead_400MB")):
        for r in steady:
            # None: no run without flash recovery to compare with
            if r["unique_MB"] == size and r.get("overhead_fr") is not None:
                met[f"{key} {r['mode']}"] = r["overhead_fr"] <= TARGETS[key]
    for r in recovery:
        if r["unique_MB"] == 100:
            met[f"recovery_100MB {r['mode']}"] = r["recovery_s"] < TARGETS["recovery_100MB_s"]
        if r["restore_gb_s"] is not None and r["unique_MB"] >= 25:
            met[f"restore {r['unique_MB']} MB {r['mode']}"] = \
                r["restore_gb_s"] >= TARGETS["restore_gb_s"]
    print("\ntargets: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in met.items()))
    png = RESULTS / "state_scale.png"
    plot(steady, recovery, png)
    data = {"config": {"sizes": sizes, "modes": modes, "reps": a.reps, "steps": a.steps,
                       "skip": a.skip, "world": 4, "tp": 2, "dp": 2},
            "targets": TARGETS, **lim, "steady": steady, "recovery": recovery,
            "targets_met": met, "wall_s": time.time() - t_all}
    path = write("state_scale", data)
    print(f"\nwrote {path} and {png} (job logs in {base})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
