"""model/matmul.py: the tensor-core form of F.linear(x.float(), w.float()) (``linears_fp32_fused``)
against the upcast reference, forward and every gradient. On CPU its products run upcast (no
``mm(out_dtype)`` kernel there), so these tests check the autograd plumbing and the hi/lo split
of the backward; bench/compressor.py checks the CUDA GEMMs at real sizes."""
import pytest
import torch

from model.matmul import linears_fp32, linears_fp32_fused, linears_fp32_reference, linears_fp32_supported


def _inputs(dtype, shape=(3, 17, 40), outs=(24, 24), seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_()
    ws = [(torch.randn(n, shape[-1], generator=g) * 0.1).to(dtype).requires_grad_() for n in outs]
    cots = [torch.randn(*shape[:-1], n, generator=g, dtype=torch.float64) for n in outs]
    return x, ws, cots


def _run(fn, x, ws, cots):
    ys = fn(x, *ws)
    loss = sum((y.double() * c).sum() for y, c in zip(ys, cots))
    return ys, torch.autograd.grad(loss, [x, *ws])


@pytest.mark.parametrize("outs", [(24, 24), (40, 40, 40), (5,)])
def test_fp64_exact(outs):
    # fp64: the hi/lo split is exact (lo = 0), so every output and gradient matches to rounding
    x, ws, cots = _inputs(torch.float64, outs=outs)
    (ys, gs), (yr, gr) = _run(linears_fp32_fused, x, ws, cots), _run(linears_fp32_reference, x, ws, cots)
    for a, b in zip(list(ys) + list(gs), list(yr) + list(gr)):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bf16_products_exact_in_fp32():
    # the claim the fast path rests on: bf16 x bf16 products summed in fp32 are the fp64 sums of
    # the same products up to fp32 summation error, i.e. no precision is lost to the operands
    x, ws, _ = _inputs(torch.bfloat16, shape=(64, 1024), outs=(32,))
    y = linears_fp32_fused(x, *ws)[0]
    exact = x.double() @ ws[0].double().t()
    bound = 1024 * 2.0 ** -24 * (x.double().abs() @ ws[0].double().abs().t())
    assert y.dtype == torch.float32
    assert bool(((y.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("outs", [(24, 24), (9, 9, 9)])
def test_bf16_matches_reference(outs):
    # forward: the same fp32 values; gradients: the reference's fp32 products rounded once to
    # bf16, ours from a 16-bit hi/lo split of the fp32 cotangent: equal but for rare one-ulp ties
    # (relative to the size of a cancelling sum, not of each element)
    x, ws, cots = _inputs(torch.bfloat16, outs=outs, scale=3.0)
    (ys, gs), (yr, gr) = _run(linears_fp32_fused, x, ws, cots), _run(linears_fp32_reference, x, ws, cots)
    for a, b in zip(ys, yr):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(gs, gr):
        assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-3
        assert (a == b).float().mean().item() > 0.97


def test_bf16_gradient_keeps_the_low_bits():
    # a cotangent that bf16 alone cannot hold (1 + 2^-12): the lo part carries it into dx
    x = torch.ones(1, 4, dtype=torch.bfloat16, requires_grad=True)
    w = torch.full((2, 4), 256.0, dtype=torch.bfloat16, requires_grad=True)
    (y,) = linears_fp32_fused(x, w)
    dy = torch.tensor([[1.0 + 2 ** -12, -1.0]])
    (dx,) = torch.autograd.grad(y, [x], dy)
    # reference: 256 * (1 + 2^-12) - 256 = 2^-4 exactly; a bf16-only cotangent would give 0
    assert torch.equal(dx, torch.full_like(dx, 2 ** -4))


def test_partial_gradients():
    # x without gradient (the indexer's detached input): only the weights get one
    x, ws, cots = _inputs(torch.float64)
    x = x.detach()
    ws[1].requires_grad_(False)
    ys = linears_fp32_fused(x, *ws)
    loss = sum((y * c).sum() for y, c in zip(ys, cots))
    (g0,) = torch.autograd.grad(loss, [ws[0]])
    yr = linears_fp32_reference(x, *ws)
    (r0,) = torch.autograd.grad(sum((y * c).sum() for y, c in zip(yr, cots)), [ws[0]])
    torch.testing.assert_close(g0, r0, rtol=1e-12, atol=1e-12)


def test_selection():
    x, ws, _ = _inputs(torch.bfloat16)
    assert not linears_fp32_supported(x, *ws)                   # CPU: the upcast reference
    if torch.cuda.is_available():
        xc, wc = x.detach().cuda(), [w.detach().cuda() for w in ws]
        assert linears_fp32_supported(xc, *wc)
        assert not linears_fp32_supported(xc.half(), *[w.half() for w in wc])   # fp16: reference
        assert not linears_fp32_supported(xc, wc[0].float(), wc[1])
        assert not linears_fp32_supported(xc, wc[0], wc[1][:5])           # weights of two shapes
    with pytest.raises(ValueError, match="one shape"):
        linears_fp32_fused(x, ws[0], ws[1][:5])
    ys = linears_fp32(x, *ws, impl="auto")
    yr = linears_fp32_reference(x, *ws)
    assert all(torch.equal(a, b) for a, b in zip(ys, yr))


def test_compressor_uses_it(monkeypatch):
    # the compressor's projections through the fused form (forced on CPU) vs attention_impl=torch
    import model.matmul as mm
    from model.compressor import Compressor
    from model.config import ModelConfig
    from model.layout import CompressedLayout, DocLayout
    from model.rope import RoPE

    cfg = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    comp = Compressor(cfg, 4, cfg.head_dim, True, RoPE.for_ratio(cfg, 4)).to(torch.bfloat16)
    x = torch.randn(2, 23, cfg.dim, dtype=torch.bfloat16, requires_grad=True)
    cl = CompressedLayout.build(DocLayout.from_doc_ids(torch.tensor([[0] * 10 + [1] * 13, [0] * 23])), 4)
    cot = torch.randn(2, 23 // 4, cfg.head_dim)
    res, calls = [], []
    fused = mm.linears_fp32_fused
    for impl in ("torch", "auto"):
        comp.impl = impl
        with monkeypatch.context() as mp:
            mp.setattr(mm, "linears_fp32_supported", lambda *a: True)
            mp.setattr(mm, "linears_fp32_fused", lambda *a: calls.append(impl) or fused(*a))
            out = comp(x, cl)
        res.append((out, torch.autograd.grad((out.float() * cot).sum(), [x, *comp.parameters()])))
    assert calls == ["auto"]
    (o0, g0), (o1, g1) = res
    assert torch.equal(o0, o1)   # the same fp32 projections (summation order aside), rounded to bf16
    for a, b in zip(g1, g0):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_keeps_the_split(backend):
    # under torch.compile the Function runs opaque (one graph split, no other break) and keeps the
    # hi/lo split (Inductor, tracing it, kept fused bf16 casts in fp32, which zeroed lo when hi came
    # from a cast round trip); the rest equals eager up to the compiled GEMMs' summation order
    import torch._dynamo

    x, ws, cots = _inputs(torch.bfloat16, scale=3.0)
    f = lambda x, *ws: linears_fp32_fused(x * 2, *ws)
    x1 = torch.ones(1, 4, dtype=torch.bfloat16, requires_grad=True)
    w1 = torch.full((2, 4), 256.0, dtype=torch.bfloat16)
    dy = torch.tensor([[1.0 + 2 ** -12, -1.0]])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        (yc, gc), (ye, ge) = _run(torch.compile(f, backend=backend), x, ws, cots), _run(f, x, ws, cots)
        (y1,) = torch.compile(linears_fp32_fused, backend=backend)(x1, w1)
        (dx1,) = torch.autograd.grad(y1, [x1], dy)
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert all(b.startswith("Skip calling `torch.compiler.disable()`d function") for b in breaks), breaks
    assert torch.equal(dx1, torch.full_like(dx1, 2 ** -4))   # as test_bf16_gradient_keeps_the_low_bits
    for a, b in zip(yc, ye):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(gc, ge):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-3
        assert (a == b).float().mean().item() > 0.97


def test_backward_split_is_two_passes_per_cotangent(op_names):
    # the hi/lo split is written in place: per cotangent one rounding copy and one subtraction,
    # no stack of the fp32 cotangents and no cast of a stacked split (before: 5 passes, ~4x bytes)
    x, ws, cots = _inputs(torch.bfloat16, outs=(24, 24, 24))
    ys = linears_fp32_fused(x, *ws)
    with op_names() as rec:
        torch.autograd.backward(ys, [c.float() for c in cots])
    before_gemm = rec.names[:rec.names.index("cat")]
    assert before_gemm.count("copy_") == 3 and before_gemm.count("sub") == 3, rec.names
    assert not {"stack", "bitwise_and"} & set(rec.names), rec.names
