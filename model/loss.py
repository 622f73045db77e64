"""LM-head + cross-entropy without [tokens, vocab] logits (main head and MTP).

``linear_cross_entropy(hidden, weight, labels)`` equals ``reference_linear_cross_entropy`` (the
unfused head -> fp32 logits -> F.cross_entropy the model used before) but walks the tokens in
chunks: each chunk's logits exist only while that chunk is processed. When a gradient is needed
the chunk's gradients w.r.t. hidden and head weight are computed right there (the loss is the
end of the graph, so d loss / d logits = (softmax - onehot) / n_valid is known in the forward)
and only they are kept for backward: per token that is one [D] row in the hidden dtype, the
same bytes as saving ``hidden`` itself, plus one [V, D] weight gradient per call in the
weight's dtype, independent of L. Backward only scales them by the incoming gradient.

Why our own function and not a library one (checked against what is installed):
- DeepSpeed 0.19's ``vocab_parallel_linear_cross_entropy`` has the right structure (CPU path,
  ignore_index, grads for hidden and weight) but always forms fp32 logits and sums the per-token
  losses in fp32, so a float64 model loses float64 exactness (the sequence-chunked step is
  tested at 1e-10 in fp64), and it recomputes the logits in backward (4 head GEMMs per token
  instead of 3) while holding an fp32 [tokens, D] hidden-gradient accumulator there.
- DeepSpeed's ``TiledFusedLogitsLoss`` runs backward inside forward on a detached input and
  needs ZeRO's ``ds_grad_is_ready`` flags; it does not compose with our graph or no-grad passes.
- liger-kernel's fused linear cross-entropy is Triton only: no CPU path for tests.
No z-loss: the model has none.

Precision: logits are accumulated in fp32 (fp64 for fp64 inputs); bf16/fp16 GEMMs produce fp32
logits directly where the device has such a GEMM (CUDA), otherwise the product is cast, which is
exactly what the unfused path does. The weight gradient is accumulated over chunks in fp32 (a
transient of this call's forward), then kept for backward in the weight's dtype: for bf16
weights [V, D] x 2 bytes per call instead of x 4 (small: 103 MB instead of 206 MB for each of
the main and MTP predictions). That is one rounding to bf16, as the unfused path's bf16 weight
gradient has (its GEMM accumulates in fp32 and writes bf16), plus the rounding of the product
with the incoming gradient in backward (computed in fp32, written in the weight's dtype).
fp32/fp64 weights keep their fp32/fp64 accumulator: nothing changes for them.
A batch with no valid label gives loss 0 and zero gradients (F.cross_entropy's mean gives NaN).

Per chunk, the softmax, the losses and d loss / d logits are ``chunk_cross_entropy`` (torch: ~9
passes over the fp32 chunk) or, on CUDA, ``kernels/cross_entropy.py`` (two reads of it and one
write of the gradient in the hidden's dtype), chosen by ``kernel_impl`` (model.loss_kernel_impl)
through model/dispatch.py; fp64 always takes the reference.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from model.config import KERNEL_IMPLS, LOSS_IMPLS
from model.dispatch import dispatcher

IGNORE_INDEX = -100
# fp32 logits per chunk ~ 2^28 elements (1 GiB), in whole 128-token tiles: each chunk adds its
# share of the head-weight gradient into an fp32 [V, D] accumulator (read + written per chunk), so
# fewer, longer chunks pay. H200, 2026-12-03 (bench/cross_entropy.py, 16384 x 1024 -> 129280 bf16,
# loss kernel): fwd+bwd 34.8 ms at 519 tokens per chunk (2^26), 28.2 at 1024, 26.6 at 2048 (+1.5 GB
# transient), still small next to a long sequence's activations.
CHUNK_ELEMENTS = 1 << 28
CHUNK_ALIGN = 128


def default_chunk_tokens(vocab_size: int) -> int:
    tokens = max(1, CHUNK_ELEMENTS // vocab_size)
    return tokens - tokens % CHUNK_ALIGN if tokens >= CHUNK_ALIGN else tokens


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@functools.lru_cache(maxsize=None)
def _has_widening_mm(device_type: str) -> bool:
    """Whether the device has bf16/fp16 GEMMs with an fp32 output (aten::mm.dtype); CPU has not."""
    try:
        key = torch._C._dispatch_key_for_device(device_type)
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
                   for op in ("aten::mm.dtype", "aten::addmm.dtype", "aten::addmm.dtype_out"))
    except (AttributeError, RuntimeError):
        return False


def _widening(a: torch.Tensor, acc: torch.dtype) -> bool:
    return a.dtype != acc and a.dtype in (torch.bfloat16, torch.float16) and _has_widening_mm(a.device.type)


def _mm_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """a @ b with an ``acc``-dtype result."""
    if _widening(a, acc):
        return torch.mm(a, b, out_dtype=acc)
    return torch.mm(a, b).to(acc)


def _addmm_acc_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b, ``out`` in the accumulation dtype."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    elif _widening(a, out.dtype):
        torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    else:
        out.add_(torch.mm(a, b))


def chunk_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, inv_count: torch.Tensor,
                        grad_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's cross-entropy from its logits [c, V] (fp32, or fp64; overwritten when a gradient
    is wanted), labels [c] (IGNORE_INDEX: ignored) and inv_count (0-dim: 1 / the labelled tokens
    the mean divides by) -> (nll [c] in the logits' dtype, 0 where ignored; when ``grad_dtype`` is
    given, d (sum(nll) * inv_count) / d logits = (softmax - onehot) * inv_count, 0 on ignored rows,
    in ``grad_dtype``, else None). The reference of ``kernels/cross_entropy.py`` (model/dispatch.py)."""
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, 0).unsqueeze(1)
    lse = torch.logsumexp(logits, dim=1)
    tgt = logits.gather(1, safe).squeeze(1)
    nll = torch.where(valid, lse - tgt, 0.0)
    if grad_dtype is None:
        return nll, None
    # built in place in `logits`: no second [c, V] tensor in the logits' dtype
    scale = (valid.to(logits.dtype) * inv_count).unsqueeze(1)
    g = logits.sub_(lse.unsqueeze(1)).exp_()
    g.scatter_add_(1, safe, torch.full_like(tgt, -1.0).unsqueeze(1))
    return nll, g.mul_(scale).to(grad_dtype)


get_chunk_cross_entropy = dispatcher("chunk_cross_entropy", chunk_cross_entropy)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens: int, want_grad: bool, count: int | None,
                kernel_impl: str):
        # hidden [N, D], weight [V, D], labels [N] -> (mean loss over valid labels, nll [N] detached)
        acc = _acc_dtype(hidden.dtype)
        n_tok = hidden.shape[0]
        # 1 / n_valid (the mean's weight of a labelled token), known before any logit
        n_valid = (labels != IGNORE_INDEX).sum() if count is None else torch.tensor(count, device=hidden.device)
        inv_count = 1.0 / n_valid.clamp(min=1).to(acc)
        nll = torch.zeros(n_tok, dtype=acc, device=hidden.device)
        need_h, need_w = want_grad and ctx.needs_input_grad[0], want_grad and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_dtype = hidden.dtype if need_h or need_w else None
        # the per-chunk loss + d loss / d logits: Triton on CUDA (kernels/cross_entropy.py) or
        # chunk_cross_entropy above, by kernel_impl (model/dispatch.py)
        chunk_ce = get_chunk_cross_entropy(kernel_impl, hidden.device, hidden.dtype)
        w_t = weight.t()
        for s in range(0, n_tok, chunk_tokens):
            e = min(s + chunk_tokens, n_tok)
            h = hidden[s:e]
            logits = _mm_acc(h, w_t, acc)                         # [c, V], the only [*, V] tensor
            nll_chunk, g = chunk_ce(logits, labels[s:e], inv_count, grad_dtype)
            nll[s:e] = nll_chunk
            del logits   # a narrower g is a copy: the fp32 chunk is freed before the next one
            if grad_h is not None:
                grad_h[s:e] = g @ weight
            if grad_w is not None:
                _addmm_acc_(grad_w, g.t(), h)
        loss = nll.sum() * inv_count
        if grad_w is not None:   # kept in the weight's dtype (the fp32 accumulator dies here)
            grad_w = grad_w.to(weight.dtype)
        ctx.mark_non_differentiable(nll)
        # saved through save_for_backward (not ctx attributes) so saved-tensor hooks see them
        ctx.save_for_backward(grad_h, grad_w)
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll):
        grad_h, grad_w = ctx.saved_tensors
        # times the 0-dim fp32 (fp64) incoming gradient: computed in fp32, written in the tensor's
        # dtype, so a weight like mtp_loss_weight = 0.3 is not first rounded to bf16
        if grad_h is not None:
            grad_h = grad_h * grad_loss
        if grad_w is not None:
            grad_w = grad_w * grad_loss
        return grad_h, grad_w, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_tokens: int | None = None, return_nll: bool = False, count: int | None = None,
                         kernel_impl: str = "auto"):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels`` (IGNORE_INDEX skipped)
    without [tokens, vocab] logits. hidden [..., D], weight [V, D], labels [...].
    ``return_nll`` also returns the per-token losses [...] (0 at ignored positions, no grad).
    ``count``: the sum is divided by this many labelled tokens instead of those in ``labels``
    (one chunk's share of a longer sequence's mean, ``model/chunked_step.py``).
    ``kernel_impl`` (auto | triton | torch): each chunk's softmax / loss / gradient by
    ``kernels/cross_entropy.py`` or ``chunk_cross_entropy`` (model/dispatch.py's rules)."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and labels "
                         f"{tuple(labels.shape)} must share the leading dimensions")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"linear_cross_entropy: weight must be [vocab, {hidden.shape[-1]}], "
                         f"got {tuple(weight.shape)}")
    chunk = default_chunk_tokens(weight.shape[0]) if chunk_tokens is None else int(chunk_tokens)
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden is {hidden.dtype} but the head weight is "
                         f"{weight.dtype}; run the model in one dtype")
    if kernel_impl not in KERNEL_IMPLS:
        raise ValueError(f"linear_cross_entropy: kernel_impl must be one of {KERNEL_IMPLS}, got {kernel_impl!r}")
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss, nll = _ChunkedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), chunk, want_grad, count,
        kernel_impl)
    return (loss, nll.view(labels.shape)) if return_nll else loss


def reference_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                   labels: torch.Tensor, return_nll: bool = False, count: int | None = None):
    """The unfused path: full logits, cast to fp32 (fp64 stays fp64), F.cross_entropy."""
    logits = F.linear(hidden, weight)
    logits = logits.to(_acc_dtype(logits.dtype)).flatten(0, -2)
    flat = labels.reshape(-1)
    nll = F.cross_entropy(logits, flat, ignore_index=IGNORE_INDEX, reduction="none")
    n_valid = (flat != IGNORE_INDEX).sum() if count is None else torch.tensor(count, device=flat.device)
    loss = nll.sum() / n_valid.clamp(min=1)
    return (loss, nll.detach().view(labels.shape)) if return_nll else loss


class LMHead(nn.Linear):
    """The LM head (weight [V, D], no bias). ``head(hidden)`` -> logits; ``head(hidden, labels)``
    -> the mean cross-entropy without logits (``impl``: chunked | reference; ``kernel_impl``:
    the chunked path's per-chunk kernel, auto | triton | torch). The loss goes through the
    module's forward so that hooks on it see the weight in use (ZeRO-3 gathers a partitioned
    weight in the owning module's pre-forward hook)."""

    def __init__(self, dim: int, vocab_size: int, impl: str = "chunked", kernel_impl: str = "auto"):
        super().__init__(dim, vocab_size, bias=False)
        if impl not in LOSS_IMPLS:
            raise ValueError(f"LMHead: impl must be one of {LOSS_IMPLS}, got {impl!r}")
        if kernel_impl not in KERNEL_IMPLS:
            raise ValueError(f"LMHead: kernel_impl must be one of {KERNEL_IMPLS}, got {kernel_impl!r}")
        self.impl = impl
        self.kernel_impl = kernel_impl

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None,
                count: int | None = None, *, return_nll: bool = False,
                chunk_tokens: int | None = None):
        """``return_nll``: (loss, per-token NLL [...] without grad), as ``linear_cross_entropy``;
        ``chunk_tokens``: tokens per logits chunk (chunked impl; default: ~256 MiB of logits)."""
        if labels is None:
            return F.linear(hidden, self.weight)                              # [..., V]
        if self.impl == "reference":
            return reference_linear_cross_entropy(hidden, self.weight, labels, return_nll=return_nll, count=count)
        return linear_cross_entropy(hidden, self.weight, labels, chunk_tokens, return_nll=return_nll, count=count,
                                    kernel_impl=self.kernel_impl)
