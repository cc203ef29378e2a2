"""In-place communicator rebuild at 4, 8 and 16 ranks: wall time and store operations per rank.

For each world size (TP x PP fixed, DP = world / (TP x PP)) this starts that many ranks of itself
around one TCPStore that the launcher holds (as ``fr-megatron run``'s controller does). Each rank
builds the tiny megatron-core GPT (``fr_megatron.megatron.model``: DDP, DistributedOptimizer),
builds the runtime's own world group as ``Session.attach`` does, trains ``--steps-before`` steps,
then rebuilds in place exactly as a survivor does in ``Session._rebuild``::

    integration.teardown()
    torch.distributed.destroy_process_group()
    torch.distributed.init_process_group("gloo", store=PrefixStore("gen1/", store), ...)
    integration.rebuild()                      # MegatronIntegration: groups, rebind, retire
    (runtime group: new_group(backend="gloo") + all_gather_object of the replica ranks)

and trains one more step on the new groups. ``--sequence on,off,on`` makes generations 1, 2, 3 with
the local-synchronisation group creation on, off, on (``parallel_state_hook.install(local_sync=)``;
the initial build uses the first entry): generation 1 is the rebuild the runtime does on its first
recovery, generations 2 and 3 compare off with on in processes that have rebuilt once already.

Store operations are counted by a ``torch.distributed.Store`` subclass written in Python that wraps
the rank's TCPStore client and counts every call torch makes on it (c10d's PrefixStore forwards to
it; gloo's rendezvous, store barriers and ``new_group`` all go through it). Each counted call is one
request to the TCPStore server. Every rank waits in a barrier on the old world before its rebuild
starts, so the wall times start together; they include waiting for slower peers.

gloo connects every pair of a group's members when the group is created (each member reads every
other member's address from the store), so the store operations of a rebuild grow with the
data-parallel size on gloo; NCCL's communicator init reads one unique id per group instead.
``--gloo-lazy-init on`` (``TORCH_GLOO_LAZY_INIT=1``) defers each pair to its first use: the
rebuild's own store operations are then constant, and the first step after it makes the
connections its collectives need (counted in ``ops_through_step``). The runtime does not use that
mode: with torch 2.13, a lazy pair to a peer that has died blocks the collective past the group's
timeout (measured: 90 s with a 60 s timeout) instead of failing at once, as an eager pair does.

torch 2.13 creates groups without a store barrier unless ``TORCH_DIST_INIT_BARRIER=1``; then
local synchronisation changes no store operation on gloo (members rendezvous the same way, a
non-member makes no store call either way). ``--init-barrier`` sets it, where it does.

    python -m benchmarks.rebuild_scale [--worlds 4,8,16] [--tp 2 --pp 2] [--sequence on,off,on]
                                       [--init-barrier]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# the store operations c10d can issue; each is one request to the TCPStore server
STORE_OPS = ("set", "get", "add", "compare_set", "wait", "check", "delete_key", "num_keys",
             "multi_get", "multi_set", "append")
PARTS = ("teardown", "destroy_world", "init_world", "megatron_rebuild", "runtime_group")
CORE_PARTS = PARTS[:4]  # the four calls of the runtime's rebuild (without its own group)


# ---------------------------------------------------------------- one rank


def counting_store_class():
    import torch.distributed as dist

    class CountingStore(dist.Store):
        """Delegates to a real store and counts every call by operation."""

        def __init__(self, inner):
            super().__init__()
            self._inner = inner
            self.counts = {op: 0 for op in STORE_OPS}

        def total(self) -> int:
            return sum(self.counts.values())

        def snapshot(self) -> dict:
            return dict(self.counts)

        def set(self, key, value):
            self.counts["set"] += 1
            return self._inner.set(key, value)

        def get(self, key):
            self.counts["get"] += 1
            return self._inner.get(key)

        def add(self, key, value):
            self.counts["add"] += 1
            return self._inner.add(key, value)

        def compare_set(self, key, expected, desired):
            self.counts["compare_set"] += 1
            return self._inner.compare_set(key, expected, desired)

        def wait(self, keys, timeout=None):
            self.counts["wait"] += 1
            return self._inner.wait(keys) if timeout is None else self._inner.wait(keys, timeout)

        def check(self, keys):
            self.counts["check"] += 1
            return self._inner.check(keys)

        def delete_key(self, key):
            self.counts["delete_key"] += 1
            return self._inner.delete_key(key)

        def num_keys(self):
            self.counts["num_keys"] += 1
            return self._inner.num_keys()

        def multi_get(self, keys):
            self.counts["multi_get"] += 1
            return self._inner.multi_get(keys)

        def multi_set(self, keys, values):
            self.counts["multi_set"] += 1
            return self._inner.multi_set(keys, values)

        def append(self, key, value):
            self.counts["append"] += 1
            return self._inner.append(key, value)

        def has_extended_api(self):
            return self._inner.has_extended_api()

    return CountingStore


def _diff(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after if after[k] - before[k]}


def _count_groups(store, by_group: dict) -> None:
    """Wrap megatron's current ``create_group`` to add each call's store ops to ``by_group``
    (keyed by megatron's group description). Re-applied after every ``install()``."""
    from megatron.core import parallel_state as ps

    current = ps.create_group
    if getattr(current, "_rebuild_scale_counting", False):
        return

    def create_group(ranks=None, timeout=None, backend=None, pg_options=None,
                     use_local_synchronization=False, group_desc=None):
        before = store.total()
        group = current(ranks, timeout, backend, pg_options, use_local_synchronization,
                        group_desc)
        key = f"{group_desc or 'group'}"
        by_group[key] = by_group.get(key, 0) + store.total() - before
        return group

    create_group._rebuild_scale_counting = True
    ps.create_group = create_group


def run_rank(a) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from fr_megatron.megatron import parallel_state_hook
    from fr_megatron.megatron.integration import MegatronIntegration
    from fr_megatron.megatron.model import TinyGPTConfig, TinyGPTJob, initialize_parallel

    rank, world = int(os.environ["FR_RB_RANK"]), int(os.environ["FR_RB_WORLD"])
    tcp = dist.TCPStore("127.0.0.1", int(os.environ["FR_RB_PORT"]), world + 1, False,
                        wait_for_workers=False)
    store = counting_store_class()(tcp)
    import datetime

    timeout = datetime.timedelta(seconds=a.pg_timeout)
    sequence = [m == "on" for m in a.sequence.split(",")]
    rep: dict = {"rank": rank, "world": world, "rebuilds": []}

    c0 = store.snapshot()
    t0 = time.perf_counter()
    dist.init_process_group("gloo", store=dist.PrefixStore("gen0/", store), rank=rank,
                            world_size=world, timeout=timeout)
    parallel_state_hook.install(local_sync=sequence[0])
    by_group: dict = {}
    _count_groups(store, by_group)
    cfg = TinyGPTConfig(tp=a.tp, pp=a.pp, num_layers=a.pp * a.layers_per_stage)
    initialize_parallel(cfg)
    job = TinyGPTJob(cfg)
    integ = MegatronIntegration.from_job(job)
    runtime_group = dist.new_group(backend="gloo")
    replica_of: list = [None] * world
    dist.all_gather_object(replica_of, integ.replica_ranks(), group=runtime_group)
    rep["initial_build"] = {"s": time.perf_counter() - t0, "store_ops": _diff(store.snapshot(), c0),
                            "local_sync": sequence[0]}

    step = 0
    losses = []
    for _ in range(a.steps_before):
        losses.append(job.train_step(step))
        step += 1
    keep = [runtime_group]  # the runtime keeps old groups referenced (comms.graveyard)
    for generation, local_sync in enumerate(sequence, start=1):
        parallel_state_hook.install(local_sync=local_sync)
        _count_groups(store, by_group)
        by_group.clear()
        dist.barrier()  # on the old world: every rank starts its rebuild together
        marks = [(time.perf_counter(), store.snapshot())]
        integ.teardown()
        marks.append((time.perf_counter(), store.snapshot()))
        dist.destroy_process_group()
        marks.append((time.perf_counter(), store.snapshot()))
        dist.init_process_group("gloo", store=dist.PrefixStore(f"gen{generation}/", store),
                                rank=rank, world_size=world, timeout=timeout)
        marks.append((time.perf_counter(), store.snapshot()))
        integ.rebuild()  # raises if a reference to an old group survived
        marks.append((time.perf_counter(), store.snapshot()))
        runtime_group = dist.new_group(backend="gloo")
        dist.all_gather_object(replica_of, integ.replica_ranks(), group=runtime_group)
        marks.append((time.perf_counter(), store.snapshot()))
        keep.append(runtime_group)
        parts = {}
        for name, (ta, ca), (tb, cb) in zip(PARTS, marks, marks[1:]):
            parts[name] = {"s": tb - ta, "store_ops": _diff(cb, ca)}
        t_step, c_step = time.perf_counter(), store.snapshot()
        loss = job.train_step(step)  # with lazy gloo init, the step connects the pairs it uses
        step_s = time.perf_counter() - t_step
        step_ops = _diff(store.snapshot(), c_step)
        losses.append(loss)
        step += 1
        rep["rebuilds"].append({
            "generation": generation, "local_sync": local_sync,
            "local_sync_active": parallel_state_hook.local_sync_supported(),
            "parts": parts,
            "core_s": marks[4][0] - marks[0][0],
            "total_s": marks[5][0] - marks[0][0],
            "core_store_ops": sum(sum(parts[p]["store_ops"].values()) for p in CORE_PARTS),
            "total_store_ops": sum(sum(p["store_ops"].values()) for p in parts.values()),
            "store_ops_by_kind": _diff(marks[5][1], marks[0][1]),
            "megatron_store_ops_by_group": dict(by_group),
            "last_rebuild": dict(integ.last_rebuild),
            "stale_references": integ.old_group_references(),
            "step_after_s": step_s, "step_after_store_ops": sum(step_ops.values()),
            "loss_after": loss,
        })
    rep["losses"] = losses
    dist.barrier()
    dist.destroy_process_group()
    return rep


# ---------------------------------------------------------------- launcher


def launch_world(a, world: int, out: Path) -> list[dict]:
    """Host the store, start ``world`` ranks, wait; their reports (raises if a rank failed)."""
    import torch.distributed as dist

    out.mkdir(parents=True, exist_ok=True)
    store = dist.TCPStore("127.0.0.1", 0, world + 1, True, wait_for_workers=False)
    env = dict(os.environ, FR_RB_PORT=str(store.port), FR_RB_WORLD=str(world))
    env["TORCH_GLOO_LAZY_INIT"] = "1" if a.gloo_lazy_init == "on" else "0"
    if a.init_barrier:  # torch's store barrier after init_process_group and every new_group
        env["TORCH_DIST_INIT_BARRIER"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "benchmarks.rebuild_scale", "--worker", "--out", str(out),
            "--tp", str(a.tp), "--pp", str(a.pp), "--layers-per-stage", str(a.layers_per_stage),
            "--steps-before", str(a.steps_before), "--sequence", a.sequence,
            "--pg-timeout", str(a.pg_timeout)]
    procs = []
    for rank in range(world):
        log = open(out / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen(argv, cwd=REPO, env=dict(env, FR_RB_RANK=str(rank)),
                                      stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + a.timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    del store
    if any(c != 0 for c in codes):
        bad = [r for r, c in enumerate(codes) if c != 0]
        tail = (out / f"rank{bad[0]}.log").read_text()[-3000:]
        raise RuntimeError(f"world {world}: ranks {bad} exited with "
                           f"{[codes[r] for r in bad]}; logs in {out}\n{tail}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def rows_for(world: int, dp: int, reports: list[dict], load: tuple) -> list[dict]:
    from .common import percentile

    rows = []
    for i, first in enumerate(reports[0]["rebuilds"]):
        rbs = [r["rebuilds"][i] for r in reports]
        ops = [rb["total_store_ops"] for rb in rbs]
        core = [rb["core_store_ops"] for rb in rbs]
        # lazy gloo init moves the pair connections into the first step: count them too
        through = [rb["core_store_ops"] + rb.get("step_after_store_ops", 0) for rb in rbs]
        wall = [rb["total_s"] for rb in rbs]
        core_wall = [rb["core_s"] for rb in rbs]
        part = {p: percentile([rb["parts"][p]["s"] for rb in rbs], 0.5) for p in PARTS}
        part_ops = {p: sum(sum(rb["parts"][p]["store_ops"].values()) for rb in rbs) / len(rbs)
                    for p in PARTS}
        rows.append({
            "world": world, "dp": dp, "gen": first["generation"],
            "local_sync": "on" if first["local_sync"] else "off",
            "ops_mean": sum(core) / len(core), "ops_max": max(core),
            "ops_with_rt_mean": sum(ops) / len(ops), "ops_with_rt_max": max(ops),
            "ops_through_step_mean": sum(through) / len(through),
            "ops_through_step_max": max(through),
            "step_after_p50_s": percentile([rb["step_after_s"] for rb in rbs], 0.5),
            "wall_p50_s": percentile(core_wall, 0.5), "wall_max_s": max(core_wall),
            "with_rt_p50_s": percentile(wall, 0.5), "with_rt_max_s": max(wall),
            **{f"{p}_p50_s": part[p] for p in PARTS},
            **{f"{p}_ops_mean": part_ops[p] for p in PARTS},
            "stale_refs": sum(rb["stale_references"] for rb in rbs),
            "losses_equal": len({json.dumps(r["losses"]) for r in reports}) == 1,
            "load_1m": load[0],
        })
    return rows


def group_table(raw: dict, worlds: list[int]) -> list[dict]:
    """Generation 1's store ops per rank by megatron group description, per world size."""
    per_world = {}
    for w in worlds:
        reps = raw[w]
        acc: dict = {}
        for r in reps:
            for k, v in r["rebuilds"][0].get("megatron_store_ops_by_group", {}).items():
                acc[k] = acc.get(k, 0) + v
        per_world[w] = {k: v / len(reps) for k, v in acc.items()}
    names = sorted({k for d in per_world.values() for k in d},
                   key=lambda k: -per_world[worlds[-1]].get(k, 0))
    return [{"group": k, **{f"world{w}": per_world[w].get(k, 0.0) for w in worlds}}
            for k in names if any(per_world[w].get(k) for w in worlds)]


def scaling(rows: list[dict], worlds: list[int]) -> list[dict]:
    """Store ops per rank at the largest world over the smallest, per (generation, mode)."""
    out = []
    lo, hi = min(worlds), max(worlds)
    for key in sorted({(r["gen"], r["local_sync"]) for r in rows}):
        by = {r["world"]: r for r in rows if (r["gen"], r["local_sync"]) == key}
        if lo not in by or hi not in by:
            continue
        entry = {"gen": key[0], "local_sync": key[1], "from_world": lo, "to_world": hi}
        for col in ("ops_mean", "ops_max", "ops_with_rt_mean", "ops_through_step_mean",
                    "ops_through_step_max"):
            ratio = by[hi][col] / by[lo][col] if by[lo][col] else None
            entry[f"{col}_ratio"] = ratio
        # the target: per-rank store ops of the rebuild and the first step after it (where lazy
        # gloo init makes its connections) constant within 10% (mean over ranks)
        entry["within_10pct"] = (entry["ops_through_step_mean_ratio"] is not None
                                 and abs(entry["ops_through_step_mean_ratio"] - 1) <= 0.10)
        for p in PARTS:
            entry[f"{p}_ops"] = f"{by[lo][p + '_ops_mean']:.1f} -> {by[hi][p + '_ops_mean']:.1f}"
        out.append(entry)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default="4,8,16", help="world sizes (multiples of TP x PP)")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--layers-per-stage", type=int, default=1)
    p.add_argument("--steps-before", type=int, default=1, help="training steps before the rebuild")
    p.add_argument("--sequence", default="on,off,on",
                   help="local_sync of generations 1, 2, ... (on|off), e.g. 'on' for one rebuild")
    p.add_argument("--init-barrier", action="store_true",
                   help="TORCH_DIST_INIT_BARRIER=1 in the ranks (a store barrier after every group "
                        "creation: over the whole world with local sync off, over the members with "
                        "it on); results go to rebuild_scale_init_barrier.json")
    p.add_argument("--gloo-lazy-init", choices=("on", "off"), default="off",
                   help="TORCH_GLOO_LAZY_INIT in the ranks: gloo connects a pair of ranks on "
                        "its first use instead of the whole group at creation. Not the "
                        "runtime's mode (see the module doc); results go to "
                        "rebuild_scale_gloo_lazy.json")
    p.add_argument("--pg-timeout", type=float, default=180.0, help="process-group timeout, s")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per world size")
    p.add_argument("--keep", default=None, help="keep the per-rank logs and reports here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        logging.basicConfig(level=logging.WARNING)
        rep = run_rank(a)
        Path(a.out, f"rank{rep['rank']}.json").write_text(json.dumps(rep))
        return 0

    from .common import table, write

    worlds = [int(w) for w in a.worlds.split(",")]
    for w in worlds:
        if w % (a.tp * a.pp):
            p.error(f"world {w} is not a multiple of TP x PP = {a.tp * a.pp}")
    base = Path(a.keep or tempfile.mkdtemp(prefix="rebuild_scale_"))
    rows, raw, loads = [], {}, {}
    t_all = time.time()
    for w in worlds:
        before = os.getloadavg()
        t0 = time.time()
        reports = launch_world(a, w, base / f"world{w}")
        after = os.getloadavg()
        loads[w] = {"before": before, "after": after, "job_s": time.time() - t0}
        raw[w] = reports
        new = rows_for(w, w // (a.tp * a.pp), reports, after)
        rows += new
        print(f"world {w}: done in {time.time() - t0:.0f}s, load {after[0]:.1f}", flush=True)
    cols = ["world", "dp", "gen", "local_sync", "ops_mean", "ops_max", "ops_through_step_mean",
            "ops_through_step_max", "wall_p50_s", "wall_max_s", "step_after_p50_s",
            "ops_with_rt_mean", "with_rt_p50_s", "stale_refs", "losses_equal", "load_1m"]
    barrier = "1" if a.init_barrier else os.environ.get("TORCH_DIST_INIT_BARRIER", "unset")
    print(f"\nIn-place rebuild, TP={a.tp} x PP={a.pp} x DP, tiny megatron-core GPT on gloo/CPU "
          f"({os.cpu_count()} CPUs, TORCH_DIST_INIT_BARRIER={barrier}, TORCH_GLOO_LAZY_INIT="
          f"{a.gloo_lazy_init}). ops = store operations per rank in teardown + destroy + "
          "init_process_group + integration.rebuild (mean, max over ranks); ops_through_step = "
          "the same plus the first training step after it (where lazy gloo init connects the "
          "pairs it uses); wall = the rebuild, per rank (p50, max); *_with_rt = plus the "
          "runtime's own world group.\n")
    print(table(rows, cols))
    part_cols = ["world", "gen", "local_sync", *[f"{p}_p50_s" for p in PARTS]]
    print("\nParts of the rebuild, p50 over ranks (seconds)\n")
    print(table(rows, part_cols))
    ops_cols = ["world", "gen", "local_sync", *[f"{p}_ops_mean" for p in PARTS]]
    print("\nStore operations per rank by part (mean over ranks)\n")
    print(table(rows, ops_cols))
    groups = group_table(raw, worlds)
    if groups:
        print("\nStore operations per rank in integration.rebuild by megatron group "
              "(generation 1, mean over ranks)\n")
        print(table(groups, list(groups[0])))
    sc = scaling(rows, worlds)
    if sc:
        print(f"\nStore ops per rank, world {min(worlds)} -> {max(worlds)} (target: within 10%)\n")
        print(table(sc, ["gen", "local_sync", "ops_mean_ratio", "ops_max_ratio",
                         "ops_with_rt_mean_ratio", "ops_through_step_mean_ratio",
                         "ops_through_step_max_ratio", "within_10pct", "init_world_ops",
                         "megatron_rebuild_ops", "runtime_group_ops"]))
    name = "rebuild_scale" + ("_init_barrier" if a.init_barrier else "") + (
        "_gloo_lazy" if a.gloo_lazy_init == "on" else "")
    path = write(name, {
        "config": {"tp": a.tp, "pp": a.pp, "layers_per_stage": a.layers_per_stage,
                   "TORCH_GLOO_LAZY_INIT": "1" if a.gloo_lazy_init == "on" else "0",
                   "TORCH_DIST_INIT_BARRIER": "1" if a.init_barrier else os.environ.get(
                       "TORCH_DIST_INIT_BARRIER", "unset"),
                   "worlds": worlds, "sequence": a.sequence, "steps_before": a.steps_before},
        "rows": rows, "scaling": sc, "megatron_groups": groups, "load": loads,
        "wall_s": time.time() - t_all,
        "per_rank": {str(w): [{"rank": r["rank"], "initial_build": r["initial_build"],
                                "rebuilds": r["rebuilds"]} for r in reps]
                     for w, reps in raw.items()},
    })
    print(f"\nwrote {path} (rank logs in {base})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
