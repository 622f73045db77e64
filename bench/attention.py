"""Benchmark: hybrid sparse attention (Triton) vs dense SDPA, the PyTorch reference and fla NSA.

For each head configuration (flash 64 x 512, small 16 x 256), layer kind (CSA: window 128 +
top-512; HCA: window 128 + all visible entries of ratio 128) and length, prints forward and
forward+backward time, attended FLOPs, achieved TFLOP/s and peak memory; then the peers on
the same shapes. Attended FLOPs = 4 * heads * head_dim * (keys attended, summed over queries),
x3.5 for forward+backward (the convention of ../shared/reference/anchors.md).

    python bench/attention.py --lengths 4096 16384 65536 --out results.md
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HEAD_CONFIGS = {"flash": (64, 512), "small": (16, 256)}
WINDOW, CSA_RATIO, HCA_RATIO, TOPK = 128, 4, 128, 512
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- inputs and FLOPs
def attended_keys(kind: str, L: int, window: int = WINDOW, topk: int = TOPK) -> int:
    """Keys attended, summed over the L queries of one document (window + compressed)."""
    t = torch.arange(L, dtype=torch.float64)
    keys = torch.clamp(t + 1, max=window)
    if kind == "csa":
        keys = keys + torch.clamp(torch.div(t + 1, CSA_RATIO, rounding_mode="floor"), max=topk)
    elif kind == "hca":
        keys = keys + torch.div(t + 1, HCA_RATIO, rounding_mode="floor")
    elif kind == "csa_dense":
        keys = keys + torch.div(t + 1, CSA_RATIO, rounding_mode="floor")
    elif kind == "dense":
        keys = t + 1
    return int(keys.sum().item())


def attn_flops(kind: str, L: int, H: int, D: int, backward: bool) -> float:
    f = 4.0 * H * D * attended_keys(kind, L)
    return f * 3.5 if backward else f


def random_topk(L: int, K: int, ratio: int, device, generator=None) -> torch.Tensor:
    """[1, L, K] int32: K random visible entries per token (one document; -1 where fewer than
    K are visible; duplicates allowed, they change neither work nor memory traffic)."""
    t = torch.arange(L, device=device)
    n_vis = torch.div(t + 1, ratio, rounding_mode="floor")  # [L]
    r = torch.rand(L, K, device=device, generator=generator)
    idx = (r * n_vis[:, None]).long()
    slot = torch.arange(K, device=device)[None, :]
    idx = torch.where(slot < n_vis[:, None], idx, torch.full_like(idx, -1))
    # where fewer than K are visible, list each visible entry once (as the indexer would)
    few = n_vis[:, None] <= K
    idx = torch.where(few & (slot < n_vis[:, None]), slot.expand(L, K), idx)
    return idx[None].to(torch.int32)


@dataclass
class AttnInputs:
    q: torch.Tensor
    kv: torch.Tensor
    sink: torch.Tensor
    doc_start: torch.Tensor
    ckv: torch.Tensor | None
    c_end: torch.Tensor | None
    topk_idx: torch.Tensor | None
    window: int
    scale: float

    def args(self):
        return (self.q, self.kv, self.sink, self.doc_start, self.window, self.scale,
                self.ckv, self.c_end, self.topk_idx)

    def leaves(self):
        return [x for x in (self.q, self.kv, self.sink, self.ckv) if x is not None]


def make_inputs(kind: str, L: int, H: int, D: int, dtype=torch.bfloat16, device=DEVICE,
                doc_cuts=(), seed: int = 0, topk: int = TOPK, batch: int = 1) -> AttnInputs:
    """``batch`` rows of L tokens; doc_cuts are token indices where a new document starts (every row)."""
    from model.layout import CompressedLayout, DocLayout

    g = torch.Generator(device=device).manual_seed(seed)
    doc_ids = torch.zeros(batch, L, dtype=torch.long, device=device)
    for c in doc_cuts:
        doc_ids[:, c:] += 1
    lay = DocLayout.from_doc_ids(doc_ids)
    q = torch.randn(batch, L, H, D, device=device, generator=g).to(dtype).requires_grad_()
    kv = torch.randn(batch, L, D, device=device, generator=g).to(dtype).requires_grad_()
    sink = torch.randn(H, device=device, generator=g).requires_grad_()
    ckv = c_end = topk_idx = None
    if kind != "window":
        ratio = HCA_RATIO if kind == "hca" else CSA_RATIO
        cl = CompressedLayout.build(lay, ratio)
        N = cl.c_end.shape[1]
        ckv = torch.randn(batch, N, D, device=device, generator=g).to(dtype).requires_grad_()
        c_end = cl.c_end
        if kind == "csa":
            if doc_cuts:  # per-document visibility: pick among entries visible under the layout
                t = torch.arange(L, device=device)
                vis = (c_end[:, None, :] >= lay.doc_start[:, :, None]) & (c_end[:, None, :] <= t[None, :, None])
                scores = torch.rand(batch, L, N, device=device, generator=g).masked_fill(~vis, float("-inf"))
                vals, idx = scores.topk(min(topk, N), dim=-1)
                topk_idx = torch.where(torch.isneginf(vals), torch.full_like(idx, -1), idx).to(torch.int32)
            else:
                topk_idx = torch.cat([random_topk(L, topk, ratio, device, g) for _ in range(batch)])
    return AttnInputs(q, kv, sink, lay.doc_start, ckv, c_end, topk_idx, WINDOW, D ** -0.5)


# ----------------------------------------------------------------------------- timing
def time_ms(fn, budget_s: float = 1.5, min_reps: int = 3, max_reps: int = 30) -> float:
    """Median of CUDA-event timings after one warm-up call (which also compiles)."""
    fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record(); fn(); e1.record(); torch.cuda.synchronize()
    first = e0.elapsed_time(e1)
    reps = int(max(min_reps, min(max_reps, budget_s * 1000 / max(first, 1e-3))))
    times = []
    for _ in range(reps):
        e0.record(); fn(); e1.record(); torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1))
    times.sort()
    return times[len(times) // 2]


def peak_mib(fn, device="cuda") -> float:
    """Peak allocated memory during fn above what was allocated before it, MiB (NaN off CUDA)."""
    if torch.device(device).type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def fwd_bwd_fns(attn, inp: AttnInputs, **kw):
    do_holder = {}

    def fwd():
        with torch.no_grad():
            return attn(*inp.args(), **kw)

    def fwd_bwd():
        o = attn(*inp.args(), **kw)
        if "do" not in do_holder:
            do_holder["do"] = torch.randn_like(o)
        return torch.autograd.grad(o, inp.leaves(), do_holder["do"])

    return fwd, fwd_bwd


# ----------------------------------------------------------------------------- peers
def sdpa_fns(L: int, H: int, D: int, backend: str, dtype=torch.bfloat16):
    """Dense causal MQA through SDPA with one backend forced; k/v materialised per head when
    the backend rejects enable_gqa (the copy is made once, outside the timed region)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
          "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]
    F = torch.nn.functional
    q = torch.randn(1, H, L, D, device="cuda", dtype=dtype, requires_grad=True)
    k1 = torch.randn(1, 1, L, D, device="cuda", dtype=dtype)
    do = torch.randn(1, H, L, D, device="cuda", dtype=dtype)
    try:
        k = k1.clone().requires_grad_()
        with sdpa_kernel(be), torch.no_grad():
            F.scaled_dot_product_attention(q[:, :, :128], k[:, :, :128], k[:, :, :128], is_causal=True, enable_gqa=True)
        gqa = True
    except Exception:
        k = k1.expand(1, H, L, D).contiguous().requires_grad_()
        gqa = False

    def run(grad: bool):
        with sdpa_kernel(be):
            o = F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=gqa)
            if grad:
                torch.autograd.grad(o, [q, k], do)

    return (lambda: torch.no_grad()(run)(False)), (lambda: run(True)), gqa


def nsa_fns(L: int, H: int, D: int = 128, dtype=torch.bfloat16):
    """fla-core NSA: compressed + 16 selected blocks of 64, one KV head, no window."""
    from fla.ops.nsa import parallel_nsa

    q = torch.randn(1, L, H, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(1, L, 1, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(1, L, 1, D, device="cuda", dtype=dtype, requires_grad=True)
    g_cmp = torch.rand(1, L, H, device="cuda", dtype=dtype)
    g_slc = torch.rand(1, L, H, device="cuda", dtype=dtype)
    do = torch.randn(1, L, H, D, device="cuda", dtype=dtype)

    def run(grad: bool):
        o = parallel_nsa(q, k, v, g_cmp=g_cmp, g_slc=g_slc, block_counts=16, block_size=64)
        if grad:
            torch.autograd.grad(o, [q, k, v], do)

    return (lambda: torch.no_grad()(run)(False)), (lambda: run(True))


def nsa_flops(L: int, H: int, D: int = 128, backward: bool = False) -> float:
    t = torch.arange(L, dtype=torch.float64)
    keys = torch.div(t + 1, 64, rounding_mode="floor") + torch.clamp(t + 1, max=16 * 64)
    f = 4.0 * H * D * float(keys.sum())
    return f * 3.5 if backward else f


# ----------------------------------------------------------------------------- table
def fmt_row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def run_table(lengths, head_cfgs, kinds, fwd_only_lengths=(), log=print, configs=None,
              time_budget_s: float = 1e9):
    """Our kernel at every (config, kind, length). Returns rows (dicts)."""
    from kernels.sparse_attention import sparse_attention_triton

    t_start = time.time()
    rows = []
    for name in head_cfgs:
        H, D = HEAD_CONFIGS[name]
        for kind in kinds:
            for L in list(lengths) + list(fwd_only_lengths):
                if time.time() - t_start > time_budget_s:
                    log(f"[skip {name} {kind} {L}: time budget]")
                    continue
                fwd_only = L in fwd_only_lengths and L not in lengths
                row = dict(cfg=name, kind=kind, L=L, H=H, D=D)
                try:
                    inp = make_inputs(kind, L, H, D)
                    kw = {"configs": configs.get((name, kind))} if configs else {}
                    fwd, fwd_bwd = fwd_bwd_fns(sparse_attention_triton, inp, **kw)
                    row["fwd_ms"] = time_ms(fwd)
                    row["fwd_tflops"] = attn_flops(kind, L, H, D, False) / row["fwd_ms"] / 1e9
                    row["fwd_peak_mib"] = peak_mib(fwd)
                    if not fwd_only:
                        row["fb_ms"] = time_ms(fwd_bwd)
                        row["fb_tflops"] = attn_flops(kind, L, H, D, True) / row["fb_ms"] / 1e9
                        row["fb_peak_mib"] = peak_mib(fwd_bwd)
                    del inp, fwd, fwd_bwd
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "OOM"
                except Exception as exc:  # record and go on: one failing shape must not hide the rest
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                torch.cuda.empty_cache()
                rows.append(row)
                log(fmt_row(_our_cells(row)))
    return rows


OUR_HEADER = ["config", "layer", "L", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s",
              "peak MiB fwd / fwd+bwd"]


def _our_cells(r):
    f = lambda k, p=2: (f"{r[k]:.{p}f}" if k in r else "-")
    peak = f"{r.get('fwd_peak_mib', float('nan')):.0f} / {r.get('fb_peak_mib', float('nan')):.0f}"
    if "error" in r:
        return [r["cfg"], r["kind"], r["L"], r["error"], "", "", "", ""]
    return [f"{r['cfg']} ({r['H']}x{r['D']})", r["kind"], r["L"], f("fwd_ms", 3), f("fwd_tflops", 1),
            f("fb_ms", 3), f("fb_tflops", 1), peak]


def run_peers(lengths, log=print, dense_max_L=None, nsa=True, reference_L=(2048,), time_budget_s=1e9):
    """Dense SDPA (cuDNN / flash at d128; efficient at d512), reference, NSA. Returns rows."""
    t_start = time.time()
    rows = []
    dense_max_L = dense_max_L or {}
    plans = []
    for H in (16, 64):
        for L in lengths:
            for backend, D in (("cudnn", 128), ("flash", 128), ("efficient", 512), ("efficient", 256)):
                if L > dense_max_L.get((backend, D, H), 1 << 30):
                    continue
                plans.append(("sdpa-" + backend, H, D, L))
            if nsa:
                plans.append(("nsa", H, 128, L))
    for L in reference_L:
        for name in HEAD_CONFIGS:
            plans.append(("reference-" + name, *HEAD_CONFIGS[name], L))
    return run_peer_plans(plans, log, time_budget_s)


def run_peer_plans(plans, log=print, time_budget_s=1e9):
    """plans: (peer, heads, head_dim, L) with peer in sdpa-<backend> | nsa | reference-<config>."""
    t_start = time.time()
    rows = []
    for peer, H, D, L in plans:
        if time.time() - t_start > time_budget_s:
            log(f"[skip {peer} H={H} D={D} L={L}: time budget]")
            continue
        row = dict(peer=peer, H=H, D=D, L=L)
        try:
            if peer.startswith("sdpa-"):
                fwd, fb, gqa = sdpa_fns(L, H, D, peer[5:])
                row["note"] = "enable_gqa" if gqa else "k/v expanded per head"
                fl = lambda bw: attn_flops("dense", L, H, D, bw)
            elif peer == "nsa":
                fwd, fb = nsa_fns(L, H, D)
                fl = lambda bw: nsa_flops(L, H, D, bw)
            else:
                from model.sparse_attention import sparse_attention

                inp = make_inputs("csa", L, H, D)
                fwd, fb = fwd_bwd_fns(sparse_attention, inp)
                fl = lambda bw: attn_flops("csa", L, H, D, bw)
            row["fwd_ms"] = time_ms(fwd, budget_s=1.0)
            row["fb_ms"] = time_ms(fb, budget_s=1.0)
            row["fwd_tflops"] = fl(False) / row["fwd_ms"] / 1e9
            row["fb_tflops"] = fl(True) / row["fb_ms"] / 1e9
            row["fb_peak_mib"] = peak_mib(fb)
        except torch.cuda.OutOfMemoryError:
            row["error"] = "OOM"
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        torch.cuda.empty_cache()
        rows.append(row)
        log(fmt_row(_peer_cells(row)))
    return rows


PEER_HEADER = ["peer", "heads x dim", "L", "fwd ms", "fwd+bwd ms", "fwd TFLOP/s", "fwd+bwd TFLOP/s",
               "peak MiB fwd+bwd", "note"]


def _peer_cells(r):
    if "error" in r:
        return [r["peer"], f"{r['H']}x{r['D']}", r["L"], r["error"], "", "", "", "", ""]
    return [r["peer"], f"{r['H']}x{r['D']}", r["L"], f"{r['fwd_ms']:.3f}", f"{r['fb_ms']:.3f}",
            f"{r['fwd_tflops']:.1f}", f"{r['fb_tflops']:.1f}", f"{r['fb_peak_mib']:.0f}", r.get("note", "")]


# ----------------------------------------------------------------------------- autotune (issue 16)
TUNE_KINDS = ("window", "hca", "csa")


def small_preset_heads() -> tuple[int, int, int]:
    """(heads, head dim, top-k) of conf/model/small.yaml (its window is WINDOW, its ratios 4 / 128)."""
    import yaml

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf/model/small.yaml")
    with open(path) as fh:
        m = yaml.safe_load(fh)
    if m["window"] != WINDOW or m["csa_ratio"] != CSA_RATIO:
        raise ValueError(f"{path}: window {m['window']} / csa_ratio {m['csa_ratio']} differ from this "
                         f"benchmark's {WINDOW} / {CSA_RATIO}: update WINDOW / CSA_RATIO here")
    return m["n_heads"], m["head_dim"], m["index_topk"]


def run_tune(kinds=TUNE_KINDS, batch: int = 4, L: int = 4096, heads=None, doc_cuts=(1531, 2890),
             log=print, tol: float = 1e-2, budget_s: float = 0.3, dtype=torch.bfloat16) -> bool:
    """The sparse-attention kernels' autotune at one micro-batch (default: experiment=small_gpu's
    4 x 4096 tokens at the small preset's heads). Per layer kind: every candidate of the named tiles
    (kernels.sparse_attention.tile_candidates, run pinned through configs=: exactly its tile, warps
    and stages) against the named tile (relative L2 of o and every gradient, < tol); autotune's
    result (tune=None) likewise; then forward and forward+backward times of the named tile
    (tune="default") and of autotune's picks; last, every pick with every candidate's time.
    Off CUDA (tests) nothing is timed and tune=None runs the named tiles. True if every check passed."""
    import dataclasses

    from kernels import sparse_attention as sa

    H, D, topk = heads or small_preset_heads()
    timed = torch.device(DEVICE).type == "cuda"
    ok_all = True
    log(f"autotune at {batch} x {L} tokens, {H} heads x {D}, top-{topk}, documents cut at {list(doc_cuts)}")
    hdr = ["layer", "tiles (fwd / bwd_q / bwd_kv: T x H, keys, warps, stages)", "o", "dq", "dkv", "dsink", "dckv",
           f"pass (< {tol:g})"]
    log(fmt_row(hdr)); log(fmt_row(["---"] * len(hdr)))
    times = []
    for kind in kinds:
        inp = make_inputs(kind, L, H, D, dtype=dtype, doc_cuts=doc_cuts, seed=len(kind), topk=topk, batch=batch)
        named = sa.variant_configs(sa.DEFAULT_VARIANT, H, D, inp.topk_idx is not None)
        do = torch.randn(inp.q.shape, device=inp.q.device, generator=torch.Generator(inp.q.device).manual_seed(1))
        do = do.to(inp.q.dtype)

        def run(**kw):
            o = sa.sparse_attention_triton(*inp.args(), **kw)
            return [o.detach(), *torch.autograd.grad(o, inp.leaves(), do)]

        ref = run(tune="default")
        cands = {k: sa.tile_candidates(k, getattr(named, k)) for k in ("fwd", "bwd_q", "bwd_kv")}
        trials = [(f"candidate {i}", dict(configs=dataclasses.replace(
            named, **{k: v[min(i, len(v) - 1)] for k, v in cands.items()})))
            for i in range(1, max(len(v) for v in cands.values()))] + [("autotune", {})]
        for name, kw in trials:
            got = run(**kw)
            errs = [_rel_err(a, b) for a, b in zip(got, ref)]
            ok = all(torch.isfinite(x.float()).all().item() for x in got) and all(e < tol for e in errs)
            ok_all &= ok
            c = kw.get("configs")
            tiles = " / ".join(f"{t.block_t}x{t.block_h}, {t.block_n}, w{t.num_warps}, s{t.num_stages}"
                               for t in (c.fwd, c.bwd_q, c.bwd_kv)) if c else "autotune's picks"
            log(fmt_row([kind, f"{name}: {tiles}"] + [f"{e:.1e}" for e in errs] + ["-"] * (5 - len(errs))
                        + ["yes" if ok else "NO"]))
        if timed:
            row = [kind]
            for tune in ("default", None):
                fwd, fwd_bwd = fwd_bwd_fns(sa.sparse_attention_triton, inp, tune=tune)
                row += [time_ms(fwd, budget_s), time_ms(fwd_bwd, budget_s)]
            times.append(row)
        del inp, ref
    if timed:
        hdr = ["layer", "fwd ms named", "fwd ms autotune", "fwd+bwd ms named", "fwd+bwd ms autotune", "fwd+bwd speedup"]
        log(""); log(fmt_row(hdr)); log(fmt_row(["---"] * len(hdr)))
        for kind, f0, fb0, f1, fb1 in times:
            log(fmt_row([kind, f"{f0:.3f}", f"{f1:.3f}", f"{fb0:.3f}", f"{fb1:.3f}", f"{fb0 / fb1:.2f}x"]))
    log("")
    log("autotune's picks (kernel, named tile: tuning key -> pick [every candidate's time]):")
    for name, picks in sa.tuned_configs().items():
        for key, pick in picks.items():
            log(f"- {name}: {key} -> {pick}")
    log(f"all checks passed: {ok_all}")
    return ok_all


def _rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    ap.add_argument("--fwd-only-lengths", type=int, nargs="*", default=[])
    ap.add_argument("--configs", nargs="+", default=list(HEAD_CONFIGS))
    ap.add_argument("--kinds", nargs="+", default=["csa", "hca"])
    ap.add_argument("--peers", action="store_true", help="also time dense SDPA, NSA and the reference")
    ap.add_argument("--out", default=None, help="write the markdown tables here")
    ap.add_argument("--tune", action="store_true",
                    help="only the autotune check and timing at one micro-batch (run_tune), not the tables")
    ap.add_argument("--tune-shape", type=int, nargs=2, default=[4, 4096], metavar=("BATCH", "L"))
    ap.add_argument("--tune-kinds", nargs="+", default=list(TUNE_KINDS), choices=TUNE_KINDS)
    a = ap.parse_args(argv)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)
        if a.out:  # written as it goes: a run cut short keeps what it measured
            with open(a.out, "w") as fh:
                fh.write("\n".join(lines) + "\n")

    if a.tune:
        log(f"device: {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'}, torch {torch.__version__}")
        ok = run_tune(a.tune_kinds, *a.tune_shape, log=log)
        raise SystemExit(0 if ok else 1)
    log(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    log(fmt_row(OUR_HEADER)); log(fmt_row(["---"] * len(OUR_HEADER)))
    run_table(a.lengths, a.configs, a.kinds, a.fwd_only_lengths, log=log)
    if a.peers:
        log(fmt_row(PEER_HEADER)); log(fmt_row(["---"] * len(PEER_HEADER)))
        run_peers(a.lengths, log=log)


if __name__ == "__main__":
    main()
