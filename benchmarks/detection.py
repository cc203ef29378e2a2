"""Detection latency per fault kind (p50/p95 over several faults) and warm-spare join time.

One 4-rank CPU job per kind, each with ``--trials`` faults injected at different steps and
ranks; detection is measured from the fault itself to the controller's decision, replacement
join from the decision to the spare taking the rank. Prints a table, writes JSON.

    python -m benchmarks.detection [--trials 5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .common import REPO, run_fr_job, summary, table, write

KINDS = {"crash": "kill", "segv": "segv", "exception": "exception", "exit": "exit:code=7",
         "hang": "hang", "hang_gil": "hang_gil", "stop": "stop"}
HANG_TIMEOUT = 2.0
HB = 0.2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--kinds", default=",".join(KINDS))
    a = p.parse_args(argv)
    script = REPO / "recipes" / "torch_ddp" / "train.py"
    rows, raw = [], {}
    for kind in a.kinds.split(","):
        spec = ";".join(f"{KINDS[kind]}:rank={1 + t % 3}:step={3 + 3 * t}:phase=backward"
                        for t in range(a.trials))
        with tempfile.TemporaryDirectory() as d:
            rep = run_fr_job(script, ["--steps", str(3 + 3 * a.trials)], nproc=4, inject=spec,
                             spares=2, report=Path(d) / "r.json",
                             extra=["--hang-timeout", str(HANG_TIMEOUT), "--heartbeat-interval",
                                    str(HB)])
        faults = rep["faults"]
        det = [f["detect_s"] for f in faults]
        join = [f["replacement_join_s"] for f in faults if f.get("replacement") == "spare"
                and f.get("replacement_join_s") is not None]
        rec = [f["recovery_s"] for f in faults if f.get("recovery_s") is not None]
        raw[kind] = faults
        target = 0.2 if kind in ("crash", "exception") else \
            (HANG_TIMEOUT + HB if kind.startswith("hang") else None)
        d, j, r = summary(det), summary(join), summary(rec)
        rows.append({"kind": kind, "faults": len(faults), "detect_p50_s": d["p50"],
                     "detect_p95_s": d["p95"], "target_s": target,
                     "met": None if target is None else d["p50"] <= target,
                     "spare_join_p50_s": j["p50"], "recovery_p50_s": r["p50"]})
        print(table(rows[-1:], list(rows[-1])), flush=True)
    cols = list(rows[0])
    print("\nDetection latency, 4-rank CPU job (hang timeout %.1fs, heartbeat %.1fs)\n" %
          (HANG_TIMEOUT, HB))
    print(table(rows, cols))
    path = write("detection", {"rows": rows, "faults": raw, "hang_timeout_s": HANG_TIMEOUT,
                               "heartbeat_s": HB})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
