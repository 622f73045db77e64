"""The model's accounting, from its config and its parameters: parameter counts, training FLOPs
per token (the MFU metric's) and KV-cache bytes per token. The layer schedule they walk is
``ModelConfig.attention_ratios`` (main stack, then the MTP blocks).

Parameters: total and per-token active. Active = every parameter whose matmul a token pays
for: all dense weights, the head, the shared experts and n_activated_experts of the routed
experts in each MoE layer. The input embedding is a table lookup, not compute, and is not
counted as active (this is the reading under which our flash/pro counts land on DeepSeek's
13B/49B; counting it adds 0.5B/0.9B).
The MTP module is reported separately: DeepSeek's headline totals (284B Flash, 1.6T Pro)
exclude it, as V3's 671B did.

FLOP model (training FLOPs per token, forward + backward = 3 x forward):

    6 * N_matmul  +  sum over attention layers of 12 * H * d_head * A(layer)  +  indexers

* ``N_matmul``: parameters a token multiplies with: all dense weights, shared experts and
  ``n_activated_experts`` of the routed experts, the head once per prediction (main + each MTP
  depth), the MTP blocks; the embedding table is a lookup and does not count.
* ``A(layer)``: keys a query attends, averaged over the positions t = 0 .. L-1 of a row:
  window ``min(window, t+1)`` plus compressed entries ``(t+1) // m`` (HCA, and CSA when
  dense) or ``min(top_k, (t+1) // m)`` (CSA when sparse). Each key costs 2 FLOPs per channel
  for q.k and 2 for p.v, per head: 4 H d forward, 12 H d with backward. Packed documents attend
  less than this (per-document masking is not subtracted): it is an upper bound.
* CSA indexer: scoring ``(t+1) // m`` entries with ``index_n_heads x index_head_dim``, 2 FLOPs
  each, x 3 for training.
Compressors, RoPE, norms, softmax and mHC mixing are not counted (they are O(L D), small).

KV-cache bytes per token (bf16, amortised over a context of N tokens; the main stack, as
inference keeps it):
  * ours: per layer, compressed entries (head_dim / m per token; CSA layers also keep the
    indexer's keys, index_head_dim / m) plus the fixed window cache spread over N;
  * baseline: dense MQA with one K and one V head of head_dim per layer (2 x head_dim per token).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.nn as nn

from model.config import ModelConfig

KV_BYTES = 2  # bf16


@dataclass
class ParamCount:
    total: int           # main model, MTP excluded
    active: int          # per token, main model, MTP excluded
    mtp: int             # MTP modules (total)
    embedding: int       # embedding + head
    routed_experts: int  # all routed expert weights of the main model

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def count_params(model: nn.Module) -> ParamCount:
    cfg = model.cfg
    total = mtp = emb = routed = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("mtp."):
            mtp += n
            continue
        total += n
        if name in ("embed.weight", "head.weight"):
            emb += n
        if ".ffn.experts." in name:
            routed += n
    inactive = routed * (cfg.n_routed_experts - cfg.n_activated_experts) // cfg.n_routed_experts
    inactive += model.embed.weight.numel()
    return ParamCount(total=total, active=total - inactive, mtp=mtp, embedding=emb, routed_experts=routed)


# ----------------------------------------------------------------------------- FLOPs per token
def matmul_params(model: nn.Module) -> int:
    """Parameters multiplied per token in training (see the module docstring)."""
    cfg = model.cfg
    frac_active = cfg.n_activated_experts / cfg.n_routed_experts
    n = 0.0
    for name, p in model.named_parameters():
        if name == "embed.weight":
            continue
        if name == "head.weight":
            n += p.numel() * (1 + cfg.mtp_depth)
        elif ".ffn.experts." in name:   # an expert-parallel slice stands for ep_size slices
            n += p.numel() * getattr(p, "ep_size", 1) * frac_active
        else:
            n += p.numel()
    return int(n)


def _mean_attended(seq_len: int, window: int, ratio: int, topk: int | None) -> float:
    """Mean over t in [0, L) of the keys query t attends (window + compressed entries)."""
    t1 = np.arange(1, seq_len + 1, dtype=np.int64)          # t + 1
    keys = np.minimum(window, t1)
    if ratio:
        entries = t1 // ratio
        keys = keys + (np.minimum(topk, entries) if topk is not None else entries)
    return float(keys.sum()) / seq_len


def _mean_entries(seq_len: int, ratio: int) -> float:
    return float((np.arange(1, seq_len + 1, dtype=np.int64) // ratio).sum()) / seq_len


def flops_per_token(model: nn.Module, seq_len: int, attention_mode: str) -> float:
    """Training FLOPs per token of ``model`` on rows of ``seq_len`` in ``attention_mode``."""
    cfg = model.cfg
    attn = idx = 0.0
    for r in cfg.attention_ratios:
        sparse_csa = r == cfg.csa_ratio and attention_mode == "sparse"
        a = _mean_attended(seq_len, cfg.window, r, cfg.index_topk if sparse_csa else None)
        attn += 12.0 * cfg.n_heads * cfg.head_dim * a
        if r == cfg.csa_ratio:
            idx += 6.0 * cfg.index_n_heads * cfg.index_head_dim * _mean_entries(seq_len, r)
    return 6.0 * matmul_params(model) + attn + idx


# ----------------------------------------------------------------------------- KV cache
def kv_bytes_per_token(cfg: ModelConfig, context: int) -> tuple[float, float]:
    """(ours, dense MQA baseline) bytes per token at ``context`` tokens."""
    ours = 0.0
    for r in cfg.compress_ratios:
        ours += cfg.window * cfg.head_dim * KV_BYTES / context
        if r:
            ours += cfg.head_dim * KV_BYTES / r
            if cfg.is_csa(r):
                ours += cfg.index_head_dim * KV_BYTES / r
    baseline = cfg.n_layers * 2 * cfg.head_dim * KV_BYTES
    return ours, baseline
