"""V4's Muon under DeepSpeed ZeRO-1/2/3 with 2 gloo ranks equals the single-process optimizer.

Each case runs 3 optimizer steps through ``deepspeed.initialize`` (``optim.deepspeed``) on two
CPU processes and compares every full fp32 parameter with ``HybridOptimizer`` run in this process
on the same global batches (the mean of the per-rank losses; gradient clipping active).
The model (``models.SmallNet``) has every group kind under its real parameter name, and its
flat ZeRO-1/2 partitions cut matrices (wo_a, an expert stack) between the ranks.

Tolerance: 1e-5 absolute on weights that move by >= 1e-3 (most by ~3e-2); the observed gap is 1e-7 - 1e-6 (batched
vs single NS matmuls, reduction order). A per-shard NS, DeepSpeed's own Muon, or a missing
decay/momentum term moves weights by ~1e-2 differently.
"""
from __future__ import annotations

import pytest
import torch

from models import OPTIM_CFG, make_small, reference_params
from optim.groups import assign_groups

pytestmark = pytest.mark.slow  # each case starts 2 DeepSpeed processes (~20-40 s)

STEPS, WORLD, CLIP, ATOL = 3, 2, 0.5, 1e-5


@pytest.fixture(scope="module")
def reference():
    return reference_params(make_small, STEPS, WORLD, CLIP)


def _run(ranks, tmp_path, *args: str) -> dict:
    out = tmp_path / "params.pt"
    ranks("zero_muon.py", ["--out", str(out), "--steps", str(STEPS), "--clip", str(CLIP), *args])
    return torch.load(out)


def _assert_equal(result: dict, reference: dict, atol: float = ATOL, kinds=("muon", "adamw")) -> None:
    init = dict(make_small().named_parameters())
    assert result["bound"], "the optimizer was not bound to the ZeRO shards"
    assert set(result["params"]) == set(reference)
    kind = assign_groups(make_small().named_parameters())
    worst = {}
    for name, ref in reference.items():
        if kind[name] not in kinds:
            continue
        got = result["params"][name].view_as(ref)
        worst[name] = (got - ref).abs().max().item()
        assert (ref - init[name]).abs().max() > 100 * ATOL, f"{name} barely moved: the test is vacuous"
    bad = {n: d for n, d in worst.items() if d > atol}
    assert not bad, f"parameters differ from the single-process V4 Muon reference: {bad}"
    # the update RMS of the Muon groups is V4's 0.18 on the shards too
    assert abs(result["rms"]["muon"] - 0.18) < 0.01 and abs(result["rms"]["muon_wo_a"] - 0.18) < 0.01


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_single_process_muon(stage, ranks, tmp_path, reference):
    """... and a DeepSpeed checkpoint resumes exactly: save, step, load, the same step again."""
    result = _run(ranks, tmp_path, "--stage", str(stage), "--ckpt-dir", str(tmp_path / "ckpt"))
    expected = "DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer"
    assert result["engine_optimizer"] == expected
    _assert_equal(result, reference)
    assert result["resume_diff"] == 0.0, f"resume from checkpoint differs by {result['resume_diff']}"


def test_zero3_redundant_placement_and_no_reduce_scatter_requirement(ranks, tmp_path, reference):
    """Every rank orthogonalises every matrix (the other NS placement); DeepSpeed's
    reduce_scatter=false requirement (its own Muon's) does not apply: keep it on. DeepSpeed's
    default persistence threshold here (small parameters stay gathered; 0 elsewhere)."""
    result = _run(ranks, tmp_path, "--stage", "3", "--placement", "redundant",
                  "--persistence", "100000")
    _assert_equal(result, reference)


def test_zero2_gradient_accumulation(ranks, tmp_path):
    result = _run(ranks, tmp_path, "--stage", "2", "--gas", "2")
    _assert_equal(result, reference_params(make_small, STEPS, WORLD, CLIP, gas=2))


def test_bf16_optimizer_path(ranks, tmp_path, reference):
    """bf16 with fp32 gradient accumulation at stage 1 runs through DeepSpeed's BF16 optimizer
    (another flat-partition layout). bf16 forward/backward: the Muon matrices are compared at a
    bf16 tolerance that still separates a correct update (gap ~1e-3) from a wrong one (~1e-2).
    AdamW's first steps are sign(g) for tiny g, which bf16 round-off flips: not compared here
    (it is elementwise on the shards and checked exactly in fp32 above)."""
    result = _run(ranks, tmp_path, "--stage", "1", "--precision", "bf16")
    assert result["engine_optimizer"] == "BF16_Optimizer"
    _assert_equal(result, reference, atol=4e-3, kinds=("muon",))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_on_another_world_size_through_universal_checkpoint(stage, ranks, tmp_path):
    """2 ranks save a ZeRO checkpoint; train.ds_checkpoint.to_universal converts it (Muon momentum
    included); 1 rank (2 accumulation steps: the same global batch) loads it with
    train.ds_checkpoint.load_universal and takes the next step, which must equal the step the 2
    ranks took after saving. (A zeroed momentum moves wkv by ~1e-2.)"""
    from train.ds_checkpoint import to_universal

    ranks("universal.py", ["save", str(tmp_path), str(stage)], world=2)
    to_universal(tmp_path / "t")
    # ZeRO-1/2: the momentum under its own name; ZeRO-3: in the slot DeepSpeed's loader reads
    momentum = "exp_avg.pt" if stage == 3 else "momentum_buffer.pt"
    assert (tmp_path / "t_universal" / "zero" / "layers.0.attn.wkv.weight" / momentum).is_file()
    ranks("universal.py", ["load", str(tmp_path), str(stage)], world=1)
    after, resumed = torch.load(tmp_path / "after.pt"), torch.load(tmp_path / "resumed.pt")
    worst = max((after[n] - resumed[n]).abs().max().item() for n in after)
    assert worst < ATOL, f"resumed step differs by {worst:.2e}"


@pytest.mark.parametrize("ns_batch_mb", ["0", "0.011"])
def test_zero1_newton_schulz_buckets_equal_per_matrix_reference(ns_batch_mb, ranks, tmp_path):
    """The owner ranks' NS one per matrix (0) and batched over small buckets (0.011 MiB: at most
    two of SmallNet's expert stacks [3, 20, 24] / [3, 24, 20] per bucket, the same canonical
    shape, one of them transposed) equal the single-process per-matrix path (ns_batch_mb=0,
    no foreach). ~7 s each."""
    result = _run(ranks, tmp_path, "--stage", "1", "--ns-batch-mb", ns_batch_mb)
    assert result["ns_batch_mb"] == float(ns_batch_mb)
    per_matrix = {**OPTIM_CFG, "ns_batch_mb": 0, "foreach": False}
    _assert_equal(result, reference_params(make_small, STEPS, WORLD, CLIP, optim_cfg=per_matrix))
