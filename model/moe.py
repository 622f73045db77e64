"""DeepSeek-V4 Mixture-of-Experts: router (learned or hash), dropless routed experts, shared expert.

    s      = sqrt(softplus(x W_g^T))                      fp32 scores            [T, E]
    idx    = topk(s + b)            (learned layers)      b: rule-updated bias buffer, not trained
           = tid2eid[token id]      (hash layers, layer_idx < n_hash_layers)
           = routing_indices        (supplied from outside: anticipatory routing)
    w      = s[idx] / sum s[idx] * route_scale            unbiased scores of the chosen experts
    y      = sum_k w_k SwiGLU_{idx_k}(x) + SwiGLU_shared(x)

SwiGLU with clamp (routed AND shared experts; math in fp32, the matmuls in the input dtype):
    gate = min(x W1^T, limit);  up = clamp(x W3^T, -limit, limit);  out = (silu(gate) * up) W2^T
As in DeepSeek's inference code the routing weight multiplies the hidden activation before W2.

Parameter layout (names in docs/ARCHITECTURE.md):
  gate.weight [E, D]           router (trained)
  gate.bias   [E] fp32 buffer  aux-loss-free balancing bias (learned-router layers only)
  gate.tid2eid [V, K] long     frozen hash table (hash layers only; saved in the state dict)
  experts.w1, experts.w3 [E, inter, D]; experts.w2 [E, D, inter]
      One logical matrix per expert (Muon orthogonalises each [inter, D] / [D, inter] slice).
      HF's DeepseekV4Experts fuses gate_up_proj = cat([w1, w3], dim=1) -> [E, 2*inter, D]
      (gate first: HF splits with chunk(2)) and names w2 down_proj; the export helper maps.
  shared.{w1,w2,w3}.weight     nn.Linear, width n_shared_experts * moe_inter_dim
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from model.dispatch import dispatcher
from kernels.checks import require
from model.config import ModelConfig
from model.matmul import linears_fp32_fused, linears_fp32_supported
from model.profile_ranges import component
from model.recompute import recompute_in_backward

logger = logging.getLogger(__name__)

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _acc(t: torch.Tensor) -> torch.dtype:
    """Math dtype: fp32, or fp64 for fp64 inputs (fp64 exactness checks, e.g. of the chunked
    step, stay fp64)."""
    return torch.promote_types(t.dtype, torch.float32)


# ---------------------------------------------------------------------------- functions
def swiglu_activation(gate: torch.Tensor, up: torch.Tensor | None, limit: float,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """h = silu(min(gate, limit)) * clamp(up, -limit, limit) [* weight[:, None]], gate/up [N, I],
    weight [N] or None -> [N, I] in gate's dtype, math in fp32. ``up=None``: gate is [N, 2I] =
    [gate | up] (``swiglu_gate_up``'s one GEMM). ``limit <= 0`` disables the clamp
    (as DeepSeek's code does for swiglu_limit = 0). Triton: ``kernels/swiglu.py``. Keeps only
    gate, up, weight for backward (bf16: the fp32 temporaries rerun there, model/recompute.py)."""
    return recompute_in_backward(_swiglu_fp32, gate, up, limit, weight)


get_swiglu_activation = dispatcher("swiglu_activation", swiglu_activation)


def _swiglu_fp32(gate: torch.Tensor, up: torch.Tensor | None, limit: float,
                 weight: torch.Tensor | None) -> torch.Tensor:
    dt = gate.dtype
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    gate, up = gate.to(_acc(gate)), up.to(_acc(up))
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    h = F.silu(gate) * up
    if weight is not None:
        h = h * weight.to(h.dtype)[:, None]
    return h.to(dt)


def swiglu(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    limit: float,
    weight: torch.Tensor | None = None,
    act=swiglu_activation,
    x_up: torch.Tensor | None = None,
) -> torch.Tensor:
    """Clamped SwiGLU expert. x [T, D]; w1, w3 [inter, D]; w2 [D, inter]; weight [T] or None.

    Elementwise math in fp32 (``act``: the reference or its Triton kernel); the result of W2 is
    in x's dtype. ``x_up``: the same rows as x for W3 through a second autograd handle
    (``permute_tokens(..., handles=2)``), default x.
    """
    up = F.linear(x if x_up is None else x_up, w3)
    return F.linear(act(F.linear(x, w1), up, limit, weight), w2)  # [T, D]


def swiglu_gate_up(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, limit: float,
                   act=swiglu_activation) -> torch.Tensor:
    """``swiglu(x, w1, w2, w3, limit)`` with W1 and W3 as one GEMM over their concatenation
    [2 inter, D] (the same dot products): x's gradient is then one product instead of two plus
    a [T, D] add, and one GEMM fewer each way. The copy of the weights is small for the shared
    expert (2 x 384 x 1024 in small); the routed experts' [E, inter, D] would cost more than the
    add it saves, so they keep two GEMMs (their input gradients meet in the permute instead)."""
    return F.linear(act(F.linear(x, torch.cat([w1, w3])), None, limit), w2)


def router_logits(x: torch.Tensor, weight: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """x W^T in fp32 (the router runs in fp32). x [..., D], weight [E, D] -> [..., E].
    Default (``auto``/``torch``): the fp32 upcast, keeping x (bf16), not its fp32 copy, for backward
    (model/recompute.py). ``impl="triton"`` on CUDA bf16: the tensor-core GEMM with fp32 output of
    model/matmul.py (the same products); not the default because at the router's narrow output it
    loses: 16384 x 1024 -> 64 fwd+bwd 0.95 ms vs 0.52 ms upcast (bench/matmul_fp32_out.py, H200,
    2026-12-03), while the compressors' wider outputs win with it."""
    if impl == "triton" and linears_fp32_supported(x, weight):
        return linears_fp32_fused(x, weight)[0]
    return recompute_in_backward(_router_linear_fp32, x, weight)


def _router_linear_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x.to(_acc(x)), weight.to(_acc(x)))


def router_scores(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """s = sqrt(softplus(x W^T)) in fp32 (V4's "sqrtsoftplus"). x [..., D], weight [E, D] -> [..., E]."""
    return F.softplus(router_logits(x, weight)).sqrt()


def routing_weights(scores: torch.Tensor, indices: torch.Tensor, route_scale: float) -> torch.Tensor:
    """w = s[idx] / sum s[idx] * route_scale: the unbiased scores of the chosen experts. [T, K] fp32."""
    chosen = scores.gather(1, indices)  # [T, K]
    return chosen / (chosen.sum(-1, keepdim=True) + 1e-20) * route_scale


def topk_routing(logits: torch.Tensor, bias: torch.Tensor, k: int,
                 route_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Learned routing from fp32 logits [T, E]: (weights [T, K] fp32, indices [T, K] long,
    scores [T, E] fp32). The bias only decides which experts are chosen, never how much they
    weigh. Triton (one kernel each way): ``kernels/moe_router.py``."""
    scores = F.softplus(logits).sqrt()
    indices = torch.topk(scores.detach() + bias, k, dim=-1).indices
    return routing_weights(scores, indices, route_scale), indices, scores


get_topk_routing = dispatcher("topk_routing", topk_routing)


def permute_tokens(x: torch.Tensor, order: torch.Tensor, k: int, handles: int = 1,
                   weights: torch.Tensor | None = None, passthrough: bool = False):
    """Rows of x [T, D] in expert-sorted order: row n is token order[n] // k ((token, slot) pairs
    flattened token-major, ``order`` = their stable sort by expert). -> [T*k, D].
    ``handles=2``: a pair of handles on the same rows, one per consumer (the experts' W1 and W3
    GEMMs). Here both are the one tensor, so autograd adds their [T*k, D] gradients; the Triton
    backward sums both inside its gather instead (no such add: it was 13 ms of a 131K-token step).
    ``passthrough``: x itself follows the row handles (the shared expert's input: on the Triton
    path its gradient joins the permute's backward sum instead of a [T, D] add).
    ``weights`` [T, k] (the routing weights): also returned in the same order, [T*k], as the
    last element (Triton: in the same launches, forward and backward).
    Triton: ``kernels/moe_permute.py`` (backward without atomics)."""
    if handles not in (1, 2):
        raise ValueError(f"permute_tokens: handles must be 1 or 2, got {handles}")
    xs = x.index_select(0, order // k)
    outs = (xs,) * handles + ((x,) if passthrough else ())
    if weights is not None:
        outs += (weights.reshape(-1).index_select(0, order),)
    return outs[0] if len(outs) == 1 else outs


get_permute_tokens = dispatcher("permute_tokens", permute_tokens)


def unpermute_tokens(out: torch.Tensor, order: torch.Tensor, k: int, n_tokens: int,
                     add: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of ``permute_tokens`` with the sum over each token's k rows: out [T*k, D] ->
    y [T, D] fp32 (fp64 for fp64). A gather of each token's k rows summed in fp32: autograd keeps
    only the index (an index_add_ of out.float() kept an fp32 copy of every expert row).
    ``add`` [T, D] (the shared expert's output): y + add, summed in fp32 after the k rows and
    returned in add's dtype, the same numbers as adding it to the fp32 y and casting, without the
    mixed-dtype add and the two casts (forward and backward) around it.
    Triton: ``kernels/moe_permute.py`` (the same gather-sum)."""
    slot = torch.empty_like(order)
    slot[order] = torch.arange(order.numel(), device=order.device)     # row of pair (t, j) = t*k + j
    rows = out.index_select(0, slot).view(n_tokens, k, out.shape[-1])
    y = rows.sum(1, dtype=torch.promote_types(out.dtype, torch.float32))
    return y if add is None else (y + add).to(add.dtype)


get_unpermute_tokens = dispatcher("unpermute_tokens", unpermute_tokens)


def hash_routing_table(vocab_size: int, n_experts: int, k: int, seed: int) -> torch.Tensor:
    """Deterministic token -> K distinct experts table [vocab_size, k] (long), balanced over the vocab.

    DeepSeek did not publish how their table is built; ours: lay the vocab_size * k slots out in
    token order and fill them round after round with a fresh random permutation of the experts
    (torch.Generator seeded with ``seed``). Every expert appears exactly once per round, so
    per-expert counts differ by at most one. A token whose k slots straddle two rounds gets
    the head of the next round re-ordered (first candidates not already used by that token),
    which keeps its experts distinct.
    """
    if not 1 <= k <= n_experts:
        raise ValueError(f"hash_routing_table: need 1 <= k ({k}) <= n_experts ({n_experts})")
    if vocab_size < 1:
        raise ValueError(f"hash_routing_table: vocab_size must be >= 1, got {vocab_size}")
    total = vocab_size * k
    n_rounds = -(-total // n_experts)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # explicit CPU device: the table must be real even when the model is built under a
    # `torch.device("meta")` context (parameter accounting of flash/pro)
    perms = torch.rand(n_rounds, n_experts, generator=gen, device="cpu").argsort(dim=1).tolist()
    flat: list[int] = []
    for perm in perms:
        filled = len(flat) % k  # slots of the current token already filled by the last round
        if filled:
            used = set(flat[-filled:])
            head = [e for e in perm if e not in used][: k - filled]
            head_set = set(head)
            perm = head + [e for e in perm if e not in head_set]
        flat.extend(perm)
    return torch.tensor(flat[:total], dtype=torch.long, device="cpu").view(vocab_size, k)


def hash_seed_for_layer(hash_seed: int, layer_idx: int) -> int:
    """Seed of one hash layer's table: distinct per (hash_seed, layer) for layer < 2**20."""
    return int(hash_seed) * (1 << 20) + int(layer_idx)


def expert_counts(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens per expert [E] (long) of a flat index tensor. Not torch.bincount: its output size
    depends on the values, so on CUDA it reads max() back to the host (a sync per call)."""
    counts = torch.zeros(n_experts, device=experts.device, dtype=torch.long)
    return counts.scatter_add_(0, experts, torch.ones_like(experts))


def sort_by_expert(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """order [N] (long): the stable sort of a flat expert index tensor [N], i.e.
    ``torch.argsort(experts, stable=True)``, with the keys narrowed to the fewest bytes that hold
    n_experts (uint8 up to 256 experts, int16 up to 32768): CUDA's radix sort makes one pass per
    key byte (CUB onesweep: 8 over int64 keys, 10 kernels per sort in the H200 trace), and a stable
    sort orders equal keys the same whatever their width."""
    if n_experts <= 256:
        experts = experts.to(torch.uint8)
    elif n_experts <= 32768:
        experts = experts.to(torch.int16)
    return torch.argsort(experts, stable=True)


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max load - mean load) / mean load over experts (0 = perfectly balanced).

    load [E] or [..., E] token counts; returns a tensor over the leading dims (nan if no tokens).
    """
    load = load.float()
    mean = load.mean(-1)
    return (load.amax(-1) - mean) / mean


def row_expert_counts(indices: torch.Tensor, n_experts: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """indices [B, L, K] -> [B, E] (fp32, exact integers): tokens of each row (sequence) routed to
    each expert. A scatter of the scalar 1 (no tensor of ones to fill first)."""
    B, L, K = indices.shape
    counts = torch.zeros(B, n_experts, device=indices.device, dtype=dtype)
    return counts.scatter_(1, indices.reshape(B, L * K), 1, reduce="add")


def sequence_balance_loss(
    scores: torch.Tensor, indices: torch.Tensor, n_experts: int, alpha: float,
    sequence: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """Sequence-wise balance loss, one sequence per batch row, averaged over rows.

    scores [B, L, E] (unbiased s), indices [B, L, K] (the experts actually used).
    L_b = alpha * sum_i f_i P_i,  f_i = E / (K L) * #{t : i in idx_t},  P_i = mean_t s_ti / sum_j s_tj.
    f is a count (no gradient); P carries the gradient into the router.
    ``sequence = (counts [B, E], length)``: the rows are one chunk of longer sequences with these
    whole-sequence expert counts (``model/chunked_step.py``); returns the chunk's share of the
    loss (P summed over the chunk, divided by the whole length), whose gradient w.r.t. a token's
    probabilities is the unchunked one, alpha * f_i / (length * B).
    """
    B, L, K = indices.shape
    share = scores / scores.sum(-1, keepdim=True)  # [B, L, E]
    if sequence is None:
        counts, p = row_expert_counts(indices, n_experts), share.mean(1)
    else:
        counts, L = sequence
        p = share.sum(1) / L
    f = counts.to(p.dtype) * (n_experts / (K * L))  # [B, E]
    return alpha * (f * p).sum(-1).mean()


class _BalanceLoss(torch.autograd.Function):
    """sum_{b,t} r_bt,  r_bt = sum_i c_bi s_bti / S_bt,  S_bt = sum_i s_bti;  c [B, E] carries no
    gradient.  d/ds_bti = (c_bi - r_bt) / S_bt.  Keeps only the [B, L] r and S for backward."""

    @staticmethod
    def forward(ctx, scores, c):
        S = scores.sum(-1)                            # [B, L]
        r = (scores * c[:, None, :]).sum(-1) / S      # [B, L]
        ctx.save_for_backward(c, r, S)
        return r.sum()

    @staticmethod
    def backward(ctx, g):
        c, r, S = ctx.saved_tensors
        # the scalar g folded into the small factors first: 4 launches for the [B, L, E] gradient
        return ((c * g)[:, None, :] - (r * g)[..., None]) / S[..., None], None


def balance_loss_from_counts(scores: torch.Tensor, counts: torch.Tensor, length: int, k: int,
                             alpha: float) -> torch.Tensor:
    """``sequence_balance_loss(scores, indices, E, alpha, (counts, length))`` in ~10 launches instead
    of ~20 (forward and backward together): alpha * sum_i f_i P_i = sum_{b,t,i} c_bi s_bti / S_bt
    with c = alpha * E / (K length^2 B) * counts, folded into one weighted sum per token and a
    hand-written backward. counts [B, E] (any dtype: exact integers) of the rows' whole sequences
    of ``length`` tokens (this chunk's own counts and L when unchunked)."""
    B, _, E = scores.shape
    c = counts.to(scores.dtype) * (alpha * E / (k * length * length * B))   # [B, E]
    return _BalanceLoss.apply(scores, c)


# ---------------------------------------------------------------------------- modules
class Router(nn.Module):
    """Gate: scores, top-k selection (or hash table / supplied indices) and routing weights."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.n_activated_experts
        self.route_scale = cfg.route_scale
        self.is_hash = layer_idx < cfg.n_hash_layers
        self.kernel_impl = cfg.moe_kernel_impl
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        if self.is_hash and self.weight.is_meta:
            # meta build (accounting only): shape without the cost of building the table
            self.register_buffer("tid2eid", torch.empty(cfg.vocab_size, cfg.n_activated_experts, dtype=torch.long))
        elif self.is_hash:
            table = hash_routing_table(cfg.vocab_size, cfg.n_routed_experts, cfg.n_activated_experts,
                                       hash_seed_for_layer(cfg.hash_seed, layer_idx))
            self.register_buffer("tid2eid", table, persistent=True)
        else:
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(
        self,
        x: torch.Tensor,
        input_ids: torch.Tensor | None,
        routing_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, D], input_ids [T] -> (weights [T, K] fp32, indices [T, K] long, scores [T, E] fp32)."""
        logits = router_logits(x, self.weight, self.kernel_impl)  # [T, E] fp32
        if routing_indices is None and not self.is_hash:
            route = get_topk_routing(self.kernel_impl, logits.device, logits.dtype)
            return route(logits, self.bias, self.top_k, self.route_scale)
        scores = F.softplus(logits).sqrt()
        if routing_indices is not None:
            indices = routing_indices
        else:
            if input_ids is None:
                raise ValueError("MoE: input_ids is required for hash-routed layers")
            indices = self.tid2eid[input_ids]
        return routing_weights(scores, indices, self.route_scale), indices, scores


# ---------------------------------------------------------------------------- expert FFN over sorted rows
# The routed experts run on rows already sorted by expert (segment e = rows of expert e).
#   loop:    one SwiGLU per non-empty expert (the reference; 3 GEMMs + ~8 elementwise launches
#            per expert, and a host sync for the segment sizes: launch-bound on GPUs)
#   grouped: torch._grouped_mm over all experts at once (3 grouped GEMMs per layer, no host sync);
#            CPU (any float dtype) and CUDA bf16 (SM >= 90 kernels; SM 80 has them from torch 2.9)
# `moe_impl=auto` picks grouped where supported and logs once where it cannot.
_LOGGED: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        logger.warning(msg)


def grouped_unsupported_reason(x: torch.Tensor, w1: torch.Tensor) -> str | None:
    """Why torch._grouped_mm cannot run the experts on these operands, or None."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"grouped GEMM takes fp32/bf16/fp16 operands, got {x.dtype}"
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16:
            return f"grouped GEMM on CUDA needs bf16 activations, got {x.dtype}"
        if torch.cuda.get_device_capability(x.device) < (8, 0):
            return "grouped GEMM needs a GPU with compute capability >= 8.0"
    elif x.device.type != "cpu":
        return f"no grouped GEMM on device {x.device.type}"
    inter, D = w1.shape[-2:]
    if (inter * x.element_size()) % 16 or (D * x.element_size()) % 16:
        return f"grouped GEMM needs rows of 16-byte multiples (dim {D}, moe_inter_dim {inter})"
    return None


def _grad_contiguous(t: torch.Tensor) -> torch.Tensor:
    # _grouped_mm's backward rejects broadcast (stride-0) gradients, e.g. from a bare .sum()
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def experts_loop(x_sorted: torch.Tensor, counts: list[int], w1, w2, w3, limit: float,
                 w_sorted: torch.Tensor, act=swiglu_activation, x_up: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: x_sorted [N, D] grouped by expert, counts[e] rows each -> [N, D] in x's dtype.
    ``x_up``: the rows for W3 through a second handle (``permute_tokens(..., handles=2)``)."""
    x_up = x_sorted if x_up is None else x_up
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            seg = slice(start, start + n)
            outs.append(swiglu(x_sorted[seg], w1[e], w2[e], w3[e], limit, w_sorted[seg], act, x_up[seg]))
            start += n
    return torch.cat(outs) if outs else x_sorted.new_zeros(0, x_sorted.shape[-1])


def _aligned(w: torch.Tensor) -> torch.Tensor:
    """The grouped GEMM kernels need 16-byte aligned operands. DeepSpeed keeps parameters as views
    into flat buffers (bf16 copies, ZeRO partitions) whose offsets need not be aligned: such a
    weight is copied (differentiably) for this call, which costs one read + write of it."""
    if w.data_ptr() % 16 == 0:
        return w
    _log_once("MoE grouped GEMM: expert weights are not 16-byte aligned in memory (a view into a flat "
              "parameter buffer); they are copied before each grouped GEMM")
    return w.clone()


def experts_grouped(x_sorted: torch.Tensor, counts: torch.Tensor, w1, w2, w3, limit: float,
                    w_sorted: torch.Tensor, act=swiglu_activation, x_up: torch.Tensor | None = None) -> torch.Tensor:
    """The same as ``experts_loop`` with grouped GEMMs; counts [E] (device tensor, no host sync)."""
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    dt = x_sorted.dtype
    w1, w2, w3 = (_aligned(w.to(dt)) for w in (w1, w2, w3))
    gate = _grad_contiguous(torch._grouped_mm(x_sorted, w1.transpose(-2, -1), offs=offs))
    up = _grad_contiguous(torch._grouped_mm(x_sorted if x_up is None else x_up, w3.transpose(-2, -1), offs=offs))
    h = act(gate, up, limit, w_sorted)
    return _grad_contiguous(torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs))


def run_experts(impl: str, x_sorted: torch.Tensor, counts: torch.Tensor, w1, w2, w3,
                limit: float, w_sorted: torch.Tensor, act=swiglu_activation,
                x_up: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch on ``moe_impl`` (auto | grouped | loop). counts: [E] rows per expert; ``act``:
    the SwiGLU activation (reference or Triton, ``model.moe_kernel_impl``); ``x_up``: the rows
    for W3 through a second handle (``permute_tokens(..., handles=2)``), default x_sorted."""
    if x_sorted.shape[0] == 0:   # no rows here (e.g. an idle EP rank): zero output, zero gradients
        touch = sum(w.sum() for w in (w1, w2, w3)).to(x_sorted.dtype) * 0
        return x_sorted.new_zeros(0, w2.shape[-2]) + touch
    if impl != "loop":
        reason = grouped_unsupported_reason(x_sorted, w1)
        if reason is None:
            return experts_grouped(x_sorted, counts, w1, w2, w3, limit, w_sorted, act, x_up)
        if impl == "grouped":
            raise RuntimeError(f"model.moe_impl=grouped: {reason}")
        _log_once(f"MoE experts run as a per-expert loop (moe_impl=auto): {reason}")
    return experts_loop(x_sorted, counts.tolist(), w1, w2, w3, limit, w_sorted, act, x_up)


class RoutedExperts(nn.Module):
    """E clamped-SwiGLU experts as 3-D parameters, dropless dispatch (any load is served)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, D, inter = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        self.n_experts = E
        self.limit = cfg.swiglu_limit
        self.impl = cfg.moe_impl
        self.kernel_impl = cfg.moe_kernel_impl  # router / SwiGLU / permute kernels (model/dispatch.py)
        self.w1 = nn.Parameter(torch.empty(E, inter, D))
        self.w3 = nn.Parameter(torch.empty(E, inter, D))
        self.w2 = nn.Parameter(torch.empty(E, D, inter))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                counts: torch.Tensor | None = None, shared: nn.Module | None = None) -> torch.Tensor:
        """x [T, D], weights [T, K], indices [T, K] -> y [T, D] fp32 (sum over each token's K experts).
        ``counts``: ``expert_counts`` of these indices when the caller has them already (MoE does:
        its load), else counted here. ``shared`` (the shared expert): runs on x through the
        permute's passthrough handle (its input gradient joins the permute's backward sum) and
        its output joins the combine: returns y + shared(x) in x's dtype (``unpermute_tokens``)."""
        T, K = indices.shape
        dev, dt = x.device, x.dtype
        with component("dispatch"):
            flat_expert = indices.reshape(-1)  # [T*K]
            # sort the (token, slot) pairs by expert so each expert sees one contiguous segment
            order = sort_by_expert(flat_expert, self.n_experts)
            if counts is None:
                counts = expert_counts(flat_expert, self.n_experts)
            # [T*K, D] twice: one handle for W1, one for W3, their gradients summed in the permute
            # (x itself for the shared expert,) and the routing weights in the same order, w_sorted [T*K]
            fanned = get_permute_tokens(self.kernel_impl, dev, dt)(x, order, K, 2, weights, shared is not None)
            x_gate, x_up, w_sorted = fanned[0], fanned[1], fanned[-1]
        add = None
        if shared is not None:
            with component("shared"):
                add = shared(fanned[2])   # [T, D] x's dtype
        with component("mlp"):
            out = run_experts(self.impl, x_gate, counts, self.w1, self.w2, self.w3, self.limit, w_sorted,
                              get_swiglu_activation(self.kernel_impl, dev, dt), x_up)
        with component("combine"):
            return get_unpermute_tokens(self.kernel_impl, dev, dt)(out, order, K, T, add)


class SharedExpert(nn.Module):
    """The always-on expert(s): one clamped SwiGLU of width n_shared_experts * moe_inter_dim."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inter = cfg.n_shared_experts * cfg.moe_inter_dim
        self.limit = cfg.swiglu_limit
        self.kernel_impl = cfg.moe_kernel_impl
        self.w1 = nn.Linear(cfg.dim, inter, bias=False)
        self.w2 = nn.Linear(inter, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, inter, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = get_swiglu_activation(self.kernel_impl, x.device, x.dtype)
        return swiglu_gate_up(x, self.w1.weight, self.w2.weight, self.w3.weight, self.limit, act=act)


class MoE(nn.Module):
    """V4 MoE layer. forward(x [B,L,D], input_ids [B,L], routing_indices [B,L,K] | None) -> (y, aux).

    aux = {"balance_loss": scalar (0 on hash layers), "indices": [B,L,K] long, "load": [E] float}.
    In training mode with grad enabled, loads also add up in the buffer ``load_accum`` until
    ``update_bias()``; no-grad passes (e.g. an anticipatory-routing pre-pass) and eval do not count.
    Activation-checkpoint recomputation counts a micro-batch twice, which scales every expert's load
    equally and so changes neither the sign rule of ``update_bias`` nor MaxVio.
    ``gate.bias`` and ``load_accum`` stay fp32 when the module is cast to bf16/fp16.
    """

    _FP32_BUFFERS = ("load_accum", "gate.bias")

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        if layer_idx < 0:
            raise ValueError(f"MoE: layer_idx must be >= 0, got {layer_idx}")
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.n_activated_experts
        self.is_hash = layer_idx < cfg.n_hash_layers
        self.gate = Router(cfg, layer_idx)
        self.experts = RoutedExperts(cfg)
        self.shared = SharedExpert(cfg) if cfg.n_shared_experts > 0 else None
        self.register_buffer("load_accum", torch.zeros(cfg.n_routed_experts, dtype=torch.float32),
                             persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Our init (V4's is unpublished): every matrix N(0, init_std), as HF initialises V4; the
        experts' w2 (the branch's output) at cfg.output_init_std (``scaled_output_init``)."""
        std, out_std = self.cfg.init_std, self.cfg.output_init_std   # w2: the branch's output
        for p, s in ((self.gate.weight, std), (self.experts.w1, std), (self.experts.w2, out_std),
                     (self.experts.w3, std)):
            p.normal_(0.0, s)
        if self.shared is not None:
            for lin, s in ((self.shared.w1, std), (self.shared.w2, out_std), (self.shared.w3, std)):
                lin.weight.normal_(0.0, s)

    # ------------------------------------------------------------------ forward
    def _check_routing_indices(self, ri: torch.Tensor, B: int, L: int) -> torch.Tensor:
        if ri.shape != (B, L, self.top_k):
            raise ValueError(f"MoE: routing_indices must have shape [B, L, K] = {[B, L, self.top_k]}, "
                             f"got {list(ri.shape)}")
        if ri.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"MoE: routing_indices must be an integer tensor, got {ri.dtype}")
        if ri.numel():
            require(((ri >= 0) & (ri < self.n_experts)).all(), f"MoE: routing_indices must lie in [0, {self.n_experts})")
        return ri.long().reshape(B * L, self.top_k)

    def forward(
        self,
        x: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        routing_indices: torch.Tensor | None = None,
        sequence: tuple[torch.Tensor, int] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``sequence``: (whole-sequence expert counts [B, E], length) when x is one chunk of a
        longer sequence (``model/chunked_step.py``): the balance loss is the chunk's share. A
        callable ``sequence(indices [B, L, K]) -> (counts, length)`` gets them from this
        layer's routing (context parallel: the counts of every rank's rows)."""
        if x.dim() != 3 or x.shape[-1] != self.cfg.dim:
            raise ValueError(f"MoE: x must be [B, L, {self.cfg.dim}], got {list(x.shape)}")
        B, L, D = x.shape
        ids = None
        if input_ids is not None:
            if input_ids.shape != (B, L):
                raise ValueError(f"MoE: input_ids must be [B, L] = {[B, L]}, got {list(input_ids.shape)}")
            ids = input_ids.reshape(B * L)
        ri = None if routing_indices is None else self._check_routing_indices(routing_indices, B, L)

        x_flat = x.reshape(B * L, D)  # [T, D]
        with component("router"):
            weights, indices, scores = self.gate(x_flat, ids, ri)  # [T, K], [T, K], [T, E]
            own_rows = None   # [B, E] long: this batch's expert counts per row (the balance loss's f)
            if not self.is_hash and sequence is None:
                own_rows = row_expert_counts(indices.view(B, L, self.top_k), self.n_experts, torch.long)
                counts = own_rows.sum(0)
            else:
                counts = expert_counts(indices.reshape(-1), self.n_experts)  # [E] long: the experts' rows and the load
        with component("experts"):
            # [T, D]: fp32, or routed + shared expert in x's dtype (the shared expert runs inside,
            # on the permute's handle of x; its output is added in fp32 inside the combine)
            y = self.experts(x_flat, weights, indices, counts, shared=self.shared)

        load = counts.float()  # [E]
        if self.training and torch.is_grad_enabled():
            self.load_accum += load
        indices = indices.view(B, L, self.top_k)
        if self.is_hash:
            balance = scores.new_zeros(())
        else:
            if callable(sequence):
                sequence = sequence(indices)
            row_counts, length = (own_rows, L) if sequence is None else sequence
            with component("balance_loss"):   # = sequence_balance_loss (the reference), fewer launches
                balance = balance_loss_from_counts(scores.view(B, L, -1), row_counts, length, self.top_k,
                                                   self.cfg.balance_loss_alpha)
        aux = {"balance_loss": balance, "indices": indices, "load": load}
        return y.to(x.dtype).view(B, L, D), aux

    # ------------------------------------------------------------------ balancing
    @torch.no_grad()
    def update_bias(self, load: torch.Tensor | None = None) -> None:
        """Aux-loss-free balancing: b_i += speed * sign(mean load - load_i), then clear load_accum.

        ``load`` [E] (e.g. the all-reduced ``load_accum``) replaces the local accumulator when given.
        Hash layers have no bias: only the accumulator is cleared.
        """
        if load is None:
            load = self.load_accum
        elif load.shape != (self.n_experts,):
            raise ValueError(f"MoE.update_bias: load must be [{self.n_experts}], got {list(load.shape)}")
        if not self.is_hash:
            load = load.to(device=self.gate.bias.device, dtype=torch.float32)
            self.gate.bias += self.cfg.bias_update_speed * torch.sign(load.mean() - load)
        self.load_accum.zero_()

    def _apply(self, fn, recurse: bool = True):
        # Casting the model to bf16 must not cast the balancing state: bias steps of 1e-3 and
        # token counts above 256 are not representable in bf16. Keep them fp32 (moved, not cast).
        kept = {name: self.get_buffer(name) for name in self._FP32_BUFFERS if self._has_buffer(name)}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self.get_buffer(name)
            if new.dtype in _HALF_DTYPES:
                owner, _, leaf = name.rpartition(".")
                module = self.get_submodule(owner) if owner else self
                module._buffers[leaf] = old.to(device=new.device, dtype=torch.float32)
        return self

    def _has_buffer(self, name: str) -> bool:
        try:
            self.get_buffer(name)
            return True
        except AttributeError:
            return False
