"""DeepSpeed integration: state capture/restore, in-place group rebuild, the config section.

The multi-rank tests start 4 real processes (gloo, ``DS_ACCELERATOR=cpu``), forked from one that
imported DeepSpeed (``jobs.fork_ranks``); each runs the worker at the bottom of this file and writes
what it saw to a JSON file that the test reads back.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from jobs import fork_ranks, free_port

HERE = Path(__file__).resolve()


# ---------------------------------------------------------------------------------------------
# launching
# ---------------------------------------------------------------------------------------------

# what the worker imports, imported once before its ranks fork
PRELOAD = ["pytest", "torch.distributed", "deepspeed", "fr_megatron.deepspeed.mpu",
           "megatron.core.parallel_state"]


def launch(tmp_path: Path, world: int, *args: str, timeout: float = 150) -> list[dict]:
    """Run the worker on ``world`` ranks (torchrun-like env) and return each rank's result."""
    port = free_port()
    envs = [dict(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                 FR_TEST_OUT=str(tmp_path / f"rank{rank}.json")) for rank in range(world)]
    fork_ranks(tmp_path, HERE, list(args), envs, PRELOAD, timeout,
               env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


# ---------------------------------------------------------------------------------------------
# multi-rank tests
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """One 4-rank launch runs the stage-0, ZeRO-1, ZeRO-2, bf16 ZeRO-2 and replacement scenarios one
    after another (world generations 1 to 5): starting 4 DeepSpeed processes costs more than a
    scenario."""
    return launch(tmp_path_factory.mktemp("zero"), 4, "recover", "0,1,2,2bf16,1replace", "1")


def _check_recovery(res, r, stage):
    assert res["fresh_diff"] == [], (r, res["fresh_diff"])
    assert res["redo_equal"], (r, res["redo_diff"])
    assert res["losses_after_rebuild"] == res["losses_uninterrupted"], r
    assert res["final_equal"], (r, res["final_diff"])
    assert res["old_refs_before"] > 0 and res["old_refs_after"] == 0, r
    assert res["all_live"], (r, res["refs_after"])
    if stage == 0:  # plain optimizer: everything is replicated across data parallelism
        assert res["unique_keys"] == []
    else:
        assert res["unique_keys"] == ["zero/0/fp32", "zero/0/state/exp_avg", "zero/0/state/exp_avg_sq",
                                      "zero/0/state/step"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("variant", ["0", "1", "2", "2bf16", "1replace"])
def test_zero_restore_and_rebuild_bit_exact(zero_runs, variant):
    results = [by_variant[variant] for by_variant in zero_runs]
    for r, res in enumerate(results):
        _check_recovery(res, r, int(variant[0]))
        assert res["replica_ranks"] == [0, 1, 2, 3]
    # the replicated parameters are identical across the data-parallel group
    assert len({res["param_digest"] for res in results}) == 1


@pytest.mark.timeout(200)
def test_zero2_with_megatron_mpu_tp2_dp2_and_a_replacement(tmp_path):
    # rank 0 comes back as a fresh replacement; ranks 1-3 rebuild Megatron's and DeepSpeed's groups
    results = [by_variant["2replace"] for by_variant in launch(tmp_path, 4, "recover", "2replace", "2")]
    for r, res in enumerate(results):
        _check_recovery(res, r, 2)
        assert res["mpu_rebuilt"] == 1
    assert [res["replica_ranks"] for res in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    # TP shards differ, DP replicas agree
    assert results[0]["param_digest"] == results[2]["param_digest"]
    assert results[1]["param_digest"] == results[3]["param_digest"]
    assert results[0]["param_digest"] != results[1]["param_digest"]


# ---------------------------------------------------------------------------------------------
# the object-graph walk that finds cached groups (ProcessGroups are invisible to gc)
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_group_refs_rebinds_every_kind_of_holder():
    import collections
    import functools
    import types

    import torch
    import torch.distributed as dist

    from fr_megatron.runtime import group_refs

    store = dist.HashStore()
    old, new, other = (dist.ProcessGroup(store, 0, 1) for _ in range(3))
    Pair = collections.namedtuple("Pair", "a b")

    class Slotted:
        __slots__ = ("group",)

    class Holder(torch.nn.Module):
        pass

    slotted = Slotted()
    slotted.group = old
    param = torch.nn.Parameter(torch.zeros(2))
    param._dp_group = old
    holder = Holder()
    holder.p = param
    holder.groups = [old, other, (old, "x"), Pair(old, 1), {old}]
    holder.by_group = {("reduce", old): 1, "g": old}
    holder.slotted = slotted
    holder.partial = functools.partial(print, old, group=old)

    def make_closure(g):
        return lambda: g

    holder.closure = make_closure(old)
    module = types.ModuleType("fake_groups")
    module._GROUP = old
    module._DICT = {"a": old}

    roots = {"holder": holder, "fake_groups": module}
    found = group_refs.find(roots)
    assert sum(pg is old for _, pg in found) == 13
    assert group_refs.count(roots, [old]) == 13
    paths = group_refs.rebind(roots, lambda pg, path: new if pg is old else None)
    assert len(paths) == 13 and any("_dp_group" in p for p in paths)
    assert group_refs.count(roots, [old]) == 0
    assert group_refs.count(roots, [other]) == 1
    assert holder.groups[2] == (new, "x") and holder.groups[3] == Pair(new, 1) and holder.groups[4] == {new}
    assert holder.by_group == {("reduce", new): 1, "g": new}
    assert slotted.group is new and param._dp_group is new and holder.closure() is new
    assert holder.partial.args == (new,) and holder.partial.keywords == {"group": new}
    assert module._GROUP is new and module._DICT == {"a": new}


# ---------------------------------------------------------------------------------------------
# config section: every error comes before any process group exists
# ---------------------------------------------------------------------------------------------
def _base(**section):
    cfg = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 1}}
    if section is not None:
        cfg["flash_recovery"] = section
    return cfg


@pytest.fixture
def no_dist(monkeypatch):
    """Fail the test if anything creates a process group or imports DeepSpeed's engine."""
    import torch.distributed as dist

    def boom(*a, **k):
        raise AssertionError("a process group was created before the config was validated")

    monkeypatch.setattr(dist, "init_process_group", boom)
    monkeypatch.setattr(dist, "new_group", boom)
    import deepspeed

    monkeypatch.setattr(deepspeed, "initialize", boom)
    yield
    assert not dist.is_initialized()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("section, words", [
    ({"heartbeat_intervall": 1}, ["flash_recovery.heartbeat_intervall", "unknown key", "heartbeat_interval",
                                  "replicas"]),
    ({"replicas": "two"}, ["flash_recovery.replicas", "integer", "'two'"]),
    ({"heartbeat_interval": -1}, ["flash_recovery.heartbeat_interval", "greater than 0", "-1"]),
    ({"replicas": 0}, ["flash_recovery.replicas", "greater than or equal to 1"]),
    ({"controller": "localhost"}, ["flash_recovery.controller", "HOST:PORT"]),
    ({"wandb": {"mode": "loud"}}, ["flash_recovery.wandb.mode", "online"]),
    ({"wandb": {"colour": 1}}, ["flash_recovery.wandb.colour", "unknown key", "project"]),
    ({"replicas": 4}, ["flash_recovery.replicas", "data-parallel size is 4", "1..3"]),
])
def test_section_errors_before_any_group(no_dist, section, words):
    import torch

    from fr_megatron.config import ConfigError
    from fr_megatron.deepspeed import initialize

    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError) as e:
        initialize(model=model, model_parameters=model.parameters(), config=_base(**section))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.timeout(60)
def test_zero3_rejected_before_any_group(no_dist, tmp_path):
    import torch

    from fr_megatron.config import ConfigError
    from fr_megatron.deepspeed import initialize

    path = tmp_path / "ds.json"
    cfg = _base(replicas=1)
    cfg["zero_optimization"]["stage"] = 3
    path.write_text(json.dumps(cfg))
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match=r"zero_optimization.stage=3: .*ZeRO-1 and ZeRO-2"):
        initialize(model=model, model_parameters=model.parameters(), config=str(path))


@pytest.mark.timeout(60)
def test_section_not_a_dict_and_bad_json(no_dist, tmp_path):
    from fr_megatron.config import ConfigError
    from fr_megatron.deepspeed.config import read_section

    with pytest.raises(ConfigError, match=r"flash_recovery: expected an object with keys .*replicas"):
        read_section({"flash_recovery": [1]})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_section(str(bad))


def test_replicas_against_dp_size():
    from fr_megatron.config import ConfigError, FlashRecoveryConfig
    from fr_megatron.deepspeed.config import check_replicas, infer_dp_size, validate

    check_replicas(FlashRecoveryConfig(replicas=3), 4)
    with pytest.raises(ConfigError, match="replicas: 2 copies need at least 3 data-parallel ranks"):
        check_replicas(FlashRecoveryConfig(replicas=2), 2)
    with pytest.raises(ConfigError, match="no peer to hold a copy"):
        check_replicas(FlashRecoveryConfig(replicas=1), 1)
    check_replicas(FlashRecoveryConfig(enabled=False, replicas=8), 1)
    # ``replicas=False`` leaves the check out: ``initialize`` makes it once the engine exists
    # when the sizes at hand are a shrunk world's (below)
    one = {**_base(), "flash_recovery": {"replicas": 1}}
    with pytest.raises(ConfigError, match="no peer to hold a copy"):
        validate(one, dp_size=1)
    assert validate(one, dp_size=1, replicas=False).replicas == 1
    assert infer_dp_size(_base()) == 4
    assert infer_dp_size({"train_batch_size": 8}, world_size=8,) == 8
    assert infer_dp_size({"tensor_parallel": {"autotp_size": 2}}, world_size=8) == 4


def test_replicas_are_checked_against_the_configured_data_parallel_size(monkeypatch):
    """A job of four replicas shrunk to one: its engine built again, or a replacement's, has
    one data-parallel rank, and the check reads the configured four."""
    import torch.distributed as dist

    from fr_megatron.deepspeed import configured_data_parallel_size

    monkeypatch.setenv("WORLD_SIZE", "4")
    assert configured_data_parallel_size(4) == 4  # no group yet: the world is the job's
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert configured_data_parallel_size(1) == 4
    finally:
        dist.destroy_process_group()
    monkeypatch.delenv("WORLD_SIZE")
    assert configured_data_parallel_size(3) == 3


def test_section_absent_or_disabled_and_engine_config():
    from fr_megatron.deepspeed.config import read_section, validate

    assert read_section({"train_batch_size": 1}).enabled is False
    assert validate({"flash_recovery": {"enabled": False, "replicas": 8},
                     "zero_optimization": {"stage": 3}}).enabled is False
    cfg = read_section({"flash_recovery": {"replicas": 2, "heartbeat_interval": 0.25}})
    assert (cfg.enabled, cfg.replicas, cfg.heartbeat_interval) == (True, 2, 0.25)

    class FakeDSConfig:  # what an engine holds: DeepSpeedConfig with _param_dict
        _param_dict = {"flash_recovery": {"spares": 3}}

    class FakeEngine:
        _config = FakeDSConfig()

    assert read_section(FakeEngine()).spares == 3


# ---------------------------------------------------------------------------------------------
# the worker (one rank)
# ---------------------------------------------------------------------------------------------
IN, HID, OUT, MB = 8, 16, 4, 2


def _worker_recover(stages: list[str], tp: int) -> dict:
    """For each ZeRO stage: an uninterrupted run, then a run that restores, redoes a step and
    rebuilds every group on a new world generation mid-training. Returns results by stage."""
    from datetime import timedelta

    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(seconds=60)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0, timeout=timeout)
    dist.init_process_group("gloo", store=dist.PrefixStore("gen0/", store), rank=rank, world_size=world,
                            timeout=timeout)

    import deepspeed

    # DeepSpeed's CPU shared-memory all-reduce serves inference only; skip its JIT build.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    counter = {"n": 0}

    def rebuild_parallel_state():
        """What the Megatron side does on a new world: parallel_state's groups, same topology."""
        from megatron.core import parallel_state as ps

        counter["n"] += 1
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp)

    mpu = rebuild_mpu = None
    if tp > 1:
        from megatron.core import parallel_state as ps

        ps.initialize_model_parallel(tensor_model_parallel_size=tp)
        mpu, rebuild_mpu = MegatronCoreMPU(), rebuild_parallel_state

    def new_generation(gen: int) -> None:
        """What the runtime does: destroy the whole world, join the next generation's prefix."""
        dist.destroy_process_group()
        dist.init_process_group("gloo", store=dist.PrefixStore(f"gen{gen}/", store), rank=rank,
                                world_size=world, timeout=timeout)

    out = {}
    for gen, variant in enumerate(stages, start=1):
        stage, bf16, replace = int(variant[0]), variant.endswith("bf16"), variant.endswith("replace")
        out[variant] = _scenario(stage, tp, mpu, rebuild_mpu, lambda g=gen: new_generation(g), bf16,
                                 replace)
        out[variant]["mpu_rebuilt"] = counter["n"]
    dist.barrier()
    return out


def _scenario(stage: int, tp: int, mpu, rebuild_mpu, new_generation, bf16: bool = False,
              replace: bool = False) -> dict:
    import copy
    import gc

    import torch
    import torch.distributed as dist

    from fr_megatron.deepspeed import initialize
    from fr_megatron.runtime.integration import RankState

    rank, world = dist.get_rank(), dist.get_world_size()
    tp_rank, dp_rank, dp_size = rank % tp, rank // tp, world // tp
    config = {"train_batch_size": MB * dp_size, "train_micro_batch_size_per_gpu": MB,
              "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
              "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
              "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.02,
                                                           "warmup_num_steps": 8}},
              "flash_recovery": {"replicas": 1, "heartbeat_interval": 0.5}}
    if bf16:
        config["bf16"] = {"enabled": True}

    def make_engine():
        torch.manual_seed(1234 + tp_rank)
        model = TPMLP(tp) if tp > 1 else torch.nn.Sequential(torch.nn.Linear(IN, HID), torch.nn.Tanh(),
                                                             torch.nn.Linear(HID, OUT))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        engine, _, _, _ = initialize(model=model, optimizer=optimizer, config=config, mpu=mpu,
                                     rebuild_mpu=rebuild_mpu)
        return engine

    def step(engine, i: int) -> float:
        g = torch.Generator().manual_seed(1000 * i + dp_rank)
        x, y = torch.randn(MB, IN, generator=g), torch.randn(MB, OUT, generator=g)
        out = engine(x.to(torch.bfloat16 if bf16 else torch.float32))
        loss = torch.nn.functional.mse_loss(out.float(), y)
        engine.backward(loss)
        engine.step()
        return loss.item()

    def snapshot(fr):
        """A deep copy of the live state (capture returns live tensors), with every module
        parameter beside it under "module/" (ZeRO-1/2 capture leaves the trained ones out: they
        are made from the master partitions), so that the comparisons below cover them."""
        s = fr.capture()
        params = {f"module/{n}": p.detach().clone() for n, p in fr.engine.module.named_parameters()}
        return RankState(replicated={**{k: v.clone() for k, v in s.replicated.items()}, **params},
                         unique={k: v.clone() for k, v in s.unique.items()}, meta=copy.deepcopy(s.meta))

    def restorable(state):
        """``state`` as ``capture`` returned it (without the "module/" parameters)."""
        return RankState({k: v for k, v in state.replicated.items() if not k.startswith("module/")},
                         state.unique, state.meta)

    def diff(a, b) -> list[str]:
        empty = torch.empty(0)
        out = [k for part in ("replicated", "unique") for k in set(getattr(a, part)) | set(getattr(b, part))
               if not torch.equal(getattr(a, part).get(k, empty), getattr(b, part).get(k, empty))]
        return out + (["meta"] if repr(a.meta) != repr(b.meta) else [])

    K, N = 2, 7
    # 1. the uninterrupted run; its state after step K is what a replacement would receive
    engine = make_engine()
    plain = []
    for i in range(N):
        plain.append(step(engine, i))
        if i == K:
            at_k = snapshot(engine.flash_recovery)
    final_plain = snapshot(engine.flash_recovery)
    del engine
    gc.collect()

    # 2. a fresh engine (no optimizer state yet) restores that state, like a replacement rank
    engine = make_engine()
    fr = engine.flash_recovery
    fr.restore(restorable(at_k))
    fresh_diff = diff(at_k, snapshot(fr))

    # 3. capture, step, restore, redo the step
    before = snapshot(fr)
    loss1 = step(engine, K + 1)
    after1 = snapshot(fr)
    fr.restore(restorable(before))
    restored = snapshot(fr)
    loss2 = step(engine, K + 1)
    after2 = snapshot(fr)
    redo_diff = diff(before, restored) + diff(after1, after2) + ([] if loss1 == loss2 else ["loss"])
    redo_diff += [] if loss1 == plain[K + 1] else ["loss differs from the uninterrupted run"]

    # 4. a new generation of the world in the middle of training: groups rebuilt in place, or
    #    (replace) rank 0 plays a fresh replacement process that initialises DeepSpeed from scratch
    #    and receives its state, while the survivors rebuild and mirror its init collectives
    old_groups = [pg for _, pg in _group_objects(fr)] + [dist.group.WORLD]
    fr.teardown()
    old_refs_before = fr.old_group_references(old_groups)
    new_generation()
    if replace and rank == 0:
        if rebuild_mpu is not None:
            rebuild_mpu()
        engine = make_engine()
        fr = engine.flash_recovery
    else:
        fr.rebuild()
        if replace:
            fr.mirror_fresh_init()
    if replace:  # every rank restores, as in a recovery (ZeRO all-gathers the parameters)
        fr.restore(restorable(after2))
    old_refs_after = fr.old_group_references(old_groups)
    refs_after = fr.group_references()
    live = set(map(id, dist.distributed_c10d._world.pg_map))
    all_live = all(id(pg) in live for _, pg in _group_objects(fr))
    after_rebuild = [step(engine, i) for i in range(K + 2, N)]
    final = snapshot(fr)

    params = [v for k, v in final.replicated.items() if k.startswith("module/")]
    digest = float(sum(v.double().sum() * (j + 1) for j, v in enumerate(params)))
    return {"fresh_diff": fresh_diff, "redo_equal": not redo_diff, "redo_diff": redo_diff,
            "losses_uninterrupted": plain[K + 2:], "losses_after_rebuild": after_rebuild,
            "final_equal": not diff(final_plain, final), "final_diff": diff(final_plain, final),
            "old_refs_before": old_refs_before, "old_refs_after": old_refs_after,
            "refs_after": [(p, list(r)) for p, r in refs_after], "all_live": all_live,
            "replica_ranks": fr.replica_ranks(), "unique_keys": sorted(final.unique),
            "param_digest": digest}


from fr_megatron.deepspeed.mpu import MegatronCoreMPU  # noqa: E402


def _group_objects(fr):
    from fr_megatron.runtime import group_refs

    return group_refs.find(fr._roots(), fr._walk_skip())


def _make_tp_functions():
    from fr_megatron.deepspeed.mpu import CopyToTP, ReduceFromTP

    return CopyToTP, ReduceFromTP


def TPMLP(tp: int):
    """A column-parallel then row-parallel MLP (Megatron's layout) over the mpu's TP group."""
    import torch

    CopyToTP, ReduceFromTP = _make_tp_functions()

    class _TPMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(IN, HID // tp)
            self.fc2 = torch.nn.Linear(HID // tp, OUT, bias=False)
            self.bias = torch.nn.Parameter(torch.zeros(OUT))

        def forward(self, x):
            h = torch.tanh(self.fc1(CopyToTP.apply(x)))
            return ReduceFromTP.apply(self.fc2(h)) + self.bias

    return _TPMLP()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO,
                        format=f"%(relativeCreated)d [rank{os.environ.get('RANK')}] %(name)s: %(message)s")
    if sys.argv[1] == "recover":
        out = _worker_recover(sys.argv[2].split(","), int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown worker {sys.argv[1]}")
    Path(os.environ["FR_TEST_OUT"]).write_text(json.dumps(out))
