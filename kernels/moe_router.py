"""MoE router in Triton: sqrt-softplus scores, biased top-k and routing weights in one kernel,
their gradient in one more.

Matches ``model.moe.topk_routing(logits, bias, k, route_scale)`` (logits [T, E] fp32):
    s   = sqrt(softplus(logits))                        scores   [T, E] fp32
    idx = topk(s + bias, k)                             indices  [T, K] long, descending
    w   = s[idx] / (sum s[idx] + 1e-20) * route_scale   weights  [T, K] fp32
Backward (the bias and the top-k carry no gradient; S = sum s[idx] + 1e-20):
    dc_j     = route_scale * (dw_j / S - sum_k dw_k s[idx_k] / S^2)
    ds      += scatter of dc onto idx
    dlogits  = ds * ds/dl,  ds/dl = sigmoid(l) / (2 s)  (1 / (2 s) above softplus's threshold 20)

The reference spends ~10 launches forward (softplus, sqrt, bias add, topk, gather, sum, divide,
scale) and more backward; here one program handles BLOCK_T rows of all E experts (E <= 1024,
padded to a power of two) in registers. Top-k is k rounds of arg-max (ties: the lower expert
index, as an exact selection needs some rule; torch.topk leaves ties unspecified).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.opaque import opaque_to_compile

_MAX_EXPERTS = 1024


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@triton.jit
def _softplus_sqrt(l):
    """(s, ds/dl) of s = sqrt(softplus(l)) as torch computes them (threshold 20, log1p)."""
    y = tl.exp(tl.minimum(l, 20.0))
    u = 1.0 + y
    # log1p(y) without a log1p intrinsic: log(u) * y / (u - 1) is exact to rounding (Goldberg)
    exact = u == 1.0
    lp = tl.where(exact, y, tl.log(u) * (y / tl.where(exact, 1.0, u - 1.0)))
    big = l > 20.0
    sp = tl.where(big, l, lp)
    s = tl.sqrt(sp)
    dsp = tl.where(big, 1.0, y / (y + 1.0))
    return s, dsp / (2.0 * s)


@triton.jit
def _router_fwd(LOGITS, BIAS, SCORES, IDX, W, T, E, route_scale, K: tl.constexpr, EP: tl.constexpr,
                KP: tl.constexpr, BLOCK_T: tl.constexpr):
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    re = tl.arange(0, EP)
    rk = tl.arange(0, KP)
    t_ok, e_ok = rt < T, re < E
    rt64 = rt.to(tl.int64)
    m = t_ok[:, None] & e_ok[None, :]
    l = tl.load(LOGITS + rt64[:, None] * E + re[None, :], mask=m, other=0.0)
    s, _ = _softplus_sqrt(l)
    tl.store(SCORES + rt64[:, None] * E + re[None, :], s, mask=m)
    b = tl.load(BIAS + re, mask=e_ok, other=0.0)
    biased = tl.where(e_ok[None, :], s + b[None, :], float("-inf"))
    idx = tl.zeros([BLOCK_T, KP], dtype=tl.int32)
    chosen = tl.zeros([BLOCK_T, KP], dtype=tl.float32)
    for k in tl.static_range(K):
        best = tl.max(biased, 1)
        arg = tl.min(tl.where(biased == best[:, None], re[None, :], EP), 1)       # lowest index of the max
        hit = re[None, :] == arg[:, None]
        c = tl.sum(tl.where(hit, s, 0.0), 1)
        idx = tl.where(rk[None, :] == k, arg[:, None], idx)
        chosen = tl.where(rk[None, :] == k, c[:, None], chosen)
        biased = tl.where(hit, float("-inf"), biased)
    w = chosen / (tl.sum(chosen, 1)[:, None] + 1e-20) * route_scale
    mk = t_ok[:, None] & (rk < K)[None, :]
    tl.store(IDX + rt64[:, None] * K + rk[None, :], idx.to(tl.int64), mask=mk)
    tl.store(W + rt64[:, None] * K + rk[None, :], w, mask=mk)


@triton.jit
def _router_bwd(LOGITS, IDX, DW, DS, DL, T, E, route_scale, HAS_DS: tl.constexpr, K: tl.constexpr,
                EP: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr):
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    re = tl.arange(0, EP)
    rk = tl.arange(0, KP)
    t_ok, e_ok = rt < T, re < E
    rt64 = rt.to(tl.int64)
    m = t_ok[:, None] & e_ok[None, :]
    mk = t_ok[:, None] & (rk < K)[None, :]
    l = tl.load(LOGITS + rt64[:, None] * E + re[None, :], mask=m, other=0.0)
    s, dsdl = _softplus_sqrt(l)
    if HAS_DS:
        g = tl.load(DS + rt64[:, None] * E + re[None, :], mask=m, other=0.0)
    else:
        g = tl.zeros([BLOCK_T, EP], dtype=tl.float32)
    idx = tl.load(IDX + rt64[:, None] * K + rk[None, :], mask=mk, other=-1).to(tl.int32)
    dw = tl.load(DW + rt64[:, None] * K + rk[None, :], mask=mk, other=0.0)
    chosen = tl.zeros([BLOCK_T, KP], dtype=tl.float32)
    for k in tl.static_range(K):
        ik = tl.sum(tl.where(rk[None, :] == k, idx, 0), 1)
        c = tl.sum(tl.where(re[None, :] == ik[:, None], s, 0.0), 1)
        chosen = tl.where(rk[None, :] == k, c[:, None], chosen)
    total = tl.sum(chosen, 1) + 1e-20
    dot = tl.sum(dw * chosen, 1)
    dc = route_scale * (dw / total[:, None] - (dot / (total * total))[:, None])
    for k in tl.static_range(K):
        ik = tl.sum(tl.where(rk[None, :] == k, idx, 0), 1)
        dck = tl.sum(tl.where(rk[None, :] == k, dc, 0.0), 1)
        g += tl.where(re[None, :] == ik[:, None], dck[:, None], 0.0)
    tl.store(DL + rt64[:, None] * E + re[None, :], g * dsdl, mask=m)


def _block_t(EP: int) -> int:
    return max(1, min(64, 4096 // EP))


class _TopkRouting(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, bias, k, route_scale, block_t):
        T, E = logits.shape
        lf = logits.contiguous()
        scores = torch.empty_like(lf)
        indices = torch.empty(T, k, device=lf.device, dtype=torch.long)
        weights = torch.empty(T, k, device=lf.device, dtype=torch.float32)
        EP, KP = _pow2(E), _pow2(k)
        BT = block_t or _block_t(EP)
        if T > 0:
            _router_fwd[(triton.cdiv(T, BT),)](lf, bias.float().contiguous(), scores, indices, weights, T, E,
                                               float(route_scale), K=k, EP=EP, KP=KP, BLOCK_T=BT)
        ctx.save_for_backward(lf, indices)
        ctx.meta = (k, float(route_scale), BT)
        ctx.mark_non_differentiable(indices)
        # no zero-filled [T, K] gradient for the indices (or an unused output): backward takes None
        ctx.set_materialize_grads(False)
        return weights, indices, scores

    @staticmethod
    def backward(ctx, dweights, _dindices, dscores):
        lf, indices = ctx.saved_tensors
        k, route_scale, BT = ctx.meta
        T, E = lf.shape
        dl = torch.empty_like(lf)
        dw = torch.zeros(T, k, device=lf.device) if dweights is None else dweights.float().contiguous()
        ds = lf if dscores is None else dscores.float().contiguous()   # (not read when absent)
        if T > 0:
            _router_bwd[(triton.cdiv(T, BT),)](lf, indices, dw, ds, dl, T, E, route_scale,
                                               HAS_DS=dscores is not None, K=k, EP=_pow2(E), KP=_pow2(k),
                                               BLOCK_T=BT)
        return dl, None, None, None, None


@opaque_to_compile
def topk_routing_triton(logits: torch.Tensor, bias: torch.Tensor, k: int, route_scale: float, *,
                        block_t: int | None = None):
    """Triton version of ``model.moe.topk_routing``: logits [T, E] fp32, bias [E] -> (weights
    [T, k] fp32, indices [T, k] long, scores [T, E] fp32), differentiable in logits through
    weights and scores. ``block_t`` overrides the rows per program (tests)."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"topk_routing_triton: logits must be [T, E] fp32, got {tuple(logits.shape)} {logits.dtype}")
    E = logits.shape[1]
    if not 1 <= k <= E or E > _MAX_EXPERTS:
        raise ValueError(f"topk_routing_triton: need 1 <= k ({k}) <= E ({E}) <= {_MAX_EXPERTS}; "
                         f"set model.moe_kernel_impl=torch for more experts")
    if bias.shape != (E,):
        raise ValueError(f"topk_routing_triton: bias must be [{E}], got {tuple(bias.shape)}")
    return _TopkRouting.apply(logits, bias, k, route_scale, block_t)
