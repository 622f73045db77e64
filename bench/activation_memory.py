"""Per-token saved-activation bytes of one training forward, by site (CPU is enough: it counts
what autograd keeps for backward, model/saved_memory.py, not allocator peaks).

The model runs in bf16 (parameters and activations, as DeepSpeed's bf16 mode), attention and MoE
through the PyTorch references (on CUDA the Triton kernels keep different internals). Sites: the
main blocks by kind (window / CSA / HCA, per layer), the MTP block(s), and the rest (embedding,
head, hyper-connection head mix, losses). Variants: the loss path (chunked | reference with the
logits held, as before), the dense-mode indexer KL (chunked | full [L, N] matrix, as before),
activation checkpointing on or off, CSA in dense or sparse mode.

    python bench/activation_memory.py --preset small --seq 1024 [--out bench/results/x.md]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model.attention as attention_mod  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.indexer import indexer_kl_loss, indexer_scores  # noqa: E402
from model.saved_memory import SavedTensorMeter  # noqa: E402
from model.transformer import Block, MTPModule, Transformer  # noqa: E402

CHUNKED_KL = attention_mod.indexer_kl_loss_dense


def full_matrix_kl(q_i, w_i, k_i, q, ckv, lse, scale, c_end, doc_start):
    """The dense indexer loss as it was: [B, L, N] scores with their graph, then the KL."""
    scores = indexer_scores(q_i, w_i, k_i, c_end, doc_start)
    return indexer_kl_loss(q, ckv, lse, scale, scores, c_end, doc_start)


class SiteTracker:
    """Names the site saving a tensor: the innermost main block / MTP module running (forward
    hooks), or the one a checkpoint call is about to run (its inputs are saved before it runs)."""

    def __init__(self, model: Transformer):
        self.names = {}
        for i, blk in enumerate(model.layers):
            self.names[id(blk)] = f"layer {model.cfg.layer_kind(i)}"
        for mod in model.mtp:
            self.names[id(mod)] = "mtp"
            self.names[id(mod.block)] = "mtp"
        self.stack: list[str] = []
        for m in list(model.layers) + list(model.mtp):
            m.register_forward_pre_hook(self._enter)
            m.register_forward_hook(self._leave)

    def _enter(self, mod, args) -> None:
        self.stack.append(self.names[id(mod)])

    def _leave(self, mod, args, out) -> None:
        self.stack.pop()

    def __call__(self) -> str:
        return self.stack[-1] if self.stack else "embed + head + losses"

    def wrap_checkpoint(self, checkpoint):
        def wrapped(fn, *args, **kw):
            site = next((self.names[id(a)] for a in (fn, *args) if id(a) in self.names), None)
            if site is not None:
                self.stack.append(site)
            try:
                return checkpoint(fn, *args, **kw)
            finally:
                if site is not None:
                    self.stack.pop()
        return wrapped


def measure(cfg: ModelConfig, seq: int, *, loss: str, kl: str, checkpointing: bool, seed: int = 0):
    import model.transformer as tmod

    torch.manual_seed(seed)
    cfg = ModelConfig.from_dict({**cfg.to_dict(), "loss_impl": loss})
    model = Transformer(cfg).to(torch.bfloat16).train()
    model.activation_checkpointing = checkpointing
    attention_mod.indexer_kl_loss_dense = CHUNKED_KL if kl == "chunked" else full_matrix_kl
    tracker = SiteTracker(model)
    saved_ckpt = tmod.checkpoint
    tmod.checkpoint = tracker.wrap_checkpoint(saved_ckpt)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (1, seq + 1), generator=g)
    doc_ids = torch.zeros(1, seq, dtype=torch.long)
    doc_ids[:, seq // 3:] = 1                         # two packed documents
    try:
        t0 = time.perf_counter()
        with SavedTensorMeter(exclude=model.parameters(), site=tracker) as meter:
            out = model(ids[:, :-1], doc_ids=doc_ids, labels=ids[:, 1:],
                        return_logits=(loss == "reference"))   # as before: logits always held
            held = 0 if out.logits is None else out.logits.untyped_storage().nbytes()
        fwd_s = time.perf_counter() - t0
        sites, dtypes = meter.by_site(), meter.by_dtype()   # before backward frees the graph
        # the chunked loss keeps one fp32 [V, D] weight-gradient accumulator per head call:
        # fixed bytes, whatever L (reported apart, not per token)
        static = (1 + cfg.mtp_depth) * cfg.vocab_size * cfg.dim * 4 if loss == "chunked" else 0
        rest = "embed + head + losses"
        sites[rest] = sites.get(rest, 0) + held - static
        total = meter.live_bytes + held - static
        out.loss.backward()
    finally:
        tmod.checkpoint = saved_ckpt
        attention_mod.indexer_kl_loss_dense = CHUNKED_KL
    per_layer = defaultdict(int)
    counts = defaultdict(int)
    for i in range(cfg.n_layers):
        counts[f"layer {cfg.layer_kind(i)}"] += 1
    for k, v in sites.items():
        per_layer[k] = v / counts.get(k, 1)
    return {"total": total / seq, "sites": {k: v / seq for k, v in per_layer.items()},
            "fp32": (dtypes.get("float32", 0) - static) / seq, "static": static,
            "fwd_s": fwd_s}


VARIANTS = [
    # name, loss, kl, checkpointing
    ("full logits + [L,N] KL (before)", "reference", "full", False),
    ("chunked loss", "chunked", "full", False),
    ("chunked loss + chunked KL", "chunked", "chunked", False),
    ("full logits + [L,N] KL, ckpt (before)", "reference", "full", True),
    ("chunked loss + chunked KL, ckpt", "chunked", "chunked", True),
]
SITES = ["layer window", "layer csa", "layer hca", "mtp", "embed + head + losses"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--modes", default="dense", help="CSA modes to measure (dense,sparse)")
    ap.add_argument("--variants", default="", help="comma-separated indices into VARIANTS (default all)")
    ap.add_argument("--out", default="", help="write the markdown table here as well")
    ap.add_argument("--commit", default="", help="label for the code measured (default: git HEAD)")
    args = ap.parse_args()
    picks = [VARIANTS[int(i)] for i in args.variants.split(",")] if args.variants else VARIANTS
    commit = args.commit
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "?"
        except OSError:
            commit = "?"
    lines = [f"# Saved activations per token: {args.preset}, L = {args.seq}, bf16, batch 1, two packed documents",
             "",
             f"{datetime.date.today()} · {platform.processor() or platform.machine()} CPU · torch {torch.__version__}"
             f" · commit {commit} · `python bench/activation_memory.py --preset {args.preset} --seq {args.seq}`",
             "",
             "kB per token held for backward at the end of the forward (storage-deduplicated, parameters "
             "excluded); layer columns are per layer of that kind; `fp32` = the part of the total in fp32; "
             "`static MB` = held whatever L (the chunked loss's fp32 [V, D] weight-gradient accumulator "
             "per head call), not in the per-token columns.",
             "",
             "| CSA mode | variant | total | " + " | ".join(SITES) + " | fp32 | static MB | fwd s |",
             "|" + "---|" * (len(SITES) + 6)]
    print("\n".join(lines), flush=True)
    for mode in args.modes.split(","):
        cfg = ModelConfig.from_preset(args.preset, attention_mode=mode, attention_impl="torch",
                                      mhc_impl="torch", moe_kernel_impl="torch")
        for name, loss, kl, ckpt in picks:
            if mode == "sparse" and kl == "full" and loss == "chunked":
                continue   # the KL variant only matters in dense mode
            r = measure(cfg, args.seq, loss=loss, kl=kl, checkpointing=ckpt)
            kb = lambda v: f"{v / 1e3:,.1f}"
            row = (f"| {mode} | {name} | {kb(r['total'])} | "
                   + " | ".join(kb(r["sites"].get(s, 0.0)) for s in SITES)
                   + f" | {kb(r['fp32'])} | {r['static'] / 2**20:,.0f} | {r['fwd_s']:.1f} |")
            lines.append(row)
            print(row, flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
