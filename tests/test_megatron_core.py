"""megatron-core side of fr_megatron, on CPU with gloo and real processes.

The multi-process tests launch ``recipes/megatron/gpt_cpu_smoke.py`` (one OS process per rank, a
TCPStore held by the launcher) and assert on the JSON reports the ranks write. Each layout is
launched once per module and shared by the tests that read it. The single-process tests at the
end exercise the rebind walker and group retirement on a one-rank gloo world.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "megatron" / "gpt_cpu_smoke.py"
PYTHON = sys.executable

pytest.importorskip("megatron.core")


def _env() -> dict:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path)


def _launch(out: Path, *args: str, timeout: float = 420) -> list[dict]:
    """Run the smoke launcher; return the per-rank reports (fail with the logs if it failed)."""
    env = _env()
    proc = subprocess.run(
        [PYTHON, str(SMOKE), *args, "--out", str(out), "--timeout", str(timeout - 20)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    world = int(args[args.index("--world") + 1])
    reports = []
    for rank in range(world):
        path = out / f"rank{rank}.json"
        if not path.exists():
            logs = "\n".join(
                f"--- rank {r}\n" + (out / f"rank{r}.log").read_text()[-3000:]
                for r in range(world)
                if (out / f"rank{r}.log").exists()
            )
            rc = proc.returncode
            pytest.fail(f"rank {rank} wrote no report (rc={rc}):\n{proc.stderr}\n{logs}")
        reports.append(json.loads(path.read_text()))
    reports[0]["_launcher"] = {"returncode": proc.returncode, "stdout": proc.stdout}
    return reports


def _assert_rebuild_and_restore(reports: list[dict], world: int, rebuilds: int = 1) -> None:
    assert [r["rank"] for r in reports] == list(range(world))
    losses = reports[0]["losses"]
    assert all(isinstance(x, float) and 0 < x < 10 for x in losses)
    for r in reports:
        # Bit-exact: the run with a rebuild (and a restore) equals the uninterrupted run.
        assert r["losses"] == r["baseline"], f"rank {r['rank']}"
        assert r["losses"] == losses, f"rank {r['rank']} reports other losses than rank 0"
        assert len(r["rebuilds"]) == rebuilds
        for rb in r["rebuilds"]:
            assert rb["roles_before"] == rb["roles_after"]
            assert rb["roles_before"]["WORLD"] == list(range(world))
            assert rb["stale_references"] == 0
            assert rb["detail"]["references_replaced"] > 0
            assert rb["old_group_raises"] == {
                "WORLD": True,
                "_TENSOR_MODEL_PARALLEL_GROUP": True,
                "_DATA_PARALLEL_GROUP": True,
            }
        rs = r["restore"]
        assert rs["loss_first"] == rs["loss_again"] == rs["loss_fresh"]
        assert rs["state_equal_after_restore"] and rs["params_equal"]
        assert rs["fresh_job_differed_before_restore"]
        # Built as a replacement builds (while its peers wait elsewhere): the original's
        # construction communicated (the optimizer's param-group keys), the fresh one's answers
        # came from that record and no collective reached c10d.
        assert "all_gather_object" in r["startup_calls"]
        assert rs["fresh_build_collectives"] == []
        assert rs["unique_keys"] > 0 and rs["unique_numel"] > 0
    assert reports[0]["_launcher"]["returncode"] == 0, reports[0]["_launcher"]["stdout"]


def _assert_replicas(reports: list[dict], tp: int, pp: int) -> None:
    """replica_ranks() is the data-parallel group: same TP and PP coordinate (order tp-dp-pp)."""
    world = len(reports)
    dp = world // (tp * pp)
    for r in reports:
        rank = r["rank"]
        tp_rank, pp_rank = rank % tp, rank // (tp * dp)
        expected = [pp_rank * tp * dp + d * tp + tp_rank for d in range(dp)]
        assert r["replica_ranks"] == expected, f"rank {rank}"
        assert r["rebuilds"][0]["roles_before"]["_DATA_PARALLEL_GROUP"] == expected


# ---------------------------------------------------------------- TP=2 x PP=2 x DP=2, 8 processes


@pytest.fixture(scope="module")
def run_3d(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2pp2dp2")
    args = ["--world", "8", "--tp", "2", "--pp", "2", "--steps", "5"]
    return _launch(out, *args, "--rebuild-at", "2,3", "--restore-check-at", "4", "--baseline")


@pytest.mark.timeout(480)
def test_3d_rebuild_is_bit_exact_and_leaves_no_stale_group(run_3d):
    _assert_rebuild_and_restore(run_3d, world=8, rebuilds=2)


@pytest.mark.timeout(60)
def test_3d_groups_and_replicas(run_3d):
    _assert_replicas(run_3d, tp=2, pp=2)
    roles = run_3d[0]["rebuilds"][0]["roles_before"]
    assert roles["_TENSOR_MODEL_PARALLEL_GROUP"] == [0, 1]
    assert roles["_PIPELINE_MODEL_PARALLEL_GROUP"] == [0, 4]
    assert roles["_EMBEDDING_GROUP"] == [0, 4]
    assert roles["_MODEL_PARALLEL_GROUP"] == [0, 1, 4, 5]
    # one gloo group per member set: 24-25 roles, 7 member sets, plus WORLD (whose members
    # the distributed-optimizer-instance group has too)
    for r in run_3d:
        for rb in r["rebuilds"]:
            member_sets = set(map(tuple, rb["roles_before"].values()))
            assert rb["detail"]["groups_retired"] == len(member_sets) + 1, (r["rank"], rb)


@pytest.mark.timeout(60)
def test_3d_training_makes_progress(run_3d):
    losses = run_3d[0]["losses"]
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- 4-process layouts


@pytest.mark.timeout(420)
@pytest.mark.parametrize("tp,pp,bf16", [(1, 2, True)], ids=["pp2dp2-bf16"])  # TP, fp32: the 3D run
def test_rebuild_4_ranks(tmp_path, tp, pp, bf16):
    """Two generations in a row (gen1 before step 1, gen2 before step 2); gen2 tears megatron
    down twice, as when a second fault interrupts a rebuild before it began: the rebuild must
    still rebind every reference to the groups of gen1."""
    args = ["--world", "4", "--tp", str(tp), "--pp", str(pp), "--steps", "4"]
    args += ["--rebuild-at", "1,2", "--teardown-again-at", "2", "--restore-check-at", "3",
             "--baseline"]
    reports = _launch(tmp_path, *args, *(["--bf16"] if bf16 else []))
    _assert_rebuild_and_restore(reports, world=4, rebuilds=2)
    _assert_replicas(reports, tp=tp, pp=pp)
    for r in reports:
        # bf16: the DistributedOptimizer's fp32 master shards are unique state; fp32: they are
        # views of the (replicated) params.
        assert (r["restore"]["unique_main_param_keys"] > 0) == bf16


# ---------------------------------------------------------------- single process, subprocess


def _run_python(code: str, timeout: float = 180) -> dict:
    proc = subprocess.run(
        [PYTHON, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(240)
def test_a_replacement_model_is_tagged_as_a_randomly_initialized_one():
    """A replacement draws no random weights, yet every parameter carries the tensor-parallel
    attributes megatron-core's initialization sets: the grad norm (and so clipping) counts them,
    and the job stays on the fault-free trajectory."""
    result = _run_python("""
        import json, torch, torch.distributed as dist
        from fr_megatron.megatron.model import TinyGPTConfig, TinyGPTJob, initialize_parallel
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        cfg = TinyGPTConfig()
        initialize_parallel(cfg)
        def tags(job):
            return {n: [getattr(p, a, None) for a in ("tensor_model_parallel", "partition_dim",
                                                       "partition_stride")]
                    for c in job.model for n, p in c.named_parameters()}
        drawn = TinyGPTJob(cfg)
        replacement = TinyGPTJob(cfg, initialize=False)
        print(json.dumps({"drawn": tags(drawn), "replacement": tags(replacement)}))
    """)
    assert result["replacement"] == result["drawn"]
    assert sum(t[0] is True for t in result["drawn"].values()) >= 4  # qkv, proj, fc1, fc2, ...


@pytest.fixture(scope="module")
def group_creation():
    """What ``parallel_state_hook`` makes of megatron's group creation, measured in one
    subprocess (a fresh torch and megatron-core): see the two tests below."""
    return _run_python(
        """
        import json, warnings
        warnings.filterwarnings("ignore")
        import torch.distributed as dist
        from torch.testing._internal.distributed.fake_pg import FakeStore
        from megatron.core import parallel_state as ps
        from fr_megatron.megatron import parallel_state_hook as hook

        hook.install(local_sync=True)
        calls, orig = [], dist.new_group
        def counting(*a, **k):
            calls.append(k.get("use_local_synchronization"))
            return orig(*a, **k)
        dist.new_group = counting
        member_only = {}
        for world in (64, 1024):
            rank = world // 2 + 3
            dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
            calls.clear()
            ps.initialize_model_parallel(4, 2, create_gloo_process_groups=False)
            tp_ranks = dist.get_process_group_ranks(ps.get_tensor_model_parallel_group())
            member_only[world] = {"calls": len(calls), "all_local": all(calls), "tp": tp_ranks}
            hook.teardown()
            dist.destroy_process_group()
        dist.new_group = orig

        sharing = {}
        for name, backend, store, local_sync in (
                ("gloo", "gloo", dist.HashStore(), True),
                ("gloo_all_ranks_call", "gloo", dist.HashStore(), False),
                ("fake", "fake", FakeStore(), True)):
            hook.install(local_sync=local_sync)
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
            # megatron's gloo copies of the data-parallel groups (gloo cannot use a FakeStore)
            ps.initialize_model_parallel(1, 1, create_gloo_process_groups=backend == "gloo")
            roles = hook.group_roles()
            groups = {id(g) for k, g in roles.items() if k != "WORLD"}
            sharing[name] = {"roles": len(roles) - 1, "groups": len(groups)}
            hook.teardown()
            dist.destroy_process_group()
        print(json.dumps({"member_only": member_only, "sharing": sharing}))
        """
    )


@pytest.mark.timeout(240)
def test_member_only_group_creation_does_not_grow_with_the_world(group_creation):
    """On a fake world of 64 and of 1024 ranks, a rank makes the same few torch group calls."""
    result = group_creation["member_only"]
    small, large = result["64"], result["1024"]
    assert small["calls"] == large["calls"] < 20
    assert small["all_local"] and large["all_local"]
    assert small["tp"] == [32, 33, 34, 35] and large["tp"] == [512, 513, 514, 515]


@pytest.mark.timeout(240)
def test_gloo_groups_with_the_same_members_are_one_group(group_creation):
    """On a gloo world every role with the same members, timeout and options is one group (a
    group with no timeout has gloo's default one), with or without member-only creation; on
    another backend nothing is shared."""
    result = group_creation["sharing"]
    assert result["gloo"]["roles"] > 20 and result["gloo"]["groups"] == 1
    # without local synchronisation (every rank calls torch for every group) too, so a world
    # built either way has the groups the other's roles map to
    assert result["gloo_all_ranks_call"] == result["gloo"]
    assert result["fake"]["groups"] > 10


@pytest.mark.timeout(240)
def test_cpu_mode_bridges():
    result = _run_python(
        """
        import json, sys, warnings
        warnings.filterwarnings("ignore")
        import torch
        from fr_megatron.megatron.cpu import (bypassed, enable_cpu_mode, cpu_mode_enabled,
                                              import_megatron_core)
        compile_ = torch.compile
        import_megatron_core()
        from megatron.core import jit
        from megatron.core.tensor_parallel import random as mrandom
        import_time = {"dynamo": "torch._dynamo" in sys.modules,
                       "fuser_compiles": jit.jit_fuser is compile_,
                       "compile_restored": torch.compile is compile_}

        assert not cpu_mode_enabled()
        first, second = enable_cpu_mode(), enable_cpu_mode()
        x = torch.zeros(3, device="cuda")
        y = torch.ones(2, device=torch.cuda.current_device()).cuda()
        torch.cuda.synchronize()
        tracker = mrandom.get_cuda_rng_tracker()
        tracker.add("a", 7)
        outside0 = torch.rand(1).item()
        with tracker.fork("a"):
            inside1 = torch.rand(1).item()
        with tracker.fork("a"):
            inside2 = torch.rand(1).item()
        expected = torch.Generator().manual_seed(7)
        e = torch.rand(2, generator=expected)
        with bypassed():  # the commit's copies go straight to torch: nothing is mapped there
            bypassed_type = torch.zeros(1).type()
        print(json.dumps({
            "bypassed_type": bypassed_type, "type_after": torch.zeros(1).type(),
            "import_time": import_time,
            "first": first, "second": second, "enabled": cpu_mode_enabled(),
            "devices": [str(x.device), str(y.device)],
            "type": torch.zeros(1).type(), "bf16": torch.zeros(1, dtype=torch.bfloat16).type(),
            "tracker": type(tracker).__name__,
            "fork": [inside1, inside2], "expected": e.tolist(),
        }))
        """
    )
    assert result["first"] and result["second"] and result["enabled"]
    assert result["devices"] == ["cpu", "cpu"]
    assert result["type"] == "torch.cuda.FloatTensor"
    assert result["bf16"] == "torch.cuda.BFloat16Tensor"
    # megatron-core loaded without torch.compile's machinery; torch.compile itself untouched
    assert result["import_time"] == {"dynamo": False, "fuser_compiles": False,
                                     "compile_restored": True}
    assert result["bypassed_type"] == "torch.FloatTensor"
    assert result["type_after"] == "torch.cuda.FloatTensor"
    assert result["tracker"] == "CpuRNGStatesTracker"
    # The tracker's named state advances across forks and follows its own seed.
    assert result["fork"] == pytest.approx(result["expected"], abs=0)


# ---------------------------------------------------------------- single process, in process


@pytest.fixture
def one_rank_world():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


Pair = collections.namedtuple("Pair", "a b")


class Slotted:
    __slots__ = ("group", "other")

    def __init__(self, group):
        self.group = group
        self.other = 1


def test_rebind_reaches_every_kind_of_holder(one_rank_world):
    from fr_megatron.megatron.rebind import count_old_group_references, rebind

    old, new = dist.new_group([0]), dist.new_group([0])

    def make_closure(group):
        return lambda: group

    closure = make_closure(old)

    holder = torch.nn.Linear(1, 1)
    holder.pg_collection = type("PGC", (), {})()
    holder.pg_collection.tp = old
    holder.weight.tp_group = old
    roots = [
        {
            "plain": old,
            "tuple": (1, old),
            "named": Pair(old, 2),
            "nested": [[{"deep": (old,)}]],
            "key": {old: "value"},
            "set": {old},
            "frozen": frozenset([old]),
            "partial": functools.partial(print, old, group=old),
            "closure": closure,
            "slots": Slotted(old),
            "module": holder,
        }
    ]
    assert count_old_group_references(roots, [old]) == 13
    replaced = rebind(roots, {id(old): new})
    assert replaced == 13
    assert count_old_group_references(roots, [old]) == 0
    d = roots[0]
    assert d["plain"] is new and d["tuple"][1] is new and d["named"].a is new
    assert isinstance(d["named"], Pair)
    assert d["nested"][0][0]["deep"][0] is new and d["key"] == {new: "value"}
    assert d["set"] == {new} and d["frozen"] == frozenset([new])
    assert d["partial"].args[0] is new and d["partial"].keywords["group"] is new
    assert d["closure"]() is new and d["slots"].group is new
    assert d["module"].pg_collection.tp is new and d["module"].weight.tp_group is new


def test_retired_group_fails_loudly(one_rank_world):
    from fr_megatron.megatron.rebind import retire_groups

    group = dist.new_group([0])
    t = torch.ones(1)
    dist.all_reduce(t, group=group)  # works before
    assert retire_groups([group], "test retirement") == 1
    assert group.size() == 1 and group.rank() == 0  # still readable
    with pytest.raises(Exception):
        dist.all_reduce(torch.ones(1), group=group)
    with pytest.raises(Exception):
        group.broadcast([torch.ones(1)]).wait()
    dist.all_reduce(t)  # the default group is untouched


def test_optimizer_instances_fit_the_data_parallel_size_left():
    """A shrunk world keeps the configured instances where they divide the data-parallel size,
    else the most that do: one shard copy fewer per instance lost, never a megatron assert."""
    from fr_megatron.megatron.parallel_state_hook import fit_optimizer_instances

    assert [fit_optimizer_instances(2, dp) for dp in (4, 3, 2, 1)] == [2, 1, 2, 1]
    assert [fit_optimizer_instances(4, dp) for dp in (8, 6, 4, 3, 2)] == [4, 3, 4, 3, 2]
    assert fit_optimizer_instances(1, 5) == 1


def test_a_vanished_group_role_is_left_out_only_after_a_resize():
    from fr_megatron.megatron.rebind import build_group_map

    old, new = object(), object()
    gone = object()  # an inter-instance group of two instances, when one is left
    roles_old = {"_DATA_PARALLEL_GROUP": old, "_INTER_DISTRIBUTED_OPTIMIZER_INSTANCE_GROUP": gone}
    assert build_group_map(roles_old, {"_DATA_PARALLEL_GROUP": new}, resized=True) == \
        {id(old): new}
    with pytest.raises(RuntimeError, match="has no replacement"):
        build_group_map(roles_old, {"_DATA_PARALLEL_GROUP": new})
