"""Every benchmark in one run, then one summary: ``python -m benchmarks`` or ``fr-megatron bench``.

The benchmarks time things on the same CPUs, so they run one after another, each as its own
``python -m benchmarks.<name>`` process: a crashed or hung one cannot take the others down, and
each starts from a fresh interpreter as it does when run alone. ``--quick`` is passed to the
benchmarks that take it; those that do not get the smaller arguments in ``QUICK_ARGS``. At the
end ``benchmarks/results/README.md`` is written from the JSON files in ``benchmarks/results``
(also those of earlier runs), one section per file, with the machine each was measured on.

    python -m benchmarks [--only detection,control_plane] [--quick] [--list] [--readme-only]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .common import REPO, RESULTS

BENCH_DIR = REPO / "benchmarks"
# the order they run in; restart_baseline runs only where its module exists
ORDER = ["detection", "rebuild_scale", "recovery", "state_scale", "shrink", "restart_baseline",
         "control_plane", "soak"]
# smaller runs for --quick, for the benchmarks that have no --quick flag of their own
QUICK_ARGS = {"detection": ["--trials", "1"], "rebuild_scale": ["--worlds", "4,8"],
              "recovery": ["--trials", "1", "--reps", "1", "--steady-iters", "6"]}


def available() -> list[str]:
    return [n for n in ORDER if (BENCH_DIR / f"{n}.py").is_file()]


def _module_info(name: str) -> tuple[str, bool]:
    """(first docstring line, whether it declares a --quick flag), read without importing it."""
    path = BENCH_DIR / f"{name}.py"
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return "", False
    doc = (ast.get_docstring(tree) or "").strip().splitlines()
    quick = any(isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "add_argument"
                and any(isinstance(a, ast.Constant) and a.value == "--quick" for a in n.args)
                for n in ast.walk(tree))
    return (doc[0] if doc else ""), quick


def command(name: str, quick: bool) -> list[str]:
    cmd = [sys.executable, "-m", f"benchmarks.{name}"]
    if quick:
        cmd += ["--quick"] if _module_info(name)[1] else QUICK_ARGS.get(name, [])
    return cmd


def run_one(name: str, cmd: list[str], timeout: float, prefix: str) -> dict:
    """Run one benchmark, echoing its output indented; kill its process group on timeout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        PYTHONUNBUFFERED="1")
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, bufsize=1,
                         start_new_session=True)
    tail: list[str] = []

    def echo():
        for line in p.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            del tail[:-20]
            print(f"{prefix}  | {line}", flush=True)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    timed_out = False
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(p.pid, signal.SIGKILL)  # the group this run started, and only it
        p.wait(30)
    except KeyboardInterrupt:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    reader.join(5)
    return {"name": name, "rc": p.returncode, "timed_out": timed_out,
            "seconds": round(time.time() - t0, 1), "tail": tail}


# ---- the summary ------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return {True: "yes", False: "no", None: "-"}[v]
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    if isinstance(v, (list, dict)):
        s = json.dumps(v, separators=(",", ":"))
        return s if len(s) <= 40 else s[:37] + "..."
    return str(v).replace("|", "/").replace("\n", " ")


def _tables(data, path: str = "", depth: int = 0):
    """(title, rows) for every list of flat objects in ``data`` (two levels down at most)."""
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        if len(data) <= 60:
            yield path, data
        return
    if isinstance(data, dict) and depth < 2:
        for k, v in data.items():
            if k in ("machine", "per_rank"):
                continue
            yield from _tables(v, f"{path}.{k}" if path else k, depth + 1)


def _section(stem: str, data: dict, results: Path) -> list[str]:
    base = max((n for n in available() + [stem] if stem.startswith(n)), key=len)
    doc, _ = _module_info(base)
    out = [f"## {stem}", ""]
    if doc:
        out += [doc, ""]
    m = data.get("machine", {})
    if m:
        out += ["Machine: " + ", ".join(f"{k} {v}" for k, v in m.items()) +
                (f"; run took {data['wall_s']:.0f} s" if isinstance(data.get("wall_s"),
                                                                    (int, float)) else ""), ""]
    cfg = data.get("config")
    if isinstance(cfg, dict):
        flat = {k: v for k, v in cfg.items() if not isinstance(v, (dict, list)) or
                len(json.dumps(v)) <= 60}
        out += ["Config: " + ", ".join(f"`{k}={_fmt(v)}`" for k, v in flat.items()), ""]
    if isinstance(data.get("targets"), dict):
        out += ["Targets: " + ", ".join(f"{k} {_fmt(v)}" for k, v in data["targets"].items()),
                ""]
    scalars = {k: v for k, v in data.items() if k not in ("wall_s", "plot") and
               isinstance(v, (int, float, str, bool)) and len(str(v)) <= 60}
    if scalars:
        out += ["Parameters: " + ", ".join(f"{k} {_fmt(v)}" for k, v in scalars.items()), ""]
    for title, rows in _tables(data):
        cols: list[str] = []
        for r in rows:
            cols += [c for c in r if c not in cols]
        if title == "rows" and isinstance(data.get("columns"), list):
            cols = [c for c in data["columns"] if c in cols]  # the benchmark's own choice
        # leave out columns of long nested values (per-step lists, per-thread breakdowns)
        cols = [c for c in cols if not any(isinstance(r.get(c), (list, dict)) and
                                           len(json.dumps(r.get(c))) > 40 for r in rows)][:24]
        out += [f"**{title}** ({len(rows)} rows)", "",
                "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
        out.append("")
    png = results / f"{stem}.png"
    if png.exists():
        out += [f"![{stem}]({png.name})", ""]
    return out


def write_readme(results: Path = RESULTS) -> Path:
    files = sorted(results.glob("*.json"), key=lambda f: (
        next((i for i, n in enumerate(ORDER) if f.stem.startswith(n)), len(ORDER)), f.stem))
    out = ["# Benchmark results", "",
           "Written by `python -m benchmarks` (`fr-megatron bench`) from the JSON files in this "
           "folder; each section is one file, measured on the machine it names. Figures are "
           "printed next to their targets, never asserted. Rerun one with "
           "`python -m benchmarks --only NAME`.", ""]
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            out += [f"## {f.stem}", "", f"(unreadable: {e})", ""]
            continue
        out += _section(f.stem, data if isinstance(data, dict) else {"rows": data}, results)
    results.mkdir(parents=True, exist_ok=True)
    path = results / "README.md"
    path.write_text("\n".join(out).rstrip() + "\n")
    return path


def build_parser() -> argparse.ArgumentParser:
    names = available()
    p = argparse.ArgumentParser(prog="fr-megatron bench",
                                description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None,
                   help=f"comma-separated benchmarks to run (default: all: {','.join(names)})")
    p.add_argument("--quick", action="store_true", help="smaller runs (see QUICK_ARGS)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per benchmark")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--readme-only", action="store_true",
                   help="only rewrite results/README.md from the JSON files there")
    return p


def main(argv=None) -> int:
    names = available()
    p = build_parser()
    a = p.parse_args(argv)
    chosen = names
    if a.only is not None:
        chosen = [n.strip() for n in a.only.split(",") if n.strip()]
        bad = [n for n in chosen if n not in names]
        if bad or not chosen:
            p.error(f"--only: unknown benchmark(s) {', '.join(bad) or '(none given)'}; "
                    f"valid: {', '.join(names)}")
    if a.list:
        for n in names:
            doc, quick = _module_info(n)
            print(f"{n:<16} {'--quick' if quick else '        '}  {doc}")
        return 0
    if a.readme_only:
        print(f"wrote {write_readme()}")
        return 0
    results, t0 = [], time.time()
    for i, name in enumerate(chosen, 1):
        cmd = command(name, a.quick)
        tag = f"[{i}/{len(chosen)}] {name}"
        print(f"{tag}: {' '.join(['python'] + cmd[1:])}", flush=True)
        r = run_one(name, cmd, a.timeout, tag)
        status = "timed out" if r["timed_out"] else ("ok" if r["rc"] == 0 else f"rc {r['rc']}")
        print(f"{tag}: {status} in {r['seconds']:.0f} s (total {time.time() - t0:.0f} s)",
              flush=True)
        results.append(r)
    path = write_readme()
    print("\n| benchmark | result | seconds |\n|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {'timed out' if r['timed_out'] else r['rc']} | "
              f"{r['seconds']:.0f} |")
    print(f"\nwrote {path}")
    failed = [r["name"] for r in results if r["rc"] != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
