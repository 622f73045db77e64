"""One mHC site's pre in Triton: coefficients + Sinkhorn + collapse fused, forward and backward.

Matches ``model.hyper_connections.mhc_pre`` (= ``mhc_coefficients`` then ``collapse_streams``):
    mixes = (flatten(x) @ fn^T) * r,  r = rsqrt(mean(x^2) + norm_eps)             [T, (2+n)n]
    pre, post, comb = sigmoid / 2 sigmoid / sinkhorn of (scale_group * mixes + base)
    h     = sum_j pre_j x_j                                                      [T, D]
and hands x back unchanged as ``x_res`` (the residual input of the post-mix): the post-mix's
gradient of x then arrives in this op's backward, which adds it in the same pass that writes dx,
instead of autograd adding three [T, n, D] gradients (coefficients, collapse, mix) in two more
full passes.

Launches: 1 forward, 2 backward + 2 small sums (the unfused pre, kernels/mhc.py then
kernels/mhc_streams.py's collapse: 3 forward, ~20 backward incl. ~14 small torch ops, a host-to-
device copy that syncs, and autograd's 2 full-size additions of x's three gradients):
  forward   _mhc_pre_fwd: per token block, the skinny product with fn and the sum of squares
            (one pass over x), the sigmoids and Sinkhorn in registers, then the collapse (a
            second pass over the same rows, from L2);
  backward  _mhc_pre_bwd: per token block, dpre = <dh, x_j> (pass 1), the tail's backward
            (Sinkhorn's forward run again with each step's input kept in a transient scratch,
            2 (iters - 1) n^2 fp32 per token, 10 MB at 4K tokens, then walked back), then
            dx = dx_res + pre_j dh + (dmix r) @ fn - (r^3/nD) <dmix, x fn^T> x (pass 2), plus
            per-block sums of dbase / dscale; _mhc_dfn_split: dfn = (dmix r)^T x with the token
            range split across programs; two small torch sums finish dfn and dbase / dscale.
Mixes are written to memory and re-read in another register layout (a [T, (2+n)n] row is split
into pre / post / comb pieces); a CTA barrier orders that store and load.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.mhc import (_load_parts, _logit_params, _pow2, _pre_tail_grads, _sinkhorn_fwd, check_pre_inputs,
                         pre_cotangents, pre_forward_buffers)
from kernels.opaque import opaque_to_compile


@triton.jit
def _mhc_pre_fwd(X, FN, BASE, SCALE, MIX, R, PRE, POST, COMB, H, T, D, NM, iters, eps, norm_eps,
                 N: tl.constexpr, NP: tl.constexpr, NM_P: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    K = N * D
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = rt < T
    rt64 = rt.to(tl.int64)
    rm = tl.arange(0, NM_P)
    # 1. mixes = (x fn^T) * r: one pass over the block's rows
    acc = tl.zeros([BLOCK_T, NM_P], dtype=tl.float32)
    ssq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(X + rt64[:, None] * K + rk[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        f = tl.load(FN + rm[:, None] * K + rk[None, :],
                    mask=(rm < NM)[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(x, tl.trans(f), input_precision="tf32x3")
        ssq += tl.sum(x * x, 1)
    r = 1.0 / tl.sqrt(ssq / K + norm_eps)
    tl.store(MIX + rt64[:, None] * NM + rm[None, :], acc * r[:, None], mask=t_ok[:, None] & (rm < NM)[None, :])
    tl.store(R + rt, r, mask=t_ok)
    tl.debug_barrier()  # the rows just stored are re-read below in the [T, n] / [T, n, n] layout
    # 2. the coefficients, Sinkhorn in registers
    rj = tl.arange(0, NP)
    j_ok = rj < N
    mpre, mpost, mcomb, m2, cmask = _load_parts(MIX, rt, t_ok, N, NM, NP)
    s0, s1, s2, bpre, bpost, bcomb = _logit_params(SCALE, BASE, rj, j_ok, N)
    pre = tl.sigmoid(s0 * mpre + bpre[None, :]) + eps
    post = 2.0 * tl.sigmoid(s1 * mpost + bpost[None, :])
    comb = _sinkhorn_fwd(s2 * mcomb + bcomb[None, :, :], cmask, iters, eps)
    out2 = rt64[:, None] * N + rj[None, :]
    tl.store(PRE + out2, pre, mask=m2)
    tl.store(POST + out2, post, mask=m2)
    tl.store(COMB + rt64[:, None, None] * (N * N) + rj[None, :, None] * N + rj[None, None, :], comb, mask=cmask)
    # 3. collapse h = sum_j pre_j x_j (the rows were just read: mostly L2 hits)
    pre = tl.where(m2, pre, 0.0)
    xrow = (rt64[:, None, None] * N + rj[None, :, None]) * D
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_ok = rd < D
        x3 = tl.load(X + xrow + rd[None, None, :], mask=m2[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        h = tl.sum(x3 * pre[:, :, None], 1)
        tl.store(H + rt64[:, None] * D + rd[None, :], h.to(H.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _mhc_pre_bwd(X, FN, BASE, SCALE, MIX, R, PRE, DH, DXRES, DPOST, DCOMB, G, PART, DX, SCR, T, D, NM, iters, eps,
                 N: tl.constexpr, NP: tl.constexpr, NM_P: tl.constexpr, HAS_DXRES: tl.constexpr,
                 SAVED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """DX [T, nD], G = dmix * r [T, NM] (for dfn), PART[pid] = (sum_t dlogit [NM], per-group
    sum_t dlogit * mixes [3]) of this token block."""
    K = N * D
    pid = tl.program_id(0)
    rt = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = rt < T
    rt64 = rt.to(tl.int64)
    rj = tl.arange(0, NP)
    j_ok = rj < N
    m2 = t_ok[:, None] & j_ok[None, :]
    # 1. dpre[t, j] = sum_d dh[t, d] x[t, j, d]
    xrow = (rt64[:, None, None] * N + rj[None, :, None]) * D
    dpre = tl.zeros([BLOCK_T, NP], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_ok = rd < D
        dh = tl.load(DH + rt64[:, None] * D + rd[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        x3 = tl.load(X + xrow + rd[None, None, :], mask=m2[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        dpre += tl.sum(x3 * dh[:, None, :], 2)
    # 2. the tail's backward (d(logits), logits = scale_group * mixes + base): G, PART and the r-path's coef
    coef = _pre_tail_grads(dpre, MIX, R, BASE, SCALE, DPOST, DCOMB, G, PART, SCR, pid, rt, rt64, t_ok, K, NM, iters, eps,
                           N, NP, SAVED, False)
    in2 = rt64[:, None] * N + rj[None, :]
    tl.debug_barrier()  # G's rows are re-read below as one [BLOCK_T, NM] tile for the product with fn
    rm = tl.arange(0, NM_P)
    g = tl.load(G + rt64[:, None] * NM + rm[None, :], mask=t_ok[:, None] & (rm < NM)[None, :], other=0.0)
    pre = tl.load(PRE + in2, mask=m2, other=0.0)
    # 3. dx[t, j, d] = dx_res + pre_j dh + (g @ fn)[j D + d] + coef x, stream by stream
    for j in tl.static_range(N):
        pre_j = tl.sum(tl.where(rj[None, :] == j, pre, 0.0), 1)
        for d0 in range(0, D, BLOCK_K):
            rd = d0 + tl.arange(0, BLOCK_K)
            d_ok = rd < D
            mtd = t_ok[:, None] & d_ok[None, :]
            xoff = rt64[:, None] * K + j * D + rd[None, :]
            x = tl.load(X + xoff, mask=mtd, other=0.0).to(tl.float32)
            dh = tl.load(DH + rt64[:, None] * D + rd[None, :], mask=mtd, other=0.0).to(tl.float32)
            f = tl.load(FN + rm[:, None] * K + j * D + rd[None, :],
                        mask=(rm < NM)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            dx = tl.dot(g, f, input_precision="tf32x3") + coef[:, None] * x + pre_j[:, None] * dh
            if HAS_DXRES:
                dx += tl.load(DXRES + xoff, mask=mtd, other=0.0).to(tl.float32)
            tl.store(DX + xoff, dx.to(DX.dtype.element_ty), mask=mtd)


@triton.jit
def _mhc_dfn_split(X, G, DFN, T, K, NM, T_PER,
                   BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, NM_P: tl.constexpr):
    """DFN[split] [NM, K] = G[tokens of this split]^T x (one program per (column block, split))."""
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    k_ok = rk < K
    rm = tl.arange(0, NM_P)
    acc = tl.zeros([NM_P, BLOCK_K], dtype=tl.float32)
    t_end = tl.minimum(T, (split + 1) * T_PER)
    for t0 in range(split * T_PER, t_end, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        t_ok = rt < t_end
        rt64 = rt.to(tl.int64)
        g = tl.load(G + rt64[:, None] * NM + rm[None, :], mask=t_ok[:, None] & (rm < NM)[None, :], other=0.0)
        x = tl.load(X + rt64[:, None] * K + rk[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(g), x, input_precision="tf32x3")
    tl.store(DFN + split.to(tl.int64) * NM * K + rm[:, None] * K + rk[None, :], acc,
             mask=(rm < NM)[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------- host code
# (block_t, block_k, block_d) of the fused kernels; bench/mhc.py --ops site sweeps them.
DEFAULT_TILES = (16, 128, 128)
_DFN_PROGRAMS = 264   # ~2 per H200 multiprocessor: the token range is split until the grid has these


def _dfn_split(T: int, K: int, block_t: int, block_k: int) -> int:
    cols = triton.cdiv(K, block_k)
    return max(1, min(triton.cdiv(T, 4 * block_t), triton.cdiv(_DFN_PROGRAMS, cols)))


class _MHCPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn, base, scale, n, iters, eps, norm_eps, tiles, saved):
        D = x.shape[-1]
        K = n * D
        xf, fn_in, base_in, scale_in, mixes, r, pre, post, comb, h = pre_forward_buffers(x, fn, base, scale, n)
        T, NM = xf.shape[0], fn.shape[0]
        bt, bk, bd = tiles
        nm_p = max(16, _pow2(NM))
        if T > 0:
            _mhc_pre_fwd[(triton.cdiv(T, bt),)](xf, fn_in, base_in, scale_in, mixes, r, pre, post, comb, h, T, D, NM,
                                               iters, eps, norm_eps, N=n, NP=_pow2(n), NM_P=nm_p,
                                               BLOCK_T=bt, BLOCK_K=bk, BLOCK_D=bd)
        ctx.save_for_backward(xf, fn_in, base_in, scale_in, mixes, r, pre)
        ctx.meta = (x.shape, n, iters, eps, tiles, saved, fn.dtype, base.dtype, scale.dtype)
        lead = x.shape[:-2]
        return h.view(*lead, D), x, post.view(*lead, n), comb.view(*lead, n, n)

    @staticmethod
    def backward(ctx, dh, dx_res, dpost, dcomb):
        xf, fn_in, base_in, scale_in, mixes, r, pre = ctx.saved_tensors
        xshape, n, iters, eps, tiles, saved, fdt, bdt, sdt = ctx.meta
        T, K = xf.shape
        D, NM = K // n, fn_in.shape[0]
        dev = xf.device
        dh, dx_res, dpost, dcomb, has_dxres = pre_cotangents(xf, n, dh, dx_res, dpost, dcomb)
        bt, bk, bd = tiles
        nm_p = max(16, _pow2(NM))
        P = triton.cdiv(T, bt)
        g = torch.empty(T, NM, device=dev, dtype=torch.float32)
        part = torch.empty(P, NM + 3, device=dev, dtype=torch.float32)
        dx = torch.empty_like(xf)
        if T == 0:
            return (dx.view(xshape), torch.zeros_like(fn_in).to(fdt), torch.zeros_like(base_in).to(bdt),
                    torch.zeros_like(scale_in).to(sdt), None, None, None, None, None, None)
        # Sinkhorn's step inputs for the backward walk: 2 (iters - 1) n x n per token, transient
        steps = 2 * (iters - 1) if saved else 0
        scratch = torch.empty(max(1, T * steps * _pow2(n) ** 2), device=dev, dtype=torch.float32)
        _mhc_pre_bwd[(P,)](xf, fn_in, base_in, scale_in, mixes, r, pre, dh, dx_res, dpost, dcomb, g, part, dx, scratch,
                           T, D, NM, iters, eps, N=n, NP=_pow2(n), NM_P=nm_p, HAS_DXRES=has_dxres,
                           SAVED=saved, BLOCK_T=bt, BLOCK_K=bk, BLOCK_D=bd)
        splits = _dfn_split(T, K, bt, bk)
        dfn = torch.empty(splits, NM, K, device=dev, dtype=torch.float32)
        _mhc_dfn_split[(triton.cdiv(K, bk), splits)](xf, g, dfn, T, K, NM, triton.cdiv(T, splits),
                                                     BLOCK_T=max(bt, 16), BLOCK_K=bk, NM_P=nm_p)
        dfn = dfn[0] if splits == 1 else dfn.sum(0)
        sums = part.sum(0)
        # dscale per group = sum_t <dlogit, mixes> of the group; dbase = sum_t dlogit
        return (dx.view(xshape), dfn.to(fdt), sums[:NM].to(bdt), sums[NM:].to(sdt), None, None, None, None, None, None)


@opaque_to_compile
def mhc_pre_triton(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, n: int,
                   iters: int, eps: float, norm_eps: float, *, tiles: tuple[int, int, int] | None = None,
                   sinkhorn_saved: bool = False):
    """Triton version of ``model.hyper_connections.mhc_pre``: x [..., n, D] -> (h [..., D] in x's
    dtype, x_res (= x), post [..., n], comb [..., n, n] fp32); differentiable in x (through h,
    post, comb and x_res), fn, base and scale. ``tiles`` = (block_t, block_k, block_d) overrides
    the tile sizes (powers of 2, block_t >= 16; tests and bench/mhc.py's sweep).
    ``sinkhorn_saved``: the backward keeps Sinkhorn's step inputs in a transient scratch
    (O(iters)); False recomputes them in registers (O(iters^2), no memory). The default stays
    False (the version checked and timed on the H200) until bench/mhc.py's sweep shows the saved
    one correct and faster there."""
    check_pre_inputs("mhc_pre_triton", x, fn, base, scale, n, iters)
    tiles = tuple(tiles or DEFAULT_TILES)
    if tiles[0] < 16 or any(t & (t - 1) for t in tiles):
        raise ValueError(f"mhc_pre_triton: tiles must be powers of 2 with block_t >= 16, got {tiles}")
    return _MHCPre.apply(x, fn, base, scale, int(n), int(iters), float(eps), float(norm_eps), tiles,
                         bool(sinkhorn_saved))
