"""``fr-megatron demo``: watch a 3D-parallel job lose a rank and recover within one step.

With no arguments: a tiny megatron-core GPT on 8 CPU ranks (TP=2 x PP=2 x DP=2, distributed
optimizer), one rank killed mid-step, a warm spare taking its place, wandb offline. It first trains
the same steps without a fault, then with it, and checks the two end bit-identical. It prints
progress, a report table, and writes the JSON report and two PNGs (loss curve with the fault,
recovery timeline) into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from .launcher.spare import MEGATRON_PRELOAD as PRELOAD
from .runtime.inject import KINDS, STEP_PHASES

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "megatron" / "pretrain_gpt.py"
_EVENT = re.compile(r"event=(fault_reported|fault_decided|replacement_started|recovered|"
                    r"job_stopped)\s+(.*)")
_ITER = re.compile(r"iteration (\d+)/(\d+) \| lm loss ([0-9.]+)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fr-megatron demo", description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=8, help="ranks (one node)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (default 2)")
    p.add_argument("--pp", type=int, default=2, help="pipeline-parallel size (default 2)")
    p.add_argument("--steps", type=int, default=12, help="training steps (default 12)")
    p.add_argument("--fault", default="kill", choices=KINDS, help="fault kind (default kill)")
    p.add_argument("--fault-rank", type=int, default=5, help="the rank that fails (default 5)")
    p.add_argument("--fault-step", type=int, default=6, help="the step it fails in (default 6)")
    p.add_argument("--fault-phase", default="backward", choices=STEP_PHASES,
                   help="the phase of that step (default backward)")
    p.add_argument("--spares", type=int, default=1, help="warm spares (default 1)")
    p.add_argument("--out-dir", default="runs/demo",
                   help="where the reports, journals and plots go (default runs/demo)")
    p.add_argument("--report", default=None, help="JSON report path (default OUT_DIR/report.json)")
    p.add_argument("--no-wandb", action="store_true", help="do not log the recovery to wandb")
    p.add_argument("--skip-baseline", action="store_true",
                   help="skip the fault-free run (no bit-exact check)")
    return p


def _validate(a) -> None:
    errors = []
    if a.nproc % (a.tp * a.pp):
        errors.append(f"--nproc {a.nproc} must be a multiple of --tp x --pp ({a.tp * a.pp})")
    if not 0 <= a.fault_rank < a.nproc:
        errors.append(f"--fault-rank must be in [0, {a.nproc})")
    if not 1 <= a.fault_step <= a.steps:
        errors.append(f"--fault-step must be in [1, --steps={a.steps}]")
    if errors:
        raise SystemExit("fr-megatron demo: error: " + "; ".join(errors))


def _job(a, out: Path, name: str, inject: str | None, wandb: bool) -> dict:
    """Run one job, streaming condensed progress; returns its report."""
    report = out / f"{name}.report.json"
    cmd = [sys.executable, "-m", "fr_megatron.cli", "run", "--nproc-per-node", str(a.nproc),
           "--spares", str(a.spares if inject else 0), "--report", str(report),
           "--journal", str(out / f"{name}.journal.jsonl")]
    if not wandb:
        cmd.append("--no-wandb")
    if inject:
        # the spare loads megatron-core at its start, as a user's --preload makes it: the
        # fault comes a few seconds into training, before a spare could have learned the
        # ranks' modules and imported them
        cmd += ["--inject", inject, "--preload", PRELOAD]
    cmd += [str(RECIPE), "--tensor-model-parallel-size", str(a.tp),
            "--pipeline-model-parallel-size", str(a.pp), "--num-layers", str(2 * a.pp),
            "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "2", "--global-batch-size", str(4 * a.nproc // (a.tp * a.pp)),
            "--train-iters", str(a.steps), "--use-distributed-optimizer", "--flash-recovery",
            "--out", str(out / name)]
    env = {**os.environ, "FR_CONFIG": json.dumps({"wandb": {
        "enabled": wandb, "mode": os.environ.get("WANDB_MODE", "offline"), "dir": str(out),
        "project": "fr_megatron-demo", "tags": ["demo"]}}), "DS_ACCELERATOR": "cpu"}
    t0 = time.monotonic()
    log = open(out / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    for line in proc.stdout:
        log.write(line)
        m = _ITER.search(line)
        if m:
            print(f"  [{name:>8}] {time.monotonic() - t0:6.1f}s  step {m[1]:>3}/{m[2]}  loss {m[3]}",
                  flush=True)
        m = _EVENT.search(line)
        if m:
            fields = " ".join(kv for kv in m[2].split() if not kv.startswith(("pid=", "node=")))
            print(f"  [{name:>8}] {time.monotonic() - t0:6.1f}s  ** {m[1]}: {fields}", flush=True)
    rc = proc.wait()
    log.close()
    if rc != 0 or not report.exists():
        raise SystemExit(f"fr-megatron demo: the {name} job failed (exit {rc}); see "
                         f"{out / (name + '.log')}")
    return json.loads(report.read_text())


def _load(out: Path, name: str, nproc: int) -> list[dict]:
    import torch

    return [torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in range(nproc)]


def _equal(base: list[dict], got: list[dict]) -> bool:
    import torch

    for a, b in zip(base, got):
        if a["losses"] != b["losses"] or a["consumed_samples"] != b["consumed_samples"]:
            return False
        for part in ("params", "optim"):
            if a[part].keys() != b[part].keys() or not all(
                    torch.equal(a[part][k], b[part][k]) for k in a[part]):
                return False
    return True


def _table(faults: list[dict], equal) -> str:
    rows = []
    for f in faults:
        ph = f.get("phases") or {}
        rows.append([f"{f['kind']} rank {f['rank']} step {f['step']} ({f['phase']})",
                     f"{f['detect_s']:.3f}", *(f"{ph.get(k, 0):.3f}" for k in
                                               ("abort", "rebuild", "restore", "resume")),
                     f"{f['recovery_s']:.2f}" if f.get("recovery_s") is not None else "-",
                     str(f.get("steps_lost")), f.get("replacement") or "-"])
    head = ["fault", "detect s", "abort s", "rebuild s", "restore s", "resume s", "recovery s",
            "steps lost", "replacement"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)] if rows else \
        [len(h) for h in head]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    verdict = {True: "yes: parameters, optimizer shards and losses of every rank are "
                     "bit-identical to the fault-free run",
               False: "NO: the run with the fault differs from the fault-free run",
               None: "not checked (--skip-baseline)"}[equal]
    out.append(f"\nbit-exact with the fault-free run: {verdict}")
    return "\n".join(out)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    _validate(a)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inject = f"{a.fault}:rank={a.fault_rank}:step={a.fault_step}:phase={a.fault_phase}"
    print(f"fr_megatron demo: tiny GPT, {a.nproc} CPU ranks, TP={a.tp} x PP={a.pp} x "
          f"DP={a.nproc // (a.tp * a.pp)}, distributed optimizer, {a.steps} steps; "
          f"fault: {inject}; {a.spares} warm spare(s)\n", flush=True)
    t0 = time.monotonic()
    base_rep = None
    if not a.skip_baseline:
        print("1/2  the same steps without a fault (reference for the bit-exact check)")
        base_rep = _job(a, out, "baseline", None, wandb=False)
    print(f"{'2/2' if base_rep else '1/1'}  with the fault and flash recovery")
    rep = _job(a, out, "fault", inject, wandb=not a.no_wandb)
    got = _load(out, "fault", a.nproc)
    equal = None
    base_losses = None
    if base_rep is not None:
        base = _load(out, "baseline", a.nproc)
        equal = _equal(base, got)
        base_losses = base[0]["losses"]
    from . import plots

    losses = got[0]["losses"]
    png_loss = plots.loss_curve(str(out / "loss_curve.png"), losses, rep["faults"], base_losses,
                                title=f"tiny GPT TP{a.tp}xPP{a.pp}xDP{a.nproc // (a.tp * a.pp)}: "
                                      f"loss with the fault marked")
    png_tl = plots.recovery_timeline(str(out / "recovery_timeline.png"), rep["faults"])
    report = {**rep, "final_params_equal_fault_free": equal, "losses": losses,
              "fault_free_losses": base_losses, "inject": inject,
              "plots": [png_loss, png_tl], "wall_s": round(time.monotonic() - t0, 1)}
    report_path = Path(a.report or out / "report.json")
    report_path.write_text(json.dumps(report, indent=2))
    print("\n" + _table(rep["faults"], equal))
    print(f"\nreport: {report_path}\nplots:  {png_loss}\n        {png_tl}")
    if not a.no_wandb:
        print(f"wandb:  offline run under {out / 'wandb'} (wandb sync to upload)")
    print(f"demo took {time.monotonic() - t0:.0f}s")
    return 0 if equal is not False else 1


if __name__ == "__main__":
    sys.exit(main())
