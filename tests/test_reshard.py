"""Re-partitioning distributed-optimizer state over another data-parallel size, in memory
(``runtime.reshard``, ``MegatronIntegration.reshard``): the model-space pieces on their own, and
real megatron-core jobs whose shards are written at one data-parallel size and restored at
another, compared with megatron's own per-parameter view of the shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jobs import fork_ranks, free_port
from fr_megatron.runtime.reshard import ReshardError, ShardLayout, Span, assemble, scatter

WORKER = Path(__file__).with_name("reshard_worker.py")
# what the worker imports, imported once before its ranks fork
PRELOAD = ["torch.distributed", "megatron.core.parallel_state", "fr_megatron.megatron.integration",
           "fr_megatron.megatron.model"]


def _layouts(numel: int, size: int) -> list[ShardLayout]:
    """One parameter of ``numel`` elements in a buffer padded to ``size`` shards, with an
    ``exp_avg`` per shard and a scalar ``step``."""
    per = -(-numel // size)
    out = []
    for r in range(size):
        lo, hi = min(numel, r * per), min(numel, (r + 1) * per)
        lay = ShardLayout(numel={"w": numel})
        lay.add("param_shard", Span("w", "param", lo, hi, 0))
        lay.add("exp_avg", Span("w", "exp_avg", lo, hi))
        lay.add("step", Span("w", "step", -1, -1))
        out.append(lay)
    return out


def _tensors(lay: ShardLayout, full: dict) -> dict:
    sp = lay.spans["param_shard"][0]
    return {"param_shard": full["param"][sp.start:sp.end].clone(),
            "exp_avg": full["exp_avg"][sp.start:sp.end].clone(),
            "step": torch.tensor(7.0)}


@pytest.mark.parametrize("old,new", [(4, 3), (3, 4), (2, 1), (1, 5)])
def test_shards_of_one_size_fill_every_shard_of_another(old, new):
    numel = 23
    full = {"param": torch.randn(numel), "exp_avg": torch.randn(numel)}
    space = assemble((lay, _tensors(lay, full)) for lay in _layouts(numel, old))
    got = []
    for lay in _layouts(numel, new):
        live = {k: torch.zeros_like(v) for k, v in _tensors(lay, full).items()}
        live["step"] = torch.tensor(0.0)
        scatter(space, lay, live)
        assert torch.equal(live["param_shard"], _tensors(lay, full)["param_shard"])
        assert live["step"].item() == 7.0
        got.append(live["exp_avg"])
    assert torch.equal(torch.cat(got), full["exp_avg"])


def test_a_missing_old_shard_is_an_error_naming_the_parameter():
    full = {"param": torch.randn(10), "exp_avg": torch.randn(10)}
    olds = _layouts(10, 2)[:1]  # the second rank's shard is lost
    space = assemble((lay, _tensors(lay, full)) for lay in olds)
    lay = _layouts(10, 1)[0]
    live = {k: torch.zeros_like(v) for k, v in _tensors(lay, full).items()}
    with pytest.raises(ReshardError, match="elements 0..10 of param of w"):
        scatter(space, lay, live)


def test_a_tensor_without_a_layout_is_refused():
    with pytest.raises(ReshardError, match="no model-space layout"):
        _layouts(4, 2)[0].check_covers(["param_shard", "exp_avg", "optim0/extra"])


def _launch(tmp: Path, world: int, *args: str, timeout: float = 200) -> None:
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world))
    fork_ranks(tmp / f"{args[0]}_logs", WORKER, list(args),
               [dict(env, RANK=str(r)) for r in range(world)], PRELOAD, timeout,
               env={"DS_ACCELERATOR": "cpu"})


@pytest.mark.timeout(420)
# a grow, data-parallel 2 -> 3, of tensor-parallel pairs with bf16 parameters and fp32 mains (the
# shrink direction, fp32, runs end to end in test_megatron_shrink)
@pytest.mark.parametrize("tp,bf16,old_world,new_world", [(2, True, 4, 6)], ids=["tp2-bf16-dp2to3"])
def test_a_megatron_job_restores_its_shards_at_another_data_parallel_size(
        tmp_path, tp, bf16, old_world, new_world):
    flags = ["--dir", str(tmp_path), "--tp", str(tp), *(["--bf16"] if bf16 else [])]
    _launch(tmp_path, old_world, "save", *flags)
    _launch(tmp_path, new_world, "load", *flags)
    olds = [torch.load(p, weights_only=False) for p in sorted(tmp_path.glob("old*.pt"))]
    news = [torch.load(p, weights_only=False) for p in sorted(tmp_path.glob("new*.pt"))]
    assert {n["dp"] for n in news} == {new_world // tp}
    for position in {o["position"] for o in olds}:
        # the old shards, put together from megatron's own ranges, per parameter and kind
        whole: dict = {}
        for o in (o for o in olds if o["position"] == position):
            for (name, kind), (start, end, t) in o["shard"].items():
                if t.dim() == 0:
                    whole.setdefault((name, kind), t)
                    continue
                numel = o["params"][name].numel()
                buf = whole.setdefault((name, kind), torch.full((numel,), float("nan"),
                                                                dtype=t.dtype))
                buf[start:end] = t.reshape(-1)
        mine = [n for n in news if n["position"] == position]
        covered: dict = {}
        for n in mine:
            assert n["copied"] > 0
            for (name, kind), (start, end, t) in n["shard"].items():
                if t.dim() == 0:
                    assert torch.equal(t, whole[(name, kind)]), (name, kind)
                    continue
                assert torch.equal(t.reshape(-1), whole[(name, kind)][start:end]), \
                    (position, name, kind, start, end)
                covered[(name, kind)] = covered.get((name, kind), 0) + end - start
            old_params = next(o for o in olds if o["position"] == position)["params"]
            for name, p in n["params"].items():
                assert torch.equal(p, old_params[name]), (position, name)
        # the new shards together hold every element once, and the job trained (moments set)
        assert all(covered[k] == v.numel() for k, v in whole.items() if v.dim()), position
        assert any(k[1] == "exp_avg" and v.abs().sum() > 0 for k, v in whole.items())
        if bf16:
            assert any(k[1] == "param" and v.dtype == torch.float32 for k, v in whole.items())


def test_a_point_needs_a_whole_partition_at_every_position():
    from fr_megatron.runtime.reshard_exchange import Offers

    # two positions (tensor ranks 0 and 1) of a DP=3 world; step 5 was committed at DP=4
    # (shards i of 4), step 6 at DP=3; job ranks 4 and 5 left the world with shards 2 of 4
    position = [(0, 0), (1, 0), (0, 0), (1, 0), (0, 0), (1, 0)]
    steps = [{0: {5: (0, 4), 6: (0, 3)}, 4: {5: (2, 4)}}, {1: {5: (0, 4), 6: (0, 3)}, 5: {5: (2, 4)}},
             {2: {5: (1, 4), 6: (1, 3)}}, {3: {5: (1, 4), 6: (1, 3)}},
             {6: {5: (3, 4), 6: (2, 3)}}, {7: {5: (3, 4), 6: (2, 3)}}]
    where = {0: (0, 0), 2: (0, 0), 4: (0, 0), 6: (0, 0), 1: (1, 0), 3: (1, 0), 5: (1, 0), 7: (1, 0)}
    offers = Offers(position, steps, where, stale=[[5, 6]] * 6)
    assert offers.complete(5) and offers.complete(6)
    # without the snapshot that rank 5 left, tensor rank 1 lacks shard 2 of 4 at step 5
    steps[1] = {1: {5: (0, 4), 6: (0, 3)}}
    offers = Offers(position, steps, where, stale=[[5, 6]] * 6)
    assert not offers.complete(5) and offers.complete(6)
    # a lost rank at that position will hold its own shard once its sources sent it
    assert offers.complete(5, wildcards=[3])
    assert offers.sender(4, 5) == 0 and offers.sender(5, 5) is None
