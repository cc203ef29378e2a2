"""Soak: one long job with many random faults, every one recovered, ending bit-exact.

A 4-rank plain torch.distributed job (``recipes/torch_ddp/train.py``, 2 warm spares) takes
``--faults`` faults drawn from ``--seed``: the kind (crash, segfault, exception, exit, early exit
0, SIGSTOP, hang, hang holding the GIL), the rank, the step (distinct steps, consecutive ones
included: a fault can hit the step a recovery just resumed) and the phase. The same job without
faults is the reference: final parameters, optimizer state and every step's loss must be equal
bit for bit. Prints and writes each fault's detection and recovery time and a summary by kind.

    python -m benchmarks.soak [--faults 50] [--seed 7] [--quick]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from .common import REPO, RESULTS, run_fr_job, summary, table, write

SCRIPT = REPO / "recipes" / "torch_ddp" / "train.py"
# weights of the kinds in the draw: process deaths are what clusters see most
KINDS = {"kill": 4, "segv": 1, "exception": 2, "exit": 1, "exit0": 1, "stop": 1, "hang": 1,
         "hang_gil": 1}
PHASES = ("forward", "backward", "grad_reduce", "optimizer", "after_step")
FLAGS = ["--hang-timeout", "2", "--heartbeat-interval", "0.2"]


def draw(faults: int, seed: int, first_step: int = 2) -> tuple[str, int]:
    """The ``--inject`` spec of ``faults`` faults and the number of steps to train."""
    rng = random.Random(seed)
    span = faults + faults // 2  # a third of the steps without a fault: runs of consecutive ones
    steps = sorted(rng.sample(range(first_step, first_step + span), faults))
    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=faults)
    parts = [f"{k}:rank={rng.randrange(4)}:step={s}:phase={rng.choice(PHASES)}"
             for k, s in zip(kinds, steps)]
    return ";".join(parts), first_step + span + 2


def same_training(a: dict, b: dict) -> tuple[bool, str]:
    import torch

    if a["losses"] != b["losses"]:
        diff = [s for s in a["losses"] if a["losses"][s] != b["losses"].get(s)]
        return False, f"losses differ at steps {diff[:10]}"
    for k in a["params"]:
        if not torch.equal(a["params"][k], b["params"][k]):
            return False, f"parameter {k} differs"
    sa, sb = a["optim"]["state"], b["optim"]["state"]
    for i in sa:
        for k in sa[i]:
            if not torch.equal(sa[i][k], sb[i][k]):
                return False, f"optimizer state {i}/{k} differs"
    return True, "losses, parameters and optimizer state equal"


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.8))
    kinds = sorted({r["kind"] for r in rows})
    for i, kind in enumerate(kinds):
        pts = [r for r in rows if r["kind"] == kind]
        ax.scatter([r["step"] for r in pts], [r["recovery_s"] or 0 for r in pts], s=22,
                   color=plt.cm.tab10(i), label=kind)
    ax.set_xlabel("step of the fault")
    ax.set_ylabel("fault -> first step after (s)")
    ax.set_title(f"Soak: {len(rows)} faults, 4 ranks, every one recovered")
    ax.legend(ncol=4, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faults", type=int, default=50)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="10 faults")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per job")
    p.add_argument("--keep", default=None, help="write the jobs' logs here")
    a = p.parse_args(argv)
    n = 10 if a.quick else a.faults
    spec, steps = draw(n, a.seed)
    import torch

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        t0 = time.time()
        run_fr_job(SCRIPT, ["--steps", str(steps), "--out", str(d / "ref.pt")], nproc=4,
                   inject=None, spares=0, report=d / "ref.json", extra=FLAGS,
                   timeout=a.timeout)
        ref_s = time.time() - t0
        print(f"[soak] fault-free reference: {steps} steps in {ref_s:.0f} s; now {n} faults "
              f"(seed {a.seed}) ...", flush=True)
        t0 = time.time()
        keep = Path(a.keep) if a.keep else None
        if keep:
            keep.mkdir(parents=True, exist_ok=True)
        rep = run_fr_job(SCRIPT, ["--steps", str(steps), "--out", str(d / "soak.pt")], nproc=4,
                         inject=spec, spares=2, report=d / "soak.json",
                         extra=[*FLAGS, *(["--journal", str(keep / "journal.jsonl")] if keep
                                          else [])],
                         timeout=a.timeout, log=keep / "soak.log" if keep else None)
        soak_s = time.time() - t0
        equal, how = same_training(torch.load(d / "ref.pt", weights_only=False),
                                   torch.load(d / "soak.pt", weights_only=False))
    cols = ["rank", "kind", "step", "phase", "generation", "detect_s", "recovery_s",
            "steps_lost", "replacement", "survivor_pids_unchanged"]
    rows = [{c: f.get(c) for c in cols} for f in rep["faults"]]
    print(table(rows, cols))
    by_kind = []
    for kind in sorted({r["kind"] for r in rows}):
        ks = [r for r in rows if r["kind"] == kind]
        det = summary([r["detect_s"] for r in ks if r["detect_s"] is not None])
        rec = summary([r["recovery_s"] for r in ks if r["recovery_s"] is not None])
        by_kind.append({"kind": kind, "faults": len(ks), "detect_p50_s": det["p50"],
                        "detect_max_s": max((r["detect_s"] for r in ks), default=None),
                        "recovery_p50_s": rec["p50"],
                        "recovery_max_s": max((r["recovery_s"] or 0 for r in ks), default=None)})
    recs = [r["recovery_s"] for r in rows if r["recovery_s"] is not None]
    result = {
        "faults_injected": n, "faults_reported": len(rows),
        "generations": rep.get("generations"), "steps": steps,
        "steps_lost": sum(r["steps_lost"] or 0 for r in rows),
        "all_recovered": len(rows) == n and all(r["recovery_s"] is not None for r in rows),
        "final_equal_to_fault_free": equal, "comparison": how,
        "recovery_p50_s": summary(recs)["p50"], "recovery_p95_s": summary(recs)["p95"],
        "recovery_max_s": max(recs, default=None),
        "soak_job_s": round(soak_s, 1), "reference_job_s": round(ref_s, 1)}
    print(f"\nBy kind\n\n{table(by_kind, list(by_kind[0]))}\n" if by_kind else "")
    print(table([result], list(result)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / "soak.png"
    plot(rows, png)
    path = write("soak", {"config": {"faults": n, "seed": a.seed, "ranks": 4, "spares": 2,
                                     "steps": steps, "flags": FLAGS, "inject": spec},
                          "summary": result, "by_kind": by_kind, "faults": rows,
                          "plot": png.name})
    print(f"\nwrote {path} and {png}")
    return 0 if result["all_recovered"] and equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
