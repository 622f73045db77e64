"""Initialisation study: which init keeps the learned MoE routers balanced at step 0 without
hurting the fp32 gradients or the first steps of training?

Background: with HF's uniform N(0, 0.02) (embedding included) the small preset started with
every token on the same 6 of 64 experts in the learned-router layers (MaxVio 9.67): the sublayer
outputs at init are large next to an N(0, 0.02) embedding and largely shared by all tokens, so
the normalised router input is nearly one direction (b996eaf). Candidates (``CANDIDATES``): the
embedding's std (``model.embed_init_std``), the residual branches' output projections at
init_std / sqrt(2 n_layers) (``model.scaled_output_init``, GPT-2 / Megatron), and
DeepSeek-V3's N(0, 0.006) for every parameter.

Per candidate, three measurements (each a column group of the table):
  balance   MaxVio of every learned-router layer at the first forward (random tokens, no
            update; the collapse maximum is E/K - 1): the small preset at 1 x --seq tokens, and a
            Flash-width stack (dim 4096, 64 x 512 heads, o 8 x 1024; 4 layers, 16 experts top-2,
            expert width 512 with w2 doubled so the MoE output has Flash's inter-2048 rms).
  fp32      max relative error (max |g32 - g64| / max |g64| per parameter) of the whole model's
            fp32 gradient against fp64 on the same weights and tokens, routing replayed from the
            fp64 pass (so no discrete flip counts), in three groups (``param_group``): the mHC
            head's collapse weights, the blocks' mHC coefficients, every other parameter; micro
            and tiny.
  training  ``python -m train`` on the shipped corpus: the tiny preset with the small preset's
            wide attention output (8 x 128 heads, o 1 x 1024: the width at which the old init
            collapses), 8 x 128 tokens a step, AdamW (embedding, head, gates) + Muon, --steps
            steps, lr 3e-3 (the default job): train LM loss at steps 1 / half / end, the final
            validation loss, the routers' MaxVio (step 1, max, end), the largest gradient norm.
            ``embed-1.0+bias-0.01`` (train only) is no init: the router-bias speed x10.

    PYTHONPATH=$PWD python -m bench.init_study --out bench/results      # ~50 min on one busy core
    PYTHONPATH=$PWD python -m bench.init_study --train                  # balance + fp32 only (~12 min)
    PYTHONPATH=$PWD python -m bench.init_study --candidates --train embed-1.0   # one training run
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.experiments import common as C
from model.config import ModelConfig
from model.moe import max_violation
from model.transformer import Transformer


@dataclass(frozen=True)
class Candidate:
    name: str
    overrides: dict = field(default_factory=dict)   # ModelConfig fields (and trainer model.* keys)
    note: str = ""
    train_only: bool = False   # not an init: no balance / fp32 row (they would repeat another's)


def _init(embed: float, scaled_output: bool = False, **kw) -> dict:
    """Every candidate names both knobs, so it means the same whatever the defaults are."""
    return {"embed_init_std": embed, "scaled_output_init": scaled_output, **kw}


CANDIDATES = [
    Candidate("hf-0.02", _init(0.02), "HF's uniform initializer_range (the old init)"),
    Candidate("embed-0.1", _init(0.1)),
    Candidate("embed-0.3", _init(0.3)),
    Candidate("embed-1.0", _init(1.0), "b996eaf's default"),
    Candidate("out-scaled", _init(0.02, True), "HF's 0.02, branch outputs / sqrt(2L)"),
    Candidate("embed-1.0+out-scaled", _init(1.0, True)),
    Candidate("v3-0.006", _init(0.006, init_std=0.006), "DeepSeek-V3: every parameter N(0, 0.006)"),
    # not an init: does a 10x faster router-bias update (default 0.001) keep training balanced?
    Candidate("embed-1.0+bias-0.01", _init(1.0, bias_update_speed=0.01), "reference: router-bias speed x10",
              train_only=True),
]

# the trainer's model: tiny with the small preset's attention output width (see the docstring)
WIDE_TINY = {"n_heads": 8, "head_dim": 128, "o_groups": 1, "o_lora_rank": 1024}


# ----------------------------------------------------------------------------- balance
def learned_maxvio(model: Transformer, ids: torch.Tensor) -> dict[int, float]:
    """MaxVio of every learned-router MoE layer (main and MTP) in one no-grad forward."""
    vio: dict[int, float] = {}

    def hook(mod, args, out):
        vio[mod.layer_idx] = float(max_violation(out[1]["load"]))

    handles = [m.register_forward_hook(hook) for m in model.moe_layers() if not m.is_hash]
    try:
        with torch.no_grad():
            model.eval()(ids, labels=ids)     # labels: the MTP block routes too
    finally:
        for h in handles:
            h.remove()
    return vio


def flash_width_config(c: Candidate) -> ModelConfig:
    return ModelConfig.from_preset("flash", vocab_size=1024, n_layers=4, compress_ratios=[0] * 4,
                                   n_hash_layers=1, mtp_depth=0, n_routed_experts=16,
                                   n_activated_experts=2, moe_inter_dim=512, **c.overrides)


def balance(c: Candidate, preset: str, seq: int, seed: int = 0) -> dict[int, float]:
    if preset == "flash-width":
        cfg = flash_width_config(c)
    else:
        cfg = ModelConfig.from_preset(preset, **c.overrides)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    if preset == "flash-width":
        with torch.no_grad():   # expert width 512 stands in for 2048: w2's output rms x 2
            for m in model.moe_layers():
                m.experts.w2.mul_(2.0)
                m.shared.w2.weight.mul_(2.0)
    ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(seed + 1))
    return learned_maxvio(model, ids)


# ----------------------------------------------------------------------------- fp32 vs fp64
def _grads(model: Transformer, ids: torch.Tensor, routing=None):
    model.zero_grad(set_to_none=True)
    out = model.train()(ids, labels=ids, routing_indices=routing)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def param_group(name: str) -> str:
    """'head': the mHC head's collapse weights (main and MTP HyperHead fn / base / scale);
    'sites': the block sites' mHC fn / base / scale; 'rest': every other parameter."""
    if "hc_head." in name:
        return "head"
    return "sites" if ".hc_attn." in name or ".hc_ffn." in name else "rest"


def fp32_gradient_errors(cfg: ModelConfig, seq: int = 64, batch: int = 2, seed: int = 0) -> dict[str, float]:
    """Per parameter: max |g_fp32 - g_fp64| / max |g_fp64| on the same weights and tokens, the
    fp32 pass replaying the fp64 pass's routing. ``cfg`` needs moe_impl="loop" (fp64)."""
    torch.manual_seed(seed)
    m64 = Transformer(cfg).double()
    m32 = Transformer(cfg)
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed + 3))
    out64, g64 = _grads(m64, ids)
    _, g32 = _grads(m32, ids, out64.routing_indices)
    return {n: float((g32[n].double() - g64[n]).abs().max() / g64[n].abs().max().clamp(min=1e-300))
            for n in g64}


def fp32_summary(c: Candidate, preset: str) -> list[float]:
    """Max error over each parameter group (``param_group``): [head, sites, rest]."""
    cfg = ModelConfig.from_preset(preset, vocab_size=1024, moe_impl="loop", **c.overrides)
    errs = fp32_gradient_errors(cfg)
    return [max(v for n, v in errs.items() if param_group(n) == g) for g in ("head", "sites", "rest")]


# ----------------------------------------------------------------------------- training
def train_overrides(c: Candidate, steps: int, work: Path) -> list[str]:
    batch, seq = 8 * 128, 128
    model = {**WIDE_TINY, **c.overrides}
    return ["model=tiny", *(f"model.{k}={v}" for k, v in model.items()),
            "train.device=cpu", f"train.seq_len={seq}", f"train.global_batch_tokens={batch}",
            f"train.micro_batch_tokens={batch}", f"train.tokens={batch * steps}",
            f"train.val_every={steps}", "train.ckpt_every=0", "train.progress=false",
            f"train.runs_root={work}", f"optim.warmup_steps={max(1, steps // 10)}",
            "logging.log_every=1", "logging.diagnostics_every=0", "logging.wandb.mode=disabled"]


def train_summary(run: C.Run) -> dict:
    _, lm = run.series("loss/lm")
    _, vio = run.series("moe/maxvio_step_max")
    _, gn = run.series("grad_norm")
    return {"loss_first": lm[0], "loss_mid": lm[len(lm) // 2 - 1], "loss_last": C.final_mean(lm),
            "val": run.final_val, "vio_first": vio[0] if vio else None,
            "vio_last": C.final_mean(vio) if vio else None, "vio_max": max(vio) if vio else None,
            "grad_norm_max": max(gn) if gn else None}


# ----------------------------------------------------------------------------- report
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=512, help="tokens of the balance forward (small preset)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps of each training run")
    ap.add_argument("--candidates", nargs="*", default=[c.name for c in CANDIDATES if not c.train_only],
                    help="candidates for the balance and fp32 tables (none: skip them)")
    ap.add_argument("--train", nargs="*", default=["hf-0.02", "embed-1.0", "embed-1.0+out-scaled", "embed-1.0+bias-0.01"],
                    help="candidates to train (each run ~5-10 min on one busy core); none: skip")
    ap.add_argument("--skip-flash", action="store_true", help="no Flash-width balance (3.4 GB, ~20 s each)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("outputs/init_study"))
    ap.add_argument("--out", type=Path, default=None, help="write <out>/init-study-cpu-<date>.md")
    args = ap.parse_args(argv)
    known = {c.name: c for c in CANDIDATES}
    bad = [n for n in args.candidates + args.train if n not in known]
    if bad:
        raise SystemExit(f"init_study: unknown --candidates {bad}; choose from {sorted(known)}")
    torch.set_num_threads(args.threads)
    cands = [known[n] for n in args.candidates]
    rows_bal, rows_fp, rows_tr = [], [], []
    for c in cands:
        t = time.time()
        small = balance(c, "small", args.seq)
        flash = None if args.skip_flash else balance(c, "flash-width", 256)
        rows_bal.append([c.name, max(small.values()), " ".join(f"{small[k]:.2f}" for k in sorted(small)),
                         None if flash is None else max(flash.values())])
        fp = [v for p in ("micro", "tiny") for v in fp32_summary(c, p)]
        rows_fp.append([c.name, *fp])
        print(f"[init_study] {c.name}: small maxvio {rows_bal[-1][1]:.2f}, flash-width {rows_bal[-1][3]}; "
              f"fp32 micro/tiny head, sites, rest {' '.join(f'{v:.1e}' for v in fp)} ({time.time() - t:.0f} s)",
              flush=True)
    if args.train:
        # the evidence experiments' launcher (bench/experiments/common.py), one run at a time
        ns = C.parser("init_study").parse_args(["--device", "cpu", "--work", str(args.work), "--steps",
                                                str(args.steps), "--threads", str(args.threads), "--wandb", "disabled"])
        ns = C.finish_args(ns, "init_study", argv=[])
        for c in (known[n] for n in args.train):
            run = C.single(ns, c.name, train_overrides(c, args.steps, ns.work))
            if ns.failures:
                raise SystemExit("init_study: " + "; ".join(ns.failures))
            s = train_summary(run)
            rows_tr.append([c.name, s["loss_first"], s["loss_mid"], s["loss_last"], s["val"], s["vio_first"],
                            s["vio_max"], s["vio_last"], s["grad_norm_max"]])
            print(f"[init_study] {c.name}: train {s}", flush=True)
    tables = []
    if rows_bal:
        tables += [
            "## Routing balance at init (MaxVio of the learned-router layers; collapse = E/K - 1)\n\n"
            f"small: 1 x {args.seq} random tokens, max 9.67; Flash-width: 1 x 256, 4 layers, max 7.\n\n"
            + C.markdown_table(["candidate", "small max", "small per layer (2..11, MTP)", "Flash-width max"], rows_bal),
            "## fp32 gradient vs fp64 (max rel. error per parameter, routing replayed)\n\n"
            "head: the mHC head's collapse weights (main + MTP); sites: the blocks' mHC fn/base/scale; "
            "rest: every other parameter.\n\n"
            + C.markdown_table(["candidate", "micro: head", "micro: sites", "micro: rest", "tiny: head", "tiny: sites",
                                "tiny: rest"], rows_fp),
        ]
    if rows_tr:
        tables.append(
            f"## Training: tiny with small's attention output width, {args.steps} steps x 1,024 tokens "
            "(shipped corpus, CPU)\n\n"
            "MaxVio: the largest over the layers of one step's loads (collapse = 3); end: mean of the last 3 steps.\n\n"
            + C.markdown_table(["candidate", "LM loss step 1", f"LM loss step {args.steps // 2}",
                                "LM loss end (mean of last 3)", "val loss", "MaxVio step 1", "MaxVio max",
                                "MaxVio end", "max grad norm"], rows_tr))
    shown = cands + [known[n] for n in args.train if known[n] not in cands]
    notes = "\n".join(f"- {c.name}: {c.overrides}" + (f" ({c.note})" if c.note else "") for c in shown)
    text = "\n\n".join([f"# Init study ({C.device_name('cpu')}, commit {C.git_commit()})", "Candidates:\n" + notes,
                        *tables])
    print(text)
    if args.out is not None:
        import datetime as dt

        path = args.out / f"init-study-cpu-{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        print(f"[init_study] wrote {path}")


if __name__ == "__main__":
    main()
