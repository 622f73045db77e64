"""What the sequence-chunked step (model/chunked_step.py) keeps per token of the WHOLE sequence,
measured on CPU from live tensor bytes (model/saved_memory.py: a gc walk of every reachable
tensor's storage, plus what autograd saved), not from the allocator: deterministic.

For each length L (one subprocess each, fixed chunk), at two points of the step:
  * state: when the backward sweep starts (the state pass is done, no chunk is computed yet):
    what the step holds for the whole sequence; compared with train/seq_chunk.py's
    ``state_bytes`` (the estimate train.seq_chunk=auto adds to one chunk's activations);
  * chunk peak: the most alive at any chunk's backward call (after its forward: live tensors
    plus its saved activations; after its backward: plus the state gradients it produced).
Bytes per token of the sequence follow from the slope between two lengths (the chunk's own
activations are the same at every L). Peak RSS (ru_maxrss) is shown for reference only.

    python bench/chunk_memory.py --preset tiny --lengths 2048,4096,8192 --chunk 512
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.chunked_step import chunked_forward_backward  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.saved_memory import SavedTensorMeter, live_tensor_bytes  # noqa: E402
from model.transformer import Transformer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def packed_batch(vocab: int, L: int, doc_len: int, seed: int = 0):
    """One row of L tokens: documents of doc_len tokens (0: a single document, no doc_ids)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, L + 1), generator=g)
    doc = (torch.arange(L) // doc_len)[None] if doc_len else None
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), doc


class _Stop(Exception):
    pass


def measure(model: Transformer, ids, labels, doc, chunk: int, full: bool = True) -> dict:
    """{"state": bytes alive when the backward sweep starts, "chunk_peak": the most alive at a
    chunk's backward call} (parameters, their gradients and buffers excluded; the batch
    included). ``full=False``: stop once "state" is measured (the state pass only)."""
    fixed = list(model.parameters()) + list(model.buffers())
    res = {"state": None, "chunk_peak": 0}
    meters: list[SavedTensorMeter] = []

    def excluded():
        return fixed + [p.grad for p in model.parameters() if p.grad is not None]

    # what was alive before the step (other objects of this process, e.g. an earlier test's
    # tensors) is not the step's: measured once, without the batch, and subtracted
    before = live_tensor_bytes(excluded() + [ids, labels, doc])

    def forward(**kw):
        if not kw["chunk"].need_loss:   # the state pass
            return model(**kw)
        if res["state"] is None:
            res["state"] = live_tensor_bytes(excluded()) - before
            if not full:
                raise _Stop
        else:   # what the previous chunk's backward left (the state gradients it produced)
            res["chunk_peak"] = max(res["chunk_peak"], live_tensor_bytes(excluded()) - before)
        meter = SavedTensorMeter(exclude=excluded())
        with meter:
            out = model(**kw)
        meters[:] = [meter]
        return out

    def backward(loss, last):
        saved = {k: v[0] for k, v in meters[0]._bytes.items()}
        res["chunk_peak"] = max(res["chunk_peak"], live_tensor_bytes(excluded(), also=saved) - before)
        meters.clear()
        loss.backward()

    try:
        chunked_forward_backward(model, ids, labels, chunk, doc_ids=doc, forward=forward, backward=backward)
    except _Stop:
        pass
    return res


def state_at_sweep(model: Transformer, ids, labels, doc, chunk: int) -> int:
    """Bytes of tensors alive when the chunked step's backward sweep starts: what it holds for
    the whole sequence (the batch included; parameters and buffers not)."""
    return measure(model, ids, labels, doc, chunk, full=False)["state"]


def run_one(preset: str, L: int, chunk: int, dtype: str, checkpointing: bool, doc_len: int,
            mode: str) -> dict:
    cfg = ModelConfig.from_preset(preset, attention_impl="torch", mhc_impl="torch", attention_mode=mode)
    torch.manual_seed(0)
    model = Transformer(cfg).to(DTYPES[dtype]).train()
    model.activation_checkpointing = checkpointing
    ids, labels, doc = packed_batch(cfg.vocab_size, L, doc_len)
    res = measure(model, ids, labels, doc, chunk)
    res["rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--doc-len", type=int, default=0, help="packed documents of this length (0: one document)")
    ap.add_argument("--mode", default="sparse", choices=["sparse", "dense"])
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        L = int(args.lengths)
        print(json.dumps(run_one(args.preset, L, args.chunk, args.dtype, args.checkpointing,
                                 args.doc_len, args.mode)))
        return

    from train.seq_chunk import state_bytes

    cfg = ModelConfig.from_preset(args.preset)
    prec = "bf16" if args.dtype == "bf16" else args.dtype
    rows = []
    print(f"# chunked step, whole-sequence memory: {args.preset}, {args.dtype}, chunk {args.chunk}, "
          f"checkpointing {'on' if args.checkpointing else 'off'}, {args.mode}, "
          f"docs {args.doc_len or 'one'}")
    print("| L | state bytes | state B/tok | chunk peak bytes | estimate B/tok | RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for L in (int(x) for x in args.lengths.split(",")):
        cmd = [sys.executable, os.path.abspath(__file__), "--one", "--preset", args.preset, "--lengths", str(L),
               "--chunk", str(args.chunk), "--dtype", args.dtype, "--doc-len", str(args.doc_len),
               "--mode", args.mode] + (["--checkpointing"] if args.checkpointing else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        est = state_bytes(cfg, L, prec, chunk=args.chunk)
        rows.append((L, r))
        print(f"| {L} | {r['state']:,} | {r['state'] / L:,.0f} | {r['chunk_peak']:,} | {est / L:,.0f} | "
              f"{r['rss_kib'] / 1024:,.0f} |", flush=True)
    for (l1, a), (l2, b) in zip(rows, rows[1:]):
        print(f"slope {l1}->{l2}: state {(b['state'] - a['state']) / (l2 - l1):,.0f} B/token, "
              f"chunk peak {(b['chunk_peak'] - a['chunk_peak']) / (l2 - l1):,.0f} B/token, "
              f"estimate {(state_bytes(cfg, l2, prec, chunk=args.chunk) - state_bytes(cfg, l1, prec, chunk=args.chunk)) / (l2 - l1):,.0f} B/token")


if __name__ == "__main__":
    main()
