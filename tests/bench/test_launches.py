"""The eager CUDA path's kernel launches per block, counted on the CPU (bench/launches.py), stay
within today's budget: the small model's step is host-bound (~20-100 us of host time per launch),
so a change that adds launches slows training even when it adds no FLOPs."""
import torch

from bench.launches import build, count_forward_backward, per_block

# (forward, backward) launches per block of the micro preset, 1 x 64, bf16, attention.impl=auto
# as on CUDA. A change that cuts launches lowers these: run
#   PYTHONPATH=$PWD python bench/launches.py --preset micro --seq 64
# and copy the block table's rows here (say the before/after in the commit message). A change
# that must add launches raises them and says why in its commit message.
BUDGET = {
    "layers.0": (75, 141),      # window-only attention, hash-routed MoE
    "layers.1": (226, 270),     # CSA (ratio 4, indexer top-k), learned routing
    "layers.2": (113, 190),     # HCA (ratio 16)
    "mtp.0.block": (86, 153),  # the MTP block
}


def test_launches_per_block_within_budget():
    model, cfg = build("micro")
    ids = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    got = per_block(count_forward_backward(model, ids))
    over = {b: (got[b], cap) for b, cap in BUDGET.items() if got[b][0] > cap[0] or got[b][1] > cap[1]}
    assert not over, f"kernel launches per block (forward, backward) above budget: {over}"
    assert set(BUDGET) <= set(got), f"blocks missing from the count: {set(BUDGET) - set(got)}"


def test_counter_counts_triton_ops_as_their_kernels():
    # an RMSNorm with a weight: the Triton path launches 1 forward and 3 backward kernels,
    # whatever the reference does; a plain aten op counts once; views count nothing
    from bench.launches import TRITON_LAUNCHES
    from model.norms import RMSNorm

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = RMSNorm(8, 1e-6)

        def forward(self, ids, labels=None):
            from types import SimpleNamespace
            x = (ids.to(torch.bfloat16).view(2, 4, 1).expand(2, 4, 8) * 2).reshape(8, 8)
            return SimpleNamespace(loss=self.norm(x).float().sum())

    m = Tiny().to(torch.bfloat16)
    counts = count_forward_backward(m, torch.arange(8.0, requires_grad=False))
    norm = {ph: sum(n for (p, name, _k, op), n in counts.items() if p == ph and name == "norm")
            for ph in ("fwd", "bwd")}
    assert (norm["fwd"], norm["bwd"]) == TRITON_LAUNCHES["rms_norm"]
    ops = {op for (p, _n, _k, op), n in counts.items() if p == "fwd"}
    assert not ops & {"view", "expand", "reshape"}, ops
    assert {"_to_copy", "mul", "sum"} <= ops, ops
