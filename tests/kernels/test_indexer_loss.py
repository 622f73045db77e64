"""Triton sparse indexer-loss gathers (kernels/indexer_loss.py, interpreter on CPU) vs their
PyTorch references in model/indexer.py on fresh random inputs, fp32 and fp16: empty (-1) slots,
entries 0 and N-1, many queries selecting one entry (the dk atomics), a query listing an entry
twice, odd L / N / K (K not a multiple of the tile), B > 1, several head blocks and head-dim
chunks; then the Attention layer's indexer loss and gradients with the kernels vs the references."""
import pytest
import torch

from kernels.indexer_loss import (attention_mass_on_selected_triton, candidates, kl_over_selected_triton,
                                  selected_indexer_scores_triton)
from model.indexer import attention_mass_on_selected, selected_indexer_scores
from doc_layouts import layout_from_cuts
from hopper_compile import run_fresh

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _selection(g, B, L, N, K):
    """Random indices in [-1, N) with the corner cases planted."""
    idx = torch.randint(-1, N, (B, L, K), generator=g)
    idx[:, : L // 2, 0] = 0              # half the queries pick entry 0 (dk accumulation)
    idx[:, :, -1] = N - 1                # every query picks the last entry
    idx[0, 1, :] = -1                    # a query with an empty set
    idx[-1, 2, 1] = idx[-1, 2, 2] = 3    # one query lists an entry twice
    return idx.to(DEVICE)


CASES = [  # B, L, N, K, Hi, Di, block_k
    (2, 13, 7, 21, 3, 20, 16),     # K = 21 over tiles of 16; odd heads and head dim
    (1, 9, 11, 5, 2, 16, 16),      # K < one tile
    (3, 6, 5, 40, 16, 32, 32),     # many slots per entry (K > N), three batch rows
]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("B,L,N,K,Hi,Di,block_k", CASES)
@pytest.mark.parametrize("dk", ["dense", "atomic"])
def test_selected_scores_forward_and_backward_match_reference(dtype, tol, B, L, N, K, Hi, Di, block_k, dk):
    """dk both ways; the dense one in query segments of 5 (several per sequence, not a multiple
    of the query tile)."""
    g = torch.Generator().manual_seed(B * 100 + K)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype)
    q, w, k = r(B, L, Hi, Di), r(B, L, Hi) * 0.3, r(B, N, Di)
    idx = _selection(g, B, L, N, K)
    leaves = [t.requires_grad_() for t in (q, w, k)]
    got = selected_indexer_scores_triton(*leaves, idx, config={"BLOCK_K": block_k, "SEG": 5}, dk=dk)
    ref = selected_indexer_scores(*leaves, idx)
    assert got.dtype == ref.dtype == torch.float32 and got.shape == ref.shape
    assert torch.equal(got == float("-inf"), idx < 0) and torch.equal(ref == float("-inf"), idx < 0)
    valid = idx >= 0
    assert _rel(got[valid], ref[valid]) < tol
    cot = torch.randn(B, L, K, generator=g).to(DEVICE)
    cot[~valid] = float("nan")   # the loss never sends gradient to empty slots: must be ignored
    for a, b, name in zip(torch.autograd.grad(got, leaves, cot), torch.autograd.grad(ref, leaves, cot), "qwk"):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all() and _rel(a, b) < tol, (name, _rel(a, b))
        assert b.abs().max() > 0, name


def test_given_scores_skip_the_forward_kernel_and_keep_the_backward():
    """scores= (the top-k's values): returned as the output, no forward kernel; the backward (both
    dk modes) equals the one after the kernel's own forward."""
    g = torch.Generator().manual_seed(12)
    B, L, N, K, Hi, Di = 2, 11, 7, 5, 3, 16
    q, w, k = (torch.randn(*s, generator=g).to(DEVICE).requires_grad_() for s in ((B, L, Hi, Di), (B, L, Hi), (B, N, Di)))
    idx = _selection(g, B, L, N, K)
    own = selected_indexer_scores_triton(q, w, k, idx)
    given = own.detach().clone()
    cot = torch.randn(B, L, K, generator=g).to(DEVICE).masked_fill(idx < 0, 0.0)
    for dk in ("dense", "atomic"):
        got = selected_indexer_scores_triton(q, w, k, idx, scores=given, dk=dk)
        assert torch.equal(got, given) and got.data_ptr() == given.data_ptr()   # no copy, no kernel
        for a, b in zip(torch.autograd.grad(got, (q, w, k), cot),
                        torch.autograd.grad(selected_indexer_scores_triton(q, w, k, idx, dk=dk), (q, w, k), cot)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="scores must be fp32"):
        selected_indexer_scores_triton(q, w, k, idx, scores=given.double())


def test_selected_scores_non_contiguous_inputs_and_empty_selection():
    g = torch.Generator().manual_seed(5)
    B, L, N, K, Hi, Di = 2, 5, 6, 4, 2, 16
    base = torch.randn(B, L, 2 * Hi, Di, generator=g, device=DEVICE)
    q = base[:, :, ::2]                                                   # a strided head view
    w, k = torch.randn(B, L, Hi, generator=g).to(DEVICE), torch.randn(B, N, Di, generator=g).to(DEVICE)
    idx = _selection(g, B, L, N, K)
    torch.testing.assert_close(selected_indexer_scores_triton(q, w, k, idx), selected_indexer_scores(q, w, k, idx))
    empty = torch.full((B, L, K), -1, dtype=torch.long, device=DEVICE)
    qq, ww, kk = (t.clone().requires_grad_() for t in (q, w, k))
    out = selected_indexer_scores_triton(qq, ww, kk, empty)
    assert (out == float("-inf")).all()
    for grad in torch.autograd.grad(out, (qq, ww, kk), torch.ones_like(out)):
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("B,L,N,K,H,D,blocks", [
    (2, 11, 9, 21, 3, 40, {}),                                  # one head block, one chunk
    (1, 7, 5, 18, 20, 40, {"BLOCK_H": 16, "BLOCK_D": 16}),      # 2 head blocks, 3 head-dim chunks
    (3, 4, 6, 9, 16, 32, {"BLOCK_K": 32}),
])
def test_attention_mass_on_selected_matches_reference(dtype, tol, B, L, N, K, H, D, blocks):
    g = torch.Generator().manual_seed(L * 10 + H)
    q, ckv = torch.randn(B, L, H, D, generator=g).to(DEVICE, dtype), torch.randn(B, N, D, generator=g).to(DEVICE, dtype)
    lse = (torch.randn(B, L, H, generator=g) + 4).to(DEVICE)
    idx = _selection(g, B, L, N, K)
    got = attention_mass_on_selected_triton(q, ckv, lse, D ** -0.5, idx, config=blocks or None)
    ref = attention_mass_on_selected(q, ckv, lse, D ** -0.5, idx)
    assert got.dtype == ref.dtype == torch.float32 and got.shape == ref.shape
    assert torch.equal(got[idx < 0], torch.zeros_like(got[idx < 0]))
    assert _rel(got, ref) < tol


def _visible_case(g, B, L, ratio, cuts):
    """A packed-document layout's (c_end, doc_start) and its visibility [B, L, N]."""
    from model.layout import compressed_mask

    lay, cl = layout_from_cuts(B, L, cuts, ratio, DEVICE)
    return cl.c_end, lay.doc_start, compressed_mask(lay.doc_start, cl.c_end)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("B,L,H,D,K,cuts", [
    (2, 37, 3, 40, 21, [[11, 30], []]),     # packed documents, odd head dim (2 chunks of 32 at BLOCK_D 32)
    (1, 70, 20, 32, 9, [[25]]),              # > one query tile (at BLOCK_T 64), 20 heads
    (3, 17, 16, 32, 40, [[], [3], [8]]),     # K > N, B = 3
])
def test_dense_mass_matches_reference_on_visible_slots(dtype, tol, B, L, H, D, K, cuts):
    """visible=(c_end, doc_start): every visible selected slot equals the reference (invisible
    ones, which the loss drops, are 0), empty slots 0; every dense candidate forced; and
    dense="gather" (or no visibility) takes the gather kernel: the reference everywhere."""
    g = torch.Generator().manual_seed(L * 10 + H)
    c_end, doc_start, vis = _visible_case(g, B, L, 4, cuts)
    N = c_end.shape[1]
    q, ckv = torch.randn(B, L, H, D, generator=g).to(DEVICE, dtype), torch.randn(B, N, D, generator=g).to(DEVICE, dtype)
    lse = (torch.randn(B, L, H, generator=g) + 4).to(DEVICE)
    idx = _selection(g, B, L, N, K)
    ref = attention_mass_on_selected(q, ckv, lse, D ** -0.5, idx)
    seen = (idx >= 0) & torch.gather(vis, 2, idx.clamp(min=0))
    assert seen.any() and ((idx >= 0) & ~seen).any()     # both kinds of selected slots
    metas = [None] + [dict(m, BLOCK_D=min(m["BLOCK_D"], 32)) for m, _, _ in candidates("mass_dense", H, D)]
    for meta in metas:
        got = attention_mass_on_selected_triton(q, ckv, lse, D ** -0.5, idx, visible=(c_end, doc_start), config=meta)
        assert got.dtype == torch.float32 and torch.equal(got[~seen], torch.zeros_like(got[~seen])), meta
        assert _rel(got[seen], ref[seen]) < tol, (meta, _rel(got[seen], ref[seen]))
    for kw in ({"dense": "gather", "visible": (c_end, doc_start)}, {}):
        assert _rel(attention_mass_on_selected_triton(q, ckv, lse, D ** -0.5, idx, **kw), ref) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("Hi,Di", [(16, 128), (5, 24)])   # the small preset's indexer; odd heads / dims
def test_every_scores_candidate_matches_reference(dtype, tol, Hi, Di):
    """Each autotune candidate of the forward and of the backward, forced by its config dict (the
    interpreter ignores warps and stages): odd L (not a multiple of SPREAD), odd K (not a multiple
    of any BLOCK_K), two sequences whose dk rows the SPREAD order interleaves, entries picked by
    many queries."""
    B, L, N, K = 2, 19, 9, 37
    g = torch.Generator().manual_seed(Hi * Di)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype)
    q, w, k = r(B, L, Hi, Di), r(B, L, Hi) * 0.3, r(B, N, Di)
    idx = _selection(g, B, L, N, K)
    leaves = [t.requires_grad_() for t in (q, w, k)]
    ref = selected_indexer_scores(*leaves, idx)
    cot = torch.randn(B, L, K, generator=g).to(DEVICE)
    want = torch.autograd.grad(ref, leaves, cot)
    valid = idx >= 0
    metas = [(m, "atomic") for m, _, _ in candidates("scores_fwd") + candidates("scores_bwd", Hi, Di)]
    metas += [(dict(m, SEG=7), "dense") for m, _, _ in candidates("scores_dk", Hi, Di)]
    assert {m.get("SPREAD", 1) for m, _ in metas} == {1, 16} and len({m.get("BLOCK_K") for m, _ in metas}) >= 4
    for meta, dk in metas:
        got = selected_indexer_scores_triton(*leaves, idx, config=meta, dk=dk)
        assert torch.equal(got == float("-inf"), ~valid) and _rel(got[valid], ref[valid]) < tol, meta
        for a, b, name in zip(torch.autograd.grad(got, leaves, cot), want, "qwk"):
            assert _rel(a, b) < tol, (meta, dk, name, _rel(a, b))


def test_dense_dk_is_deterministic_and_chosen_where_it_fits():
    """The dense dk sums fixed partials in a fixed order (bitwise repeatable, unlike the
    atomics); "auto" takes it at the small preset's 4 x 4K micro-batch (N = 1024 = 4 K) and keeps
    the atomics where N >> K (the 64K stage) or G would be large."""
    from kernels.indexer_loss import dense_fits

    assert dense_fits(4, 4096, 1024, 256) and dense_fits(8, 4096, 1024, 256)
    assert not dense_fits(1, 65536, 16384, 256) and not dense_fits(64, 4096, 1024, 256)
    g = torch.Generator().manual_seed(11)
    B, L, N, K, Hi, Di = 2, 21, 9, 6, 3, 16
    q, w, k = (torch.randn(*s, generator=g).to(DEVICE).requires_grad_() for s in ((B, L, Hi, Di), (B, L, Hi), (B, N, Di)))
    idx = _selection(g, B, L, N, K)
    cot = torch.randn(B, L, K, generator=g).to(DEVICE)
    dks = [torch.autograd.grad(selected_indexer_scores_triton(q, w, k, idx, config={"SEG": 8}, dk="dense"), k, cot)[0]
           for _ in range(2)]
    assert torch.equal(dks[0], dks[1]) and dks[0].abs().max() > 0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("H,D", [(16, 256), (20, 40)])   # the small preset's attention; odd sizes
def test_every_mass_candidate_matches_reference(dtype, tol, H, D):
    B, L, N, K = 2, 5, 9, 37
    g = torch.Generator().manual_seed(H * D)
    q, ckv = torch.randn(B, L, H, D, generator=g).to(DEVICE, dtype), torch.randn(B, N, D, generator=g).to(DEVICE, dtype)
    lse = (torch.randn(B, L, H, generator=g) + 4).to(DEVICE)
    idx = _selection(g, B, L, N, K)
    ref = attention_mass_on_selected(q, ckv, lse, D ** -0.5, idx)
    cands = candidates("mass", H, D)
    assert len(cands) >= 3 and cands[0][0]["BLOCK_K"] == 64
    for meta, _, _ in cands:
        got = attention_mass_on_selected_triton(q, ckv, lse, D ** -0.5, idx, config=meta)
        assert torch.equal(got[idx < 0], torch.zeros_like(got[idx < 0])) and _rel(got, ref) < tol, meta


def test_first_candidates_are_the_tiles_before_autotuning():
    """off CUDA and under config="default" the kernels keep their earlier tiles."""
    assert candidates("scores_fwd")[0] == ({"BLOCK_K": 32}, 8, 3)
    for hi, di in ((16, 128), (64, 128)):
        assert candidates("scores_bwd", hi, di)[0] == ({"BLOCK_K": 32, "SPREAD": 1}, 8, 3)
    assert candidates("mass", 16, 256)[0] == ({"BLOCK_H": 16, "BLOCK_K": 64, "BLOCK_D": 64}, 8, 3)
    assert candidates("mass", 64, 512)[0] == ({"BLOCK_H": 64, "BLOCK_K": 64, "BLOCK_D": 64}, 8, 3)


def test_bad_inputs_raise_clear_errors():
    q, k = torch.randn(1, 3, 2, 16, device=DEVICE), torch.randn(1, 4, 16, device=DEVICE)
    w, idx = torch.randn(1, 3, 2, device=DEVICE), torch.zeros(1, 3, 2, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="one dtype"):
        selected_indexer_scores_triton(q, w, k.half(), idx)
    with pytest.raises(ValueError, match="w must be"):
        selected_indexer_scores_triton(q, w[..., :1], k, idx)
    with pytest.raises(ValueError, match="BLOCK_K"):
        selected_indexer_scores_triton(q, w, k, idx, config={"BLOCK_K": 24})
    with pytest.raises(ValueError, match="dk must be"):
        selected_indexer_scores_triton(q, w, k, idx, dk="sorted")
    with pytest.raises(ValueError, match="SPREAD"):
        selected_indexer_scores_triton(q, w, k, idx, config={"SPREAD": 0})
    with pytest.raises(ValueError, match="config must be"):
        selected_indexer_scores_triton(q, w, k, idx, config="fast")
    with pytest.raises(ValueError, match="one dtype"):
        attention_mass_on_selected_triton(q, k.half(), w, 0.3, idx)
    with pytest.raises(ValueError, match="dense must be"):
        attention_mass_on_selected_triton(q, k, w, 0.3, idx, dense="yes")
    with pytest.raises(ValueError, match="visible must be"):
        attention_mass_on_selected_triton(q, k, w, 0.3, idx, visible=(idx[0], idx[0]), dense="dense")
    with pytest.raises(ValueError, match="BLOCK_H"):
        attention_mass_on_selected_triton(q, k, w, 0.3, idx, config={"BLOCK_H": 8})
    with pytest.raises(ValueError, match="index_n_heads x index_head_dim"):
        selected_indexer_scores_triton(torch.randn(1, 3, 128, 256, device=DEVICE), torch.randn(1, 3, 128, device=DEVICE),
                                       torch.randn(1, 4, 256, device=DEVICE), idx)
    with pytest.raises(ValueError, match="lse must be"):
        attention_mass_on_selected_triton(q, k, w[..., :1], 0.3, idx)
    if DEVICE == "cpu":   # on CUDA the same check is a device-side assert (kernels/checks.py)
        with pytest.raises(ValueError, match="index >= N"):
            attention_mass_on_selected_triton(q, k, w, 0.3, idx + 4)
        with pytest.raises(ValueError, match="index >= N"):
            selected_indexer_scores_triton(q, w, k, idx + 4)


def _layer_configs(cfg) -> list[tuple[dict | None, dict | None]]:
    """(scores config, mass config) pairs that force every candidate of the three kernels at the
    layer's head shapes (None: the default path, as the model calls it)."""
    import itertools

    scores = [m for m, _, _ in candidates("scores_fwd") + candidates("scores_bwd", cfg.index_n_heads, cfg.index_head_dim)]
    mass = [m for m, _, _ in candidates("mass", cfg.n_heads, cfg.head_dim)]
    return list(itertools.zip_longest(scores, mass))


@pytest.mark.parametrize("forced", [False, pytest.param(True, marks=pytest.mark.slow)])   # True: ~20 s
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
def test_attention_layer_indexer_loss_with_kernels_matches_reference(monkeypatch, dtype, tol, forced):
    """The CSA layer's sparse indexer loss (tiny config, three packed documents, a query with
    an empty set) and every indexer parameter's gradient: kernels vs references, same weights;
    the kernels on their default path, then with each autotune candidate forced."""
    import functools

    import model.indexer as mi
    from model.attention import Attention
    from model.config import ModelConfig
    from model.layout import DocLayout

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", attention_mode="sparse", attention_impl="torch")
    attn = Attention(cfg, 1).to(DEVICE, dtype).train()
    assert attn.indexer is not None
    with torch.no_grad():
        attn.indexer.compressor.ape.normal_(std=0.5)
        attn.sink.normal_()
    doc_ids = torch.tensor([[0] * 37, [0] * 9 + [1] * 17 + [2] * 11]).to(DEVICE)
    lay = DocLayout.from_doc_ids(doc_ids)
    x = torch.randn(*doc_ids.shape, cfg.dim, device=DEVICE).to(dtype)
    run = lambda: attn(x, lay)[1]["indexer_loss"]
    l_ref = run()
    g_ref = torch.autograd.grad(l_ref, list(attn.indexer.parameters()))
    assert float(l_ref.detach()) > 0
    for sc, mc in _layer_configs(cfg) if forced else [(None, None)]:
        calls = []
        with monkeypatch.context() as m:
            m.setattr(mi, "get_selected_indexer_scores", lambda *a, **k: calls.append("scores") or functools.partial(
                selected_indexer_scores_triton, config=sc))
            m.setattr(mi, "get_attention_mass_on_selected", lambda *a, **k: calls.append("mass") or functools.partial(
                attention_mass_on_selected_triton, config=mc))
            m.setattr(mi, "get_kl_over_selected", lambda *a, **k: calls.append("kl") or kl_over_selected_triton)
            l_k = run()
            g_k = torch.autograd.grad(l_k, list(attn.indexer.parameters()))
        assert calls == ["scores", "mass", "kl"]
        assert abs(float(l_k.detach()) - float(l_ref.detach())) <= tol * float(l_ref.detach()), (sc, mc)
        for (name, _), a, b in zip(attn.indexer.named_parameters(), g_k, g_ref):
            assert b.abs().max() > 0, name
            assert _rel(a, b) < tol, (sc, mc, name, _rel(a, b))


_COMPILE_CANDIDATES_FOR_HOPPER = """
import os, re, subprocess, tempfile
import triton
from triton.backends import backends
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import indexer_loss as il

if "nvidia" not in backends:
    print("SKIP no NVIDIA backend")
    raise SystemExit(0)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
POINTERS = {"Q", "W", "KI", "C", "IDX", "OUT", "G", "DQ", "DW", "DK", "GF", "DKP", "LSE", "CEND", "DSTART",
            "T", "S", "KL", "SCALE", "DS"}
INT64 = {"IDX", "CEND", "DSTART"}
FP32 = {"OUT", "G", "DW", "DK", "GF", "DKP", "LSE", "T", "S", "KL", "SCALE", "DS"}   # fp32 buffers; IDX int64; other pointers the model dtype


def resources(fn, consts, warps, stages):
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in POINTERS:
            sig[n] = "*i64" if n in INT64 else "*fp32" if n in FP32 else "*bf16"
        else:
            sig[n] = "fp32" if n == "scale" else "i32"
    # as a launch at the presets' sizes specialises: every pointer 16-byte aligned, every size and
    # stride a multiple of 16 (without the hint loads are not vectorised: far more registers)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n not in consts and n != "scale"}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    return {m: int(re.search(m + r":(\\d+)", out).group(1)) for m in ("REG", "STACK", "LOCAL")}


for (hi, di), (h, d) in (((16, 128), (16, 256)), ((64, 128), (64, 512))):   # small, flash
    jobs = [(il._scores_fwd, c, dict(HP=hi, DP=di)) for c in il.candidates("scores_fwd")]
    jobs += [(il._scores_bwd, c, dict(HP=hi, DP=di, DENSE_DK=dense)) for c in il.candidates("scores_bwd", hi, di)
             for dense in (False, True)]
    jobs += [(il._scores_bwd_dk, c, dict(DP=di)) for c in il.candidates("scores_dk", hi, di)]
    jobs += [(il._mass_on_selected, c, {}) for c in il.candidates("mass", h, d)]
    jobs += [(il._mass_dense, c, {}) for c in il.candidates("mass_dense", h, d)]
    jobs += [(fn, ({"BLOCK_K": 256 if hi == 16 else 512}, 4, 1), {}) for fn in (il._kl_fwd, il._kl_bwd)]   # index_topk
    for fn, (meta, warps, stages), shape in jobs:
        r = resources(fn, dict(shape, **({"PREC": "tf32"} if "PREC" in fn.arg_names else {}), **meta), warps, stages)
        print(fn.__name__, shape, meta, warps, stages, r)
        assert r["STACK"] == 0 and r["LOCAL"] == 0, ("spills", fn.__name__, shape, meta, warps, r)
print("OK")
"""


@pytest.mark.slow   # ~2-3 min on a busy 2-core CPU: a fresh process, 54 compiles
def test_every_candidate_compiles_for_hopper_without_spills():
    """Each autotune candidate compiled as the H200 would (sm_90, bf16, outside the interpreter)
    at the small and flash presets' head shapes: no stack frame (register spills), so autotune
    never has to time a spilling tile."""
    run_fresh(_COMPILE_CANDIDATES_FOR_HOPPER, timeout=600)


@pytest.mark.parametrize("B,L,K,cuts", [(2, 37, 9, [[11, 30], []]), (3, 17, 40, [[], [3], [8]])])
def test_kl_over_selected_matches_reference(B, L, K, cuts):
    """The fused selected-set KL vs model.indexer.kl_over_selected (fp32, interpreter): value and
    gradient, with packed documents (invisible selected slots), empty slots, queries with no set
    (the first of each document), a query whose target has no mass on its set (KL and gradient
    0), K not a power of two and K > N."""
    from model.indexer import kl_over_selected

    g = torch.Generator().manual_seed(B * 7 + K)
    c_end, doc_start, _ = _visible_case(g, B, L, 4, cuts)
    N = c_end.shape[1]
    idx = _selection(g, B, L, N, K)
    target = torch.rand(B, L, K, generator=g).to(DEVICE) ** 3
    target[0, L - 1] = 0.0
    scores = (torch.randn(B, L, K, generator=g) * 2).to(DEVICE).masked_fill(idx < 0, float("-inf")).requires_grad_()
    ref = kl_over_selected(target, scores, idx, c_end, doc_start)
    got = kl_over_selected_triton(target, scores, idx, c_end, doc_start)
    assert float(ref) > 0 and abs(float(got) - float(ref)) <= 1e-5 * float(ref)
    cot = torch.tensor(1.7, device=DEVICE)
    gr, = torch.autograd.grad(ref, scores, cot)
    gg, = torch.autograd.grad(got, scores, cot)
    assert torch.isfinite(gg).all() and _rel(gg, gr) < 1e-5
    assert torch.equal(gg[0, L - 1], torch.zeros_like(gg[0, L - 1]))
