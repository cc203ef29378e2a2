"""fr_megatron against what users do today: restart the whole job from the last checkpoint.

The same job for both: ``recipes/megatron/pretrain_gpt.py``, tiny GPT, TP=2 x PP=2 x DP (8 ranks:
DP=2, as in ``benchmarks/recovery.py``; ``--ranks`` grows DP at 2 micro-batches per rank and step;
4 ranks are TP=2 x PP=1 x DP=2, as checkpoint-free recovery needs a data-parallel replica),
DistributedOptimizer, gloo on CPU, ``--save DIR --save-interval K`` (megatron-core
dist_checkpointing, ``fr_megatron.megatron.checkpoint``). The same fault: SIGKILL of one rank
when gradients reach its first micro-batch's output (``backward``) in step F.

(a) fr_megatron: ``fr-megatron run --flash-recovery`` with ``--inject kill:rank=R:step=F:phase=
    backward`` and one warm spare (megatron-core preloaded). From the job's ``--report``:
    ``recovery_s`` (fault to the first step completed after it, the redone step F included) and
    ``steps_lost``.
    Both jobs run with ``OMP_NUM_THREADS=1`` (unless set): torchrun's default, which
    ``fr-megatron run`` does not apply; without it every rank's torch uses every core, and on 2
    cores fr_megatron's steps (so its recovery too, which redoes one) were several times slower
    (4 ranks: ~1.2 s against ~0.2 s a step) and not bit-identical to torchrun's.
(b) restart: ``torchrun --max-restarts 0`` (``torch.distributed.run --standalone``) runs this file
    in place of the recipe (``--worker``: the recipe unchanged, plus the same SIGKILL, fired from
    the same backward hook as ``--inject``, which needs the flash-recovery runtime). torchrun sees
    the worker die, tears the job down and exits; the benchmark then starts the whole job again
    with ``--load DIR``. Fault to the first step completed after the restart (the step after the
    last checkpoint), split into teardown (fault to torchrun's exit), restart (to the log line of
    the loaded checkpoint: process start, imports, groups, model, load) and first step; steps lost
    = F-1 - the checkpointed step (work done again). Times come from the fault time the killed
    rank wrote just before it died, the benchmark's clock and rank 0's log timestamps (ms).

Both: "back at F" is the time from the fault until step F is completed again (the restart redoes
the lost steps first). Targets are printed, never asserted: at 8 ranks fr_megatron recovers at
least 20x faster than the restart, with 0 steps lost.

    python -m benchmarks.restart_baseline [--trials 2] [--ranks 8] [--quick]
    python -m benchmarks.restart_baseline --ranks 4,8,16,32 --trials 1
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from fr_megatron.launcher.spare import MEGATRON_PRELOAD as PRELOAD

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "megatron" / "pretrain_gpt.py"
FAULT_RANKS = (5, 2, 6, 1, 7, 3)  # both pipeline stages, both TP positions; never rank 0
TARGET_RATIO = 20.0
TARGET_RANKS = 8
KILL_ENV, FAULT_FILE_ENV = "FR_BASELINE_KILL", "FR_BASELINE_FAULT_FILE"
TS = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
ITER = re.compile(TS + r" pretrain_gpt iteration (\d+)/(\d+) \| lm loss (\S+) \| ([0-9.]+) s")
LOADED = re.compile(TS + r" fr_megatron\.megatron\.checkpoint loaded checkpoint of step (\d+)")
SAVED = re.compile(TS + r" fr_megatron\.megatron\.checkpoint saved checkpoint of step (\d+)")


# ---------------------------------------------------------------- worker (under torchrun)


def worker(argv: list[str]) -> None:
    """The recipe, unchanged, with ``FR_BASELINE_KILL=RANK:STEP`` armed in that rank."""
    spec = os.environ.get(KILL_ENV)
    if spec:
        rank, step = (int(x) for x in spec.split(":"))
        if int(os.environ.get("RANK", -1)) == rank:
            _arm_kill(step, Path(os.environ[FAULT_FILE_ENV]))
    sys.argv = [str(RECIPE), *argv]
    runpy.run_path(str(RECIPE), run_name="__main__")


def _arm_kill(step: int, fault_file: Path) -> None:
    """SIGKILL this process in backward of ``step``: the hook ``--inject`` fires from, through
    the recipe's calls into ``training_hooks`` (no-ops without ``--flash-recovery``)."""
    from fr_megatron.megatron import phases
    from fr_megatron.megatron import training_hooks as hooks

    current = [0]
    begin, wrap = hooks.on_step_begin, hooks.wrap_forward_step

    def on_step_begin(iteration):
        current[0] = iteration + 1  # the recipe passes the finished iterations
        begin(iteration)

    def mark(name):
        if name == "backward" and current[0] == step:
            fault_file.write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)

    hooks.on_step_begin = on_step_begin
    hooks.wrap_forward_step = lambda f: phases.wrap_forward_step(wrap(f), mark)


# ---------------------------------------------------------------- jobs


def _ts(s: str) -> float:
    return datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def layout(world: int) -> tuple[int, int, int]:
    """TP x PP x DP: 2 x 2 x DP; at 4 ranks 2 x 1 x 2, since checkpoint-free recovery needs a
    data-parallel replica of every rank (DP >= 2)."""
    return (2, 2, world // 4) if world >= 8 else (2, 1, world // 2)


def model_args(a, world: int) -> list[str]:
    tp, pp, dp = layout(world)
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--num-layers", str(a.num_layers), "--hidden-size", str(a.hidden_size),
            "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2",
            "--global-batch-size", str(2 * 2 * dp), "--use-distributed-optimizer",
            "--train-iters", str(a.iters)]


def _run(cmd: list[str], env: dict, log: Path, timeout: float) -> tuple[int, str, float, float]:
    """Run to the end in its own session (a timeout kills all of it); rc, output, start, end."""
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise RuntimeError(f"job timed out after {timeout:.0f} s, log in {log}") from None
    return rc, log.read_text(), t0, time.time()


def _step_time(out: str, before: int, save_interval: int) -> float | None:
    """Median step time before the fault, from rank 0's log (the first step, and the steps after
    a checkpoint, whose log interval contains the save, left out)."""
    st = [float(m[5]) for m in ITER.finditer(out)
          if 1 < int(m[2]) < before and (int(m[2]) - 1) % save_interval]
    return statistics.median(st) if st else None


def _omp() -> str:
    """The same intra-op threads for both jobs: torchrun sets OMP_NUM_THREADS=1 when it is unset,
    ``fr-megatron run`` leaves it unset (torch then takes every core in every rank)."""
    return os.environ.get("OMP_NUM_THREADS", "1")


def run_fr(a, world: int, rank: int, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    report = work / "report.json"
    cmd = [sys.executable, "-m", "fr_megatron.cli", "run", "--nproc-per-node", str(world),
           "--spares", "1", "--no-wandb", "--report", str(report), "--journal",
           str(work / "journal.jsonl"), "--preload", PRELOAD,
           "--inject", f"kill:rank={rank}:step={a.fault_step}:phase=backward",
           str(RECIPE), *model_args(a, world), "--flash-recovery",
           "--save", str(work / "ckpt"), "--save-interval", str(a.save_interval)]
    env = dict(os.environ, TORCHELASTIC_USE_AGENT_STORE="True", OMP_NUM_THREADS=_omp())
    load = os.getloadavg()[0]
    rc, out, t0, t1 = _run(cmd, env, work / "output.log", a.timeout)
    if rc != 0 or not report.exists():
        raise RuntimeError(f"fr_megatron job failed ({rc}), log in {work / 'output.log'}:\n"
                           f"{out[-2000:]}")
    import json

    rep = json.loads(report.read_text())
    if rep.get("fatal") or len(rep["faults"]) != 1:
        raise RuntimeError(f"fr_megatron job: fatal={rep.get('fatal')}, {len(rep['faults'])} "
                           f"faults, log in {work}")
    f = rep["faults"][0]
    rec, lost = f.get("recovery_s"), f.get("steps_lost")
    return {"method": "fr_megatron", "ranks": world, "fault_rank": rank,
            "fault_step": a.fault_step, "recovery_s": rec, "steps_lost": lost,
            # the first step completed after the fault is step F itself when nothing was lost
            "back_at_fault_step_s": rec if lost == 0 else None,
            "detect_s": (f.get("phases") or {}).get("detect"), "phases": f.get("phases"),
            "replacement": f.get("replacement"),
            "step_s": _step_time(out, a.fault_step, a.save_interval), "job_wall_s": t1 - t0,
            "load_1m": load}


def run_restart(a, world: int, rank: int, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    ckpt, fault_file = work / "ckpt", work / "fault_time"
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(world), "--max-restarts", "0", str(Path(__file__).resolve()), "--worker",
            *model_args(a, world), "--save", str(ckpt), "--save-interval", str(a.save_interval)]
    env = dict(os.environ, OMP_NUM_THREADS=_omp(),
               **{KILL_ENV: f"{rank}:{a.fault_step}", FAULT_FILE_ENV: str(fault_file)})
    load = os.getloadavg()[0]
    rc1, out1, t0, t_exit = _run(base, env, work / "first.log", a.timeout)
    if rc1 == 0 or not fault_file.exists():
        raise RuntimeError(f"restart baseline: the first job did not die at step {a.fault_step} "
                           f"(rc {rc1}), log in {work / 'first.log'}")
    fault_t = float(fault_file.read_text())
    done = [int(m[2]) for m in ITER.finditer(out1)]
    env = {k: v for k, v in env.items() if k not in (KILL_ENV, FAULT_FILE_ENV)}
    rc2, out2, t_launch, t_end = _run([*base, "--load", str(ckpt)], env, work / "second.log",
                                      a.timeout)
    if rc2 != 0:
        raise RuntimeError(f"restart baseline: the restarted job failed ({rc2}), log in "
                           f"{work / 'second.log'}:\n{out2[-2000:]}")
    loaded = LOADED.search(out2)
    iters = [(int(m[2]), _ts(m[1])) for m in ITER.finditer(out2)]
    if loaded is None or not iters:
        raise RuntimeError(f"restart baseline: no checkpoint loaded / no step, {work}")
    t_loaded, step_loaded = _ts(loaded[1]), int(loaded[2])
    first_step, t_first = iters[0]
    back = [t for s, t in iters if s == a.fault_step]
    return {"method": "restart", "ranks": world, "fault_rank": rank,
            "fault_step": a.fault_step, "recovery_s": t_first - fault_t,
            "steps_lost": a.fault_step - 1 - step_loaded,
            "back_at_fault_step_s": back[0] - fault_t if back else None,
            "detect_s": None,
            "phases": {"teardown": t_exit - fault_t, "relaunch": t_launch - t_exit,
                       "restart_and_load": t_loaded - t_launch, "first_step": t_first - t_loaded},
            "last_step_before_fault": max(done) if done else 0, "checkpoint_loaded": step_loaded,
            "first_step_after": first_step,
            "step_s": _step_time(out1, a.fault_step, a.save_interval),
            "job_wall_s": (t_exit - t0) + (t_end - t_launch), "load_1m": load}


# ---------------------------------------------------------------- report


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for world in sorted({r["ranks"] for r in rows}):
        by = {m: [r for r in rows if r["ranks"] == world and r["method"] == m]
              for m in ("fr_megatron", "restart")}
        med = {m: _median([r["recovery_s"] for r in rs]) for m, rs in by.items()}
        for m, rs in by.items():
            if not rs:
                continue
            rec = [r["recovery_s"] for r in rs if r["recovery_s"] is not None]
            out.append({"ranks": world, "layout": "x".join(map(str, layout(world))),
                        "method": m, "trials": len(rs),
                        "recovery_s_p50": med[m], "recovery_s_min": min(rec) if rec else None,
                        "recovery_s_max": max(rec) if rec else None,
                        "steps_lost": ",".join(str(r["steps_lost"]) for r in rs),
                        "back_at_F_s_p50": _median([r["back_at_fault_step_s"] for r in rs]),
                        "step_s_p50": _median([r["step_s"] for r in rs]),
                        "restart/fr": (med["restart"] / med["fr_megatron"]
                                       if m == "restart" and med["restart"] and med["fr_megatron"]
                                       else None)})
    return out


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, style in (("fr_megatron", "o-"), ("restart", "s--")):
        rs = [s for s in summary if s["method"] == m and s["recovery_s_p50"]]
        if not rs:
            continue
        x = [s["ranks"] for s in rs]
        y = [s["recovery_s_p50"] for s in rs]
        err = [[yy - s["recovery_s_min"] for yy, s in zip(y, rs)],
               [s["recovery_s_max"] - yy for yy, s in zip(y, rs)]]
        label = "fr_megatron (warm spare)" if m == "fr_megatron" else \
            "torchrun restart + dist_checkpointing load"
        ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=label)
    ax.set_xscale("log", base=2)
    sizes = sorted({s["ranks"] for s in summary})
    ax.set_xticks(sizes, [str(w) for w in sizes])
    ax.set_xlim(sizes[0] / 1.5, sizes[-1] * 1.5)
    ax.set_yscale("log")
    ax.set_xlabel("ranks (TP=2 x PP=2 x DP; 4 ranks: 2 x 1 x 2)")
    ax.set_ylabel("fault -> first completed step (s)")
    ax.set_title("Recovery from a SIGKILL in backward, tiny GPT on CPU")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from .common import RESULTS, table, write

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=2, help="faults per method and size")
    p.add_argument("--ranks", default=str(TARGET_RANKS),
                   help="comma-separated world sizes, multiples of 4 (TP=2 x PP=2 x DP)")
    p.add_argument("--fault-step", type=int, default=7, help="the step the fault hits")
    p.add_argument("--save-interval", type=int, default=4, help="--save-interval of both jobs")
    p.add_argument("--iters", type=int, default=None, help="--train-iters (default F+2)")
    p.add_argument("--hidden-size", type=int, default=32)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds per job launch; a size that times out ends the sweep")
    p.add_argument("--quick", action="store_true",
                   help="one trial, 8 ranks, fault in step 4, checkpoints every 2 steps")
    p.add_argument("--keep", default=None, help="keep the jobs' logs here")
    p.add_argument("--methods", default="fr_megatron,restart",
                   help="which recoveries to run (both by default; one alone gives no ratio)")
    p.add_argument("--name", default="restart_baseline",
                   help="results file name (benchmarks/results/NAME.json and .png); another name "
                        "keeps the full sweep's files as they are")
    a = p.parse_args(argv)
    if a.quick:
        a.trials, a.ranks, a.fault_step, a.save_interval = 1, str(TARGET_RANKS), 4, 2
    a.iters = a.iters or a.fault_step + 2
    methods = {"fr_megatron": run_fr, "restart": run_restart}
    chosen = [m.strip() for m in a.methods.split(",") if m.strip()]
    if not chosen or any(m not in methods for m in chosen):
        p.error(f"--methods: choose from {', '.join(methods)} (comma-separated), got {a.methods!r}")
    sizes = [int(x) for x in a.ranks.split(",")]
    if any(w < 4 or w % 4 for w in sizes):
        p.error("--ranks: every size must be a multiple of 4 (TP=2 x PP=2 x DP; 4: 2 x 1 x 2)")
    if a.fault_step < 2 or a.iters <= a.fault_step:
        p.error("need 2 <= --fault-step < --iters")
    base = Path(a.keep or tempfile.mkdtemp(prefix="bench_restart_"))
    t_all = time.time()
    rows: list[dict] = []
    errors: list[str] = []
    for world in sizes:
        failed = False
        for t in range(a.trials):
            rank = FAULT_RANKS[t % len(FAULT_RANKS)] % world or 1
            order = [methods[m] for m in (chosen if t % 2 == 0 else chosen[::-1])]
            for fn in order:
                name = "fr_megatron" if fn is run_fr else "restart"
                try:
                    r = fn(a, world, rank, base / f"w{world}" / f"{name}_{t}")
                except RuntimeError as e:
                    errors.append(f"{world} ranks, {name} trial {t}: {e}")
                    print(f"[{world} ranks, trial {t + 1}/{a.trials}] {name}: FAILED: "
                          f"{str(e).splitlines()[0]}", flush=True)
                    failed = True
                    continue
                rows.append(r)
                ph = r["phases"] or {}
                detail = (", ".join(f"{k} {v:.2f}" for k, v in ph.items()) if ph else "")
                print(f"[{world} ranks, trial {t + 1}/{a.trials}] {name}: kill rank {rank} step "
                      f"{a.fault_step} -> first step after {r['recovery_s']:.2f} s ({detail}); "
                      f"steps lost {r['steps_lost']}; back at step {a.fault_step} after "
                      f"{r['back_at_fault_step_s'] or float('nan'):.2f} s; step "
                      f"{r['step_s'] or float('nan'):.2f} s; job {r['job_wall_s']:.0f} s; load "
                      f"{r['load_1m']:.1f}",
                      flush=True)
        if failed:
            rest = [w for w in sizes if w > world]
            if rest:
                print(f"stopping the sweep: {world} ranks failed; not run: {rest}", flush=True)
            break

    summary = summarize(rows)
    print(f"\nRecovery from SIGKILL in backward at step {a.fault_step}, layout TP x PP x DP, "
          f"checkpoints every {a.save_interval} steps (both), {a.trials} trial(s) per method; "
          f"gloo on {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f}\n")
    print(table(summary, ["ranks", "layout", "method", "trials", "recovery_s_p50", "recovery_s_min",
                          "recovery_s_max", "steps_lost", "back_at_F_s_p50", "step_s_p50",
                          "restart/fr"]))
    tgt = [s for s in summary if s["ranks"] == TARGET_RANKS]
    fr_rows = [r for r in rows if r["ranks"] == TARGET_RANKS and r["method"] == "fr_megatron"]
    ratio = next((s["restart/fr"] for s in tgt if s["method"] == "restart"), None)
    met = None
    if ratio is not None and fr_rows:
        met = ratio >= TARGET_RATIO and all(r["steps_lost"] == 0 for r in fr_rows)
        print(f"\ntarget at {TARGET_RANKS} ranks: fr_megatron >= {TARGET_RATIO:.0f}x faster than "
              f"the restart with 0 steps lost: {'met' if met else 'NOT met'} (restart/fr "
              f"{ratio:.1f}x, fr steps lost {[r['steps_lost'] for r in fr_rows]})")
    else:
        print(f"\ntarget at {TARGET_RANKS} ranks: not measured")
    for e in errors:
        print(f"error: {e.splitlines()[0]}")
    png = RESULTS / f"{a.name}.png"
    if summary:
        plot(summary, png)
    data = {"config": {**vars(a), "sizes": sizes, "omp_num_threads": _omp(),
                       "layouts": {w: layout(w) for w in sizes}, "preload": PRELOAD},
            "target": {"ratio": TARGET_RATIO, "ranks": TARGET_RANKS, "steps_lost": 0,
                       "ratio_measured": ratio, "met": met},
            "summary": summary, "rows": rows, "errors": errors,
            "wall_s": time.time() - t_all}
    path = write(a.name, data)
    print(f"\nwrote {path} and {png} (job logs in {base})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
    else:
        raise SystemExit(main())
