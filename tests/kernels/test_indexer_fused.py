"""Fused (exact, deterministic) indexer top-k and the FP8 scoring path (interpreter on CPU):
equality with the reference selection including ties, packed documents, lengths that are not
multiples of the tiles or the ratio, fewer visible entries than k, fp32 and fp16; the fp8
reference quantisation, its recall against full precision, and the config/dispatch plumbing."""
import logging

import pytest
import torch

from model import dispatch
from model.indexer_fp8 import (fp8_roundtrip, indexer_scores_fp8_reference, indexer_topk_fp8_reference,
                                 quantize_fp8, topk_recall)
from kernels.indexer_topk import indexer_scores_triton, indexer_topk, quantize_fp8_triton
from model.config import ConfigError, ModelConfig
from model.indexer import get_indexer_topk, indexer_scores, select_topk
from model.indexer_topk import reference_indexer_topk
from model.layout import DocLayout
from doc_layouts import layout_from_cuts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layout(B, L, ratio, cuts):
    return layout_from_cuts(B, L, cuts, ratio, DEVICE)


def _case(B, L, Hi, Di, ratio, cuts, dtype, seed, integer=False):
    """integer=True: small integers, so every score is exact in fp16/fp32 whatever the summation
    order (kernel and reference agree bit for bit) and ties (equal scores, zeros) are common."""
    g = torch.Generator().manual_seed(seed)
    lay, cl = _layout(B, L, ratio, cuts)
    N = cl.c_end.shape[1]
    if integer:
        r = lambda *s: torch.randint(-2, 3, s, generator=g).float()
    else:
        r = lambda *s: torch.randn(*s, generator=g)
    q, w, k = r(B, L, Hi, Di), r(B, L, Hi), r(B, N, Di)
    if integer:  # duplicate entries: exact ties between different indices
        k[:, 1::3] = k[:, 0:-1:3][:, : k[:, 1::3].shape[1]]
    return q.to(DEVICE, dtype), w.to(DEVICE, dtype), k.to(DEVICE, dtype), cl.c_end, lay.doc_start


@pytest.mark.parametrize("dtype,k", [(torch.float32, 5), (torch.float16, 20)])
def test_fused_equals_reference_exactly_with_ties(dtype, k):
    """Exact scores -> the fused selection (set AND slot order, -1 padding) equals select_topk.
    L=70: not a multiple of the ratio or the tiles; 3 documents in row 0; two chunks; k=20 > N=17:
    every query has fewer visible entries than k; k=5: early tokens of each document too."""
    q, w, kk, c_end, ds = _case(2, 70, 2, 16, 4, [[21, 50], []], dtype, seed=k, integer=True)
    ref = select_topk(indexer_scores(q, w, kk, c_end, ds), k)
    got = indexer_topk(q, w, kk, c_end, ds, k, select="fused", chunk=64)
    assert torch.equal(got, ref)
    assert (got == -1).any()


def test_fused_random_scores_and_options():
    """Random fp32 inputs: same as select_topk of the kernel's own scores (exact), and the same
    scores as the reference's selection; several register blocks per row; unordered slots."""
    q, w, kk, c_end, ds = _case(1, 75, 2, 32, 4, [[30]], torch.float32, seed=3)  # N = 18 > row_block 16
    own = select_topk(indexer_scores_triton(q, w, kk, c_end, ds), 9)
    ref_scores = indexer_scores(q, w, kk, c_end, ds)
    ref = select_topk(ref_scores, 9)
    got = indexer_topk(q, w, kk, c_end, ds, 9, select="fused")
    assert torch.equal(got, own)
    pick = lambda idx: torch.gather(ref_scores, 2, idx.clamp(min=0)).masked_fill(idx < 0, float("-inf"))
    torch.testing.assert_close(pick(got), pick(ref), rtol=1e-5, atol=1e-5)
    multi = indexer_topk(q, w, kk, c_end, ds, 9, select="fused", row_block=16)   # 2 blocks per row
    assert torch.equal(multi, own)
    loose = indexer_topk(q, w, kk, c_end, ds, 9, select="fused", ordered=False)
    key = lambda idx: torch.where(idx < 0, 10 ** 6, idx).sort(-1).values
    assert torch.equal(key(loose), key(own))
    asc = torch.where(loose < 0, 10 ** 6, loose)
    assert bool((asc[..., 1:] >= asc[..., :-1]).all())                          # ascending, -1 last


def test_select_topk_ties_lower_index_first():
    s = torch.tensor([[[1.0, 3.0, 3.0, -0.0, 0.0, 3.0, float("-inf")]]])
    assert select_topk(s, 4).tolist() == [[[1, 2, 5, 0]]]
    assert select_topk(s, 6).tolist() == [[[1, 2, 5, 0, 3, 4]]]
    assert select_topk(s, 7).tolist() == [[[1, 2, 5, 0, 3, 4, -1]]]


# ----------------------------------------------------------------------------- fp8
def test_fp8_reference_quantisation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 64, generator=g) * torch.rand(5, 7, 1, generator=g) * 10
    x[0, 0] = 0.0
    x8, sc = quantize_fp8(x)
    assert x8.dtype == torch.float8_e4m3fn and sc.shape == (5, 7)
    assert float(x8.float().abs().amax()) == 448.0
    assert bool((x8[0, 0].float() == 0).all())
    err = (x8.float() * sc[..., None] - x).norm() / x.norm()
    assert err < 0.05, err  # e4m3: 3 mantissa bits


def test_fp8_quant_kernel_matches_reference():
    """Same scales; same bytes except where Triton's CPU interpreter mis-rounds a carry into the
    next binade (it returns half the value; the GPU converts correctly: bench/gpu_check.py)."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 11, 32, generator=g) * 3).to(DEVICE)
    a8, asc = quantize_fp8(x)
    b8, bsc = quantize_fp8_triton(x, force_kernel=True)
    assert torch.equal(asc, bsc)
    bad = a8.view(torch.uint8) != b8.view(torch.uint8)
    if DEVICE == "cuda":
        assert not bad.any()
    else:
        af, bf = a8.float()[bad], b8.float()[bad]
        assert bool((bf * 2 == af).all()) and bool((af.abs().log2() % 1 == 0).all())


def test_fp8_kernel_scores_and_fused_selection_match_reference():
    q, w, kk, c_end, ds = _case(1, 60, 2, 32, 4, [[23]], torch.float32, seed=5)
    ref = indexer_scores_fp8_reference(q, w, kk, c_end, ds)
    got = indexer_scores_triton(q, w, kk, c_end, ds, score_dtype="fp8")
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(got))
    assert ((got[fin] - ref[fin]).norm() / ref[fin].norm()) < 1e-5
    sel = indexer_topk(q, w, kk, c_end, ds, 7, score_dtype="fp8", select="fused")
    assert torch.equal(sel, select_topk(got, 7))
    assert topk_recall(sel, indexer_topk_fp8_reference(q, w, kk, c_end, ds, 7), kk.shape[1]) > 0.97


def test_fp8_reference_recall_against_full_precision():
    """Top-k recall |topk_fp8 ∩ topk_fp32| / k on random inputs at a small V4-like shape."""
    q, w, kk, c_end, ds = _case(1, 1024, 8, 64, 4, [[300]], torch.float32, seed=7)
    w = w.abs() * (8 * 64) ** -0.5  # V4's weights are mostly of one sign at init; either is fine
    k = 32
    full = select_topk(indexer_scores(q, w, kk, c_end, ds), k)
    fp8 = indexer_topk_fp8_reference(q, w, kk, c_end, ds, k)
    assert topk_recall(fp8, full, kk.shape[1]) > 0.9
    qd, kd = fp8_roundtrip(q, kk)
    assert torch.equal(fp8, select_topk(indexer_scores(qd, w.float(), kd, c_end, ds), k))


# ----------------------------------------------------------------------------- plumbing
def test_config_validates_the_new_options():
    assert ModelConfig.from_preset("tiny").indexer_score_dtype == "bf16"
    with pytest.raises(ConfigError, match="indexer_score_dtype.*bf16.*fp8"):
        ModelConfig.from_preset("tiny", indexer_score_dtype="fp16")
    with pytest.raises(ConfigError, match="indexer_select"):
        ModelConfig.from_preset("tiny", indexer_select="radix")
    assert dispatch.INDEXER_SCORE_DTYPES == ("bf16", "fp8")
    assert dispatch.INDEXER_SELECTS == ("chunked", "unsorted", "fused")
    assert ModelConfig.from_preset("tiny", indexer_select="unsorted").indexer_select == "unsorted"


def test_dispatch_fp8_on_cpu_logs_once_and_uses_the_fp8_reference(caplog):
    dispatch._log_fp8_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="model.dispatch"):
        for _ in range(3):
            fn = get_indexer_topk("auto", "cpu", torch.float32, "fp8", "fused")
            assert fn is indexer_topk_fp8_reference
    assert sum("fp8" in r.getMessage() for r in caplog.records) == 1
    assert get_indexer_topk("torch", "cpu", None, "fp8") is indexer_topk_fp8_reference
    assert get_indexer_topk("auto", "cpu", None, "bf16", "fused") is reference_indexer_topk
    with pytest.raises(RuntimeError, match="needs CUDA"):
        get_indexer_topk("triton", "cpu", None, "fp8")
    with pytest.raises(ValueError, match="score_dtype"):
        get_indexer_topk("auto", "cpu", None, "int8")


def test_model_forward_with_fp8_selection_on_cpu():
    """The sparse CSA layer runs with the fp8 option on CPU (the fp8 reference selects)."""
    from model.attention import Attention

    cfg = ModelConfig.from_preset("tiny", indexer_score_dtype="fp8", indexer_select="fused")
    layer = next(i for i in range(cfg.n_layers) if cfg.layer_kind(i) == "csa")
    attn = Attention(cfg, layer)
    attn.set_attention_mode("sparse")
    L = 64
    lay = DocLayout.from_doc_ids(torch.zeros(1, L, dtype=torch.long))
    out, aux = attn(torch.randn(1, L, cfg.dim), lay)
    assert out.shape == (1, L, cfg.dim) and aux["topk_idx"] is not None
