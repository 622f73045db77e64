"""Small models and data shared by the distributed workers and the single-process references."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 48
SEQ = 12
MICRO_BATCH = 2

# The tiny preset shrunk (every layer kind kept: window, CSA, HCA, hash + learned MoE, mHC, MTP)
# with a small vocabulary so that a few steps take seconds on CPU.
TINY_OVERRIDES = dict(
    vocab_size=64, dim=32, n_layers=3, compress_ratios=[0, 4, 16], n_heads=2, head_dim=16,
    rope_dim=8, q_lora_rank=16, o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=16,
    index_topk=4, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=32,
    hc_sinkhorn_iters=5)


class _Attn(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.wq_a = nn.Linear(dim, 16, bias=False)     # wide input, Muon
        self.wkv = nn.Linear(dim, 40, bias=False)      # tall, Muon
        self.wo_a = nn.Linear(28, 24, bias=False)      # [2 * 12, 28]: Muon per row block
        self.wo_b = nn.Linear(24, dim, bias=False)
        self.sink = nn.Parameter(torch.zeros(heads))   # AdamW vector


class _Experts(nn.Module):
    def __init__(self, n: int, dim: int, inter: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n, inter, dim) / dim ** 0.5)
        self.w3 = nn.Parameter(torch.randn(n, inter, dim) / dim ** 0.5)
        self.w2 = nn.Parameter(torch.randn(n, dim, inter) / inter ** 0.5)


class _FFN(nn.Module):
    def __init__(self, n: int, dim: int, inter: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, n, bias=False)
        self.experts = _Experts(n, dim, inter)


class _HC(nn.Module):
    def __init__(self, dim: int, n: int) -> None:
        super().__init__()
        self.fn = nn.Parameter(torch.randn(n, dim) / dim ** 0.5)
        self.base = nn.Parameter(torch.zeros(n))
        self.scale = nn.Parameter(torch.ones(1))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, experts: int, inter: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim)
        self.attn = _Attn(dim, heads)
        self.ffn_norm = nn.RMSNorm(dim)
        self.ffn = _FFN(experts, dim, inter)
        self.hc_attn = _HC(dim, 4)


class SmallNet(nn.Module):
    """Every optimizer-group kind of the real model with its real parameter names: 2-D weights
    (wide, tall, square), a row-blocked wo_a, a 3-D expert stack, the router, mHC fn (Muon);
    embedding, head, norms, sink, mHC base/scale (AdamW). Dense in every parameter, so each
    gets a gradient every step. forward(ids [B, L]) -> mean next-token cross-entropy."""

    o_groups = 2

    def __init__(self, dim: int = 24, heads: int = 2, experts: int = 3, inter: int = 20) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList([_Block(dim, heads, experts, inter)])
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)                                    # h: [B, L, D]
        for blk in self.layers:
            a = blk.attn_norm(h)
            u = F.silu(blk.attn.wq_a(a))                       # [B, L, 16]
            v = blk.attn.wkv(a)                                # [B, L, 40]
            # full-rank inputs everywhere: a rank-deficient gradient makes NS amplify round-off
            o = blk.attn.wo_b(blk.attn.wo_a(torch.cat([u, v[..., :12]], -1)))
            h = h + o * torch.sigmoid(blk.attn.sink).mean() + 0.1 * v[..., 12:12 + h.shape[-1]]
            f = blk.ffn_norm(h)
            # V4's sqrt-softplus scores (a softmax would make the router gradient rank-deficient:
            # its rows sum to zero, and NS blows the round-off in that direction up ~1e4x)
            scores = F.softplus(blk.ffn.gate(f)).sqrt()        # [B, L, E]
            ex = blk.ffn.experts
            g = torch.einsum("bld,eid->blei", f, ex.w1)
            up = torch.einsum("bld,eid->blei", f, ex.w3)
            y = torch.einsum("blei,edi->bled", F.silu(g) * up, ex.w2)   # [B, L, E, D]
            h = h + (scores.unsqueeze(-1) * y).sum(2)
            gate = torch.sigmoid((h @ blk.hc_attn.fn.T) * blk.hc_attn.scale + blk.hc_attn.base)
            h = h + torch.tanh(gate - 0.5) @ blk.hc_attn.fn      # not scale-only: RMSNorm follows
        logits = self.head(self.norm(h))
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def make_small(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    return SmallNet()


def make_tiny(seed: int = 0):
    from model.config import ModelConfig
    from model.transformer import Transformer

    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny", **TINY_OVERRIDES))


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(model, (SmallNet, SmallMoENet)):
        return model(ids)
    return model(ids, labels=ids).loss


def batch(step: int, world: int, vocab: int = VOCAB) -> torch.Tensor:
    """The global batch of ``step``: [world * MICRO_BATCH, SEQ]; rank r takes rows r*MB:(r+1)*MB."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, (world * MICRO_BATCH, SEQ), generator=gen)


OPTIM_CFG = {"name": "muon", "lr": 2e-2, "ns_dtype": "fp32", "weight_decay": 0.1,
             "warmup_steps": 1, "total_steps": 10}


def reference_params(make, steps: int, world: int, clip: float, vocab: int = VOCAB,
                     optim_cfg: dict = OPTIM_CFG, gas: int = 1) -> dict[str, torch.Tensor]:
    """Single-process V4 Muon (HybridOptimizer) on the same data: the mean of the losses of all
    micro-batches (ranks x accumulation steps), then gradient clipping as DeepSpeed does it
    (global norm over all gradients)."""
    from optim import build_optimizer

    model = make()
    opt = build_optimizer(model, {**optim_cfg, "wo_a_blocks": 2})
    n = world * gas
    for step in range(steps):
        ids = batch(step, n, vocab)
        loss = sum(loss_of(model, ids[r * MICRO_BATCH:(r + 1) * MICRO_BATCH]) for r in range(n)) / n
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class SmallMoENet(nn.Module):
    """A block with the real V4 MoE layer (learned sqrt-softplus router with bias, dropless
    routed experts [E, out, in], shared expert) between a dense Muon matrix and the AdamW
    embedding / head / norms. forward(ids [B, L]) -> LM loss + balance loss."""

    def __init__(self, dim: int = 16, experts: int = 4) -> None:
        super().__init__()
        from model.config import ModelConfig
        from model.moe import MoE

        cfg = ModelConfig.from_preset("tiny", vocab_size=VOCAB, dim=dim, n_routed_experts=experts,
                                      n_activated_experts=3, moe_inter_dim=8, n_hash_layers=0)
        self.embed = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList([nn.Module()])
        blk = self.layers[0]
        blk.attn_norm, blk.ffn_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        blk.attn = nn.Module()
        blk.attn.wkv = nn.Linear(dim, dim, bias=False)
        blk.ffn = MoE(cfg, layer_idx=1)
        with torch.no_grad():  # larger than V4's init so that the experts matter in 3 steps
            for p in (blk.ffn.experts.w1, blk.ffn.experts.w2, blk.ffn.experts.w3, blk.ffn.gate.weight):
                p.normal_(0.0, 0.3)
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        blk = self.layers[0]
        h = self.embed(ids)                                          # [B, L, D]
        h = h + torch.tanh(blk.attn.wkv(blk.attn_norm(h)))
        y, aux = blk.ffn(blk.ffn_norm(h), ids)
        h = h + y
        logits = self.head(self.norm(h))
        lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        return lm + aux["balance_loss"]


def make_small_moe(seed: int = 0) -> SmallMoENet:
    torch.manual_seed(seed)
    return SmallMoENet()
