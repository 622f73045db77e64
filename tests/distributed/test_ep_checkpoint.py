"""Checkpoints of expert-parallel runs (train.expert_parallel + train.checkpoint).

Slow (processes): ``models.SmallMoENet`` with EP = 2 on 2 gloo ranks, 4 steps with a checkpoint
after step 2 (``workers/ep_checkpoint.py run``, shared by the tests of one ZeRO stage). A fresh
pair of ranks resumes from the checkpoint through ``CheckpointManager`` and must end bitwise
equal to the uninterrupted run (parameters, expert slices gathered, and the router biases); at
ZeRO-2 the checkpoint also converts to a universal one (experts consolidated, EP 2 -> 1) that
one rank resumes from. In-process: what ``to_universal`` refuses, before writing anything.
"""
from __future__ import annotations

import pytest
import torch

from conftest import run_ranks

UNIVERSAL_ATOL = 1e-5   # 2 ranks vs 1 rank with 2 accumulation steps: reduction order only


@pytest.fixture(scope="module", params=[0, 2], ids=["zero0", "zero2"])
def ep_run(request, tmp_path_factory):
    stage = request.param
    root = tmp_path_factory.mktemp(f"ep_zero{stage}")
    run_ranks("ep_checkpoint.py", ["run", str(root), str(stage)], world=2)
    return stage, root


def _load(root, name):
    return torch.load(root / f"{name}.pt")


@pytest.mark.slow
def test_ep_checkpoint_resumes_exactly_at_the_same_world_size(ep_run):
    stage, root = ep_run
    tag = root / "ckpt" / "step_00000002"
    # DeepSpeed's MoE layout: one file per (layer, global expert), none of them in the main file
    assert sorted(p.name for p in tag.glob("layer_*")) == [
        f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)]
    main = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert not [k for k in main if ".experts." in k], "expert slices leaked into the main file"
    run_ranks("ep_checkpoint.py", ["resume", str(root), str(stage)], world=2)
    want, got = _load(root, "run"), _load(root, "resume")
    assert want["buffer:layers.0.ffn.gate.bias"].abs().max() > 0, "router biases never moved"
    diff = {n: (want[n] - got[n]).abs().max().item() for n in want}
    assert all(d == 0.0 for d in diff.values()), f"resumed run differs: {diff}"


@pytest.mark.slow
def test_ep_checkpoint_resumes_on_one_rank_through_universal_checkpoint(ep_run):
    """ep_size 2 -> 1: the expert slices of both ranks become whole [E, ...] stacks."""
    from train.ds_checkpoint import to_universal

    stage, root = ep_run
    if stage == 0:
        with pytest.raises(ValueError, match="ZeRO stage 0 checkpoint with expert parallelism"):
            to_universal(root / "ckpt" / "step_00000002", root / "universal")
        assert not (root / "universal").exists()
        return
    to_universal(root / "ckpt" / "step_00000002", root / "universal")
    w1 = torch.load(root / "universal" / "zero" / "layers.0.ffn.experts.w1" / "fp32.pt",
                    weights_only=False)
    assert tuple(w1["param"].shape)[0] == 4, "experts not consolidated"
    assert (root / "universal" / "zero" / "layers.0.ffn.experts.w1" / "momentum_buffer.pt").is_file()
    run_ranks("ep_checkpoint.py", ["universal", str(root), str(stage)], world=1)
    want, got = _load(root, "run"), _load(root, "universal")
    diff = {n: (want[n] - got[n]).abs().max().item() for n in want}
    assert max(diff.values()) < UNIVERSAL_ATOL, f"resumed run differs: {diff}"


def _fake_zero_shards(folder, world: int, ep_size: int) -> None:
    folder.mkdir(parents=True)
    groups = [{"kind": "muon", "params": [0]},
              {"kind": "muon", "name": f"ep_size_{ep_size}", "moe": True, "params": [1]}]
    for r in range(world):
        torch.save({"optimizer_state_dict": {"base_optimizer_state": {"param_groups": groups,
                                                                      "state": {}}}},
                   folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")


def test_to_universal_refuses_experts_partitioned_over_expert_data_parallel_groups(tmp_path):
    from train.ds_checkpoint import to_universal

    _fake_zero_shards(tmp_path / "t", world=4, ep_size=2)
    with pytest.raises(ValueError, match="ep_size_2 on 4 ranks.*only checkpoints with "
                                                  "parallel.ep_size equal to the world size"):
        to_universal(tmp_path / "t", tmp_path / "u")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"], "wrote something before refusing"


def test_to_universal_refuses_ep_at_zero_stage_0(tmp_path):
    from train.ds_checkpoint import to_universal

    (tmp_path / "t").mkdir()
    torch.save({}, tmp_path / "t" / "expp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ValueError, match="no ZeRO shards"):
        to_universal(tmp_path / "t", tmp_path / "u")
    with pytest.raises(FileNotFoundError, match="optim_states"):
        to_universal(tmp_path / "missing", tmp_path / "u2")
