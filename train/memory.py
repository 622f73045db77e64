"""Training memory per rank, estimated from the config (parameters counted on the meta device):
weights, gradients, optimizer state (ZeRO-partitioned) and the activations of one micro-batch.

Bytes per parameter (the ZeRO paper's accounting, with V4's optimizer split):
  * fp32: weights 4, gradients 4, state: AdamW 8 (two moments), Muon 4 (momentum);
  * bf16 (DeepSpeed's bf16 optimizer): weights 2, gradients 2, state: fp32 master 4 + fp32
    gradient 4 + the moments above.
  ZeRO-1 partitions the state over the data-parallel ranks, ZeRO-2 the gradients too, ZeRO-3
  the weights too; offload moves the state (and with ZeRO-3 the weights) to host memory.
  Routed experts are split over ``ep_size`` ranks first.
Activations (saved for backward, per micro-batch of T tokens), per layer and token in elements:
  mHC 12 n D + 4 x Sinkhorn iterations x n^2 (two sites), attention 4 H d + 2 q_lora + 2 g r_o
  + 4 D, MoE k (7 I + D) + s 6 I + 2 E, and with the PyTorch reference attention (CPU, or
  ``attention_impl=torch``, which masks a dense score matrix) scores, probabilities and mask
  2.5 H (L + L/m + 1) plus the indexer's 2 H_idx L on CSA layers (the Triton path keeps none);
  the head: ``head_bytes``. Activation checkpointing keeps each block's input (n D); one
  block's activations live during its recomputation (``activation_bytes``).
  ``tests/train/test_memory.py`` checks the estimate against the bytes autograd really saves.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from model.config import ModelConfig

GIB = 2**30


@dataclass(frozen=True)
class ParamSplit:
    adamw: int      # parameters AdamW trains (embedding, head, norms, mHC biases, ...)
    muon: int       # matrices Muon trains, routed experts excluded
    experts: int    # routed expert stacks (Muon; split over expert-parallel ranks)


@functools.lru_cache(maxsize=8)
def _split(cfg_json: str, all_adamw: bool) -> ParamSplit:
    from model.transformer import build_on_meta
    from optim.groups import assign_groups

    model = build_on_meta(ModelConfig.from_dict(json.loads(cfg_json)))
    kinds = assign_groups(model.named_parameters())
    counts = {"adamw": 0, "muon": 0, "experts": 0}
    for name, p in model.named_parameters():
        if name not in kinds:
            continue
        if ".ffn.experts." in name:
            counts["experts"] += p.numel()
        else:
            counts["adamw" if all_adamw or kinds[name] == "adamw" else "muon"] += p.numel()
    return ParamSplit(**counts)


def param_split(cfg: ModelConfig, optimizer: str = "muon") -> ParamSplit:
    """Trainable parameters by optimizer (built once per config on the meta device)."""
    return _split(json.dumps(cfg.to_dict(), sort_keys=True), optimizer == "adamw")


@dataclass(frozen=True)
class Setup:
    """The settings memory depends on (what the trainer would run)."""
    tokens: int                      # tokens per micro-batch per rank (micro batch x seq_len)
    seq_len: int
    precision: str = "fp32"          # fp32 | bf16
    optimizer: str = "muon"          # muon | adamw
    zero_stage: int = 0
    world_size: int = 1
    ep_size: int = 1
    activation_checkpointing: bool = False
    offload_optimizer: bool = False
    offload_param: bool = False
    reference_attention: bool = True  # the PyTorch attention (probabilities saved for backward)


@dataclass(frozen=True)
class Estimate:
    weights: float
    grads: float
    optimizer: float
    activations: float
    host: float                      # offloaded to host memory (not in the device total)

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def describe(self) -> str:
        return (f"{self.total / GIB:,.1f} GiB = weights {self.weights / GIB:,.1f} + gradients "
                f"{self.grads / GIB:,.1f} + optimizer state {self.optimizer / GIB:,.1f} + "
                f"activations {self.activations / GIB:,.1f}")


def _layer_elements(cfg: ModelConfig, ratio: int, s: Setup) -> float:
    """Elements saved for backward per token in one block (see the module docstring)."""
    n_hc = cfg.n_streams
    n = 12 * n_hc * cfg.dim + 4 * cfg.hc_sinkhorn_iters * n_hc * n_hc
    n += 4 * cfg.n_heads * cfg.head_dim + 2 * cfg.q_lora_rank + 2 * cfg.o_groups * cfg.o_lora_rank
    n += 4 * cfg.dim
    n += cfg.n_activated_experts * (7 * cfg.moe_inter_dim + cfg.dim)
    n += cfg.n_shared_experts * 6 * cfg.moe_inter_dim + 2 * cfg.n_routed_experts
    if s.reference_attention:   # scores and probabilities over every key, masked afterwards
        entries = s.seq_len // ratio if ratio else 0
        n += 2.5 * cfg.n_heads * (s.seq_len + entries + 1)
        if ratio and cfg.is_csa(ratio):
            n += 2 * cfg.index_n_heads * s.seq_len
    return n


def estimate(cfg: ModelConfig, s: Setup) -> Estimate:
    split = param_split(cfg, s.optimizer)
    dp = max(s.world_size, 1)
    wb, gb = (2, 2) if s.precision == "bf16" else (4, 4)
    extra = 8 if s.precision == "bf16" else 0          # fp32 master weights + fp32 gradients

    def per_param(count: float, state: int, ranks: int) -> tuple[float, float, float]:
        w = count * wb / (ranks if s.zero_stage >= 3 else 1)
        g = count * gb / (ranks if s.zero_stage >= 2 else 1)
        o = count * (state + extra) / (ranks if s.zero_stage >= 1 else 1)
        return w, g, o

    experts = split.experts / max(s.ep_size, 1)
    parts = [per_param(split.adamw, 8, dp),
             per_param(split.muon, 8 if s.optimizer == "adamw" else 4, dp),
             per_param(experts, 8 if s.optimizer == "adamw" else 4, max(dp // max(s.ep_size, 1), 1))]
    weights, grads, optim = (sum(p[i] for p in parts) for i in range(3))
    host = 0.0
    if s.offload_optimizer:
        host, optim = host + optim, 0.0
    if s.offload_param and s.zero_stage == 3:
        host, weights = host + weights, 0.0

    saved, transient = activation_bytes(cfg, s)
    return Estimate(weights=weights, grads=grads, optimizer=optim,
                    activations=saved + transient, host=host)


def activation_bytes(cfg: ModelConfig, s: Setup) -> tuple[float, float]:
    """(saved for backward, alive only while computed) for one micro-batch of ``s.tokens``:
    with activation checkpointing the blocks save their inputs and one block's activations
    live during its recomputation."""
    ab = 2 if s.precision == "bf16" else 4
    ratios = cfg.attention_ratios
    layers = [_layer_elements(cfg, r, s) * ab * s.tokens for r in ratios]
    stream = cfg.n_streams * cfg.dim * ab * s.tokens        # one block's input (the mHC streams)
    head_saved, head_transient = head_bytes(cfg, s.tokens, ab)
    if s.activation_checkpointing:
        return (len(ratios) + 1) * stream + head_saved, max(layers) + head_transient
    return sum(layers) + stream + head_saved, head_transient


def head_bytes(cfg: ModelConfig, tokens: int, weight_bytes: int = 4) -> tuple[float, float]:
    """(saved for backward, alive only while computed) by the LM head and its loss, main + MTP
    predictions. Reference loss: the fp32 logits of each prediction are saved, one logits
    gradient lives during backward. Chunked (fused) loss: no logits are kept; each prediction
    keeps a head-weight gradient in the weight's dtype (``weight_bytes``), and while one is
    computed its fp32 accumulator and one chunk's logits and their gradient live (model/loss.py)."""
    from model.loss import default_chunk_tokens

    preds, v = 1 + cfg.mtp_depth, cfg.vocab_size
    if cfg.loss_impl == "reference":
        return preds * tokens * v * 4.0, tokens * v * 4.0
    return (preds * v * cfg.dim * float(weight_bytes),
            v * cfg.dim * 4.0 + 2.0 * min(tokens, default_chunk_tokens(v)) * v * 4)

