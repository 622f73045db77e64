"""KV compressor: gated pooling of ``ratio`` consecutive tokens into one compressed entry.

For block i of a document (tokens j = 0..m-1, m = ratio):

    C_i = RMSNorm( sum_j softmax_j(wgate(x)_j + ape_j) * wkv(x)_j )     (softmax per channel)

then RoPE on the last rope_dim channels at the block's first in-document position.

Overlap form (CSA, ``overlap=True``): wkv/wgate/ape have 2*out_dim channels. Entry i is one
softmax over 2m slots: the m tokens of block i-1 read through the FIRST half of the channels
(``[:out_dim]``) and the m tokens of block i read through the SECOND half (``[out_dim:]``).
This is the official ``overlap_transform`` layout (HF: "Ca"/"Cb"); the first block of a
document has its previous slots masked (-inf gate), i.e. it pools only its own m tokens.

Numerics follow DeepSeek's official code: projections, gates and the pooled sum in fp32, the
sum cast to the activation dtype, then the (fp32-internal) RMSNorm. The projections are
``F.linear(x.float(), w.float())`` there; on CUDA with a bf16 model we compute the same values as
bf16 x bf16 tensor-core GEMMs with fp32 accumulation and output (``model.matmul.linears_fp32``:
a bf16 product is exact in fp32, so only the summation order differs), without fp32 copies of x
and the weights; ``attention_impl=torch`` and every other case keep the upcast reference.
Blocks come from ``CompressedLayout``: compression restarts at every packed document and a
trailing partial block is dropped. The pooling (``compressor_pool``) is gathers, no python
loop over tokens or documents; its fast path is one Triton kernel each way
(``kernels/compressor_pool.py``, ``get_compressor_pool``, ``attention_impl``).
"""
from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.dispatch import dispatcher
from model.layout import CompressedLayout, PoolingIndex
from model.matmul import linears_fp32
from model.norms import RMSNorm
from model.rope import RoPE


class Compressor(nn.Module):
    def __init__(self, cfg: ModelConfig, ratio: int, out_dim: int, overlap: bool, rope: RoPE) -> None:
        super().__init__()
        if ratio < 2:
            raise ValueError(f"Compressor: ratio must be >= 2, got {ratio}")
        if out_dim < rope.rope_dim:
            raise ValueError(f"Compressor: out_dim {out_dim} is smaller than rope_dim {rope.rope_dim}")
        self.ratio = ratio
        self.out_dim = out_dim
        self.overlap = overlap
        self.init_std = cfg.init_std
        self.impl = cfg.attention_impl   # model/dispatch.py: auto | triton | torch
        coff = 2 if overlap else 1
        self.wkv = nn.Linear(cfg.dim, coff * out_dim, bias=False)
        self.wgate = nn.Linear(cfg.dim, coff * out_dim, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, coff * out_dim))  # learned per-slot gate bias
        self.norm = RMSNorm(out_dim, cfg.norm_eps)
        self.rope = rope  # plain object (no parameters), shared with the owning layer
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.wkv.weight, std=self.init_std)
        nn.init.normal_(self.wgate.weight, std=self.init_std)
        nn.init.zeros_(self.ape)  # as HF (position_bias); unpublished in the paper
        self.norm.weight.fill_(1.0)

    def forward(self, x: torch.Tensor, clayout: CompressedLayout) -> torch.Tensor:
        # x: [B, L, D] -> ckv: [B, N, out_dim] (N = L // ratio; pad entries are zero)
        B, L, _ = x.shape
        m, c = self.ratio, self.out_dim
        N = clayout.block_start.shape[1]
        if clayout.block_start.shape[0] != B or N != L // m:
            raise ValueError(f"Compressor: clayout has shape {tuple(clayout.block_start.shape)}, "
                             f"expected [{B}, {L // m}] for ratio {m} and length {L}")
        if N == 0:
            return x.new_zeros(B, 0, c)
        kv, gate = linears_fp32(x, self.wkv.weight, self.wgate.weight, impl=self.impl)  # [B, L, coff*c] each
        pool = clayout.pooling if clayout.ratio == m else PoolingIndex.of(clayout, m)
        fn = get_compressor_pool(self.impl, kv.device, kv.dtype)
        pooled = fn(kv, gate, self.ape, pool.tokens, pool.prev, pool.no_prev, pool.invalid, self.overlap)
        # pad entries pool to zero, and RMSNorm and RoPE keep a zero row zero (one kernel each way)
        return self.rope.apply_normed(pooled.to(x.dtype), clayout.c_pos, self.norm.weight, self.norm.eps)


def compressor_pool(kv: torch.Tensor, gate: torch.Tensor, ape: torch.Tensor, tokens: torch.Tensor,
                    prev: torch.Tensor, no_prev: torch.Tensor, invalid: torch.Tensor, overlap: bool) -> torch.Tensor:
    """The gated pooling of the module doc: kv, gate [B, L, C] (the projections; C = 2c with
    overlap, else c), ape [m, C], a ``PoolingIndex``'s tensors (tokens [B, N, m], prev, no_prev,
    invalid [B, N]) -> pooled [B, N, c] in kv's dtype; pad entries are zero. Triton:
    ``kernels/compressor_pool.py`` (``get_compressor_pool``)."""
    B, N, m = tokens.shape
    C = kv.shape[-1]
    c = C // 2 if overlap else C
    # tokens of each block: [B, N, m]; pads point at tokens 0..m-1 (zeroed at the end)
    flat = tokens.reshape(B, N * m, 1).expand(B, N * m, C)
    kv_b = torch.gather(kv, 1, flat).view(B, N, m, C)                                 # [B, N, m, C]
    gate_b = torch.gather(gate, 1, flat).view(B, N, m, C) + ape.to(kv.dtype)          # [B, N, m, C]
    if overlap:
        pidx = prev[:, :, None, None].expand(B, N, m, c)           # previous block (first: 0, masked)
        prev_kv = torch.gather(kv_b[..., :c], 1, pidx)           # block i-1, first half
        prev_gate = torch.gather(gate_b[..., :c], 1, pidx)
        prev_gate = prev_gate.masked_fill(no_prev[:, :, None, None], float("-inf"))
        kv_b = torch.cat([prev_kv, kv_b[..., c:]], dim=2)         # [B, N, 2m, c]
        gate_b = torch.cat([prev_gate, gate_b[..., c:]], dim=2)
    pooled = (kv_b * gate_b.softmax(dim=2)).sum(dim=2)            # [B, N, c]
    return pooled.masked_fill(invalid[:, :, None], 0.0)


# the pooling: Triton (kernels/compressor_pool.py) or the reference above (model/dispatch.py)
get_compressor_pool = dispatcher("compressor_pool", compressor_pool)
