"""Soak: long jobs with many random faults, each blamed on the rank it hit and recovered bit-exact.

A 4-rank plain torch.distributed job (``recipes/torch_ddp/train.py``, 2 warm spares) takes
``--faults`` faults drawn from each seed of ``--seeds``: the kind (crash, segfault, exception,
exit, early exit 0, SIGSTOP, hang, hang holding the GIL), the rank, the step (distinct steps,
consecutive ones included: a fault can hit the step a recovery just resumed) and the phase. The
same job without faults is the reference: final parameters, optimizer state and every step's
loss must be equal bit for bit. Per seed it reports the faults injected, the faults blamed,
false blames (a rank blamed at a step where none was injected into it), faults blamed on the
right rank under another kind, recovered faults and whether the job ended bit-exact, or was
lost. The default seeds include 2026 and 11, whose hangs the controller once blamed on healthy
ranks.

    python -m benchmarks.soak [--seeds 2026,11,7,3,5] [--faults 30] [--quick]
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
# what the controller reports for each injected kind
REPORTED = {"kill": "crash", "segv": "segv", "exception": "exception", "exit": "exit",
            "exit0": "exit0_early", "stop": "stop", "hang": "hang", "hang_gil": "hang_gil"}
PHASES = ("forward", "backward", "grad_reduce", "optimizer", "after_step")
FLAGS = ["--hang-timeout", "2", "--heartbeat-interval", "0.2"]
SEEDS = (2026, 11, 7, 3, 5)


def draw(faults: int, seed: int, first_step: int = 2) -> tuple[str, int]:
    """The ``--inject`` spec of ``faults`` faults and the number of steps to train."""
    rng = random.Random(seed)
    span = faults + faults // 2  # a third of the steps without a fault: runs of consecutive ones
    steps = sorted(rng.sample(range(first_step, first_step + span), faults))
    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=faults)
    parts = [f"{k}:rank={rng.randrange(4)}:step={s}:phase={rng.choice(PHASES)}"
             for k, s in zip(kinds, steps)]
    return ";".join(parts), first_step + span + 2


def injected(spec: str) -> list[dict]:
    out = []
    for part in spec.split(";"):
        kind, *kvs = part.split(":")
        fields = dict(kv.split("=") for kv in kvs)
        out.append({"kind": REPORTED[kind], "rank": int(fields["rank"]),
                    "step": int(fields["step"]), "phase": fields["phase"]})
    return out


def attribute(spec: str, reported: list[dict]) -> dict:
    """Match each reported fault to the injected fault of its rank and step: a report with no
    such injection (or a second report of one) is a false blame."""
    left = {(f["rank"], f["step"]): f for f in injected(spec)}
    false, wrong_kind = [], []
    for f in reported:
        inj = left.pop((f["rank"], f["step"]), None)
        if inj is None:
            false.append(f)
        elif inj["kind"] != f["kind"]:
            wrong_kind.append({**f, "injected_kind": inj["kind"]})
    return {"false": false, "wrong_kind": wrong_kind, "missed": list(left.values())}


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


def plot(rows: list[dict], seeds: list[int], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.8))
    kinds = sorted({r["kind"] for r in rows})
    for i, kind in enumerate(kinds):
        pts = [r for r in rows if r["kind"] == kind]
        ax.scatter([r["step"] for r in pts], [r["recovery_s"] or 0 for r in pts], s=22,
                   color=plt.cm.tab10(i), label=kind)
    false = [r for r in rows if r["false_blame"]]
    if false:
        ax.scatter([r["step"] for r in false], [r["recovery_s"] or 0 for r in false], s=90,
                   marker="x", color="red", label="false blame")
    ax.set_xlabel("step of the fault")
    ax.set_ylabel("fault -> first step after (s)")
    ax.set_title(f"Soak: {len(seeds)} seeds, {len(rows)} faults blamed, {len(false)} falsely, "
                 "4 ranks")
    ax.legend(ncol=5, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def run_seed(seed: int, n: int, steps: int, ref, d: Path, keep: Path | None,
             timeout: float) -> tuple[dict, list[dict]]:
    """One soak job; its row for the per-seed table and one row per reported fault."""
    import torch

    spec, _ = draw(n, seed)
    out = d / f"soak{seed}.pt"
    t0 = time.time()
    journal = ["--journal", str(keep / f"journal{seed}.jsonl")] if keep else []
    rep = run_fr_job(SCRIPT, ["--steps", str(steps), "--out", str(out)], nproc=4,
                     inject=spec, spares=2, report=d / f"soak{seed}.json",
                     extra=[*FLAGS, *journal], timeout=timeout,
                     log=keep / f"soak{seed}.log" if keep else None, check=False)
    soak_s = time.time() - t0
    lost = bool(rep.get("fatal")) or rep.get("rc", 0) != 0 or not out.exists()
    equal, how = (False, f"job lost: {rep.get('fatal')}") if lost else \
        same_training(ref, torch.load(out, weights_only=False))
    match = attribute(spec, rep["faults"])
    false_ids = {id(f) for f in match["false"]}
    cols = ["rank", "kind", "step", "phase", "generation", "detect_s", "recovery_s",
            "steps_lost", "replacement", "survivor_pids_unchanged", "evidence", "waits"]
    faults = [{"seed": seed, **{c: f.get(c) for c in cols}, "false_blame": id(f) in false_ids}
              for f in rep["faults"]]
    recs = [f["recovery_s"] for f in faults if f["recovery_s"] is not None]
    row = {"seed": seed, "faults_injected": n, "hangs_injected": spec.count("hang"),
           "faults_blamed": len(faults), "false_blames": len(match["false"]),
           "wrong_kind": len(match["wrong_kind"]), "missed": len(match["missed"]),
           "recovered": len(recs), "bit_exact": equal, "job_lost": lost,
           "generations": rep.get("generations"),
           "steps_lost": sum(f["steps_lost"] or 0 for f in faults),
           "recovery_p50_s": summary(recs)["p50"], "recovery_max_s": max(recs, default=None),
           "soak_job_s": round(soak_s, 1), "comparison": how, "fatal": rep.get("fatal"),
           "false_blame_faults": match["false"],
           "wrong_kind_faults": match["wrong_kind"], "missed_faults": match["missed"]}
    return row, faults


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                   help="comma-separated seeds, one job each (default %(default)s)")
    p.add_argument("--faults", type=int, default=30, help="faults per seed")
    p.add_argument("--quick", action="store_true", help="the first seed only, 10 faults")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per job")
    p.add_argument("--keep", default=None, help="write the jobs' logs and journals here")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    n = 10 if a.quick else a.faults
    if a.quick:
        seeds = seeds[:1]
    _, steps = draw(n, seeds[0])  # the same for every seed: it depends on the count only
    keep = Path(a.keep) if a.keep else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    import torch

    rows, faults = [], []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        t0 = time.time()
        run_fr_job(SCRIPT, ["--steps", str(steps), "--out", str(d / "ref.pt")], nproc=4,
                   inject=None, spares=0, report=d / "ref.json", extra=FLAGS,
                   timeout=a.timeout)
        ref_s = time.time() - t0
        ref = torch.load(d / "ref.pt", weights_only=False)
        print(f"[soak] fault-free reference: {steps} steps in {ref_s:.0f} s; now {n} faults "
              f"for each of seeds {seeds} ...", flush=True)
        for seed in seeds:
            row, fs = run_seed(seed, n, steps, ref, d, keep, a.timeout)
            rows.append(row)
            faults += fs
            lost = f", JOB LOST: {row['fatal']}" if row["job_lost"] else ""
            print(f"[soak] seed {seed}: {row['faults_blamed']} blamed for {n} injected, "
                  f"{row['false_blames']} false, {row['recovered']} recovered, "
                  f"bit-exact {row['bit_exact']}{lost} ({row['soak_job_s']:.0f} s)", flush=True)
    cols = ["seed", "faults_injected", "hangs_injected", "faults_blamed", "false_blames",
            "wrong_kind", "missed", "recovered", "bit_exact", "job_lost", "steps_lost",
            "recovery_p50_s", "recovery_max_s", "soak_job_s"]
    print(f"\nPer seed\n\n{table(rows, cols)}")
    for r in rows:
        for f in r["false_blame_faults"]:
            print(f"seed {r['seed']}: false blame {f}")
        if r["job_lost"]:
            print(f"seed {r['seed']}: job lost: {r['fatal']}")
    by_kind = []
    for kind in sorted({f["kind"] for f in faults}):
        ks = [f for f in faults if f["kind"] == kind]
        det = summary([f["detect_s"] for f in ks if f["detect_s"] is not None])
        rec = summary([f["recovery_s"] for f in ks if f["recovery_s"] is not None])
        by_kind.append({"kind": kind, "faults": len(ks), "detect_p50_s": det["p50"],
                        "detect_max_s": max((f["detect_s"] for f in ks), default=None),
                        "recovery_p50_s": rec["p50"],
                        "recovery_max_s": max((f["recovery_s"] or 0 for f in ks), default=None)})
    recs = [f["recovery_s"] for f in faults if f["recovery_s"] is not None]
    result = {
        "seeds": len(seeds), "faults_injected": n * len(seeds),
        "faults_blamed": len(faults), "false_blames": sum(r["false_blames"] for r in rows),
        "wrong_kind": sum(r["wrong_kind"] for r in rows),
        "recovered": len(recs), "jobs_lost": sum(r["job_lost"] for r in rows),
        "all_bit_exact": all(r["bit_exact"] for r in rows),
        "steps_lost": sum(r["steps_lost"] for r in rows),
        "recovery_p50_s": summary(recs)["p50"], "recovery_p95_s": summary(recs)["p95"],
        "recovery_max_s": max(recs, default=None), "reference_job_s": round(ref_s, 1)}
    print(f"\nBy kind\n\n{table(by_kind, list(by_kind[0]))}\n" if by_kind else "")
    print(table([result], list(result)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / "soak.png"
    plot(faults, seeds, png)
    path = write("soak", {"config": {"faults_per_seed": n, "seeds": seeds, "ranks": 4,
                                     "spares": 2, "steps": steps, "flags": FLAGS,
                                     "inject": {str(s): draw(n, s)[0] for s in seeds}},
                          "summary": result, "per_seed": rows, "by_kind": by_kind,
                          "faults": faults, "plot": png.name})
    print(f"\nwrote {path} and {png}")
    ok = result["false_blames"] == 0 and result["jobs_lost"] == 0 and result["all_bit_exact"] \
        and result["recovered"] == result["faults_injected"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
