"""optim.deepspeed without processes: version pin, refused configurations, shard planning."""
from __future__ import annotations

import pytest
import torch

import optim.deepspeed as od
from models import make_small
from optim import build_optimizer
from train.ds_checkpoint import to_universal

CFG = {"name": "muon", "lr": 1e-2, "ns_dtype": "fp32", "wo_a_blocks": 2}


def test_version_pin(monkeypatch):
    import deepspeed

    assert od.check_deepspeed_version() == "0.19.8"
    monkeypatch.setattr(deepspeed, "__version__", "0.20.0")
    with pytest.raises(ImportError, match="0.19.8"):
        od.check_deepspeed_version()


def test_refuses_deepspeed_optimizer_section():
    opt = od.build_sharded_optimizer(make_small(), CFG)
    with pytest.raises(ValueError, match="#8441"):
        od.check_deepspeed_config({"optimizer": {"type": "Muon"}, "zero_optimization": {"stage": 0}}, opt)


def test_refuses_plain_hybrid_optimizer_under_zero():
    opt = build_optimizer(make_small(), CFG)
    od.check_deepspeed_config({"zero_optimization": {"stage": 0}}, opt)  # fine without ZeRO
    with pytest.raises(ValueError, match="ShardedHybridOptimizer"):
        od.check_deepspeed_config({"zero_optimization": {"stage": 2}}, opt)


@pytest.mark.parametrize("zero, extra, match", [
    ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, {}, "offload_optimizer"),
    ({"stage": 3, "offload_param": {"device": "cpu"}}, {}, "offload_param"),
    ({"stage": 3, "zero_hpz_partition_size": 2}, {}, "hpz"),
    ({"stage": 1}, {"fp16": {"enabled": True}}, "fp16"),
])
def test_refuses_conflicting_zero_options(zero, extra, match):
    opt = od.build_sharded_optimizer(make_small(), CFG)
    with pytest.raises(ValueError, match=match):
        od.check_deepspeed_config({"zero_optimization": zero, **extra}, opt)


def test_adamw_only_runs_any_zero_option():
    opt = build_optimizer(make_small(), {**CFG, "name": "adamw"})
    od.check_deepspeed_config({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, opt)


def test_refuses_zero_init_and_use_muon_tags():
    model = make_small()
    p = model.layers[0].attn.wkv.weight
    p.ds_id, p.ds_shape = 7, p.shape
    with pytest.raises(ValueError, match="zero.Init"):
        od.build_sharded_optimizer(model, CFG)
    model = make_small()
    model.head.weight.use_muon = True
    with pytest.raises(ValueError, match="use_muon"):
        od.check_model_for_muon(model)


def test_ns_placement_and_from_hybrid_checks():
    with pytest.raises(ValueError, match="ns_placement"):
        od.build_sharded_optimizer(make_small(), CFG, ns_placement="everywhere")
    model = make_small()
    opt = build_optimizer(model, CFG)
    model(torch.randint(0, 48, (2, 8))).backward()
    opt.step()
    with pytest.raises(ValueError, match="state"):
        od.ShardedHybridOptimizer.from_hybrid(opt)


def test_without_zero_it_is_the_hybrid_optimizer():
    ids = torch.randint(0, 48, (2, 8))
    results = []
    for make_opt in (lambda m: build_optimizer(m, CFG), lambda m: od.build_sharded_optimizer(m, CFG)):
        model = make_small()
        opt = make_opt(model)
        for _ in range(2):
            model(ids).backward()
            opt.step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_unbound_flat_shards_are_refused():
    opt = od.build_sharded_optimizer(make_small(), CFG)
    flat = torch.zeros(100, requires_grad=True)
    flat.grad = torch.ones(100)
    opt.param_groups[0]["params"] = [flat]   # what a ZeRO optimizer does to the groups
    with pytest.raises(RuntimeError, match="bind"):
        opt.step()


# ---------------------------------------------------------------------------- planning
def _unit(rank: int, world: int) -> od.ShardUnit:
    return od.ShardUnit(group_index=0, flat=lambda: None, process_group=None, rank=rank,
                        world=world, fragments=[])


def test_plan_stage12_layout_keeps_whole_matrices_local():
    # flat partition of 2 ranks: key 0 inside rank 0, key 1 cut 10 | 50, key 2 inside rank 1
    shapes = {0: (4, 6), 1: (3, 4, 5), 2: (2, 3)}
    frags = [[(0, 0, 24), (1, 0, 10)], [(1, 10, 50), (2, 0, 6)]]
    units = [_unit(r, 2) for r in range(2)]
    for u in units:
        od._plan_unit(u, shapes, 1, "owner", frags)
    plans = {p.key: p for p in units[0].plans}
    assert [plans[k].owner for k in (0, 1, 2)] == [0, 1, 1]     # the larger piece owns key 1
    assert units[0].needs_comm and units[1].needs_comm
    # rank 0 sends its 10 elements of key 1 to rank 1, nothing else moves
    assert [[(pl.key, pc) for pl, pc in s] for s in units[0].sends] == [[], [(1, (0, 0, 10))]]
    assert [[(pl.key, pc) for pl, pc in r] for r in units[1].recvs] == [[(1, (0, 0, 10))], []]
    assert units[0].recvs == [[], []] and units[1].sends == [[], []]
    red = _unit(0, 2)
    od._plan_unit(red, shapes, 1, "redundant", frags)
    assert {p.key: p.computers for p in red.plans}[1] == (0, 1)


def test_plan_stage3_layout_balances_owners():
    shapes = {k: (8, 8) for k in range(6)}
    frags = [[(k, 0, 32) for k in range(6)], [(k, 32, 32) for k in range(6)]]
    unit = _unit(0, 2)
    od._plan_unit(unit, shapes, 1, "owner", frags)
    owners = [p.owner for p in unit.plans]
    assert sorted(owners) == [0, 0, 0, 1, 1, 1]


def test_plan_rejects_a_layout_that_does_not_tile_the_parameter():
    with pytest.raises(RuntimeError, match="do not tile"):
        od._plan_unit(_unit(0, 2), {0: (4, 6)}, 1, "owner", [[(0, 0, 10)], [(0, 12, 12)]])
    with pytest.raises(RuntimeError, match="cover"):
        od._plan_unit(_unit(0, 2), {0: (4, 6)}, 1, "owner", [[(0, 0, 10)], [(0, 10, 10)]])


def test_to_universal_refuses_non_zero12_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="optim_states"):
        to_universal(tmp_path, tmp_path / "out")
