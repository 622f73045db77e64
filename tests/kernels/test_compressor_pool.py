"""kernels/compressor_pool.py (Triton's interpreter on CPU) vs model.compressor.compressor_pool,
forward and the gradients of kv, gate and ape, on fresh random inputs: packed documents (starts
not multiples of the ratio, a document shorter than one block, trailing partial blocks, a row
with no block), overlap on (CSA) and off (HCA), ratios 2..128, slot chunks and channel / entry
tiles that do not divide the sizes, B > 1, fp32 and fp16; then a Compressor with the kernel
against the same Compressor on the reference."""
import pytest
import torch

import model.compressor as mc
from kernels.compressor_pool import compressor_pool_triton
from model.compressor import Compressor, compressor_pool
from model.config import ModelConfig
from model.layout import CompressedLayout, DocLayout
from model.rope import RoPE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

DOC_IDS = torch.tensor([
    [0] * 9 + [1] * 4 + [2] * 3 + [3] * 14,    # packed: a 3-token document, partial blocks everywhere
    [0] * 30,                                  # one document with a trailing partial block
    [5] * 17 + [6] * 13,
    [0, 1, 2] * 10,                            # only 1-token documents: no block at all
])


def _pool_inputs(doc_ids, ratio, overlap, c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    B, L = doc_ids.shape
    C = 2 * c if overlap else c
    pool = CompressedLayout.build(DocLayout.from_doc_ids(doc_ids), ratio).pooling
    kv = torch.randn(B, L, C, generator=g)
    gate = torch.randn(B, L, C, generator=g) * 3
    ape = torch.randn(ratio, C, generator=g)
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (kv, gate, ape)]
    idx = [t.to(DEVICE) for t in (pool.tokens, pool.prev, pool.no_prev, pool.invalid)]
    dout = torch.randn(B, L // ratio, c, generator=g).to(DEVICE)
    return leaves, idx, dout


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _compare(doc_ids, ratio, overlap, c, dtype, tiles=None, seed=0):
    leaves, idx, dout = _pool_inputs(doc_ids, ratio, overlap, c, dtype, seed)
    got = compressor_pool_triton(*leaves, *idx, overlap, **(tiles or {}))
    g_got = torch.autograd.grad((got.double() * dout).sum(), leaves)
    exact = [t.detach().double().requires_grad_() for t in leaves]   # the reference on the same values, fp64
    ref = compressor_pool(*exact, *idx, overlap)
    g_ref = torch.autograd.grad((ref * dout.double()).sum(), exact)
    assert got.dtype == dtype and got.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert _rel(got, ref) < tol
    for name, a, b, leaf in zip(("dkv", "dgate", "dape"), g_got, g_ref, leaves):
        assert a.dtype == leaf.dtype and a.shape == b.shape, name
        assert _rel(a, b) < tol, (name, _rel(a, b))
    # pads pool to zero; tokens of no block (and pads' tokens) get exactly zero gradient
    assert bool((got[idx[3]] == 0).all())
    outside = ~_covered(idx, doc_ids.shape)
    assert bool(outside.any())
    for a in g_got[:2]:
        assert bool((a[outside] == 0).all())


def _covered(idx, shape):
    """[B, L] bool: tokens inside a valid block."""
    tokens, _, _, invalid = idx
    cov = torch.zeros(shape, dtype=torch.long, device=tokens.device)
    cov.scatter_add_(1, tokens.flatten(1), (~invalid)[:, :, None].expand_as(tokens).flatten(1).long())
    return cov > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ratio,overlap", [(4, True), (4, False), (3, True), (2, True), (5, False), (8, False)])
def test_matches_reference_packed(ratio, overlap, dtype):
    _compare(DOC_IDS, ratio, overlap, 24, dtype, seed=ratio)


@pytest.mark.parametrize("tiles", [dict(block_e=2, block_s=2, block_c=16), dict(block_e=1, block_s=1, block_c=64),
                                   dict(block_e=4, block_s=4, block_c=32)])
@pytest.mark.parametrize("overlap", [True, False])
def test_tiles_that_do_not_divide(tiles, overlap):
    # ratio 3 in slot chunks of 2 (a partial chunk), 40 channels in tiles of 16/64/32, entry tiles of 2/1/4
    _compare(DOC_IDS, 3, overlap, 40, torch.float32, tiles, seed=7)


def test_hca_ratio_128_in_slot_chunks():
    # ratio 128 without overlap (HCA): 4 chunks of 32 slots; a 130-token document (1 block + 2
    # dropped tokens), one of 170 (1 block + 42), and a second row that is one 300-token document
    doc_ids = torch.tensor([[0] * 130 + [1] * 170, [0] * 300])
    _compare(doc_ids, 128, False, 12, torch.float32, seed=1)


def test_csa_single_document_long_row():
    # ratio 4 with overlap at a longer row: many entry tiles, every block with a previous one but the first
    _compare(torch.zeros(2, 203, dtype=torch.long), 4, True, 8, torch.float32, seed=2)


def test_bad_shapes_are_one_line_errors():
    leaves, idx, _ = _pool_inputs(DOC_IDS, 4, True, 8, torch.float32, 0)
    kv, gate, ape = leaves
    with pytest.raises(ValueError, match="ape must be"):
        compressor_pool_triton(kv, gate, ape[:3], *idx, True)
    with pytest.raises(ValueError, match="kv and gate"):
        compressor_pool_triton(kv, gate[:, 1:], ape, *idx, True)
    with pytest.raises(ValueError, match="invalid must be"):
        compressor_pool_triton(kv, gate, ape, *idx[:3], idx[3][:, 1:], True)


@pytest.mark.parametrize("ratio,overlap", [(4, True), (16, False)])
def test_compressor_with_kernel_matches_reference(monkeypatch, ratio, overlap):
    # the whole Compressor (projections, pooling, norm, RoPE): kernel vs reference, output and
    # every gradient (x and all parameters), packed rows, B = 4
    cfg = ModelConfig.from_preset("tiny")
    torch.manual_seed(ratio)
    comp = Compressor(cfg, ratio, cfg.head_dim, overlap, RoPE.for_ratio(cfg, ratio)).to(DEVICE)
    with torch.no_grad():
        comp.ape.normal_(std=0.5)
        comp.wgate.weight.mul_(20)
    x = torch.randn(*DOC_IDS.shape, cfg.dim, device=DEVICE, requires_grad=True)
    cl = CompressedLayout.build(DocLayout.from_doc_ids(DOC_IDS.to(DEVICE)), ratio)
    cot = torch.randn(DOC_IDS.shape[0], DOC_IDS.shape[1] // ratio, cfg.head_dim, device=DEVICE)
    res = []
    for fn in (compressor_pool, compressor_pool_triton):
        with monkeypatch.context() as mp:
            mp.setattr(mc, "get_compressor_pool", lambda *a, fn=fn: fn)
            out = comp(x, cl)
        res.append((out, torch.autograd.grad((out * cot).sum(), [x, *comp.parameters()])))
    (o_ref, g_ref), (o_got, g_got) = res
    assert _rel(o_got, o_ref) < 1e-5
    for (name, _), a, b in zip([("x", None), *comp.named_parameters()], g_got, g_ref):
        assert _rel(a, b) < 1e-4, (name, _rel(a, b))


def test_dispatch_picks_the_kernel_under_auto_on_cuda():
    # auto: the kernel on CUDA (measured on the H200: model/dispatch.py); triton: the kernel;
    # fp64 and CPU: the reference
    assert mc.get_compressor_pool("auto", "cuda", torch.float32) is compressor_pool_triton
    assert mc.get_compressor_pool("auto", "cuda", torch.float64) is compressor_pool
    assert mc.get_compressor_pool("triton", "cuda", torch.float32) is compressor_pool_triton
    assert mc.get_compressor_pool("auto", "cpu", torch.float32) is compressor_pool
    assert mc.get_compressor_pool("torch", "cuda", torch.float32) is compressor_pool
