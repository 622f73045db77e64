"""Expert parallelism (train.expert_parallel) against the unsharded model.

Process tests (slow): the EP layer alone vs the unsharded MoE on 2 ranks (EP=2) and 4 ranks
(EP=2 x expert-data-parallel 2; EP=4), and EP=2 inside DeepSpeed with V4's Muon at ZeRO-0/1/2
against the single-process optimizer. In-process tests: argument checks.
"""
from __future__ import annotations

import pytest
import torch

from models import make_small_moe, reference_params
from train.expert_parallel import apply_expert_parallel, check_zero_stage_for_ep


@pytest.mark.slow
@pytest.mark.parametrize("world, ep, experts", [(2, 2, 4), (4, 2, 4), (4, 4, 8)])
def test_ep_layer_matches_unsharded_moe(ranks, world, ep, experts):
    outputs = ranks("expert_parallel.py", ["--ep", str(ep), "--experts", str(experts)], world=world)
    assert all(f"OK {r}" in out for r, out in enumerate(outputs))


@pytest.mark.slow
@pytest.mark.parametrize("stage, clip", [(0, 0.0), (1, 0.5), (2, 0.5)])
def test_ep_under_deepspeed_with_muon_matches_single_process(ranks, tmp_path, stage, clip):
    """Expert slices in DeepSpeed's expert-data-parallel groups: after 3 steps every parameter
    (experts gathered over the EP group) equals single-process V4 Muon on the same batches.
    Stage 0 without clipping: there DeepSpeed clips by the mean of the per-rank norms."""
    out = tmp_path / "params.pt"
    ranks("zero_muon.py", ["--stage", str(stage), "--model", "smallmoe", "--ep", "2",
                           "--clip", str(clip), "--steps", "3", "--out", str(out)])
    result = torch.load(out)
    reference = reference_params(make_small_moe, 3, 2, clip)
    init = dict(make_small_moe().named_parameters())
    assert "ep_size_2" in result["rms"], "expert parameters are not in their own optimizer group"
    for name, ref in reference.items():
        got = result["params"][name].view_as(ref)
        assert (ref - init[name]).abs().max() > 1e-3, name
        assert (got - ref).abs().max() < 1e-5, f"{name}: {(got - ref).abs().max():.2e}"


@pytest.mark.slow
def test_ep_size_must_divide_experts_and_world(ranks):
    with pytest.raises(AssertionError, match="must divide the number of routed experts"):
        ranks("expert_parallel.py", ["--ep", "2", "--experts", "3"], world=2)
    with pytest.raises(AssertionError, match="must divide the world size 1"):
        ranks("expert_parallel.py", ["--ep", "2"], world=1)


def test_argument_checks_without_processes():
    model = make_small_moe()
    assert apply_expert_parallel(model, 1) is None          # nothing to shard
    assert model.layers[0].ffn.experts.w1.shape[0] == 4
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="ep_size"):
            apply_expert_parallel(model, bad)
    with pytest.raises(ValueError, match="must divide the number of routed experts"):
        apply_expert_parallel(model, 3)
    with pytest.raises(ValueError, match="no routed experts"):
        apply_expert_parallel(torch.nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="zero_stage=3"):
        check_zero_stage_for_ep(2, 3)
    check_zero_stage_for_ep(1, 3)
    check_zero_stage_for_ep(2, 2)
