"""Evidence that long context works: passkey retrieval by context length and depth, and the
validation NLL by position bucket.

    python -m train.eval RUN_DIR_OR_CHECKPOINT [--lengths 4096,16384,65536,262144,1048576]
        [--depths 0,0.25,0.5,0.75,1] [--trials 1] [--data embedded_long] [--val-len 1048576]
        [--val-rows 1] [--buckets 0,4096,65536,262144,1048576] [--seq-chunk N] [--device auto] [--out DIR]

Offline (the embedded corpora and the GPT-2 tokenizer ship with the install). Prints a markdown
table and writes ``eval.json`` (under ``--out``, default: the run directory) with the keys the
trainer's validation hook logs to metrics.jsonl (``eval.*`` settings):

* ``eval/passkey/<len>``: passkey exact-match accuracy at context length ``<len>`` (mean over
  depths and trials), and ``eval/passkey/<len>/d<depth>`` per depth. A passkey document
  (``data.passkey``) hides a 5-digit key at ``depth`` in filler text and asks for it at the end;
  the answer counts when the model's greedy prediction of every answer token is right
  (teacher-forced, one forward per prompt).
* ``val/nll_bucket/<lo>-<hi>``: mean next-token NLL of validation tokens whose position inside
  their document is in ``[lo, hi)`` (``0-4K``, ``4K-64K``, ``64K-256K``, ``256K-1M`` by default);
  falling NLL at far positions is what long context buys. ``val/nll_bucket_control/<range>``:
  the same rows shuffled in blocks of ``--control-block`` tokens (``eval.nll_control_block``),
  the shuffled-document control: far context that is unrelated text.

Neither builds ``[L, V]`` logits: the model returns its final hidden state
(``Transformer.hidden_states``, or chunk by chunk from the chunked no-grad forward under
``--seq-chunk`` / ``train.seq_chunk``) and only the positions that are scored go through the LM
head (the answer tokens), or the fused LM-head loss (``model.loss``) gives the per-token NLL.
``bench/plot_eval.py`` draws the results.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from data.passkey import PasskeyTemplate, random_key
from model.chunked_step import chunked_forward
from model.layout import DocLayout
from model.transformer import IGNORE_INDEX, Transformer

DEFAULT_LENGTHS = (4096, 16384, 65536, 262144, 1048576)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_BUCKETS = (0, 4096, 65536, 262144, 1048576)


def size_name(n: int) -> str:
    """4096 -> '4K', 1048576 -> '1M', 1000 -> '1000' (binary K/M, as seq_len is given)."""
    for unit, mult in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def bucket_names(edges: Sequence[int]) -> list[str]:
    return [f"{size_name(a)}-{size_name(b)}" for a, b in zip(edges[:-1], edges[1:])]


@dataclass
class EvalSettings:
    """What to measure; ``passkey_lengths`` longer than ``max_len`` are left out."""
    passkey_lengths: Sequence[int] = DEFAULT_LENGTHS
    passkey_depths: Sequence[float] = DEFAULT_DEPTHS
    passkey_trials: int = 1
    nll_buckets: Sequence[int] = DEFAULT_BUCKETS
    seed: int = 0
    control_block: int = 0   # > 0: also the NLL of rows shuffled in blocks of this many tokens

    @classmethod
    def from_config(cls, eval_cfg, seed: int = 0) -> "EvalSettings":
        """From the ``eval`` config node (train/config_schema.py ``EvalSection``)."""
        return cls([int(n) for n in eval_cfg.passkey_lengths],
                   [float(d) for d in eval_cfg.passkey_depths], int(eval_cfg.passkey_trials),
                   [int(e) for e in eval_cfg.nll_buckets], int(seed), int(eval_cfg.nll_control_block))

    @property
    def enabled(self) -> bool:
        return bool(self.passkey_lengths) or bool(self.nll_buckets)

    def check(self) -> None:
        if any(int(n) < 1 for n in self.passkey_lengths):
            raise ValueError(f"eval.passkey_lengths must be positive, got {list(self.passkey_lengths)}")
        if any(not 0.0 <= float(d) <= 1.0 for d in self.passkey_depths):
            raise ValueError(f"eval.passkey_depths must be in [0, 1], got {list(self.passkey_depths)}")
        if self.control_block < 0:
            raise ValueError(f"eval.nll_control_block must be >= 0 (0: off), got {self.control_block}")
        if self.passkey_trials < 1:
            raise ValueError(f"eval.passkey_trials must be >= 1, got {self.passkey_trials}")
        b = [int(x) for x in self.nll_buckets]
        if b and (len(b) < 2 or b[0] != 0 or any(x >= y for x, y in zip(b[:-1], b[1:]))):
            raise ValueError(f"eval.nll_buckets must be increasing edges starting at 0 (e.g. "
                             f"[0, 4096, 65536]), got {b}")


# ----------------------------------------------------------------------------- scoring
def _model_inputs(model: Transformer, tokens: np.ndarray) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.as_tensor(tokens, dtype=torch.long, device=device).unsqueeze(0)


def final_hidden(model: Transformer, input_ids: torch.Tensor, doc_ids: torch.Tensor | None,
                 seq_chunk: int, fn: Callable[[int, int, torch.Tensor], None]) -> None:
    """``fn(start, end, hidden [B, end - start, D])`` over the final hidden state (the LM head's
    input) of every position: in one piece, or ``seq_chunk`` rows at a time through the
    chunked no-grad forward (``model.chunked_step.chunked_forward``: only the cross-token state
    of the whole sequence stays, so any length that trains in chunks also scores)."""
    L = input_ids.shape[1]
    if seq_chunk and L > seq_chunk:
        chunked_forward(model, input_ids, seq_chunk, doc_ids=doc_ids, on_hidden=fn)
    else:
        fn(0, L, model.hidden_states(input_ids, doc_ids))


@torch.no_grad()
def passkey_correct(model: Transformer, template: PasskeyTemplate, length: int, depth: float,
                    key: int, seq_chunk: int = 0) -> bool:
    """One passkey prompt of ``length`` tokens: is the greedy prediction of every answer token
    right? Only the positions before the answer tokens go through the head."""
    doc = template.document(length, depth, key)
    lo, hi = doc.answer_start - 1, doc.answer_start - 1 + doc.answer_len    # rows predicting the answer
    rows: list[torch.Tensor] = []

    def keep(s: int, e: int, hidden: torch.Tensor) -> None:
        if s < hi and e > lo:
            rows.append(hidden[0, max(lo, s) - s: min(hi, e) - s])

    final_hidden(model, _model_inputs(model, doc.tokens), None, seq_chunk, keep)
    pred = model.head(torch.cat(rows)).argmax(-1)                           # [answer_len]
    target = torch.as_tensor(doc.tokens[lo + 1: hi + 1], device=pred.device)
    return bool(torch.equal(pred, target))


def passkey_accuracy(model: Transformer, template: PasskeyTemplate, lengths: Iterable[int],
                     depths: Sequence[float], trials: int, seed: int, seq_chunk: int = 0) -> dict[str, float]:
    """``eval/passkey/<len>`` (mean over depths and trials) and ``.../d<depth>`` per depth.
    Keys come from ``default_rng([seed, length])``: the same prompts in every evaluation.
    Lengths run in the order given; the first that runs out of device memory is recorded as
    ``eval/passkey_oom_at`` and ends the sweep (the longer ones would not fit either)."""
    out: dict[str, float] = {}
    for length in lengths:
        rng = np.random.default_rng([seed, int(length)])
        per_depth = []
        try:
            hits_by_depth = [[passkey_correct(model, template, int(length), float(depth), random_key(rng),
                                              seq_chunk)
                              for _ in range(trials)] for depth in depths]
        except torch.cuda.OutOfMemoryError:
            out["eval/passkey_oom_at"] = int(length)
            break
        for depth, hits in zip(depths, hits_by_depth):
            acc = float(np.mean(hits))
            out[f"eval/passkey/{size_name(int(length))}/d{float(depth):g}"] = acc
            per_depth.append(acc)
        out[f"eval/passkey/{size_name(int(length))}"] = float(np.mean(per_depth))
    if "eval/passkey_oom_at" in out and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


@torch.no_grad()
def token_nll(model: Transformer, input_ids: torch.Tensor, doc_ids: torch.Tensor | None,
              labels: torch.Tensor, chunk_tokens: int | None = None, seq_chunk: int = 0) -> torch.Tensor:
    """[B, L] next-token NLL (0 where the label is IGNORE_INDEX) through the LM head's fused
    loss (``model.loss.LMHead``: logits of one token chunk at a time). Through the head
    module's forward, not its weight: a ZeRO-3 partitioned head is gathered by its hooks.
    ``seq_chunk``: the forward runs that many rows at a time (``final_hidden``)."""
    pieces: list[torch.Tensor] = []

    def score(s: int, e: int, hidden: torch.Tensor) -> None:
        pieces.append(model.head(hidden, labels[:, s:e], return_nll=True, chunk_tokens=chunk_tokens)[1])

    final_hidden(model, input_ids, doc_ids, seq_chunk, score)
    return torch.cat(pieces, dim=1)


class BucketNLL:
    """Sums of NLL and token counts per bucket of position-in-document."""

    def __init__(self, edges: Sequence[int], seq_chunk: int = 0):
        self.device = torch.device("cpu")
        self.seq_chunk = seq_chunk
        self.edges = [int(e) for e in edges]
        self.names = bucket_names(self.edges)
        self.sums = torch.zeros(len(self.names), dtype=torch.float64)
        self.counts = torch.zeros(len(self.names), dtype=torch.float64)

    @torch.no_grad()
    def add(self, model: Transformer, batch: dict[str, torch.Tensor]) -> None:
        device = self.device = next(model.parameters()).device
        b = {k: v.to(device) for k, v in batch.items()}
        nll = token_nll(model, b["input_ids"], b["doc_ids"], b["labels"], seq_chunk=self.seq_chunk).double()
        pos = DocLayout.from_doc_ids(b["doc_ids"]).positions
        valid = b["labels"] != IGNORE_INDEX
        edges = torch.tensor(self.edges, device=device)
        which = torch.bucketize(pos, edges, right=True) - 1        # bucket k: edges[k] <= pos < edges[k+1]
        inside = valid & (which >= 0) & (which < len(self.names))
        k = which[inside]
        self.sums += torch.zeros(len(self.names), dtype=torch.float64, device=device).index_add_(
            0, k, nll[inside]).cpu()
        self.counts += torch.bincount(k, minlength=len(self.names)).double().cpu()

    def reduce(self) -> None:
        """Sum over data-parallel ranks (every rank must call it)."""
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            t = torch.cat([self.sums, self.counts]).to(self.device)
            torch.distributed.all_reduce(t)
            self.sums, self.counts = t[: len(self.names)].cpu(), t[len(self.names):].cpu()

    def metrics(self) -> dict[str, float]:
        """``val/nll_bucket/<range>`` for the buckets that hold tokens, and their counts."""
        out = {}
        for name, s, c in zip(self.names, self.sums.tolist(), self.counts.tolist()):
            if c > 0:
                out[f"val/nll_bucket/{name}"] = s / c
                out[f"val/nll_bucket_tokens/{name}"] = int(c)
        return out


def shuffled_control(batch: dict[str, torch.Tensor], block: int, seed: int) -> dict[str, torch.Tensor]:
    """The shuffled-document control of a validation batch: each row's blocks of ``block``
    tokens in a random order (a trailing partial block stays last), every token keeping its
    label; a document starts where one started in the original row (block seams join text of
    one document to another part of it, or to another document's). Near context is mostly
    intact, far context is unrelated text: NLL at far positions that is lower on the real rows
    than here is what the long context contributes."""
    ids, labels, docs = batch["input_ids"], batch["labels"], batch["doc_ids"]
    B, L = ids.shape
    n_full = L // block
    g = torch.Generator().manual_seed(int(seed))
    order = []
    for _ in range(B):
        perm = torch.randperm(n_full, generator=g)
        idx = (perm[:, None] * block + torch.arange(block)).flatten()
        order.append(torch.cat([idx, torch.arange(n_full * block, L)]))
    order = torch.stack(order).to(ids.device)
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    new_starts = torch.gather(starts, 1, order)
    new_starts[:, 0] = False
    return {"input_ids": torch.gather(ids, 1, order), "labels": torch.gather(labels, 1, order),
            "doc_ids": new_starts.long().cumsum(1)}


def long_context_metrics(model: Transformer, template: PasskeyTemplate | None,
                         val_batches: Iterable[dict[str, torch.Tensor]] | None,
                         settings: EvalSettings, max_len: int, seq_chunk: int = 0) -> dict[str, float]:
    """Passkey accuracy for the lengths up to ``max_len`` and NLL by position bucket over
    ``val_batches``: the validation hook and the CLI both call this. ``seq_chunk``: sequences
    longer than this run through the chunked no-grad forward (as ``train.seq_chunk`` trains)."""
    settings.check()
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        if template is not None and settings.passkey_lengths:
            lengths = sorted(int(n) for n in settings.passkey_lengths
                             if template.min_length <= int(n) <= max_len)
            out.update(passkey_accuracy(model, template, lengths, settings.passkey_depths,
                                        settings.passkey_trials, settings.seed, seq_chunk))
        if val_batches is not None and settings.nll_buckets:
            buckets = BucketNLL(settings.nll_buckets, seq_chunk)
            control = BucketNLL(settings.nll_buckets, seq_chunk) if settings.control_block else None
            for k, batch in enumerate(val_batches):
                try:
                    buckets.add(model, batch)
                    if control is not None:
                        control.add(model, shuffled_control(batch, settings.control_block,
                                                            settings.seed + k))
                except torch.cuda.OutOfMemoryError:   # recorded; the other rows still count
                    out["val/nll_bucket_oom_at"] = int(batch["input_ids"].shape[1])
            buckets.reduce()
            out.update(buckets.metrics())
            if control is not None:
                control.reduce()
                out.update({k.replace("val/nll_bucket", "val/nll_bucket_control", 1): v
                            for k, v in control.metrics().items()})
    finally:
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------- CLI
def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def table(results: dict[str, float], lengths: Sequence[int], depths: Sequence[float]) -> str:
    """Markdown: passkey accuracy by length (rows) and depth (columns), then NLL by bucket."""
    lines = ["| length | " + " | ".join(f"depth {d:g}" for d in depths) + " | mean |",
             "|---|" + "---|" * (len(depths) + 1)]
    for n in lengths:
        name = size_name(n)
        if f"eval/passkey/{name}" not in results:
            continue
        cells = [f"{results[f'eval/passkey/{name}/d{d:g}']:.2f}" for d in depths]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {results[f'eval/passkey/{name}']:.2f} |")
    if "eval/passkey_oom_at" in results:
        lines.append(f"| {size_name(results['eval/passkey_oom_at'])} | out of device memory (longer "
                     "lengths not tried) |")
    buckets = [(k.split("/", 2)[2], v) for k, v in results.items() if k.startswith("val/nll_bucket/")]
    if buckets:
        control = any(k.startswith("val/nll_bucket_control/") for k in results)
        lines += ["", "| position bucket | NLL | tokens |" + (" NLL, shuffled-block control |" if control else ""),
                  "|---|---|---|" + ("---|" if control else "")]
        for b, v in buckets:
            c = results.get(f"val/nll_bucket_control/{b}")
            lines.append(f"| {b} | {v:.4f} | {results[f'val/nll_bucket_tokens/{b}']} |"
                         + ((f" {c:.4f} |" if c is not None else " - |") if control else ""))
    if "val/nll_bucket_oom_at" in results:
        lines.append(f"(validation rows of {size_name(results['val/nll_bucket_oom_at'])} tokens ran "
                     "out of device memory: not counted)")
    return "\n".join(lines)


def load_model(source: str, device: torch.device, dtype: torch.dtype) -> tuple[Transformer, Path]:
    """The model of a checkpoint / run directory / export (``train.export.load_checkpoint``) and
    the run directory it belongs to (for the default output place)."""
    from train.export import load_checkpoint

    sd, cfg = load_checkpoint(source)
    model = Transformer(cfg)
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
    model.to(device=device, dtype=dtype).eval()
    p = Path(source).resolve()
    run_dir = next((q for q in [p, *p.parents] if (q / "checkpoints").is_dir()), p if p.is_dir() else p.parent)
    return model, run_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="run directory, checkpoints/ directory, step directory or export")
    ap.add_argument("--lengths", type=_ints, default=list(DEFAULT_LENGTHS),
                    help="passkey context lengths (comma-separated tokens)")
    ap.add_argument("--depths", type=_floats, default=list(DEFAULT_DEPTHS))
    ap.add_argument("--trials", type=int, default=1, help="passkey prompts per length and depth")
    ap.add_argument("--buckets", type=_ints, default=list(DEFAULT_BUCKETS),
                    help="NLL position-bucket edges (start at 0)")
    ap.add_argument("--data", default="embedded_long",
                    help="validation text: a data kind (embedded_long, embedded) with its preset's "
                         "settings, or 'none' to skip the NLL buckets")
    ap.add_argument("--val-len", type=int, default=None,
                    help="validation row length (default: the longest --buckets edge, capped at "
                         "the model's max_seq_len)")
    ap.add_argument("--val-rows", type=int, default=1, help="validation rows to score")
    ap.add_argument("--control-block", type=int, default=4096,
                    help="also score the rows shuffled in blocks of this many tokens (0: no control)")
    ap.add_argument("--seq-chunk", type=int, default=0,
                    help="run sequences longer than this many tokens in chunks (the chunked no-grad "
                         "forward; 0: whole). Needed where a whole 1M-token forward does not fit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16")
    ap.add_argument("--out", type=Path, default=None, help="where eval.json goes (default: run dir)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    settings = EvalSettings(args.lengths, args.depths, args.trials, args.buckets, args.seed,
                            args.control_block)
    try:
        settings.check()
        model, run_dir = load_model(args.checkpoint, device, dtype)
    except (ValueError, FileNotFoundError) as err:
        print(f"train.eval: {err}", file=sys.stderr)
        return 2
    from data.builder import build_data
    from data.tokenizer import load_tokenizer

    max_len = model.cfg.max_seq_len
    val_batches, tokenizer = None, None
    if args.data != "none" and settings.nll_buckets:
        val_len = min(args.val_len or int(settings.nll_buckets[-1]), max_len)
        preset = Path(__file__).resolve().parent.parent / "conf" / "data" / f"{args.data}.yaml"
        if not preset.is_file():
            print(f"train.eval: --data {args.data!r}: no preset {preset}", file=sys.stderr)
            return 2
        import yaml

        data_cfg = {**yaml.safe_load(preset.read_text()), "val_batches": args.val_rows}
        bundle = build_data(data_cfg, seq_len=val_len, micro_batch=1, seed=args.seed)
        tokenizer = bundle.tokenizer
        if bundle.val_loader is None:
            print(f"train.eval: --data {args.data} has no validation split", file=sys.stderr)
            return 2
        val_batches = list(bundle.val_loader)
    tokenizer = tokenizer or load_tokenizer("gpt2-embedded")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        print(f"train.eval: the GPT-2 tokenizer ({tokenizer.vocab_size} tokens) does not fit "
              f"model.vocab_size={model.cfg.vocab_size}", file=sys.stderr)
        return 2
    too_long = [n for n in settings.passkey_lengths if n > max_len]
    if too_long:
        print(f"train.eval: passkey lengths {too_long} exceed model.max_seq_len={max_len}: skipped")
    results = long_context_metrics(model, PasskeyTemplate(tokenizer), val_batches, settings, max_len,
                                   args.seq_chunk)
    report = {"checkpoint": str(Path(args.checkpoint).resolve()), "model": model.cfg.name,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "lengths": settings.passkey_lengths, "depths": settings.passkey_depths,
              "trials": settings.passkey_trials, "buckets": settings.nll_buckets,
              "metrics": results}
    out_dir = args.out or run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=1))
    print(table(results, settings.passkey_lengths, settings.passkey_depths))
    print(f"\nwrote {out_dir / 'eval.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
