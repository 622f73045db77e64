"""Triton sparse attention vs the PyTorch reference (interpreter on CPU, fp32 and fp16):
forward, lse and every gradient, on fresh random inputs with packed documents, lengths that are
not multiples of the tiles or the compression ratio, fewer visible entries than top-k, empty
(-1) slots and duplicate indices."""
import pytest
import torch

from kernels.sparse_attention import (KernelConfig, SparseAttentionConfigs, default_configs,
                                      sparse_attention_triton)
from model.sparse_attention import sparse_attention
from doc_layouts import layout_from_cuts
from hopper_compile import run_fresh

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _layout(B, L, cuts, ratio):
    return layout_from_cuts(B, L, cuts, ratio, DEVICE)


def _run_both(q, kv, sink, lay, window, ckv, c_end, topk, configs=None, use_lse_grad=True, tune=None):
    """Forward + backward of the reference and the kernel with the same random cotangents."""
    leaves = [q, kv, sink] + ([ckv] if ckv is not None else [])
    results = []
    do = dlse = None
    for fn in ("ref", "triton"):
        kw = dict(ckv=ckv, c_end=c_end, topk_idx=topk, return_lse=True)
        if fn == "ref":
            o, lse = sparse_attention(q, kv, sink, lay.doc_start, window, q.shape[-1] ** -0.5, **kw)
        else:
            o, lse = sparse_attention_triton(q, kv, sink, lay.doc_start, window, q.shape[-1] ** -0.5,
                                             configs=configs, tune=tune, **kw)
        if do is None:
            do, dlse = torch.randn_like(o), torch.randn_like(lse)
        loss = (o.float() * do.float()).sum() + ((lse * dlse).sum() if use_lse_grad else 0.0)
        grads = torch.autograd.grad(loss, leaves)
        results.append([o, lse, *grads])
    return results


def _inputs(B, L, H, D, N, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype).requires_grad_()
    sink = (torch.randn(H, generator=g) * 2).to(DEVICE).requires_grad_()
    return mk(B, L, H, D), mk(B, L, D), sink, (mk(B, N, D) if N else None)


NAMES = ["o", "lse", "dq", "dkv", "dsink", "dckv"]


def _check(results, tol):
    ref, got = results
    for name, a, b in zip(NAMES, ref, got):
        assert torch.isfinite(b.float()).all(), f"{name}: non-finite values"
        err = _rel(b, a)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"


# fp32: interpreter dots are exact fp32, so the kernel must agree to rounding
CASES = [
    # mode, B, L, H, D, window, ratio, K, doc cuts per row
    ("window", 2, 45, 3, 32, 8, 4, 0, [[17], []]),
    ("dense", 2, 43, 4, 32, 8, 4, 0, [[11, 30], []]),       # CSA dense mode / HCA
    ("dense", 1, 70, 2, 64, 16, 16, 0, [[25]]),              # HCA-like ratio, partial blocks dropped
    ("topk", 2, 37, 4, 32, 8, 4, 6, [[20], [3]]),
    ("topk", 1, 33, 20, 32, 4, 4, 40, [[9]]),                # K > N: fewer visible than top-k; 2 head blocks
]


@pytest.mark.parametrize("mode,B,L,H,D,window,ratio,K,cuts", CASES)
def test_matches_reference_fp32(mode, B, L, H, D, window, ratio, K, cuts):
    lay, cl = _layout(B, L, cuts, ratio)
    N = cl.c_end.shape[1] if mode != "window" else 0
    q, kv, sink, ckv = _inputs(B, L, H, D, N, torch.float32, seed=hash((mode, L, H)) % 1000)
    c_end = cl.c_end if N else None
    topk = None
    configs = None
    if mode == "topk":
        g = torch.Generator().manual_seed(7)
        topk = torch.randint(-1, N, (B, L, K), generator=g).to(DEVICE)
        topk[:, :, 0] = topk[:, :, 1]  # duplicate slots count twice, as in the reference
        if H > 16:  # several head blocks with a partial last one; dq and dckv in two launches
            configs = SparseAttentionConfigs(KernelConfig(1, 16, 16), KernelConfig(1, 16, 16, split=True),
                                             KernelConfig(1, 16, 16))
    _check(_run_both(q, kv, sink, lay, window, ckv, c_end, topk, configs), tol=2e-5)


def test_topk_from_indexer_selection_fp16():
    """Realistic top-k: the indexer's select_topk on random scores (descending, -1 padded)."""
    from model.indexer import select_topk

    B, L, H, D, W, m, K = 1, 41, 4, 32, 8, 4, 8
    lay, cl = _layout(B, L, [[14]], m)
    N = cl.c_end.shape[1]
    q, kv, sink, ckv = _inputs(B, L, H, D, N, torch.float16, seed=3)
    t = torch.arange(L, device=DEVICE)
    vis = (cl.c_end[:, None, :] >= lay.doc_start[:, :, None]) & (cl.c_end[:, None, :] <= t[None, :, None])
    scores = torch.randn(B, L, N, device=DEVICE).masked_fill(~vis, float("-inf"))
    topk = select_topk(scores, K)
    assert (topk == -1).any()  # early tokens see fewer than K entries
    _check(_run_both(q, kv, sink, lay, W, ckv, cl.c_end, topk), tol=1e-2)


def test_dense_fp16_multi_token_tiles_no_lse_grad():
    """Several tokens per program (block_t > 1) crossing a document boundary, fp16."""
    B, L, H, D, W, m = 1, 50, 2, 32, 12, 4
    lay, cl = _layout(B, L, [[21]], m)
    N = cl.c_end.shape[1]
    q, kv, sink, ckv = _inputs(B, L, H, D, N, torch.float16, seed=11)
    cfg = default_configs(H, D, topk_mode=False)
    assert cfg.fwd.block_t > 1
    res = _run_both(q, kv, sink, lay, W, ckv, cl.c_end, None, use_lse_grad=False)
    _check(res, tol=1e-2)


def test_window_only_returns_tensor_and_writes_every_element():
    B, L, H, D = 1, 19, 2, 32
    lay, _ = _layout(B, L, [[5]], 4)
    q, kv, sink, _ = _inputs(B, L, H, D, 0, torch.float32, seed=5)
    o = sparse_attention_triton(q, kv, sink, lay.doc_start, 4, D ** -0.5)
    assert isinstance(o, torch.Tensor) and o.shape == q.shape and torch.isfinite(o).all()
    ref = sparse_attention(q, kv, sink, lay.doc_start, 4, D ** -0.5)
    assert _rel(o, ref) < 2e-5


def test_bad_inputs_raise_clear_errors():
    B, L, H, D = 1, 16, 2, 32
    lay, cl = _layout(B, L, [[]], 4)
    q, kv, sink, ckv = _inputs(B, L, H, D, cl.c_end.shape[1], torch.float32, seed=1)
    with pytest.raises(ValueError, match="c_end is required"):
        sparse_attention_triton(q, kv, sink, lay.doc_start, 4, 0.1, ckv=ckv)
    with pytest.raises(ValueError, match="non-decreasing"):
        sparse_attention_triton(q, kv, sink, lay.doc_start, 4, 0.1, ckv=ckv, c_end=cl.c_end.flip(1))
    with pytest.raises(ValueError, match="sink"):
        sparse_attention_triton(q, kv, sink[:1], lay.doc_start, 4, 0.1)


def test_tile_that_does_not_fit_shrinks_until_it_fits():
    """A launch refused for shared memory is retried with a smaller tile (no partial writes
    happen: Triton refuses before the kernel starts)."""
    from triton.runtime.errors import OutOfResources

    from kernels.sparse_attention import _with_shrink

    tried = []

    def launch(cfg):
        tried.append(cfg)
        if cfg.block_h * cfg.block_n > 32 * 16:
            raise OutOfResources(300000, 232448, "shared memory")
        return "ran"

    start = KernelConfig(1, 64, 32, 8, 2)
    assert _with_shrink(launch, start, True, "test") == "ran"
    assert tried[-1] == KernelConfig(1, 32, 16, 8, 1)
    with pytest.raises(OutOfResources):
        _with_shrink(lambda cfg: (_ for _ in ()).throw(OutOfResources(1, 0, "shared memory")),
                     KernelConfig(1, 16, 16, 4, 1), True, "test")


# ----------------------------------------------------------------------------- variants
# Algorithmic variants (kernels.sparse_attention.VARIANTS): clean indices + index prefetch in the
# forward and the fused backward; the split backward (delta kernel, dq-only pass, key-major
# d(ckv) pass with the head dim whole or in two chunks). Small tiles so that several key tiles,
# head blocks and chunks occur at these sizes.
_KC = KernelConfig
VARIANT_CFGS = {
    "clean_prefetch": SparseAttentionConfigs(_KC(1, 16, 16, prefetch=True), _KC(1, 16, 16, prefetch=True),
                                             _KC(1, 16, 16), clean_idx=True),
    "split_dc_chunks": SparseAttentionConfigs(_KC(1, 16, 16), _KC(1, 16, 16, prefetch=True), _KC(1, 16, 16),
                                              bwd_dc=_KC(1, 16, 16, d_chunk=16, prefetch=True), clean_idx=True),
    "split_dc_whole_unclean": SparseAttentionConfigs(_KC(1, 16, 16), _KC(1, 16, 16), _KC(1, 16, 16),
                                                     bwd_dc=_KC(1, 16, 16)),
}


@pytest.mark.parametrize("name", list(VARIANT_CFGS))
@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "topk"] + [CASES[1]])
def test_variants_match_reference_fp32(name, case):
    mode, B, L, H, D, window, ratio, K, cuts = case
    lay, cl = _layout(B, L, cuts, ratio)
    N = cl.c_end.shape[1]
    q, kv, sink, ckv = _inputs(B, L, H, D, N, torch.float32, seed=hash((mode, L, H, name)) % 1000)
    topk = None
    cfg = VARIANT_CFGS[name]
    if mode == "topk":
        g = torch.Generator().manual_seed(7)
        topk = torch.randint(-1, N, (B, L, K), generator=g).to(DEVICE)  # -1 slots, invisible entries
        topk[:, :, 0] = topk[:, :, 1]
    elif cfg.bwd_dc is not None:  # dense entries: several tokens per program in both passes
        cfg = SparseAttentionConfigs(_KC(4, 4, 16), _KC(4, 4, 16), _KC(4, 4, 16), bwd_dc=_KC(4, 4, 16, d_chunk=16))
    _check(_run_both(q, kv, sink, lay, window, ckv, cl.c_end, topk, cfg), tol=2e-5)


def test_split_backward_fp16_indexer_selection():
    """The split backward on the indexer's real selection (descending, -1 padded), fp16."""
    from model.indexer import select_topk

    B, L, H, D, W, m, K = 1, 41, 4, 32, 8, 4, 8
    lay, cl = _layout(B, L, [[14]], m)
    N = cl.c_end.shape[1]
    q, kv, sink, ckv = _inputs(B, L, H, D, N, torch.float16, seed=4)
    t = torch.arange(L, device=DEVICE)
    vis = (cl.c_end[:, None, :] >= lay.doc_start[:, :, None]) & (cl.c_end[:, None, :] <= t[None, :, None])
    topk = select_topk(torch.randn(B, L, N, device=DEVICE).masked_fill(~vis, float("-inf")), K)
    _check(_run_both(q, kv, sink, lay, W, ckv, cl.c_end, topk, VARIANT_CFGS["split_dc_chunks"]), tol=1e-2)


@pytest.mark.parametrize("variant", ["baseline", "tuned", "fwd_prefetch", "bwd_split", "combo"])
def test_named_variants_run(variant, monkeypatch):
    """The registry's variants (selected through the environment variable, as the benchmark's
    users would) resolve to valid configs and match the reference on a small top-k case."""
    from kernels.sparse_attention import VARIANT_ENV, VARIANTS, variant_configs

    for name in VARIANTS:  # every entry builds for both head configurations
        variant_configs(name, 64, 512, True), variant_configs(name, 16, 256, False)
    monkeypatch.setenv(VARIANT_ENV, variant)
    B, L, H, D, window, ratio, K = 1, 37, 4, 32, 8, 4, 6
    lay, cl = _layout(B, L, [[20]], ratio)
    N = cl.c_end.shape[1]
    q, kv, sink, ckv = _inputs(B, L, H, D, N, torch.float32, seed=21)
    topk = torch.randint(-1, N, (B, L, K), generator=torch.Generator().manual_seed(8)).to(DEVICE)
    _check(_run_both(q, kv, sink, lay, window, ckv, cl.c_end, topk), tol=2e-5)


# ----------------------------------------------------------------------------- autotune candidates
# On CUDA the forward, query-pass and window-dkv kernels are autotuned over tile_candidates (the
# named tile first). Every candidate must give the reference's results: forced here one at a time
# (tune={kernel: its meta-parameters}) from the small preset's tiles (16 heads), on odd lengths,
# an odd head dim and document boundaries; the grids and the per-token entry table follow the tile.
def _small_preset_candidates(topk_mode):
    from kernels.sparse_attention import _meta, tile_candidates, variant_configs

    cfgs = variant_configs("tuned", 16, 256, topk_mode)
    return {k: [_meta(k, c) for c in tile_candidates(k, getattr(cfgs, k))] for k in ("fwd", "bwd_q", "bwd_kv")}


def _candidate_tunes(topk_mode):
    cands = _small_preset_candidates(topk_mode)
    n = max(len(v) for v in cands.values())
    return [{k: v[min(i, len(v) - 1)] for k, v in cands.items()} for i in range(n)]


@pytest.mark.parametrize("mode", ["window", "dense", "topk"])
def test_every_autotune_candidate_matches_reference(mode):
    cands = _small_preset_candidates(mode == "topk")
    assert all(len(v) >= 2 for v in cands.values()), cands   # something to choose between
    B, L, H, D, window, ratio, K = 2, 45, 16, 40, 8, 4, 7
    lay, cl = _layout(B, L, [[17], [4, 30]], ratio)
    N = cl.c_end.shape[1] if mode != "window" else 0
    q, kv, sink, ckv = _inputs(B, L, H, D, N, torch.float32, seed=hash(mode) % 1000)
    topk = None
    if mode == "topk":
        topk = torch.randint(-1, N, (B, L, K), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    c_end = cl.c_end if N else None
    for tune in _candidate_tunes(mode == "topk"):
        try:
            _check(_run_both(q, kv, sink, lay, window, ckv, c_end, topk, tune=tune), tol=2e-5)
        except AssertionError as exc:
            raise AssertionError(f"tune={tune}: {exc}") from exc


def test_autotune_candidates_fp16_hca_ratio():
    """fp16, the HCA ratio (entries complete every 16 tokens here), the candidates' tile heights."""
    B, L, H, D, window, ratio = 1, 61, 16, 32, 8, 16
    lay, cl = _layout(B, L, [[22]], ratio)
    q, kv, sink, ckv = _inputs(B, L, H, D, cl.c_end.shape[1], torch.float16, seed=13)
    for tune in _candidate_tunes(False):
        _check(_run_both(q, kv, sink, lay, window, ckv, cl.c_end, None, tune=tune), tol=1e-2)


def test_tune_argument_checks_and_atomics_reset():
    from kernels.sparse_attention import _tuned, variant_configs

    B, L, H, D = 1, 16, 2, 32
    lay, cl = _layout(B, L, [[]], 4)
    q, kv, sink, ckv = _inputs(B, L, H, D, cl.c_end.shape[1], torch.float32, seed=1)
    with pytest.raises(ValueError, match="tune keys"):
        sparse_attention_triton(q, kv, sink, lay.doc_start, 4, 0.1, tune={"fwdd": {}})
    with pytest.raises(ValueError, match="powers of 2"):
        sparse_attention_triton(q, kv, sink, lay.doc_start, 4, 0.1, tune={"fwd": {"BLOCK_N": 24}})
    topk = torch.zeros(B, L, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="BLOCK_T = 1"):
        sparse_attention_triton(q, kv, sink, lay.doc_start, 4, 0.1, ckv=ckv, c_end=cl.c_end, topk_idx=topk,
                                tune={"bwd_q": {"BLOCK_T": 2}})
    with pytest.raises(ValueError, match="tune must be"):
        sparse_attention_triton(q, kv, sink, lay.doc_start, 4, 0.1, tune="fast")
    # timing runs a candidate many times: the query pass's d(ckv) atomics are zeroed before each
    cfgs = variant_configs("tuned", 16, 256, True)
    assert _tuned("bwd_q", cfgs.bwd_q).tuned.reset_to_zero == ["DCKV"]
    assert _tuned("fwd", cfgs.fwd).tuned.reset_to_zero == []


_COMPILE_CANDIDATES_FOR_HOPPER = """
import os, re, subprocess, tempfile
import triton
from triton.backends import backends
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import sparse_attention as sa

if "nvidia" not in backends:
    print("SKIP no NVIDIA backend")
    raise SystemExit(0)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
POINTERS = {"Q": "bf16", "KV": "bf16", "CKV": "bf16", "O": "bf16", "DO": "bf16", "DQ": "bf16", "DKV": "bf16",
            "CEND": "i32", "TOPK": "i32", "DSTART": "i32", "NRANGE": "i32", "SINK": "fp32", "LSE": "fp32",
            "DLSE": "fp32", "DELTA": "fp32", "DCKV": "fp32"}


def resources(fn, consts, warps, stages):
    consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **consts}
    sig = {n: "constexpr" if n in consts else "*" + POINTERS[n] if n in POINTERS
           else "fp32" if n in ("qk_scale", "scale") else "i32" for n in fn.arg_names}
    # at the micro-batch (4 x 4096 tokens, 16 x 256, N = 1024 | 32, K = 256, window 128) every pointer
    # and integer argument is a multiple of 16: Triton specialises them so, as here
    div16 = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n] not in ("constexpr", "fp32")}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=div16),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    return {m: int(re.search(m + r":(\\d+)", out).group(1)) for m in ("REG", "STACK", "LOCAL")}


H, D = 16, 256   # the small preset (conf/model/small.yaml)
FN = {"fwd": sa._sparse_attn_fwd, "bwd_q": sa._sparse_attn_bwd_q, "bwd_kv": sa._sparse_attn_bwd_window_kv}
MODES = {  # kernel -> (top-k mode, constexprs of one launch kind), as the launches pass them
    "fwd": [(False, dict(HAS_C=False, TOPK_MODE=False)), (False, dict(HAS_C=True, TOPK_MODE=False)),
            (True, dict(HAS_C=True, TOPK_MODE=True, CLEAN_IDX=True))],
    "bwd_q": [(False, dict(HAS_C=False, TOPK_MODE=False, HAS_DLSE=True, DO_DQ=True, DO_DC=False)),
              (False, dict(HAS_C=True, TOPK_MODE=False, HAS_DLSE=True, DO_DQ=True, DO_DC=True)),
              (True, dict(HAS_C=True, TOPK_MODE=True, HAS_DLSE=True, DO_DQ=True, DO_DC=False, CLEAN_IDX=True,
                          PREFETCH=True)),
              (True, dict(HAS_C=True, TOPK_MODE=True, HAS_DLSE=True, DO_DQ=False, DO_DC=True, CLEAN_IDX=True,
                          PREFETCH=True))],
    "bwd_kv": [(False, {})],
}
bad = False
for kernel, modes in MODES.items():
    for topk_mode, flags in modes:
        named = getattr(sa.variant_configs(sa.DEFAULT_VARIANT, H, D, topk_mode), kernel)
        for i, c in enumerate(sa.tile_candidates(kernel, named)):
            consts = dict(flags, BLOCK_D=D, **sa._meta(kernel, c))
            r = resources(FN[kernel], consts, c.num_warps, c.num_stages)
            print(kernel, flags, "named" if i == 0 else "candidate",
                  f"{c.block_t}x{c.block_h} n{c.block_n} w{c.num_warps} s{c.num_stages}", r)
            bad = bad or (i > 0 and (r["STACK"] > 0 or r["LOCAL"] > 0))
assert not bad, "an alternative spills (STACK / LOCAL > 0 above)"
print("OK")
"""


@pytest.mark.slow   # ~2 min on a busy 2-core CPU: a fresh process, ~30 compiles
def test_every_autotune_alternative_compiles_for_hopper_without_spills():
    """Each autotune candidate after the named tile, compiled as the H200 would (sm_90, bf16,
    outside the interpreter) at the small preset's heads for every launch kind (window, dense
    entries, top-k; the query pass's dq / d(ckv) passes): no stack frame (register spills). The
    named tiles compile too; at this head dim most of them spill (see _TILE_MOVES), which is why
    the alternatives exist."""
    run_fresh(_COMPILE_CANDIDATES_FOR_HOPPER, timeout=900)
