"""One mHC site's pre in Triton, the per-token coefficient work split from the passes over x.

Same op, arguments and results as kernels/mhc_pre.py (``model.hyper_connections.mhc_pre``:
h = sum_j pre_j x_j with (pre, post, comb) the mHC coefficients of x, and x handed back as
``x_res`` so the post-mix's gradient of x is added in this op's backward), scheduled differently.
Why: the fused kernels of kernels/mhc_pre.py keep the Sinkhorn's [block, n, n] tiles, the skinny
product with fn and the [block, n, D] collapse tiles in one program: compiled for sm_90 they
use 255 registers and spill (1 KB per thread in the backward), so an H200 runs 2 programs of 4
warps per multiprocessor and the passes over x stay 3-5x off memory bandwidth (profile of
experiment=small_gpu, 2026-12-03: 0.33 ms forward, 0.59 + 0.15 ms backward at 16K tokens x 4 x
1024, where x is 128 MiB). Here every pass over [T, n, D] is its own light kernel with many
programs, the Sinkhorn runs on [T, (2+n)n] only, and each kernel's tiles and warps are picked by
``triton.autotune`` on the device (first call per shape, eager: before a CUDA graph captures).

Launches, T tokens, K = nD (x read twice forward, twice backward; dfn needs no pass of its own):
  forward   kernels/mhc.py _mhc_mix_fwd   mixes = (x fn^T) r and r       x once   -> [T, (2+n)n]
            kernels/mhc.py _mhc_tail_fwd  pre, post, comb (Sinkhorn)      [T, (2+n)n] only
            kernels/mhc_streams.py _collapse_fwd  h = sum_j pre_j x_j     x once   -> h
  backward  kernels/mhc_streams.py _collapse_bwd  dpre = <dh, x_j>        x, dh once
            _pre_tail_bwd   the tail's backward: G = dmix r [T, (2+n)n], coef [T], per-block sums
                            for dbase / dscale (Sinkhorn's steps recomputed, or kept in a scratch)
            _pre_dx_dfn     per (stream, D block, token split): dx = dx_res + pre_j dh + G fn
                            + coef x, and the split's part of dfn = G^T x, fn's block loaded once
            _pre_param_grads  dfn = the sum of the splits, dbase / dscale = the sums of the
                            per-block rows, each written in its parameter's dtype (one launch
                            for what were 2 torch sums + 3 casts: 5.6 + 6.3 us of sums per site
                            backward in the H200 trace, PART's [T/16, NM + 3] reduced by 2 CTAs).
The stream head (``mhc_head_triton``, model.hyper_connections.mhc_head: the final collapse with
pre-only weights sigmoid(scale mixes + base) + eps, fn [n, nD]) runs the same launches with the
tails' PRE_ONLY flag (no post, no Sinkhorn, NM = n): no fp32 copy of x, which the reference makes
twice forward and twice backward among its ~46 launches.
fp32 math throughout (the products as tf32x3 dots; those with x, when x is fp16 / bf16 and so
exact in tf32, as the two of tf32x3's three products that are not 0), x / h / dx in x's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.mhc import (_mhc_mix_fwd, _mhc_tail_fwd, _pow2, _pre_tail_grads, _tf32_split, check_pre_inputs,
                         pre_cotangents, pre_forward_buffers)
from kernels.mhc_streams import _collapse_bwd, _collapse_fwd
from kernels.opaque import opaque_to_compile
from kernels.tuning import Tuned


@triton.jit
def _pre_tail_bwd(MIX, R, BASE, SCALE, DPRE, DPOST, DCOMB, G, COEF, PART, SCR, T, K, NM, iters, eps,
                  N: tl.constexpr, NP: tl.constexpr, SAVED: tl.constexpr, BLOCK_T: tl.constexpr,
                  PRE_ONLY: tl.constexpr = False):
    """G [T, NM] = dmix * r (the gradient of x fn^T), COEF [T] = -(r^2 / K) <dmix, mixes> (the
    r-path: dx gets coef * x), PART[pid] = (sum_t dlogit [NM], per-group sum_t <dlogit, mixes>
    [3]) of this block, where logits = scale_group * mixes + base and dmix = dlogit * scale_group."""
    pid = tl.program_id(0)
    rt = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = rt < T
    rt64 = rt.to(tl.int64)
    rj = tl.arange(0, NP)
    m2 = t_ok[:, None] & (rj < N)[None, :]
    g_pre = tl.load(DPRE + rt64[:, None] * N + rj[None, :], mask=m2, other=0.0)
    coef = _pre_tail_grads(g_pre, MIX, R, BASE, SCALE, DPOST, DCOMB, G, PART, SCR, pid, rt, rt64, t_ok, K, NM, iters, eps,
                           N, NP, SAVED, PRE_ONLY)
    tl.store(COEF + rt, coef, mask=t_ok)


@triton.jit
def _pre_dx_dfn(X, FN, G, COEF, PRE, DH, DXRES, DX, DFN, T, D, NM, T_PER,
                N: tl.constexpr, NM_P: tl.constexpr, HAS_DXRES: tl.constexpr, X_IN_TF32: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (stream j, D block, token split s): dx[t, j, d] = dx_res + pre_j dh + (G fn)[t, jD + d]
    + coef x over the split's tokens, and DFN[s][:, jD + d] = sum over them of G^T x. fn's
    [NM, BLOCK_D] block is read once per program (not once per token block). X_IN_TF32 (x in
    fp16 / bf16, exact in tf32): G^T x as tf32x3 without its third product (G's high part times
    x's low part, which is 0): two tf32 dots, G split by hand."""
    d_blocks = tl.cdiv(D, BLOCK_D)
    j = tl.program_id(0) // d_blocks
    rd = (tl.program_id(0) % d_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(1)
    K = N * D
    d_ok = rd < D
    rm = tl.arange(0, NM_P)
    m_ok = rm < NM
    f = tl.load(FN + rm[:, None] * K + j * D + rd[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    acc = tl.zeros([NM_P, BLOCK_D], dtype=tl.float32)
    t_end = tl.minimum(T, (split + 1) * T_PER)
    for t0 in range(split * T_PER, t_end, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        t_ok = rt < t_end
        rt64 = rt.to(tl.int64)
        mtd = t_ok[:, None] & d_ok[None, :]
        g = tl.load(G + rt64[:, None] * NM + rm[None, :], mask=t_ok[:, None] & m_ok[None, :], other=0.0)
        c = tl.load(COEF + rt, mask=t_ok, other=0.0)
        p = tl.load(PRE + rt64 * N + j, mask=t_ok, other=0.0)
        xoff = rt64[:, None] * K + j * D + rd[None, :]
        x = tl.load(X + xoff, mask=mtd, other=0.0).to(tl.float32)
        dh = tl.load(DH + rt64[:, None] * D + rd[None, :], mask=mtd, other=0.0).to(tl.float32)
        dx = tl.dot(g, f, input_precision="tf32x3") + c[:, None] * x + p[:, None] * dh
        if HAS_DXRES:
            dx += tl.load(DXRES + xoff, mask=mtd, other=0.0).to(tl.float32)
        tl.store(DX + xoff, dx.to(DX.dtype.element_ty), mask=mtd)
        if X_IN_TF32:
            g_hi, g_lo = _tf32_split(g)
            acc = tl.dot(tl.trans(g_lo), x, acc, input_precision="tf32")
            acc = tl.dot(tl.trans(g_hi), x, acc, input_precision="tf32")
        else:
            acc += tl.dot(tl.trans(g), x, input_precision="tf32x3")
    tl.store(DFN + split.to(tl.int64) * NM * K + rm[:, None] * K + j * D + rd[None, :], acc,
             mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _pre_param_grads(DFN_PART, PART, DFN, DBASE, DSCALE, SPLITS, NMK, P, NM, W,
                     BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, W_P: tl.constexpr):
    """The parameter gradients from their partial sums, in a fixed order (deterministic):
    DFN [NM, K] = sum over the SPLITS token splits of DFN_PART [SPLITS, NM, K], one program per
    BLOCK entries; the last program: the column sums of PART [P, W] (W = NM + groups), the first NM
    into DBASE, the rest into DSCALE. Each output stored in its own dtype (the parameter's)."""
    pid = tl.program_id(0)
    if pid < tl.cdiv(NMK, BLOCK):
        r = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = r < NMK
        dfn = tl.zeros([BLOCK], dtype=tl.float32)
        for split in range(0, SPLITS):
            dfn += tl.load(DFN_PART + split * NMK + r, mask=ok, other=0.0)
        tl.store(DFN + r, dfn.to(DFN.dtype.element_ty), mask=ok)
    else:   # (names apart from the branch above: Triton types a name across both branches)
        rc = tl.arange(0, W_P)
        c_ok = rc < W
        sums = tl.zeros([W_P], dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            rp = p0 + tl.arange(0, BLOCK_P)
            sums += tl.sum(tl.load(PART + rp[:, None] * W + rc[None, :], mask=(rp < P)[:, None] & c_ok[None, :],
                                   other=0.0), 0)
        tl.store(DBASE + rc, sums.to(DBASE.dtype.element_ty), mask=rc < NM)
        tl.store(DSCALE + tl.where(rc >= NM, rc - NM, 0), sums.to(DSCALE.dtype.element_ty), mask=(rc >= NM) & c_ok)


# ----------------------------------------------------------------------------- tiles
# Each kernel's candidates (kernels/tuning.py): (meta-parameters, num_warps, num_stages); the first
# runs off CUDA and under config="default". Chosen from sm_90 compiles on the CPU
# (Triton 3.9 + ptxas -v: no or little register spilling; the tf32x3 products need ~140-250
# registers, the stream passes 30-100) and the H100 sweeps of bench/mhc.py (collapse / mix
# tiles); the device times them at the first call per shape.
_CANDIDATES = {
    "mix": [({"BLOCK_T": 64, "BLOCK_K": 64}, 8, 3), ({"BLOCK_T": 64, "BLOCK_K": 32}, 8, 3),
            ({"BLOCK_T": 128, "BLOCK_K": 32}, 8, 3)],
    "tail": [({"BLOCK_T": 32}, 4, 1), ({"BLOCK_T": 16}, 2, 1)],
    "collapse": [({"BLOCK_T": 4, "BLOCK_D": 256}, 4, 1), ({"BLOCK_T": 8, "BLOCK_D": 128}, 4, 1),
                 ({"BLOCK_T": 2, "BLOCK_D": 512}, 4, 1)],
    "dpre": [({"BLOCK_T": 2, "BLOCK_D": 128}, 4, 2), ({"BLOCK_T": 4, "BLOCK_D": 128}, 4, 2),
             ({"BLOCK_T": 2, "BLOCK_D": 256}, 4, 2)],
    # Sinkhorn's backward: steps recomputed (O(iters^2) n x n normalisations per token, no memory)
    # or kept in a scratch (O(iters), 2 (iters - 1) NP^2 fp32 per token written and read back)
    "tail_bwd": [({"SAVED": False}, 4, 1), ({"SAVED": True}, 4, 1), ({"SAVED": True}, 2, 1)],
    "dx_dfn": [({"BLOCK_T": 32, "BLOCK_D": 64}, 8, 3), ({"BLOCK_T": 16, "BLOCK_D": 128}, 8, 3),
               ({"BLOCK_T": 16, "BLOCK_D": 64}, 4, 3), ({"BLOCK_T": 64, "BLOCK_D": 64}, 8, 3)],
}
_TAIL_BWD_BLOCK_T = 16   # fixed: PART has one row per block (sized on the host)
_GRADS_BLOCK, _GRADS_BLOCK_P = 1024, 64   # _pre_param_grads: dfn entries per program, PART rows per step
_SCRATCH_MAX_BYTES = 256 << 20   # above this (~100K tokens at 20 iterations) Sinkhorn's backward recomputes
_DFN_SPLIT_TOKENS = 1024  # tokens per dfn split (a multiple of every BLOCK_T above)
_DFN_SPLITS_MAX = 16
# NM (the coefficient count) tells the site pres ((2+n)n) from the stream head (n) at the same shape of x
_KEYS = {"mix": ["T", "K", "NM"], "tail": ["T", "NM"], "collapse": ["T", "D"], "dpre": ["T", "D"],
         "tail_bwd": ["T", "NM"], "dx_dfn": ["T", "D", "NM"]}
_KERNELS = {
    name: Tuned(kernel, _CANDIDATES[name], _KEYS[name])
    for name, kernel in (("mix", _mhc_mix_fwd), ("tail", _mhc_tail_fwd), ("collapse", _collapse_fwd),
                         ("dpre", _collapse_bwd), ("tail_bwd", _pre_tail_bwd), ("dx_dfn", _pre_dx_dfn))
}


def tuned_configs() -> dict[str, dict]:
    """What autotune picked so far, per kernel: {name: {key: config}} (bench/mhc.py)."""
    return {name: k.picks() for name, k in _KERNELS.items()}


def _dfn_splits(T: int, config) -> tuple[int, int]:
    """(splits, tokens per split) of dfn's reduction over tokens: at most _DFN_SPLITS_MAX, tokens
    per split a multiple of _DFN_SPLIT_TOKENS (so every candidate BLOCK_T divides it; a config
    dict's "SPLIT_TOKENS" overrides it: tests split small inputs). Fixed by T alone, so autotune
    cannot change dfn's order of summation across splits."""
    unit = config.get("SPLIT_TOKENS", _DFN_SPLIT_TOKENS) if isinstance(config, dict) else _DFN_SPLIT_TOKENS
    splits = max(1, min(_DFN_SPLITS_MAX, triton.cdiv(T, unit)))
    per = triton.cdiv(triton.cdiv(T, splits), unit) * unit
    return triton.cdiv(T, per), per


def _run(name: str, grid, args: tuple, const: dict, config) -> None:
    _KERNELS[name].launch(grid, args, const, config, on_cuda=args[0].is_cuda)


def _forward(ctx, x, fn, base, scale, n, iters, eps, norm_eps, config, pre_only):
    """mix, tail, collapse: (h [T, D], post [T, n], comb [T, n, n]; post / comb unwritten when
    ``pre_only``); saves what ``_backward`` needs on ``ctx``."""
    D = x.shape[-1]
    K = n * D
    xf, fn_in, base_in, scale_in, mixes, r, pre, post, comb, h = pre_forward_buffers(x, fn, base, scale, n)
    T, NM = xf.shape[0], fn.shape[0]
    NP, nm_p = _pow2(n), max(16, _pow2(NM))
    if T > 0:
        _run("mix", lambda m: (triton.cdiv(T, m["BLOCK_T"]),), (xf, fn_in, mixes, r, T, K, NM, norm_eps),
             {"NM_P": nm_p, "X_IN_TF32": x.dtype != torch.float32}, config)
        _run("tail", lambda m: (triton.cdiv(T, m["BLOCK_T"]),),
             (mixes, base_in, scale_in, pre, post, comb, T, n, NM, iters, eps), {"NP": NP, "PRE_ONLY": pre_only}, config)
        _run("collapse", lambda m: (triton.cdiv(T, m["BLOCK_T"]), triton.cdiv(D, m["BLOCK_D"])),
             (xf, pre, h, T, D), {"N": n, "NP": NP}, config)
    ctx.save_for_backward(xf, fn_in, base_in, scale_in, mixes, r, pre)
    ctx.meta = (x.shape, n, iters, eps, config, fn.dtype, base.dtype, scale.dtype, pre_only)
    return h, post, comb


def _backward(ctx, dh, dx_res, dpost, dcomb):
    """dpre, the tail's backward, dx and dfn: (dx, dfn, dbase, dscale) in the inputs' shapes and dtypes."""
    xf, fn_in, base_in, scale_in, mixes, r, pre = ctx.saved_tensors
    xshape, n, iters, eps, config, fdt, bdt, sdt, pre_only = ctx.meta
    T, K = xf.shape
    D, NM = K // n, fn_in.shape[0]
    dev = xf.device
    if T == 0:
        return (torch.empty_like(xf).view(xshape), torch.zeros_like(fn_in).to(fdt),
                torch.zeros_like(base_in).to(bdt), torch.zeros_like(scale_in).to(sdt))
    if pre_only:   # the head: h is the only output; DPOST / DCOMB are not read (placeholders, no zero fills)
        dh, dx_res, dpost, dcomb, has_dxres = dh.reshape(T, D).contiguous(), xf, mixes, mixes, False
    else:
        dh, dx_res, dpost, dcomb, has_dxres = pre_cotangents(xf, n, dh, dx_res, dpost, dcomb)
    NP, nm_p = _pow2(n), max(16, _pow2(NM))
    dpre = torch.empty(T, n, device=dev, dtype=torch.float32)
    _run("dpre", lambda m: (triton.cdiv(T, m["BLOCK_T"]),), (xf, pre, dh, xf, dpre, T, D),
         {"N": n, "NP": NP, "WRITE_DX": False}, config)
    g = torch.empty(T, NM, device=dev, dtype=torch.float32)
    coef = torch.empty(T, device=dev, dtype=torch.float32)
    P = triton.cdiv(T, _TAIL_BWD_BLOCK_T)
    groups = 1 if pre_only else 3
    part = torch.empty(P, NM + groups, device=dev, dtype=torch.float32)
    # Sinkhorn's step inputs for the SAVED candidates: 2 (iters - 1) NP^2 fp32 per token, transient;
    # past _SCRATCH_MAX_BYTES (long sequences) only the recomputing one runs; no Sinkhorn (the head): none
    scratch_elems = T * max(1, 2 * (iters - 1)) * NP * NP
    tail_config = config
    if pre_only or scratch_elems * 4 > _SCRATCH_MAX_BYTES:
        tail_config, scratch_elems = {"SAVED": False}, 1
    scratch = torch.empty(scratch_elems, device=dev, dtype=torch.float32)
    _run("tail_bwd", lambda m: (P,), (mixes, r, base_in, scale_in, dpre, dpost, dcomb, g, coef, part, scratch,
                                     T, K, NM, iters, eps),
         {"N": n, "NP": NP, "BLOCK_T": _TAIL_BWD_BLOCK_T, "PRE_ONLY": pre_only}, tail_config)
    splits, per = _dfn_splits(T, config)
    dx = torch.empty_like(xf)
    dfn = torch.empty(splits, NM, K, device=dev, dtype=torch.float32)
    _run("dx_dfn", lambda m: (n * triton.cdiv(D, m["BLOCK_D"]), splits),
         (xf, fn_in, g, coef, pre, dh, dx_res, dx, dfn, T, D, NM, per),
         {"N": n, "NM_P": nm_p, "HAS_DXRES": has_dxres, "X_IN_TF32": xf.dtype != torch.float32}, config)
    # dbase = sum_t dlogit; dscale per group = sum_t <dlogit, mixes> of the group (PART's column sums)
    dfn_out = torch.empty(NM, K, device=dev, dtype=fdt)
    dbase = torch.empty(NM, device=dev, dtype=bdt)
    dscale = torch.empty(groups, device=dev, dtype=sdt)
    _pre_param_grads[(triton.cdiv(NM * K, _GRADS_BLOCK) + 1,)](dfn, part, dfn_out, dbase, dscale, splits, NM * K, P,
                                                             NM, NM + groups, BLOCK=_GRADS_BLOCK,
                                                             BLOCK_P=_GRADS_BLOCK_P, W_P=_pow2(NM + groups))
    return dx.view(xshape), dfn_out, dbase, dscale


class _MHCPreSplit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn, base, scale, n, iters, eps, norm_eps, config):
        h, post, comb = _forward(ctx, x, fn, base, scale, n, iters, eps, norm_eps, config, pre_only=False)
        lead = x.shape[:-2]
        return h.view(*lead, x.shape[-1]), x, post.view(*lead, n), comb.view(*lead, n, n)

    @staticmethod
    def backward(ctx, dh, dx_res, dpost, dcomb):
        return _backward(ctx, dh, dx_res, dpost, dcomb) + (None,) * 5


class _MHCHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn, base, scale, n, eps, norm_eps, config):
        h, _, _ = _forward(ctx, x, fn, base, scale, n, 1, eps, norm_eps, config, pre_only=True)
        return h.view(*x.shape[:-2], x.shape[-1])

    @staticmethod
    def backward(ctx, dh):
        return _backward(ctx, dh, None, None, None) + (None,) * 4


def _check_config(name: str, config) -> None:
    if isinstance(config, dict):
        bad = {k: v for k, v in config.items() if k.startswith("BLOCK_") and (v < 1 or v & (v - 1))}
        if bad or config.get("BLOCK_T", 16) < 16 or config.get("SPLIT_TOKENS", 1) < 1:
            raise ValueError(f"{name}: config tiles must be powers of 2 with BLOCK_T >= 16 "
                             f"and SPLIT_TOKENS >= 1, got {config}")
    elif config not in (None, "default"):
        raise ValueError(f"{name}: config must be None, 'default' or a dict, got {config!r}")


@opaque_to_compile
def mhc_pre_split_triton(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, n: int,
                         iters: int, eps: float, norm_eps: float, *, config: str | dict | None = None):
    """Triton version of ``model.hyper_connections.mhc_pre`` (as kernels/mhc_pre.py's
    ``mhc_pre_triton``): x [..., n, D] -> (h [..., D] in x's dtype, x_res (= x), post [..., n],
    comb [..., n, n] fp32); differentiable in x (through h, post, comb and x_res), fn, base, scale.
    ``config``: None autotunes each kernel on CUDA (first call per shape); "default" pins every
    kernel's first candidate; a dict such as {"BLOCK_T": 16, "BLOCK_K": 16, "BLOCK_D": 16,
    "SAVED": True, "SPLIT_TOKENS": 16} overrides those entries of every kernel that has them
    (tests, sweeps)."""
    check_pre_inputs("mhc_pre_split_triton", x, fn, base, scale, n, iters)
    _check_config("mhc_pre_split_triton", config)
    return _MHCPreSplit.apply(x, fn, base, scale, int(n), int(iters), float(eps), float(norm_eps), config)


@opaque_to_compile
def mhc_head_triton(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, n: int, eps: float,
                    norm_eps: float, *, config: str | dict | None = None) -> torch.Tensor:
    """Triton version of ``model.hyper_connections.mhc_head`` (the final stream collapse): x [..., n, D]
    -> h [..., D] in x's dtype; differentiable in x, fn [n, nD], base [n], scale [1]. The site pre's
    kernels with its coefficients cut to the pre group (``PRE_ONLY``: sigmoid + eps, no post, no
    Sinkhorn): x read twice forward (mix, collapse) and twice backward (dpre, dx / dfn), no fp32
    copy of it. ``config`` as for ``mhc_pre_split_triton``."""
    check_pre_inputs("mhc_head_triton", x, fn, base, scale, n, 1, pre_only=True)
    _check_config("mhc_head_triton", config)
    return _MHCHead.apply(x, fn, base, scale, int(n), float(eps), float(norm_eps), config)
