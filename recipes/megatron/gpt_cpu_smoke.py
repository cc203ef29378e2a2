"""Tiny 3D-parallel megatron-core GPT on CPU (gloo), with in-place communicator rebuilds.

    python recipes/megatron/gpt_cpu_smoke.py --world 8 --tp 2 --pp 2 --steps 6 --rebuild-at 3

launches ``--world`` ranks on this machine, forked from one process that imported megatron-core,
around one TCPStore (the launcher holds it, so it outlives every rank). Each rank trains ``--steps``
steps of megatron-core's GPTModel with DDP and the DistributedOptimizer. Before each step listed in
``--rebuild-at`` every rank rebuilds in place: megatron's groups are torn down, the world is
destroyed and re-created on the store prefix ``gen<g>/`` (one generation per listed step),
megatron's groups are rebuilt and every cached reference is rebound. ``--baseline`` first trains the
same steps without interruption in the same processes; ``--restore-check-at k`` captures the state
before step k, trains it, restores and trains it again, then restores into a freshly built job and
trains it once more. Each rank writes a JSON report to ``--out``; the launcher checks them and exits
non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import gc
import copy
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("gpt_cpu_smoke")

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--layers-per-stage", type=int, default=1)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument(
        "--rebuild-at",
        type=lambda v: [int(x) for x in v.split(",") if x != ""],
        default=[],
        help="comma-separated steps before which every rank rebuilds (generation 1, 2, ...)",
    )
    p.add_argument("--restore-check-at", type=int, default=-1)
    p.add_argument("--teardown-again-at", type=int, default=-1,
                   help="in this generation tear megatron down a second time before the rebuild "
                        "(a fault that interrupted the rebuild before it began)")
    p.add_argument("--baseline", action="store_true", help="also train without interruption")
    p.add_argument("--bf16", action="store_true", help="bf16 params, fp32 main params")
    p.add_argument("--no-local-sync", action="store_true", help="plain megatron create_group")
    p.add_argument("--out", type=str, default=None, help="directory for per-rank JSON reports")
    p.add_argument("--timeout", type=float, default=300.0, help="launcher: seconds for all ranks")
    return p.parse_args(argv)


# ---------------------------------------------------------------- launcher


def launch(args) -> int:
    """Host the store, start the ranks, wait, check their reports."""
    import torch.distributed as dist

    out = Path(args.out or tempfile.mkdtemp(prefix="gpt_cpu_smoke_"))
    out.mkdir(parents=True, exist_ok=True)
    store = dist.TCPStore("127.0.0.1", 0, args.world + 1, True, wait_for_workers=False)
    env = dict(FR_SMOKE_STORE_PORT=str(store.port), FR_SMOKE_WORLD=str(args.world))
    argv = _worker_argv(args, out)
    # the ranks fork from one process that imported megatron-core (as the ranks import it):
    # eight ranks that each import it on the same cores take seconds longer to start
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["fr_megatron.megatron.preload"])
    procs = []
    for rank in range(args.world):
        proc = ctx.Process(target=_rank_process, name=f"rank{rank}",
                           args=(argv, dict(env, FR_SMOKE_RANK=str(rank)),
                                 str(out / f"rank{rank}.log")))
        proc.start()
        procs.append(proc)
    deadline = time.monotonic() + args.timeout
    for proc in procs:
        proc.join(timeout=max(1.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    codes = [proc.exitcode for proc in procs]
    if any(c != 0 for c in codes):
        logger.error("ranks exited with %s; logs in %s", codes, out)
        return 1
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.world)]
    problems = check_reports(reports)
    summary = {
        "out": str(out),
        "losses": reports[0]["losses"],
        "rebuild_s": [rb["total_s"] for rb in reports[0].get("rebuilds", [])],
        "problems": problems,
    }
    print(json.dumps(summary, indent=1))
    return 1 if problems else 0


def _rank_process(argv: list[str], env: dict, log: str) -> None:
    """One rank, forked from the launcher's fork server: its log as stdout and stderr. Its exit
    code is ``main``'s; multiprocessing flushes the streams and ends the process without the
    interpreter's teardown."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(env)
    sys.exit(main(argv))


def _worker_argv(args, out: Path) -> list[str]:
    argv = []
    for key, value in vars(args).items():
        flag = "--" + key.replace("_", "-")
        if key == "out":
            continue
        if isinstance(value, bool):
            argv += [flag] if value else []
        elif isinstance(value, list):
            argv += [flag, ",".join(map(str, value))] if value else []
        else:
            argv += [flag, str(value)]
    return argv + ["--out", str(out)]


def check_reports(reports: list[dict]) -> list[str]:
    """Everything that must hold across the ranks' reports; empty when all is well."""
    problems = []
    first = reports[0]
    for r in reports:
        rank = r["rank"]
        if r["losses"] != first["losses"]:
            problems.append(f"rank {rank}: losses differ from rank 0")
        if "baseline" in r and r["baseline"] != r["losses"]:
            problems.append(f"rank {rank}: losses differ from the uninterrupted run")
        for rb in r.get("rebuilds", []):
            if rb["roles_before"] != rb["roles_after"]:
                problems.append(f"rank {rank}: group membership changed in the rebuild")
            if rb["stale_references"] != 0:
                problems.append(f"rank {rank}: {rb['stale_references']} stale group references")
            if not all(rb["old_group_raises"].values()):
                problems.append(f"rank {rank}: a collective on an old group did not raise")
        if "restore" in r:
            rs = r["restore"]
            if not (
                rs["loss_equal"]
                and rs["state_equal_after_restore"]
                and rs["params_equal"]
                and rs["fresh_job_differed_before_restore"]
                and not rs["fresh_build_collectives"]
            ):
                problems.append(f"rank {rank}: capture/restore did not replay the step: {rs}")
    return problems


# ---------------------------------------------------------------- one rank


def _digest(tensors) -> str:
    import torch

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _roles_ranks() -> dict[str, list[int]]:
    import torch.distributed as dist

    from fr_megatron.megatron import parallel_state_hook

    roles = parallel_state_hook.group_roles()
    return {role: dist.get_process_group_ranks(group) for role, group in roles.items()}


def _rebuild_in_place(integ, store, rank: int, world: int, generation: int,
                      teardown_again: bool = False) -> dict:
    """What the runtime does on a survivor: teardown, new world on gen{g}/, rebuild + rebind.

    Odd generations tear megatron down before the world is destroyed, even ones after (both
    orders must work). ``teardown_again``: a second teardown before the rebuild, as when a new
    fault interrupted the first attempt's rendezvous and the runtime starts over.
    """
    import torch
    import torch.distributed as dist

    roles_before = _roles_ranks()
    teardown_first = generation % 2 == 1
    t0 = time.perf_counter()
    if teardown_first:
        integ.teardown()
    dist.destroy_process_group()
    if not teardown_first:
        integ.teardown()
    if teardown_again:
        integ.teardown()
    t2 = time.perf_counter()
    dist.init_process_group(
        "gloo", store=dist.PrefixStore(f"gen{generation}/", store), rank=rank, world_size=world
    )
    t3 = time.perf_counter()
    integ.rebuild()
    t4 = time.perf_counter()
    roles_after = _roles_ranks()
    stale = integ.old_group_references()
    raises = {}
    old_roles = {"WORLD": None, "_TENSOR_MODEL_PARALLEL_GROUP": None, "_DATA_PARALLEL_GROUP": None}
    for role in old_roles:
        old = integ._old_roles[role]
        try:
            dist.all_reduce(torch.ones(1), group=old)
            raises[role] = False
        except Exception as exc:  # noqa: BLE001 - any error is the expected outcome
            raises[role] = True
            logger.info("collective on old %s raised %s: %s", role, type(exc).__name__, exc)
    return {
        "roles_before": roles_before,
        "roles_after": roles_after,
        "stale_references": stale,
        "old_group_raises": raises,
        "teardown_first": teardown_first,
        "teardown_and_destroy_s": t2 - t0,
        "init_world_s": t3 - t2,
        "megatron_rebuild_s": t4 - t3,
        "total_s": t4 - t0,
        "detail": integ.last_rebuild,
    }


def _clone_state(state):
    from fr_megatron.runtime.integration import RankState

    return RankState(
        replicated={k: v.clone() for k, v in state.replicated.items()},
        unique={k: v.clone() for k, v in state.unique.items()},
        meta=copy.deepcopy(state.meta),
    )


def _states_equal(a, b) -> bool:
    import torch

    for part in ("replicated", "unique"):
        x, y = getattr(a, part), getattr(b, part)
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


class _CollectiveRecorder:
    """Records torch.distributed collectives that reach c10d (they dispatch torch functions)."""

    def __enter__(self):
        from torch.overrides import TorchFunctionMode

        calls = self.calls = set()

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__module__", "").startswith("torch.distributed"):
                    calls.add(func.__name__)
                return func(*args, **(kwargs or {}))

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def _restore_check(integ, job, step: int, cfg, startup):
    """Replay ``step`` from a captured state: in the same job, and in a freshly built one.

    The fresh job is initialised from another seed and built as a replacement process builds it:
    its collectives answered from ``startup``, the record of the original job's construction
    (``runtime.startup_calls``), none reaching c10d. It only trains like the original if
    the runtime's capture (the integration's state and the process's RNG) holds every bit of
    state that matters. Returns the fresh job (training goes on with it), its integration, the
    loss and the findings.
    """
    import torch

    from fr_megatron.megatron.integration import MegatronIntegration
    from fr_megatron.megatron.model import TinyGPTJob
    from fr_megatron.runtime import startup_calls, transaction

    snapshot = _clone_state(transaction.capture(integ, step))
    loss_first = job.train_step(step)
    after_first = _clone_state(transaction.capture(integ, step))
    transaction.restore(integ, snapshot)
    restored_ok = _states_equal(integ.capture(), snapshot)
    loss_again = job.train_step(step)
    params_equal = _states_equal(after_first, integ.capture())

    torch.manual_seed(cfg.seed + 7919)  # a different initialisation for the fresh job
    replayer = startup_calls.Replayer(startup, int(os.environ["FR_SMOKE_RANK"]))
    try:
        with _CollectiveRecorder() as recorder:
            fresh = TinyGPTJob(cfg)
    finally:
        replayer.close()
    fresh_integ = MegatronIntegration.from_job(fresh)
    differs_before = not _states_equal(fresh_integ.capture(), snapshot)
    transaction.restore(fresh_integ, snapshot)
    loss_fresh = fresh.train_step(step)
    fresh_equal = _states_equal(after_first, fresh_integ.capture())
    return fresh, fresh_integ, loss_fresh, {
        "loss_first": loss_first,
        "loss_again": loss_again,
        "loss_fresh": loss_fresh,
        "loss_equal": loss_first == loss_again == loss_fresh,
        "state_equal_after_restore": restored_ok,
        "params_equal": params_equal and fresh_equal,
        "fresh_job_differed_before_restore": differs_before,
        "fresh_build_collectives": sorted(recorder.calls),
        "unique_keys": len(snapshot.unique),
        "unique_main_param_keys": sum("/main" in k for k in snapshot.unique),
        "replicated_keys": len(snapshot.replicated),
        "unique_numel": sum(t.numel() for t in snapshot.unique.values()),
        "replicated_numel": sum(t.numel() for t in snapshot.replicated.values()),
    }


def run_rank(args) -> dict:
    import torch.distributed as dist

    from fr_megatron.megatron import parallel_state_hook
    from fr_megatron.megatron.integration import MegatronIntegration
    from fr_megatron.megatron.model import TinyGPTConfig, TinyGPTJob, initialize_parallel, seed_rngs
    from fr_megatron.runtime import startup_calls

    rank = int(os.environ["FR_SMOKE_RANK"])
    world = int(os.environ["FR_SMOKE_WORLD"])
    port = int(os.environ["FR_SMOKE_STORE_PORT"])
    store = dist.TCPStore("127.0.0.1", port, world + 1, False, wait_for_workers=False)
    gen0 = dist.PrefixStore("gen0/", store)
    dist.init_process_group("gloo", store=gen0, rank=rank, world_size=world)
    parallel_state_hook.install(local_sync=not args.no_local_sync)
    cfg = TinyGPTConfig(
        tp=args.tp, pp=args.pp, num_layers=args.layers_per_stage * args.pp, bf16=args.bf16
    )
    t0 = time.perf_counter()
    initialize_parallel(cfg)
    report: dict = {"rank": rank, "init_model_parallel_s": time.perf_counter() - t0}

    if args.baseline:
        job = TinyGPTJob(cfg)
        report["baseline"] = [job.train_step(s) for s in range(args.steps)]
        del job
        seed_rngs(cfg)

    recorder = startup_calls.Recorder()  # what a replacement of this rank would replay
    try:
        job = TinyGPTJob(cfg)
    finally:
        recorder.close()
    report["startup_calls"] = [e["op"] for e in recorder.entries]
    integ = MegatronIntegration.from_job(job)
    report["replica_ranks"] = integ.replica_ranks()
    losses = []
    t_train = time.perf_counter()
    for step in range(args.steps):
        if step in args.rebuild_at:
            generation = len(report.setdefault("rebuilds", [])) + 1
            report["rebuilds"].append(_rebuild_in_place(
                integ, store, rank, world, generation, generation == args.teardown_again_at))
        if step == args.restore_check_at:
            job, integ, loss, report["restore"] = _restore_check(integ, job, step, cfg, recorder.entries)
        else:
            loss = job.train_step(step)
        losses.append(loss)
        logger.info("step %d loss %.6f", step, loss)
    report["train_s"] = time.perf_counter() - t_train
    report["losses"] = losses
    report["param_digest"] = _digest(p.data for c in job.model for p in c.parameters())
    dist.barrier()
    dist.destroy_process_group()
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if "FR_SMOKE_RANK" in os.environ else logging.WARNING,
        format=f"%(asctime)s [{os.environ.get('FR_SMOKE_RANK', 'launcher')}] %(name)s: %(message)s",
    )
    if "FR_SMOKE_RANK" not in os.environ:
        return launch(args)
    import warnings

    warnings.filterwarnings("ignore")
    report = run_rank(args)
    Path(args.out, f"rank{report['rank']}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    rc = main()
    gc.freeze()  # no last full collection at exit: seconds of CPU per rank (see pretrain_gpt.py)
    sys.exit(rc)
