"""Benchmark + check of the sequence-chunked training step (model/chunked_step.py) on one GPU.

1. Check (fp32, Triton kernels on): the chunked step's loss and gradients against the unchunked
   step at --check-len tokens (packed documents crossing the chunk boundaries, unequal chunks),
   sparse and dense attention: max relative gradient error per parameter (fp32 rounding only;
   the exact fp64 equality is a CPU test, tests/model/test_chunked_step.py).
2. Memory and time (bf16, the small preset with max_seq_len raised to 4M): forward + backward of
   one sequence of L tokens, chunked with each of --chunk rows (and unchunked where it fits):
   peak allocated GiB above the model, beside train/memory.py's estimate of it (the
   activations of one chunk + the whole sequence's state, train/seq_chunk.chunked_estimate,
   + the parameter gradients), seconds, tokens/s. L from --lengths (default 16K ... 1M). Also
   the chunk train.seq_chunk=auto would pick for each L on this device.

    python bench/seq_chunk.py --out $OUT        # writes $OUT/seq_chunk.md and prints it
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.attention import fmt_row  # noqa: E402
from model.chunked_step import chunked_forward_backward  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from train.memory import Setup  # noqa: E402
from train.seq_chunk import (AUTO, AUTO_HEADROOM, AUTO_MAX_CHUNK, SeqChunkError, chunked_estimate,  # noqa: E402
                             stage_chunks)


def packed(B, L, vocab, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, L + 1), generator=g)
    doc = torch.zeros(B, L, dtype=torch.long)
    cuts = sorted(torch.randint(1, L, (max(1, L // 3000),), generator=g).tolist())
    for c in cuts:
        doc[:, c:] += 1
    return ids[:, :-1].to(device), ids[:, 1:].to(device), doc.to(device)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def grad_errors(model, ref):
    """(worst per-parameter relative error, its name, relative error of all gradients together)."""
    worst, name, num, den = 0.0, "", 0.0, 0.0
    for n, p in model.named_parameters():
        if n in ref:
            d, r = float((p.grad - ref[n]).norm()), float(ref[n].norm())
            num, den = num + d * d, den + r * r
            if d / max(r, 1e-30) > worst:
                worst, name = d / max(r, 1e-30), n
    return worst, name, (num / max(den, 1e-300)) ** 0.5


def check(preset, L, device, log):
    """Chunked vs unchunked in fp32. On the GPU the two runs round differently, so a near-tie in
    a discrete choice (MoE top-k routing, the indexer's top-k) can flip and move a few parameters'
    gradients by O(1) without any bug; the row with the unchunked run's routing replayed removes
    the MoE flips. Exactness itself is the fp64 CPU test (tests/model/test_chunked_step.py)."""
    rows = []
    for mode in ("sparse", "dense"):
        cfg = ModelConfig.from_preset(preset, attention_mode=mode, max_seq_len=max(L, 4096))
        torch.manual_seed(0)
        model = Transformer(cfg).to(device).train()
        ids, lab, doc = packed(1, L, cfg.vocab_size, device)
        out = model(ids, doc_ids=doc, labels=lab)
        out.loss.backward()
        ref = grads(model)
        routing = [r.detach() for r in out.routing_indices]
        sizes = [L // 3, L // 3 + 7]
        sizes.append(L - sum(sizes))
        for replay in (False, True):
            model.zero_grad(set_to_none=True)
            got = chunked_forward_backward(model, ids, lab, sizes, doc_ids=doc,
                                           routing_indices=routing if replay else None)
            worst, name, overall = grad_errors(model, ref)
            loss_err = abs(float(got.loss) - float(out.loss.detach())) / abs(float(out.loss.detach()))
            rows.append([preset, mode, "replayed" if replay else "own", L, str(sizes), f"{loss_err:.1e}",
                         f"{overall:.1e}", f"{worst:.1e} ({name})"])
            log(fmt_row(rows[-1]))
        model.zero_grad(set_to_none=True)
    return rows


def measure(model, L, chunk, device):
    ids, lab, doc = packed(1, L, model.cfg.vocab_size, device, seed=1)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if chunk:
        chunked_forward_backward(model, ids, lab, chunk, doc_ids=doc)
    else:
        model(ids, doc_ids=doc, labels=lab).loss.backward()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    model.zero_grad(set_to_none=True)
    return peak, dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--preset", default="small")
    ap.add_argument("--check-len", type=int, default=8192)
    ap.add_argument("--chunk", default="16384", help="chunk lengths, comma-separated")
    ap.add_argument("--lengths", default="16384,65536,262144,1048576")
    ap.add_argument("--unchunked-max", type=int, default=65536)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing inside chunks")
    args = ap.parse_args()
    device = torch.device("cuda")
    lines = [f"# sequence-chunked step: {torch.cuda.get_device_name()} , {time.strftime('%Y-%m-%d')}", ""]

    def log(s):
        print(s, flush=True)
        lines.append(s)

    log("## check: chunked vs unchunked, fp32, packed documents, 3 unequal chunks")
    log(fmt_row(["preset", "mode", "MoE routing", "L", "chunks", "loss rel err", "all grads rel err",
                 "worst grad rel err (param)"]))
    log(fmt_row(["---"] * 8))
    check(args.preset, args.check_len, device, log)

    chunks = [int(x) for x in args.chunk.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    cfg = ModelConfig.from_preset(args.preset, max_seq_len=1 << 22)
    setup = Setup(tokens=0, seq_len=0, precision="bf16", reference_attention=False,
                  activation_checkpointing=args.checkpointing)
    free = torch.cuda.mem_get_info()[0]

    class Stage:
        micro_batch = 1

    log("")
    log(f"## train.seq_chunk=auto on this device ({free / 2**30:.1f} GiB free before the model; "
        f"headroom {AUTO_HEADROOM}, at most {AUTO_MAX_CHUNK} rows)")
    for L in lengths:
        Stage.seq_len = L
        try:
            (pick,) = stage_chunks(AUTO, [Stage], cfg, setup=setup, free_bytes=free)
        except SeqChunkError as e:
            pick = f"refused: {e}"
        log(f"- L={L}: chunk {pick or 'off (whole)'}")

    log("")
    log(f"## memory and time: {args.preset}, bf16, batch 1, checkpointing {'on' if args.checkpointing else 'off'}")
    log(fmt_row(["L", "chunk", "peak GiB (above weights)", "estimate GiB", "fwd+bwd s", "tok/s"]))
    log(fmt_row(["---"] * 6))
    torch.manual_seed(0)
    model = Transformer(cfg).to(device).to(torch.bfloat16).train()
    model.activation_checkpointing = args.checkpointing
    measure(model, 4096, 0, device)   # warm-up: Triton compilation
    for L in lengths:
        for chunk in ([0] if L <= args.unchunked_max else []) + [c for c in chunks if L > c]:
            est = chunked_estimate(cfg, setup, L, 1, chunk)
            est_gib = f"{(est.activations + est.grads) / 2**30:.1f}"
            try:
                peak, dt = measure(model, L, chunk, device)
                log(fmt_row([L, chunk or "off", f"{peak:.1f}", est_gib, f"{dt:.2f}", f"{L / dt:,.0f}"]))
            except torch.OutOfMemoryError:
                log(fmt_row([L, chunk or "off", "OOM", est_gib, "", ""]))
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "seq_chunk.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
