"""Hyper-connections: n residual streams mixed around every sublayer (mHC | HC | plain residual).

One site (attention or FFN of a block) with streams x [B, L, n, D] and sublayer F:
    h      = sum_j pre_j x_j                          (collapse -> norm -> F)
    x'_k   = post_k F(h) + sum_j comb[j, k] x_j       (expand + mix)
so the residual map is H_res = comb^T (x' = comb^T x + post F). This is the orientation of
DeepSeek's inference code (hc_post sums comb over its FIRST stream axis) and of HF's
DeepseekV4DecoderLayer (comb^T @ x); Sinkhorn's output is not symmetric, so it matters.

Kinds (cfg.hyper_connections):
  "mhc"      manifold-constrained HC (DeepSeek-V4 / arXiv 2512.24880): coefficients from the
             RMS-normalised flattened streams, comb projected onto doubly-stochastic matrices.
  "hc"       plain Hyper-Connections (arXiv 2409.19606), the unconstrained contrast case.
  "residual" n = 1: x' = x + F(x); no parameters.

Parameters per site (fp32): mhc fn [(2+n)n, nD], base [(2+n)n], scale [3] = (pre, post, comb).
The layout of fn/base rows is [pre (n) | post (n) | comb (n*n, row-major [j, k])].
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.dispatch import dispatcher
from model.config import ModelConfig

# Our init (V4's is unpublished): comb base logits are c on the diagonal and 0 elsewhere, with c
# chosen so that the row softmax puts this much mass on the diagonal (H_res close to identity).
_COMB_DIAG_PROB = 0.9


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """At least fp32 (fp64 stays fp64 so gradcheck can run)."""
    return torch.promote_types(t.dtype, torch.float32)


# ---------------------------------------------------------------------------- reference math
def sinkhorn_knopp(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project logits [..., n, n] onto (nearly) doubly-stochastic matrices, exactly as V4 does.

    softmax over the last dim + eps, column-normalise, then (iters - 1) x (row-, column-normalise);
    each normalisation divides by (sum + eps).
    """
    if iters < 1:
        raise ValueError(f"sinkhorn_knopp: iters must be >= 1, got {iters}")
    m = torch.softmax(logits, dim=-1) + eps
    m = m / (m.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdim=True) + eps)
        m = m / (m.sum(-2, keepdim=True) + eps)
    return m


def _normed_mixes(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """linear(rms_norm(flatten(x)), fn) as DeepSeek computes it: the linear first, then times
    rsqrt(mean(x^2) + norm_eps) (same value, cheaper). x [..., n, D] -> [..., rows of fn] (fp32+)."""
    cd = _compute_dtype(x)
    xf = x.flatten(-2).to(cd)  # [..., nD]
    rsqrt = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm_eps)  # [..., 1]
    return F.linear(xf, fn.to(cd)) * rsqrt


def mhc_coefficients(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    n: int,
    iters: int,
    eps: float,
    norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC coefficients of one site. x [..., n, D] -> (pre [..., n], post [..., n], comb [..., n, n]).

    mixes = linear(rms_norm(flatten(x)), fn), computed as DeepSeek does: linear first, then
    times rsqrt(mean(x^2) + norm_eps) (same value, cheaper). Math in fp32 (fp64 if given fp64).
        pre  = sigmoid(scale0 * mixes_pre  + base_pre) + eps
        post = 2 * sigmoid(scale1 * mixes_post + base_post)
        comb = sinkhorn(scale2 * mixes_comb + base_comb)
    """
    if x.shape[-2] != n:
        raise ValueError(f"mhc_coefficients: x has {x.shape[-2]} streams, expected n={n}")
    cd = _compute_dtype(x)
    mixes = _normed_mixes(x, fn, norm_eps)  # [..., (2+n)n]
    base, scale = base.to(cd), scale.to(cd)
    pre = torch.sigmoid(scale[0] * mixes[..., :n] + base[:n]) + eps
    post = 2.0 * torch.sigmoid(scale[1] * mixes[..., n:2 * n] + base[n:2 * n])
    comb_logits = scale[2] * mixes[..., 2 * n:] + base[2 * n:]
    comb = sinkhorn_knopp(comb_logits.unflatten(-1, (n, n)), iters, eps)
    return pre, post, comb


get_mhc_coefficients = dispatcher("mhc_coefficients", mhc_coefficients)


def hc_coefficients(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    n: int,
    norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain dynamic Hyper-Connections (arXiv 2409.19606). x [..., n, D] -> (pre, post, comb).

    Each stream is normalised on its own (weightless RMS; the paper uses a LayerNorm) and projected
    by the shared fn [2+n, D] rows (W_m | W_beta | W_r):
        pre  = A_m = base_pre  + scale0 * tanh(x_j W_m)          [..., n]
        post = B   = base_post + scale1 * tanh(x_j W_beta)       [..., n]
        comb = A_r = base_comb + scale2 * tanh(x_j W_r)          [..., n(j), n(k)]
    Nothing constrains comb: this is the contrast case whose composite gain can explode.
    """
    if x.shape[-2] != n:
        raise ValueError(f"hc_coefficients: x has {x.shape[-2]} streams, expected n={n}")
    cd = _compute_dtype(x)
    xf = x.to(cd)
    xn = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm_eps)  # [..., n, D]
    dyn = torch.tanh(F.linear(xn, fn.to(cd)))  # [..., n, 2+n]
    base, scale = base.to(cd), scale.to(cd)
    pre = base[:n] + scale[0] * dyn[..., 0]
    post = base[n:2 * n] + scale[1] * dyn[..., 1]
    comb = base[2 * n:].view(n, n) + scale[2] * dyn[..., 2:]
    return pre, post, comb


def collapse_streams(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """h = sum_j pre_j x_j. x [..., n, D], pre [..., n] -> [..., D] in x's dtype (fp32 math)."""
    cd = _compute_dtype(x)
    return (pre.to(cd).unsqueeze(-1) * x.to(cd)).sum(-2).to(x.dtype)


get_collapse_streams = dispatcher("collapse_streams", collapse_streams)


def mhc_pre(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    n: int,
    iters: int,
    eps: float,
    norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One mHC site's pre: x [..., n, D] -> (h [..., D], x_res, post [..., n], comb [..., n, n]).

    h = collapse_streams(x, pre) with (pre, post, comb) = mhc_coefficients(x, ...). x_res is x
    itself, the residual input the post-mix must be given: the Triton path
    (kernels/mhc_pre_split.py) returns it through its autograd node so that the post-mix's
    gradient of x is added inside its backward pass instead of in separate full-size additions.
    """
    pre, post, comb = mhc_coefficients(x, fn, base, scale, n, iters, eps, norm_eps)
    return collapse_streams(x, pre), x, post, comb


get_mhc_pre = dispatcher("mhc_pre", mhc_pre)


def mhc_head_weights(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, eps: float,
                     norm_eps: float) -> torch.Tensor:
    """The stream head's collapse weights: the mHC pre group alone (no post, no Sinkhorn).
    x [..., n, D], fn [n, nD], base [n], scale [1] -> sigmoid(scale * mixes + base) + eps [..., n] (fp32+)."""
    cd = _compute_dtype(x)
    return torch.sigmoid(scale.to(cd) * _normed_mixes(x, fn, norm_eps) + base.to(cd)) + eps


def mhc_head(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, n: int, eps: float,
             norm_eps: float) -> torch.Tensor:
    """The final collapse of the streams: x [..., n, D] -> h [..., D] (x's dtype) =
    collapse_streams(x, mhc_head_weights(x, ...)). The Triton path (kernels/mhc_pre_split.py's
    ``mhc_head_triton``) runs the site pre's kernels on the pre group, with no fp32 copy of x."""
    if x.shape[-2] != n:
        raise ValueError(f"mhc_head: x has {x.shape[-2]} streams, expected n={n}")
    return collapse_streams(x, mhc_head_weights(x, fn, base, scale, eps, norm_eps))


get_mhc_head = dispatcher("mhc_head", mhc_head)


def mix_streams(f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """x'_k = post_k f + sum_j comb[j, k] x_j. f [..., D], x [..., n, D] -> [..., n, D] (x's dtype)."""
    cd = _compute_dtype(x)
    mixed = torch.einsum("...jk,...jd->...kd", comb.to(cd), x.to(cd))
    return (post.to(cd).unsqueeze(-1) * f.to(cd).unsqueeze(-2) + mixed).to(x.dtype)


get_mix_streams = dispatcher("mix_streams", mix_streams)


# ---------------------------------------------------------------------------- diagnostics
def amax_gain(comb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Amax gain magnitudes of H_res = comb^T, max over all tokens. comb [..., n, n].

    forward  = max abs row sum of H_res    = max abs COLUMN sum of comb
    backward = max abs column sum of H_res = max abs ROW sum of comb
    Both are 1 for any doubly-stochastic comb (and for the identity).
    """
    a = comb.detach().to(_compute_dtype(comb)).abs()
    return a.sum(-2).amax(), a.sum(-1).amax()


def composite_gain(combs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Amax gains of the residual map across sites, per token, max over tokens.

    combs in forward order (attention and FFN sites separately), each [..., n, n]. The product
    H_L ... H_1 = (comb_1 comb_2 ... comb_L)^T, so the composite comb is the ordered product.
    """
    if not combs:
        raise ValueError("composite_gain: combs is empty")
    prod = combs[0].detach().to(_compute_dtype(combs[0]))
    for c in combs[1:]:
        prod = prod @ c.detach().to(prod.dtype)
    return amax_gain(prod)


# ---------------------------------------------------------------------------- modules
class SiteState(NamedTuple):
    """What a site's post-mix needs from its pre: the residual input x [B, L, n, D] (for the fused
    mHC pre, x handed back through its autograd node: see ``mhc_pre``), post [B, L, n] and
    comb [B, L, n, n] (fp32; None for "residual")."""
    x: torch.Tensor
    post: torch.Tensor | None
    comb: torch.Tensor | None


class HyperConnection(nn.Module):
    """One hyper-connection site. pre(x [B,L,n,D]) -> (h [B,L,D], SiteState(x, post [B,L,n],
    comb [B,L,n,n])); post(f [B,L,D], state) -> x' [B,L,n,D] in x's dtype (mixing in fp32).

    ``layer_idx`` is the site index (count attention and FFN sites separately: 2*i and 2*i + 1);
    only "hc" uses it, for its static pre vector e_{layer_idx mod n}.
    "residual": pre returns (x[:, :, 0], SiteState(x, None, None)) and post returns x + f.

    Init (ours; V4 published only alpha = 0.01):
      mhc  fn ~ N(0, 1/(nD)) so mixes have unit variance at any width; scale = cfg.hc_init_alpha;
           base: pre = sigmoid(b) = 1/n (identical streams collapse to x), post = 2 sigmoid(0) = 1
           (x' = x + F for identical streams, like a residual), comb logits c on the diagonal, 0 off it,
           with softmax putting 0.9 on the diagonal (H_res close to identity, still trainable).
      hc   the paper's: fn = 0 (dynamic part starts at 0), scale = alpha, base = the static
           A_m = e_{k mod n}, B = 1, A_r = I.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.kind = cfg.hyper_connections
        self.n = cfg.n_streams
        self.dim = cfg.dim
        self.layer_idx = layer_idx
        self.iters = cfg.hc_sinkhorn_iters
        self.eps = cfg.hc_eps
        self.norm_eps = cfg.norm_eps
        self.mhc_impl = cfg.mhc_impl
        self.init_alpha = cfg.hc_init_alpha
        n, D = self.n, cfg.dim
        if self.kind == "mhc":
            self.fn = nn.Parameter(torch.empty((2 + n) * n, n * D, dtype=torch.float32))
        elif self.kind == "hc":
            self.fn = nn.Parameter(torch.empty(2 + n, D, dtype=torch.float32))
        if self.kind != "residual":
            self.base = nn.Parameter(torch.empty((2 + n) * n, dtype=torch.float32))
            self.scale = nn.Parameter(torch.empty(3, dtype=torch.float32))
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.kind == "residual":
            return
        n, D = self.n, self.dim
        self.scale.fill_(self.init_alpha)
        pre_b, post_b, comb_b = self.base.split([n, n, n * n])
        if self.kind == "mhc":
            self.fn.normal_(0.0, 1.0 / math.sqrt(n * D))
            pre_b.fill_(-math.log(n - 1) if n > 1 else 10.0)  # sigmoid = 1/n
            post_b.zero_()
            diag = math.log(_COMB_DIAG_PROB * (n - 1) / (1 - _COMB_DIAG_PROB)) if n > 1 else 0.0
            comb_b.copy_((torch.eye(n) * diag).flatten())
        else:  # hc
            self.fn.zero_()
            pre_b.copy_(F.one_hot(torch.tensor(self.layer_idx % n), n).float())
            post_b.fill_(1.0)
            comb_b.copy_(torch.eye(n).flatten())

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[2] != self.n or x.shape[3] != self.dim:
            raise ValueError(f"HyperConnection: x must be [B, L, n={self.n}, D={self.dim}], got {list(x.shape)}")

    def coefficients(self, x: torch.Tensor):
        if self.kind == "mhc":
            fn = get_mhc_coefficients(self.mhc_impl, x.device, x.dtype)  # Triton on CUDA
            return fn(x, self.fn, self.base, self.scale, self.n, self.iters, self.eps, self.norm_eps)
        return hc_coefficients(x, self.fn, self.base, self.scale, self.n, self.norm_eps)

    def pre(self, x: torch.Tensor) -> tuple[torch.Tensor, "SiteState"]:
        """x [B, L, n, D] -> (h [B, L, D], the state ``post`` needs)."""
        self._check(x)
        if self.kind == "residual":
            return x[:, :, 0], SiteState(x, None, None)
        if self.kind == "mhc":  # coefficients + Sinkhorn + collapse in one op (Triton on CUDA)
            fused = get_mhc_pre(self.mhc_impl, x.device, x.dtype)
            h, x_res, post, comb = fused(x, self.fn, self.base, self.scale, self.n, self.iters, self.eps,
                                         self.norm_eps)
            return h, SiteState(x_res, post, comb)
        pre, post, comb = self.coefficients(x)  # [B,L,n], [B,L,n], [B,L,n,n] fp32
        collapse = get_collapse_streams(self.mhc_impl, x.device, x.dtype)  # Triton on CUDA
        return collapse(x, pre), SiteState(x, post, comb)

    def post(self, f: torch.Tensor, state: "SiteState") -> torch.Tensor:
        """x' = post f + comb^T x (in x's dtype, mixing in fp32) from the sublayer's output f [B, L, D]."""
        x = state.x
        if f.shape != x.shape[:2] + x.shape[3:]:
            raise ValueError(f"HyperConnection.post: f must be [B, L, D] matching x {list(x.shape)}, "
                             f"got {list(f.shape)}")
        if self.kind == "residual":
            return x + f.unsqueeze(2)
        mix = get_mix_streams(self.mhc_impl, x.device, x.dtype)  # Triton on CUDA
        return mix(f, x, state.post, state.comb)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, n={self.n}, dim={self.dim}, layer_idx={self.layer_idx}"


class HyperHead(nn.Module):
    """Final collapse [B,L,n,D] -> [B,L,D]: pre-only mHC weights (sigmoid + eps, no Sinkhorn).

    Params fn [n, nD], base [n], scale [1] (fp32). Used for both "mhc" and "hc" (the HC paper
    sums the streams; a learned positive weighting contains that). "residual": x[:, :, 0].
    Init as the mHC pre part: fn ~ N(0, 1/(nD)), base so sigmoid = 1/n, scale = hc_init_alpha.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.hyper_connections
        self.n = cfg.n_streams
        self.dim = cfg.dim
        self.eps = cfg.hc_eps
        self.norm_eps = cfg.norm_eps
        self.init_alpha = cfg.hc_init_alpha
        self.mhc_impl = cfg.mhc_impl
        if self.kind != "residual":
            n, D = self.n, cfg.dim
            self.fn = nn.Parameter(torch.empty(n, n * D, dtype=torch.float32))
            self.base = nn.Parameter(torch.empty(n, dtype=torch.float32))
            self.scale = nn.Parameter(torch.empty(1, dtype=torch.float32))
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.kind == "residual":
            return
        n = self.n
        self.fn.normal_(0.0, 1.0 / math.sqrt(n * self.dim))
        self.base.fill_(-math.log(n - 1) if n > 1 else 10.0)
        self.scale.fill_(self.init_alpha)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., n, D] -> collapse weights [..., n] (fp32; the reference's, for diagnostics)."""
        return mhc_head_weights(x, self.fn, self.base, self.scale, self.eps, self.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[2] != self.n or x.shape[3] != self.dim:
            raise ValueError(f"HyperHead: x must be [B, L, n={self.n}, D={self.dim}], got {list(x.shape)}")
        if self.kind == "residual":
            return x[:, :, 0]
        head = get_mhc_head(self.mhc_impl, x.device, x.dtype)  # Triton on CUDA
        return head(x, self.fn, self.base, self.scale, self.n, self.eps, self.norm_eps)

    def expand(self, h: torch.Tensor) -> torch.Tensor:
        """Embedding [B, L, D] -> n identical streams [B, L, n, D]."""
        return h.unsqueeze(2).expand(*h.shape[:2], self.n, h.shape[-1]).contiguous()
