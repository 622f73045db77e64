"""mHC / HC stream ops in Triton, forward and backward: collapse (streams -> sublayer input) and
mix (sublayer output + streams -> new streams).

Match ``model.hyper_connections.collapse_streams`` and ``mix_streams``:
    collapse   h[t, d]     = sum_j pre[t, j] x[t, j, d]                          x [T, n, D] -> [T, D]
    mix        x'[t, k, d] = post[t, k] f[t, d] + sum_j comb[t, j, k] x[t, j, d]  -> [T, n, D]
Gradients (g = the incoming gradient):
    collapse   dx[t, j, d] = pre[t, j] g[t, d]          dpre[t, j] = sum_d g[t, d] x[t, j, d]
    mix        df[t, d]    = sum_k post[t, k] g[t, k, d]
               dx[t, j, d] = sum_k comb[t, j, k] g[t, k, d]
               dpost[t, k] = sum_d g[t, k, d] f[t, d]
               dcomb[t, j, k] = sum_d x[t, j, d] g[t, k, d]

Every kernel reads each input once and writes each output once, in the tensors' own dtypes
(x / f / g: fp16, bf16 or fp32; the coefficients: any float, read as fp32), with all math in fp32
registers. The reference upcasts the whole [T, n, D] tensor to fp32 and materialises several
full-size intermediates in both directions.

Grids: the forwards have no reduction, so one program per (token block, D tile); the backwards
reduce over D (dpre, dpost, dcomb), so one program per token block loops over D in tiles and
keeps the per-row sums in registers (deterministic: no atomics). The stream count n is a
compile-time constant (one specialisation per n; the stream loops are unrolled); tuned for
n <= 8, any n works. D and the token count need not be multiples of the tiles (masked).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.opaque import opaque_to_compile
from kernels.tuning import Tuned


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _collapse_fwd(X, PRE, H, T, D, N: tl.constexpr, NP: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rj = tl.arange(0, NP)
    t_ok, d_ok, j_ok = rt < T, rd < D, rj < N
    rt64 = rt.to(tl.int64)
    p = tl.load(PRE + rt64[:, None] * N + rj[None, :], mask=t_ok[:, None] & j_ok[None, :],
                other=0.0).to(tl.float32)                                              # [BT, NP]
    m3 = t_ok[:, None, None] & j_ok[None, :, None] & d_ok[None, None, :]
    x = tl.load(X + (rt64[:, None, None] * N + rj[None, :, None]) * D + rd[None, None, :], mask=m3,
                other=0.0).to(tl.float32)                                              # [BT, NP, BD]
    h = tl.sum(x * p[:, :, None], 1)                                                   # [BT, BD]
    tl.store(H + rt64[:, None] * D + rd[None, :], h.to(H.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _collapse_bwd(X, PRE, G, DX, DPRE, T, D, N: tl.constexpr, NP: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_DX: tl.constexpr = True):
    """dpre (and dx unless WRITE_DX is off: kernels/mhc_pre_split.py writes dx in a later pass)."""
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rj = tl.arange(0, NP)
    t_ok, j_ok = rt < T, rj < N
    rt64 = rt.to(tl.int64)
    m2 = t_ok[:, None] & j_ok[None, :]
    p = tl.load(PRE + rt64[:, None] * N + rj[None, :], mask=m2, other=0.0).to(tl.float32)  # [BT, NP]
    xrow = (rt64[:, None, None] * N + rj[None, :, None]) * D                                # [BT, NP, 1]
    acc = tl.zeros([BLOCK_T, NP], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_ok = rd < D
        g = tl.load(G + rt64[:, None] * D + rd[None, :], mask=t_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)                                          # [BT, BD]
        m3 = m2[:, :, None] & d_ok[None, None, :]
        x = tl.load(X + xrow + rd[None, None, :], mask=m3, other=0.0).to(tl.float32)   # [BT, NP, BD]
        if WRITE_DX:
            dx = p[:, :, None] * g[:, None, :]
            tl.store(DX + xrow + rd[None, None, :], dx.to(DX.dtype.element_ty), mask=m3)
        acc += tl.sum(x * g[:, None, :], 2)
    tl.store(DPRE + rt64[:, None] * N + rj[None, :], acc, mask=m2)


@triton.jit
def _mix_fwd(F, X, POST, COMB, OUT, T, D, N: tl.constexpr, NP: tl.constexpr,
             BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rk = tl.arange(0, NP)
    t_ok, d_ok, k_ok = rt < T, rd < D, rk < N
    rt64 = rt.to(tl.int64)
    mtd = t_ok[:, None] & d_ok[None, :]
    mtk = t_ok[:, None] & k_ok[None, :]
    post = tl.load(POST + rt64[:, None] * N + rk[None, :], mask=mtk, other=0.0).to(tl.float32)  # [BT, NP(k)]
    f = tl.load(F + rt64[:, None] * D + rd[None, :], mask=mtd, other=0.0).to(tl.float32)         # [BT, BD]
    acc = post[:, :, None] * f[:, None, :]                                                       # [BT, NP(k), BD]
    for j in tl.static_range(N):
        xj = tl.load(X + (rt64[:, None] * N + j) * D + rd[None, :], mask=mtd, other=0.0).to(tl.float32)
        cj = tl.load(COMB + rt64[:, None] * (N * N) + j * N + rk[None, :], mask=mtk, other=0.0).to(tl.float32)
        acc += cj[:, :, None] * xj[:, None, :]
    m3 = mtk[:, :, None] & d_ok[None, None, :]
    tl.store(OUT + (rt64[:, None, None] * N + rk[None, :, None]) * D + rd[None, None, :],
             acc.to(OUT.dtype.element_ty), mask=m3)


@triton.jit
def _mix_bwd(F, X, POST, COMB, G, DF, DX, DPOST, DCOMB, T, D, N: tl.constexpr, NP: tl.constexpr,
             BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rk = tl.arange(0, NP)
    t_ok, k_ok = rt < T, rk < N
    rt64 = rt.to(tl.int64)
    mtk = t_ok[:, None] & k_ok[None, :]
    post = tl.load(POST + rt64[:, None] * N + rk[None, :], mask=mtk, other=0.0).to(tl.float32)  # [BT, NP(k)]
    grow = (rt64[:, None, None] * N + rk[None, :, None]) * D                                    # [BT, NP, 1]
    dpost = tl.zeros([BLOCK_T, NP], dtype=tl.float32)
    dcomb = tl.zeros([BLOCK_T, NP, NP], dtype=tl.float32)                                       # [BT, j, k]
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_ok = rd < D
        mtd = t_ok[:, None] & d_ok[None, :]
        m3 = mtk[:, :, None] & d_ok[None, None, :]
        g = tl.load(G + grow + rd[None, None, :], mask=m3, other=0.0).to(tl.float32)           # [BT, NP(k), BD]
        f = tl.load(F + rt64[:, None] * D + rd[None, :], mask=mtd, other=0.0).to(tl.float32)   # [BT, BD]
        df = tl.sum(post[:, :, None] * g, 1)
        tl.store(DF + rt64[:, None] * D + rd[None, :], df.to(DF.dtype.element_ty), mask=mtd)
        dpost += tl.sum(g * f[:, None, :], 2)
        for j in tl.static_range(N):
            xoff = (rt64[:, None] * N + j) * D + rd[None, :]
            xj = tl.load(X + xoff, mask=mtd, other=0.0).to(tl.float32)                         # [BT, BD]
            cj = tl.load(COMB + rt64[:, None] * (N * N) + j * N + rk[None, :], mask=mtk,
                         other=0.0).to(tl.float32)                                             # [BT, NP(k)]
            dxj = tl.sum(cj[:, :, None] * g, 1)                                                # [BT, BD]
            tl.store(DX + xoff, dxj.to(DX.dtype.element_ty), mask=mtd)
            dcj = tl.sum(xj[:, None, :] * g, 2)                                                # [BT, NP(k)]
            dcomb += tl.where((rk == j)[None, :, None], dcj[:, None, :], 0.0)
    tl.store(DPOST + rt64[:, None] * N + rk[None, :], dpost, mask=mtk)
    tl.store(DCOMB + rt64[:, None, None] * (N * N) + rk[None, :, None] * N + rk[None, None, :], dcomb,
             mask=mtk[:, :, None] & k_ok[None, None, :])


# ----------------------------------------------------------------------------- host code
_FWD_ELEMS = 4096   # elements of the [BT, NP, BD] tile per program (forward)
_BWD_ELEMS = 2048   # backward: smaller token blocks, more programs (each loops over D)
_BD_MAX = 256
# Tiles picked from the H100 sweep (bench/mhc.py --ops streams, 4096 x 4 x 1024, 2026-11-22):
# collapse backward (2, 128) 0.40 ms fwd+bwd vs 0.54 with the element-count rule; mix forward
# and backward (8, 128) 0.41 vs 0.62. (block_t, block_d); None = the rule in _blocks.
_COLLAPSE_BWD_TILE = (2, 128)
_MIX_TILE = (8, 128)
# On CUDA with no tiles given, the mix's tiles are autotuned (kernels/tuning.py) from these, the
# H100 pick first: compiled for sm_90, (8, 128) takes 255 registers and its backward spills 320 B
# per thread; the smaller tiles take 56-128 registers but timed slower on the H100 at 4K tokens.
_MIX_FWD = Tuned(_mix_fwd, [({"BLOCK_T": 8, "BLOCK_D": 128}, 4, 3), ({"BLOCK_T": 4, "BLOCK_D": 256}, 4, 3),
                            ({"BLOCK_T": 2, "BLOCK_D": 512}, 4, 3)],
                 key=["T", "D"])
_MIX_BWD = Tuned(_mix_bwd, [({"BLOCK_T": 8, "BLOCK_D": 128}, 4, 3), ({"BLOCK_T": 8, "BLOCK_D": 128}, 8, 3),
                            ({"BLOCK_T": 4, "BLOCK_D": 128}, 4, 3), ({"BLOCK_T": 2, "BLOCK_D": 256}, 4, 3)],
                 key=["T", "D"])


def _blocks(n: int, D: int, elems: int, block_t: int | None, block_d: int | None) -> tuple[int, int, int]:
    NP = _pow2(n)
    BD = block_d or min(_BD_MAX, max(16, _pow2(D)))
    BT = block_t or max(2, min(16, elems // (NP * BD)))
    return NP, BT, BD


def _f32(t: torch.Tensor, *shape) -> torch.Tensor:
    return t.reshape(*shape).to(torch.float32).contiguous()


class _CollapseStreams(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pre, block_t, block_d):
        n, D = x.shape[-2], x.shape[-1]
        xf = x.reshape(-1, n, D).contiguous()
        T = xf.shape[0]
        pf = _f32(pre, T, n)
        h = torch.empty(T, D, device=x.device, dtype=x.dtype)
        NP, BT, BD = _blocks(n, D, _FWD_ELEMS, block_t, block_d)
        if T > 0 and D > 0:
            _collapse_fwd[(triton.cdiv(T, BT), triton.cdiv(D, BD))](xf, pf, h, T, D, N=n, NP=NP,
                                                                    BLOCK_T=BT, BLOCK_D=BD)
        ctx.save_for_backward(xf, pf)
        ctx.meta = (x.shape, pre.shape, pre.dtype, block_t, block_d)
        return h.view(*x.shape[:-2], D)

    @staticmethod
    def backward(ctx, dh):
        xf, pf = ctx.saved_tensors
        xshape, pshape, pdt, block_t, block_d = ctx.meta
        T, n, D = xf.shape
        g = dh.reshape(T, D).contiguous()
        dx = torch.empty_like(xf)
        dpre = torch.empty(T, n, device=xf.device, dtype=torch.float32)   # the kernel writes every entry
        NP, BT, BD = _blocks(n, D, _BWD_ELEMS, block_t or _COLLAPSE_BWD_TILE[0],
                             block_d or min(_COLLAPSE_BWD_TILE[1], max(16, _pow2(D))))
        if T > 0 and D > 0:
            _collapse_bwd[(triton.cdiv(T, BT),)](xf, pf, g, dx, dpre, T, D, N=n, NP=NP, BLOCK_T=BT, BLOCK_D=BD)
        return dx.view(xshape), dpre.view(pshape).to(pdt), None, None


class _MixStreams(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f, x, post, comb, block_t, block_d):
        n, D = x.shape[-2], x.shape[-1]
        xf = x.reshape(-1, n, D).contiguous()
        T = xf.shape[0]
        ff = f.reshape(T, D).contiguous()
        pf, cf = _f32(post, T, n), _f32(comb, T, n, n)
        out = torch.empty_like(xf)
        NP, BT, BD = _blocks(n, D, _FWD_ELEMS, block_t or _MIX_TILE[0],
                             block_d or min(_MIX_TILE[1], max(16, _pow2(D))))
        if T > 0 and D > 0 and x.is_cuda and block_t is None and block_d is None:
            _MIX_FWD.launch(lambda m: (triton.cdiv(T, m["BLOCK_T"]), triton.cdiv(D, m["BLOCK_D"])),
                            (ff, xf, pf, cf, out, T, D), {"N": n, "NP": NP}, None, on_cuda=True)
        elif T > 0 and D > 0:
            _mix_fwd[(triton.cdiv(T, BT), triton.cdiv(D, BD))](ff, xf, pf, cf, out, T, D, N=n, NP=NP,
                                                               BLOCK_T=BT, BLOCK_D=BD)
        ctx.save_for_backward(ff, xf, pf, cf)
        ctx.meta = (f.shape, x.shape, post.shape, post.dtype, comb.shape, comb.dtype, block_t, block_d)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dout):
        ff, xf, pf, cf = ctx.saved_tensors
        fshape, xshape, pshape, pdt, cshape, cdt, block_t, block_d = ctx.meta
        T, n, D = xf.shape
        g = dout.reshape(T, n, D).contiguous()
        df = torch.empty_like(ff)
        dx = torch.empty_like(xf)
        dpost = torch.empty(T, n, device=xf.device, dtype=torch.float32)   # the kernel writes every entry
        dcomb = torch.empty(T, n, n, device=xf.device, dtype=torch.float32)
        NP, BT, BD = _blocks(n, D, _BWD_ELEMS, block_t or _MIX_TILE[0],
                             block_d or min(_MIX_TILE[1], max(16, _pow2(D))))
        if T > 0 and D > 0 and xf.is_cuda and block_t is None and block_d is None:
            _MIX_BWD.launch(lambda m: (triton.cdiv(T, m["BLOCK_T"]),), (ff, xf, pf, cf, g, df, dx, dpost, dcomb, T, D),
                            {"N": n, "NP": NP}, None, on_cuda=True)
        elif T > 0 and D > 0:
            _mix_bwd[(triton.cdiv(T, BT),)](ff, xf, pf, cf, g, df, dx, dpost, dcomb, T, D, N=n, NP=NP,
                                            BLOCK_T=BT, BLOCK_D=BD)
        return (df.view(fshape), dx.view(xshape), dpost.view(pshape).to(pdt), dcomb.view(cshape).to(cdt),
                None, None)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_x(op: str, x: torch.Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be [..., n, D], got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{op}: x dtype must be fp16, bf16 or fp32, got {x.dtype}")


@opaque_to_compile
def collapse_streams_triton(x: torch.Tensor, pre: torch.Tensor, *, block_t: int | None = None,
                            block_d: int | None = None) -> torch.Tensor:
    """Triton version of ``model.hyper_connections.collapse_streams``: x [..., n, D], pre [..., n]
    -> h [..., D] in x's dtype (fp32 math); differentiable in x and pre. ``block_t`` / ``block_d``
    override the tile sizes (powers of 2; tests)."""
    _check_x("collapse_streams_triton", x)
    if pre.shape != x.shape[:-1]:
        raise ValueError(f"collapse_streams_triton: pre must be {tuple(x.shape[:-1])}, got {tuple(pre.shape)}")
    return _CollapseStreams.apply(x, pre, block_t, block_d)


@opaque_to_compile
def mix_streams_triton(f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, *,
                       block_t: int | None = None, block_d: int | None = None) -> torch.Tensor:
    """Triton version of ``model.hyper_connections.mix_streams``: f [..., D], x [..., n, D],
    post [..., n], comb [..., n, n] -> x' [..., n, D] in x's dtype (fp32 math); differentiable in
    all four (df in f's dtype, dpost / dcomb in theirs)."""
    _check_x("mix_streams_triton", x)
    n = x.shape[-2]
    lead = x.shape[:-2]
    if f.shape != lead + x.shape[-1:]:
        raise ValueError(f"mix_streams_triton: f must be {tuple(lead + x.shape[-1:])}, got {tuple(f.shape)}")
    if f.dtype not in _DTYPES:
        raise ValueError(f"mix_streams_triton: f dtype must be fp16, bf16 or fp32, got {f.dtype}")
    if post.shape != lead + (n,) or comb.shape != lead + (n, n):
        raise ValueError(f"mix_streams_triton: post must be {tuple(lead + (n,))} and comb {tuple(lead + (n, n))}, "
                         f"got {tuple(post.shape)} and {tuple(comb.shape)}")
    return _MixStreams.apply(f, x, post, comb, block_t, block_d)
