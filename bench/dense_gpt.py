"""The dense peer for throughput: a plain GPT of the small preset's active size (issue 16).

dim 1024, 12 layers, 16 heads, MLP 4x (GELU), pre-LayerNorm, causal SDPA, untied head, no
biases; fp32 parameters under bf16 autocast, fused AdamW, clip 1.0: the usual recipe that a
dense model of this size trains with, i.e. the ceiling for a ~200M-active model on one GPU.

FLOPs per token (training, as train/metrics.py counts for hybridlm): 6 x matmul parameters
(every Linear, the head included, the embedding excluded) + 12 x n_layers x dim x mean keys
attended ((L + 1) / 2 for causal attention).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(dim, bias=False), nn.LayerNorm(dim, bias=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.fc = nn.Linear(dim, 4 * dim, bias=False)
        self.out = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.n_heads, D // self.n_heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class DenseGPT(nn.Module):
    def __init__(self, vocab: int = 50304, dim: int = 1024, n_layers: int = 12, n_heads: int = 16):
        super().__init__()
        self.dim, self.n_layers = dim, n_layers
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([_Block(dim, n_heads) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(dim, bias=False)
        self.head = nn.Linear(dim, vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())

    def matmul_params(self) -> int:
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def flops_per_token(self, seq_len: int) -> float:
        return 6.0 * self.matmul_params() + 12.0 * self.n_layers * self.dim * (seq_len + 1) / 2


class DenseTrainee:
    """The dense model, fused AdamW and one micro-batch of random tokens; ``phases`` for
    bench/timing.py (the whole step as one phase: forward under bf16 autocast, backward, clip,
    AdamW step)."""

    def __init__(self, device, seq: int, micro_batch: int, compiled: bool, sizes: dict | None = None,
                 backend: str = "inductor"):
        dev = torch.device(device)
        torch.manual_seed(0)
        self.model = DenseGPT(**(sizes or {})).to(dev)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                     fused=dev.type == "cuda")
        self.fwd = torch.compile(self.model, backend=backend) if compiled else self.model
        self.ids = torch.randint(0, self.model.embed.num_embeddings, (micro_batch, seq), device=dev)
        self.device_type = dev.type
        self.flops_per_token = self.model.flops_per_token(seq)

    def forward_backward(self, ids: torch.Tensor, compiled: bool | None = None) -> torch.Tensor:
        """Forward under bf16 autocast and backward of ``ids``; ``compiled`` picks the compiled
        or the eager forward of the same weights (default: as constructed)."""
        fwd = self.fwd if compiled is None or compiled else self.model
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            loss = fwd(ids)
        loss.backward()
        return loss.detach()

    def optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.forward_backward(self.ids)
        self.optimizer_step()

    def phases(self):
        return [("all", self.step)]
