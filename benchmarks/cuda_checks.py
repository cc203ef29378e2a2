"""On one GPU: CUDA ranks and Megatron-LM's own pretrain_gpt.py recover bit-exact; a snapshot's cost.

Needs one CUDA device; not part of ``python -m benchmarks`` (which runs on CPUs).

- ``cuda_start``: what a fresh process pays to start CUDA, alone and with 8 starting at once:
  importing torch, ``torch.cuda.init`` (the driver), the device's context and the first cuBLAS
  product. A warm spare has imported torch; the rest a replacement pays once it has a rank.
- ``ranks``: ``recipes/megatron/pretrain_gpt.py`` on 4 ranks sharing the GPU (TP=2 x DP=2,
  distributed optimizer, gloo moving CUDA tensors, ``--deterministic-mode``, dropout on): a run
  without a fault, one with rank 1 killed in backward and one with rank 2 killed inside the
  optimizer step, all with ``--flash-recovery`` and a warm spare that has imported megatron-core.
  Losses, parameters and optimizer state compared bit for bit; steps lost, recovery time and
  phases from the report.
- ``instances``: as ``ranks`` with ``--num-distributed-optimizer-instances 2`` and the snapshots
  in process memory (``--snapshot-dir ""``): each replacement takes its state from its instance
  peer, into CUDA tensors.
- ``megatron_lm``: Megatron-LM's own ``pretrain_gpt.py`` (a checkout of core_v0.16.1 given with
  ``--megatron-lm``, copied and patched with ``fr-megatron patch``), launched by ``fr-megatron
  run`` on 4 ranks sharing the GPU over gloo with ``--mock-data --flash-recovery``: a run without
  a fault and one with rank 1 killed in backward; the losses Megatron-LM logs and the parameters
  and optimizer state of its final checkpoint (``--ckpt-format torch``) compared bit for bit.
- ``snapshot_cost``: one rank whose parameters and optimizer state hold 4.8 GB on the GPU (fp32,
  403 M parameters, distributed optimizer), runs without and with ``--flash-recovery``
  interleaved (off, on, on, off): median step time, the overhead, and the time the training
  thread spends in a commit; then one run each way under the PyTorch profiler (the recipe's
  ``--profile``), whose traces give the GPU's busy and idle time per step; in the same run the
  machine's device-to-host bandwidth into pinned memory, xxh3 on one core, and the checksum a
  seal computes on several.

    python -m benchmarks.cuda_checks [--only cuda_start,ranks,instances,megatron_lm,...]
                                     [--megatron-lm DIR] [--work DIR]

Writes ``benchmarks/results/cuda_checks.json`` (or ``--results FILE``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fr_megatron.launcher.spare import MEGATRON_PRELOAD

from .common import REPO, RESULTS, machine, percentile, run_fr_job

RECIPE = REPO / "recipes" / "megatron" / "pretrain_gpt.py"
CHECKS = ("cuda_start", "ranks", "instances", "megatron_lm", "snapshot_cost")
TIMED = ("cuda_start", "snapshot_cost")  # run alone; the correctness checks share the GPU
RANKS_ARGS = ["--tensor-model-parallel-size", "2", "--num-layers", "2", "--hidden-size", "64",
              "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
              "--global-batch-size", "8", "--train-iters", "8", "--use-distributed-optimizer",
              "--distributed-backend", "gloo", "--deterministic-mode", "--flash-recovery"]
RANKS_FAULTS = {"none": None, "backward": "kill:rank=1:step=4:phase=backward",
                "optimizer": "kill:rank=2:step=6:phase=optimizer"}
# TP=2 x DP=2: data-parallel groups (0, 2) and (1, 3), each split into two instances of one rank
INSTANCES_ARGS = ["--num-distributed-optimizer-instances", "2"]
INSTANCE_PEER = {0: 2, 2: 0, 1: 3, 3: 1}
# 8 layers x 12 h^2 at h=2048: 403 M parameters, 1.6 GB in fp32, and 3.2 GB of Adam moments
SNAPSHOT_ARGS = ["--num-layers", "8", "--hidden-size", "2048", "--num-attention-heads", "16",
                 "--seq-length", "1024", "--micro-batch-size", "2", "--global-batch-size", "8",
                 "--hidden-dropout", "0.0", "--use-distributed-optimizer",
                 "--flash-recovery-hang-timeout-min", "120"]
MEGATRON_LM_ARGS = [
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "127",
    "--make-vocab-size-divisible-by", "64", "--num-workers", "0",
    "--tensor-model-parallel-size", "2", "--use-distributed-optimizer",
    "--distributed-backend", "gloo", "--transformer-impl", "local",
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "64", "--max-position-embeddings", "64",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "8",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine",
    "--weight-decay", "0.01", "--clip-grad", "1.0", "--seed", "1234",
    "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
    "--deterministic-mode", "--no-gradient-accumulation-fusion", "--no-persist-layer-norm",
    "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
    "--no-rope-fusion", "--ckpt-format", "torch", "--save-interval", "8", "--flash-recovery"]
# --deterministic-mode asks for NCCL_ALGO even on gloo; cuBLAS for its workspace setting; TP > 1
# on Hopper for one connection; TORCH_COMPILE_DISABLE: Megatron-LM's start-up warms its fused
# functions up with torch.compile on every rank, which training with the fusions off never calls
MEGATRON_LM_ENV = {"NCCL_ALGO": "Ring", "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
                   "CUDA_DEVICE_MAX_CONNECTIONS": "1", "TORCH_COMPILE_DISABLE": "1"}


def _load(path: Path, device: str | None = "cpu"):
    import torch

    return torch.load(path, map_location=device, weights_only=False)


def _flat(obj, prefix=""):
    """Every tensor and number in a nested state, by path."""
    import torch

    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flat(v, f"{prefix}/{i}")
    elif isinstance(obj, torch.Tensor) or isinstance(obj, (int, float)):
        yield prefix, obj


def compare(a, b) -> list[str]:
    """The paths where two nested states differ (tensors bit for bit); empty when identical."""
    import torch

    fa, fb = dict(_flat(a)), dict(_flat(b))
    diff = sorted(set(fa) ^ set(fb))
    for k in sorted(set(fa) & set(fb)):
        x, y = fa[k], fb[k]
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            diff.append(k)
        elif isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                diff.append(k)
        elif x != y and not (x != x and y != y):  # NaN equals NaN here
            diff.append(k)
    return diff


def fault_rows(report: dict) -> list[dict]:
    return [{"rank": f["rank"], "step": f.get("step"), "phase": f.get("phase"),
             "kind": f.get("kind"), "recovery_s": f.get("recovery_s"),
             "phases_s": f.get("phases"), "steps_lost": f.get("steps_lost"),
             "replacement": f.get("replacement"), "restored_from": f.get("restored_from"),
             "ranks_kept_live_state": f.get("ranks_kept_live_state"),
             "restore_gb_s": f.get("restore_gb_s")} for f in report.get("faults", [])]


# ---- several CUDA ranks ------------------------------------------------------------------------
def check_recipe_ranks(work: Path, args: list[str], faults: dict,
                       extra: list[str] = ()) -> dict:
    """The recipe on 4 ranks sharing the GPU, one job per entry of ``faults`` (name -> inject,
    "none" without a fault), all at once; each faulted job's losses, parameters and optimizer
    state compared bit for bit with the job without a fault. The spares import megatron-core
    at their start (``--preload``): the faults come seconds after training starts, before a
    spare has imported what the ranks did, where in a real job they come hours later."""
    extra = ["--preload", MEGATRON_PRELOAD, *extra]

    def job(name: str) -> dict:
        d = work / name
        d.mkdir(parents=True, exist_ok=True)
        inject = faults[name]
        try:
            return run_fr_job(RECIPE, [*args, "--out", str(d / "out")], nproc=4,
                              inject=inject, spares=1 if inject else 0, extra=extra,
                              report=d / "report.json", log=d / "log.txt", check=False,
                              timeout=200)
        except subprocess.TimeoutExpired:
            return {"rc": "timeout", "faults": [], "fatal": "no end in 200 s"}

    with ThreadPoolExecutor(len(faults)) as pool:  # one GPU, 16 cores: all at once
        reports = dict(zip(faults, pool.map(job, faults)))

    def outs(name: str) -> dict[int, dict]:
        """Each rank's losses and state, as saved: on the device the rank trained on."""
        paths = {r: work / name / f"out.rank{r}.pt" for r in range(4)}
        return {r: {k: s[k] for k in ("losses", "params", "optim")}
                for r, p in paths.items() if p.exists() for s in [_load(p, device=None)]}

    out = {"args": args, "launcher_args": extra, "runs": {}}
    base = outs("none")
    out["params_on_cuda"] = all(t.is_cuda for t in base[0]["params"].values()) \
        if 0 in base else None
    for name, rep in reports.items():
        run = {"rc": rep.get("rc"), "fatal": rep.get("fatal"), "faults": fault_rows(rep),
               "redundancy": rep.get("redundancy")}
        if name != "none":
            got, diffs = outs(name), {}
            for r in range(4):
                d = compare(base[r], got[r]) if r in base and r in got else ["missing"]
                if d:
                    diffs[r] = d[:10]
            run["bit_exact"] = not diffs
            run["differences"] = diffs
            run["losses"] = {0: got[0]["losses"]} if 0 in got else {}
        out["runs"][name] = run
    out["losses_without_fault"] = base.get(0, {}).get("losses")
    return out


def check_ranks(work: Path) -> dict:
    """Snapshots in the node's shared memory: a replacement restores its predecessor's."""
    return check_recipe_ranks(work, RANKS_ARGS, RANKS_FAULTS)


def check_instances(work: Path) -> dict:
    """Two distributed-optimizer instances (ranks 0 and 2, 1 and 3 hold the same shard) and the
    snapshots in process memory: a replacement takes its state from its instance peer, over
    gloo, into CUDA tensors."""
    out = check_recipe_ranks(work, [*RANKS_ARGS, *INSTANCES_ARGS], RANKS_FAULTS,
                             extra=["--snapshot-dir", ""])
    for run in out["runs"].values():
        for f in run["faults"]:
            f["from_instance_peer"] = (f.get("restored_from") or {}).get("unique") \
                == INSTANCE_PEER.get(f["rank"])
    return out


# ---- a fresh process's CUDA start ---------------------------------------------------------------
CUDA_START = """
import json, time
t = [time.perf_counter()]
import torch
t.append(time.perf_counter())
torch.cuda.init()
t.append(time.perf_counter())
torch.cuda.set_device(0)
torch.empty(1, device="cuda")
torch.cuda.synchronize()
t.append(time.perf_counter())
a = torch.randn(256, 256, device="cuda")
(a @ a).sum().item()
t.append(time.perf_counter())
print(json.dumps(dict(zip(("import_torch_s", "cuda_init_s", "context_s", "first_matmul_s"),
                          (b - a for a, b in zip(t, t[1:]))))))
"""


def check_cuda_start(counts=(1, 8)) -> dict:
    """What a process pays to start CUDA, alone and with others starting at once: importing
    torch, ``torch.cuda.init`` (the driver), the device's context, the first cuBLAS product."""
    out = {}
    for n in counts:
        procs = [subprocess.Popen([sys.executable, "-c", CUDA_START], stdout=subprocess.PIPE,
                                  text=True) for _ in range(n)]
        rows = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1])
                for p in procs]
        out[f"{n}_at_once"] = {k: _median([r[k] for r in rows]) for k in rows[0]}
    return out


# ---- Megatron-LM's own pretrain_gpt.py -----------------------------------------------------------
LOSS_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+.*?lm loss: ([0-9.eE+-]+)")


def megatron_lm_losses(log: str) -> dict[int, float]:
    """The loss Megatron-LM logs per iteration (the last line for an iteration redone)."""
    return {int(i): float(v) for i, v in LOSS_LINE.findall(log)}


def build_dataset_helpers(tree: Path, env: dict) -> int:
    """Megatron-LM's C++ dataset helpers (its mock data needs them), built before the ranks
    start: Megatron-LM runs ``make`` for them on rank 0, which finds them built (a machine
    without ``make`` gets one that does nothing, on ``env``'s PATH)."""
    import sysconfig

    src = tree / "megatron/core/datasets"
    includes = subprocess.run([sys.executable, "-m", "pybind11", "--includes"],
                              capture_output=True, text=True).stdout.split()
    cc = subprocess.run(["g++", "-O3", "-Wall", "-shared", "-std=c++17", "-fPIC", *includes,
                         str(src / "helpers.cpp"), "-o",
                         str(src / ("helpers_cpp" + sysconfig.get_config_var("EXT_SUFFIX")))],
                        capture_output=True, text=True)
    if shutil.which("make") is None:
        stub = tree.parent / "bin"
        stub.mkdir(exist_ok=True)
        (stub / "make").write_text("#!/bin/sh\nexit 0\n")
        (stub / "make").chmod(0o755)
        env["PATH"] = f"{stub}{os.pathsep}{env.get('PATH', '')}"
    return cc.returncode


def run_with_stacks(cmd: list[str], cwd: Path, env: dict, log: Path, timeout: float):
    """Run a job; one that has not ended in ``timeout`` seconds gets SIGABRT in each of its
    ranks first (faulthandler prints every thread's stack), then is killed. (exit code or
    "timeout", output)."""
    import signal

    import psutil

    with open(log, "w") as out:
        p = subprocess.Popen(cmd, cwd=cwd, env={**env, "PYTHONFAULTHANDLER": "1"}, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
            for child in psutil.Process(p.pid).children(recursive=True):
                try:
                    child.send_signal(signal.SIGABRT)
                except psutil.Error:
                    pass
            time.sleep(5)
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return rc, log.read_text(errors="replace")


def check_megatron_lm(work: Path, checkout: Path) -> dict:
    tree = work / "Megatron-LM"
    if not tree.exists():
        shutil.copytree(checkout, tree, symlinks=True)
    if "fr_megatron" not in (tree / "pretrain_gpt.py").read_text():  # a checkout not patched yet
        p = subprocess.run([sys.executable, "-m", "fr_megatron.cli", "patch", "--megatron-lm",
                            str(tree)], cwd=REPO, capture_output=True, text=True)
        if p.returncode:
            return {"patched": False, "error": p.stdout + p.stderr}
    env = {**os.environ, **MEGATRON_LM_ENV,
           "PYTHONPATH": os.pathsep.join([str(tree), str(REPO), os.environ.get("PYTHONPATH", "")])}
    mk = build_dataset_helpers(tree, env)
    faults = {"none": None, "backward": "kill:rank=1:step=4:phase=backward"}

    def job(name: str) -> dict:
        d = work / f"mlm-{name}"
        d.mkdir(parents=True, exist_ok=True)
        inject = faults[name]
        # the template and the spares import Megatron-LM's training package at their start, as
        # a spare of a real job has long done when a fault comes (``check_recipe_ranks``)
        cmd = [sys.executable, "-m", "fr_megatron.cli", "run", "--nproc-per-node", "4",
               "--spares", "1" if inject else "0", "--no-wandb", "--report",
               str(d / "report.json"), "--preload", f"{MEGATRON_PRELOAD},megatron.training"] \
            + (["--inject", inject] if inject else [])
        cmd += [str(tree / "pretrain_gpt.py"), *MEGATRON_LM_ARGS, "--save", str(d / "ckpt")]
        t0 = time.time()
        rc, log = run_with_stacks(cmd, tree, env, d / "log.txt", timeout=150)
        rep = json.loads((d / "report.json").read_text()) if (d / "report.json").exists() else {}
        return {"rc": rc, "wall_s": time.time() - t0, "log_tail": log[-3000:] if rc else "",
                "losses": megatron_lm_losses(log), "faults": fault_rows(rep),
                "fatal": rep.get("fatal")}

    with ThreadPoolExecutor(len(faults)) as pool:
        runs = dict(zip(faults, pool.map(job, faults)))
    out = {"args": MEGATRON_LM_ARGS, "env": MEGATRON_LM_ENV, "helpers_build_rc": mk,
           "runs": runs}
    a, b = (sorted((work / f"mlm-{n}" / "ckpt").rglob("*.pt")) for n in faults)
    rel = [p.relative_to(work / "mlm-none" / "ckpt") for p in a]
    out["checkpoint_files"] = [str(r) for r in rel]
    if a and [p.relative_to(work / "mlm-backward" / "ckpt") for p in b] == rel:
        diffs = {}
        for r in rel:
            sa, sb = (_load(work / f"mlm-{n}" / "ckpt" / r) for n in faults)
            for s in (sa, sb):  # what differs by design: the paths in args, and the FLOPs
                if isinstance(s, dict):  # counter, which a replacement starts again from 0
                    s.pop("args", None)
                    s.pop("num_floating_point_operations_so_far", None)
            d = compare(sa, sb)
            if d:
                diffs[str(r)] = d[:10]
        out["final_state_bit_exact"] = not diffs
        out["differences"] = diffs
    else:
        out["final_state_bit_exact"] = False
        out["differences"] = {"files": [str(p) for p in b]}
    la, lb = runs["none"]["losses"], runs["backward"]["losses"]
    out["losses_equal"] = bool(la) and la == lb
    return out


# ---- the snapshot's cost on one rank with gigabytes of state -------------------------------------
def limits(nbytes: int = 2 << 30) -> dict:
    """The machine's own limits for a snapshot: device-to-host copy into pinned memory, one
    core's xxh3, and the checksum a seal computes (``layout.checksum``, on several cores)."""
    import torch
    import xxhash

    from fr_megatron.runtime.layout import checksum

    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def best(f):
        rates = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            f()
            torch.cuda.synchronize()
            rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
        return max(rates)

    return {"d2h_pinned_gb_s": best(lambda: dst.copy_(src, non_blocking=True)),
            "xxh3_one_core_gb_s": best(lambda: xxhash.xxh3_128(dst.numpy()).digest()),
            "checksum_gb_s": best(lambda: checksum(dst))}


def trace_steps(path: Path) -> list[dict]:
    """Per profiled step of a PyTorch profiler trace: its wall time, the GPU's busy time (the
    union of its kernels), the longest time the GPU waited between two kernels, the
    device-to-host copy time, and the time in flash recovery's named ranges (``fr_megatron.*``)."""
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X"]
    steps = [e for e in events if e.get("cat") == "user_annotation"
             and str(e.get("name", "")).startswith("ProfilerStep#")]
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "kernel")
    rows = []
    for s in steps:
        a, b = s["ts"], s["ts"] + s["dur"]
        busy, longest_wait, end = 0.0, 0.0, None
        for x, y in (k for k in kernels if a <= k[0] < b):
            if end is not None and x > end:
                longest_wait = max(longest_wait, x - end)
            busy += max(0.0, y - max(x, end if end is not None else x))
            end = y if end is None else max(end, y)
        d2h = sum(e["dur"] for e in events if e.get("cat") == "gpu_memcpy"
                  and "DtoH" in e.get("name", "") and a <= e["ts"] < b)
        fr: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "user_annotation" and a <= e["ts"] < b and \
                    str(e.get("name", "")).startswith("fr_megatron."):
                fr[e["name"]] = fr.get(e["name"], 0.0) + e["dur"] / 1e6
        rows.append({"step_s": s["dur"] / 1e6, "gpu_busy_s": busy / 1e6,
                     "gpu_idle_s": (s["dur"] - busy) / 1e6,
                     "longest_gpu_wait_s": longest_wait / 1e6, "d2h_copy_s": d2h / 1e6,
                     "flash_recovery_s": fr})
    return rows


def check_snapshot_cost(work: Path, steps: int = 12, skip: int = 3) -> dict:
    """Timed runs off, on, on, off; then one run each way under the PyTorch profiler (steps
    7-9), whose traces say where a step's extra time goes: the GPU's kernels or its waits."""
    order = ["off", "on", "on", "off", "off-profiled", "on-profiled"]
    runs = []
    for i, mode in enumerate(order):
        d = work / f"snap-{i}-{mode}"
        d.mkdir(parents=True, exist_ok=True)
        args = [*SNAPSHOT_ARGS, "--train-iters", str(steps), "--timings", str(d / "t.json")]
        if mode.startswith("on"):
            args.append("--flash-recovery")
        if mode.endswith("profiled"):
            args += ["--profile", "--use-pytorch-profiler", "--profile-step-start", "7",
                     "--profile-step-end", "10", "--tensorboard-dir", str(d / "traces")]
        t0 = time.time()
        try:
            rep = run_fr_job(RECIPE, args, nproc=1, inject=None, spares=0,
                             report=d / "report.json", log=d / "log.txt", check=False,
                             timeout=150)
        except subprocess.TimeoutExpired:
            rep = {"rc": "timeout"}
        times = {int(k): v for k, v in json.loads((d / "t.json").read_text()).items()} \
            if (d / "t.json").exists() else {}
        stats = next(iter(rep.get("rank_stats", {}).values()), {})
        run = {"mode": mode, "rc": rep.get("rc"), "wall_s": time.time() - t0,
               "step_s": [times[k] for k in sorted(times)], "stats": stats}
        traces = sorted((d / "traces").glob("*.json")) if mode.endswith("profiled") else []
        if traces:
            run["profiled_steps"] = trace_steps(traces[0])
        runs.append(run)
        print(f"snapshot_cost {mode}: median step "
              f"{_median([t for k, t in times.items() if k > skip])}", flush=True)
    med = {m: _median([t for r in runs if r["mode"] == m for t in r["step_s"][skip:]])
           for m in ("off", "on")}
    on_stats = [r["stats"] for r in runs if r["mode"] == "on" and r["stats"]]
    profiled = {r["mode"].removesuffix("-profiled"): r.get("profiled_steps", [])
                for r in runs if r["mode"].endswith("profiled")}
    return {"args": SNAPSHOT_ARGS, "steps": steps, "skip": skip, "order": order,
            **limits(), "step_s_off": med["off"], "step_s_on": med["on"],
            "overhead": med["on"] / med["off"] - 1 if med["off"] and med["on"] else None,
            "target_overhead": 0.01,
            "training_thread_waits_s_p50": _median([s.get("commit_blocked_s_p50")
                                                    for s in on_stats
                                                    if s.get("commit_blocked_s_p50")
                                                    is not None]),
            "state_GB": _median([s["state_bytes"] for s in on_stats]) / 1e9 if on_stats else None,
            "snapshots_GB": _median([s["snapshot_bytes"] for s in on_stats]) / 1e9
            if on_stats else None,
            "snapshots_in_shared_memory": all(s.get("snapshots_in_shared_memory")
                                              for s in on_stats) if on_stats else None,
            "profiled": {m: {k: _median([row[k] for row in rows])
                             for k in ("step_s", "gpu_busy_s", "gpu_idle_s",
                                       "longest_gpu_wait_s", "d2h_copy_s")}
                         for m, rows in profiled.items() if rows},
            "runs": runs}


def summary(checks: dict) -> list[dict]:
    """One row per job of the checks: what it shows at a glance."""
    rows = []
    for name in ("ranks", "instances", "megatron_lm"):
        for run, r in checks.get(name, {}).get("runs", {}).items():
            f = (r.get("faults") or [{}])[0]
            exact = r.get("bit_exact") if name != "megatron_lm" else (
                checks[name].get("final_state_bit_exact") and checks[name].get("losses_equal"))
            rows.append({"check": name, "fault": run, "rc": r.get("rc"),
                         "bit_exact": None if run == "none" else exact,
                         "steps_lost": f.get("steps_lost"), "recovery_s": f.get("recovery_s"),
                         "from": (f.get("restored_from") or {}).get("unique"),
                         **{f"{k}_s": v for k, v in (f.get("phases_s") or {}).items()}})
    snap = checks.get("snapshot_cost", {})
    if "overhead" in snap:
        rows.append({"check": "snapshot_cost", "fault": "-", "state_GB": snap["state_GB"],
                     "step_s_off": snap["step_s_off"], "step_s_on": snap["step_s_on"],
                     "overhead": snap["overhead"],
                     "waits_s": snap["training_thread_waits_s_p50"],
                     **{f"gpu_idle_s_{m}": p["gpu_idle_s"]
                        for m, p in snap.get("profiled", {}).items()}})
    return rows


def _median(xs):
    return percentile([x for x in xs if x is not None], 0.5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(CHECKS), help=f"of {','.join(CHECKS)}")
    p.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM_DIR"),
                   help="a Megatron-LM checkout of core_v0.16.1 (copied, never modified)")
    p.add_argument("--work", default=None, help="where the jobs run and keep their logs")
    p.add_argument("--results", default=str(RESULTS / "cuda_checks.json"))
    a = p.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="cuda_checks_"))
    import torch

    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    result = {"machine": {**machine(), "gpu": torch.cuda.get_device_name(0),
                          "torch": torch.__version__, "cuda": torch.version.cuda},
              "checks": {}}
    def one(name: str) -> dict:
        t0 = time.time()
        try:
            if name == "cuda_start":
                got = check_cuda_start()
            elif name == "ranks":
                got = check_ranks(work / name)
            elif name == "instances":
                got = check_instances(work / name)
            elif name == "megatron_lm":
                got = check_megatron_lm(work / name, Path(a.megatron_lm)) if a.megatron_lm \
                    else {"skipped": "no --megatron-lm checkout"}
            else:
                got = check_snapshot_cost(work / name)
        except Exception:  # noqa: BLE001 - the other checks still run and report
            got = {"error": traceback.format_exc()}
        got["wall_s"] = time.time() - t0
        print(f"== {name}\n" + json.dumps(got, indent=1, default=str)[:6000], flush=True)
        return got

    names = a.only.split(",")
    bad = [n for n in names if n not in CHECKS]
    if bad:
        p.error(f"unknown checks {bad}; of {CHECKS}")
    # the correctness checks share the GPU and the cores at once; the timed one runs alone
    if "cuda_start" in names:
        result["checks"]["cuda_start"] = one("cuda_start")
    together = [n for n in names if n not in TIMED]
    with ThreadPoolExecutor(max(len(together), 1)) as pool:
        result["checks"].update(zip(together, pool.map(one, together)))
    Path(a.results).write_text(json.dumps(result, indent=2, default=str))
    if "snapshot_cost" in names:
        result["checks"]["snapshot_cost"] = one("snapshot_cost")
    result["summary"] = summary(result["checks"])
    Path(a.results).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
