"""Shrink and grow back at 8 ranks: time to the first step after each, throughput in each phase.

The plain torch recipe (``--recipe torch``) on one node of 8 ranks with ``--shrink always``: a
rank is killed at ``--fault-step``, the job goes on with 7 data-parallel replicas, and a spare
node started once the shrink is over takes the removed rank back. With ``--recipe megatron``, the
megatron-core recipe at TP=2 x DP=4 with the distributed optimizer: the killed rank's replica (two
ranks) leaves, the job goes on at DP=3 with the optimizer's shards re-partitioned, and grows back
to DP=4. ``--recipe deepspeed`` is the same for DeepSpeed ZeRO-2 with Megatron's parallel_state
as its mpu (TP=2 x DP=4), ZeRO's partitions re-partitioned at each change. From the report: the shrink's recovery time and
phases, the grow's time from its decision to the first step after it and its phases. From the
recipe's per-step timestamps: samples per second before the fault, while shrunk and after the
grow (the global batch is the same throughout), with the ratio that the data-parallel sizes alone
would give. On a machine with fewer cores than ranks the ranks share the CPUs, so fewer ranks do
the same work in about the same time and throughput barely moves; on accelerators a shrunk step
takes longer by the ratio of the data-parallel sizes.

    python -m benchmarks.shrink [--recipe torch|megatron|deepspeed] [--steps 300] [--width 2048]
                                [--micro-batch-size 256] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import REPO, table, write

RECIPES = {"torch": REPO / "recipes" / "torch_ddp" / "train.py",
           "megatron": REPO / "recipes" / "megatron" / "pretrain_gpt.py",
           "deepspeed": REPO / "recipes" / "deepspeed" / "train_tiny.py"}
TP = {"torch": 1, "megatron": 2, "deepspeed": 2}  # the ranks of one data-parallel replica
WIDTH = {"torch": 2048, "megatron": 256, "deepspeed": 2048}
DS_CONFIG = RECIPES["deepspeed"].parent / "ds_config.json"


def _launch(tmp: Path, port: int, node_rank: int, nproc: int, recipe: str,
            script_args: list[str], extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fr_megatron.cli", "run", "--nnodes", "1", "--node-rank",
           str(node_rank), "--nproc-per-node", str(nproc), "--controller", f"127.0.0.1:{port}",
           "--token-file", str(tmp / "token"), "--no-wandb", "--spares", "1", *extra,
           str(RECIPES[recipe]), *script_args]
    env = {**os.environ, **({"DS_ACCELERATOR": "cpu"} if recipe == "deepspeed" else {})}
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(tmp / f"node{node_rank}.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _throughput(step_t: dict, first: int, last: int, samples: int) -> float | None:
    """Samples per second over steps first+1..last (each interval ends at a step)."""
    gaps = [step_t[s] - step_t[s - 1] for s in range(first + 1, last + 1)
            if s - 1 in step_t and s in step_t]
    return round(samples / statistics.median(gaps), 1) if gaps else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", choices=sorted(RECIPES), default="torch")
    p.add_argument("--nproc", type=int, default=8)
    p.add_argument("--steps", type=int, default=None,
                   help="steps of the job: enough for the spare node to start while it runs "
                        "(default: deepspeed 800, else 300)")
    p.add_argument("--width", type=int, default=None,
                   help="the recipe's hidden width (default: torch 2048, megatron 256, "
                        "deepspeed 2048)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="samples per micro-batch; the global batch: one per data-parallel rank "
                        "(default: torch 256, megatron 4; deepspeed: its config's)")
    p.add_argument("--fault-step", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="fewer steps")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="keep the job's logs, report and journal in DIR")
    a = p.parse_args(argv)
    a.steps = 200 if a.quick else a.steps or (800 if a.recipe == "deepspeed" else 300)
    torch_recipe = a.recipe == "torch"
    a.width = a.width or WIDTH[a.recipe]
    if a.recipe == "deepspeed":
        a.micro_batch_size = json.loads(DS_CONFIG.read_text())["train_micro_batch_size_per_gpu"]
    a.micro_batch_size = a.micro_batch_size or (256 if torch_recipe else 4)
    tp = TP[a.recipe]
    dp = a.nproc // tp
    import torch

    from fr_megatron.events import Journal
    from fr_megatron.protocol.auth import new_token, write_token_file

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(a.keep or d)
        tmp.mkdir(parents=True, exist_ok=True)
        write_token_file(str(tmp / "token"), new_token())
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        journal, report = tmp / "journal.jsonl", tmp / "report.json"
        if torch_recipe:
            script_args = ["--steps", str(a.steps), "--width", str(a.width),
                           "--micro-batch-size", str(a.micro_batch_size),
                           "--out", str(tmp / "job.pt")]
        elif a.recipe == "deepspeed":
            script_args = ["--zero-stage", "2", "--mpu", "megatron", "--tp", str(tp),
                           "--steps", str(a.steps), "--hidden", str(a.width),
                           "--out", str(tmp / "job.pt")]
        else:
            script_args = _megatron_args(a, tp, dp, tmp / "timings.json")
        victim = a.nproc // 2 - 1
        nodes = [_launch(tmp, port, 0, a.nproc, a.recipe, script_args, [
            "--shrink", "always", "--inject", f"kill:rank={victim}:step={a.fault_step}:"
            "phase=backward", "--report", str(report), "--journal", str(journal)])]
        try:
            if Journal.wait_for(str(journal), "recovered", 300,
                                lambda: nodes[0].poll() is None) is None:
                raise RuntimeError("the shrink did not recover within 300 s")
            nodes.append(_launch(tmp, port, 1, a.nproc, a.recipe, script_args,
                                 ["--spare-node"]))
            rcs = [nodes[0].wait(900), nodes[1].wait(60)]
        finally:
            for proc in nodes:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
        if rcs != [0, 0]:
            raise RuntimeError(f"job failed {rcs}: {(tmp / 'node0.log').read_text()[-3000:]}")
        rep = json.loads(report.read_text())
        if a.recipe != "megatron":  # the recipe's own per-step record
            result = torch.load(tmp / "job.pt", weights_only=False)
        else:
            durations = json.loads((tmp / "timings.json").read_text())
    # the injected fault; a survivor that the abort left inside a cut gloo message leaves
    # too (``stuck``), which with --shrink always is another shrink, listed after it
    fault, *more = rep["faults"]
    grows = [g for g in rep["grows"] if g.get("grow_s") is not None]
    samples = dp * a.micro_batch_size * (3 if a.recipe == "megatron" else 1)
    # the data-parallel size from each change on: (last step before it, size after it), in the
    # order of the generations they opened (a survivor stuck by a grow's abort shrinks the job
    # again from the same step)
    changes = [(point, size) for point, _, size in sorted(
        [(f["recovery_point"], f["generation"] + 1, f["data_parallel_size_after"])
         for f in rep["faults"] if f["action"] == "shrink"] +
        [(g["recovery_point"], g["generation"], g["data_parallel_size_after"]) for g in grows])]
    if a.recipe == "megatron":  # rank 0's step times, and the world's size at each step
        result = {"step_t": _cumulative(durations),
                  "world_sizes": {s: tp * _size_at(s, dp, changes)
                                  for s in range(1, a.steps + 1)}}
    step_t = result["step_t"]
    bounds = [0, *(point for point, _ in changes), a.steps]
    base = _throughput(step_t, 1, bounds[1], samples)
    rows = []
    for k, (start, last) in enumerate(zip(bounds, bounds[1:])):
        if last <= start:
            continue
        size = _size_at(last, dp, changes)
        name = "before" if k == 0 else "grown" if size == dp else "shrunk"
        tput = _throughput(step_t, start + 1, last, samples)
        rows.append({"phase": name, "steps": f"{start + 1}-{last}", "data_parallel_size": size,
                     "samples_per_s": tput,
                     "vs_before": round(tput / base, 3) if tput and base else None,
                     "dp_ratio": round(size / dp, 3)})
    events = [{"event": "shrink", "rank": fault["rank"], "step": fault["step"],
               "seconds": fault["recovery_s"], "prepare_s": None, "phases": fault["phases"],
               "steps_lost": fault["steps_lost"],
               "world_size_after": fault["world_size_after"]}]
    events += [{"event": "grow", "rank": g["ranks"][0], "step": g["recovery_point"] + 1,
                "seconds": g["grow_s"], "prepare_s": g["prepare_s"], "phases": g["phases"],
                "steps_lost": g["steps_lost"], "world_size_after": g["world_size_after"]}
               for g in grows]
    what = "plain torch recipe" if torch_recipe else f"{a.recipe} recipe TP={tp} x DP={dp}"
    print(f"\nShrink and grow back, {a.nproc} ranks, {what} (width {a.width}), "
          f"{a.steps} steps; global batch {samples} samples\n")
    print(table([{k: v for k, v in e.items() if k != "phases"} for e in events],
                ["event", "rank", "step", "seconds", "prepare_s", "steps_lost",
                 "world_size_after"]))
    for e in events:
        print(f"  {e['event']} phases: " + ", ".join(f"{k} {v:.3f}s" for k, v in
                                                   e["phases"].items()))
    for f in more:
        print(f"  also: rank {f['rank']} {f['kind']} at step {f['step']}: {f['action']} to "
              f"{f['world_size_after']} ranks in {f['recovery_s']:.2f}s")
    if not grows:
        print("  no grow: the job ended before the spare node's process stood by; give it more "
              "--steps")
    print()
    print(table(rows, list(rows[0])))
    name = "shrink" if torch_recipe else f"shrink_{a.recipe}"
    png = _plot(result, events, a.nproc, name)
    path = write(name, {"recipe": a.recipe, "nproc": a.nproc, "tensor_parallel": tp,
                        "steps": a.steps, "width": a.width,
                            "micro_batch_size": a.micro_batch_size, "grew_back": bool(grows),
                            "events": events, "throughput": rows, "plot": png.name})
    print(f"\nwrote {path} and {png}")
    return 0


def _megatron_args(a, tp: int, dp: int, timings: Path) -> list[str]:
    """The megatron recipe at TP x DP with the distributed optimizer; synthetic data, which any
    data-parallel size can spread; a global batch of three micro-batches per rank."""
    return ["--tensor-model-parallel-size", str(tp), "--num-layers", "2",
            "--hidden-size", str(a.width), "--num-attention-heads", "8", "--seq-length", "64",
            "--vocab-size", "512", "--micro-batch-size", str(a.micro_batch_size),
            "--global-batch-size", str(3 * dp * a.micro_batch_size),
            "--train-iters", str(a.steps), "--hidden-dropout", "0",
            "--dataloader-type", "synthetic", "--use-distributed-optimizer", "--flash-recovery",
            "--timings", str(timings)]


def _size_at(step: int, dp: int, changes: list[tuple[int, int]]) -> int:
    """The data-parallel size that trained ``step``: the last change before it, else ``dp``."""
    return next((size for point, size in reversed(changes) if point < step), dp)


def _cumulative(durations: dict) -> dict:
    """Step -> the time it ended, from each step's duration."""
    t, out = 0.0, {0: 0.0}
    for step in sorted(durations, key=int):
        t += durations[step]
        out[int(step)] = t
    return out


def _plot(result: dict, events: list[dict], nproc: int, name: str) -> Path:
    """Step time over the run, with the world's size, the shrink and the grow marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .common import RESULTS

    t = result["step_t"]
    steps = [s for s in sorted(t) if s - 1 in t]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.plot(steps, [t[s] - t[s - 1] for s in steps], lw=1, color="tab:blue", label="step time")
    ax.set_xlabel("step")
    ax.set_ylabel("seconds per step")
    ax2 = ax.twinx()
    sizes = result["world_sizes"]
    ax2.step(sorted(sizes), [sizes[s] for s in sorted(sizes)], where="post", color="tab:green",
             label="ranks (data-parallel size)")
    ax2.set_ylim(0, nproc + 1)
    ax2.set_ylabel("ranks")
    for e in events:
        ax.axvline(e["step"], color="red" if e["event"] == "shrink" else "tab:purple", ls="--")
        ax.annotate(f"{e['event']} {e['seconds']:.2f}s", (e["step"], ax.get_ylim()[1]),
                    fontsize=8, va="top")
    fig.legend(loc="lower right", fontsize=8)
    ax.set_title(f"Shrink and grow back, {nproc} ranks")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"{name}.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


if __name__ == "__main__":
    sys.exit(main())
