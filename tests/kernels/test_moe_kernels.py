"""MoE Triton kernels (interpreter on CPU) vs their references in model/moe.py, forward and every
gradient: the router (kernels/moe_router.py), the clamped SwiGLU (kernels/swiglu.py), permute /
unpermute (kernels/moe_permute.py); odd sizes, rows not multiples of the tiles, experts with no
tokens, empty inputs, clamp boundaries; and a whole MoE layer with the kernels swapped in."""
import pytest
import torch

import model.moe as moe_mod
from kernels.moe_permute import permute_tokens_triton, unpermute_tokens_triton
from kernels.moe_router import topk_routing_triton
from kernels.swiglu import swiglu_activation_triton
from model.moe import permute_tokens, swiglu_activation, topk_routing, unpermute_tokens

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    # relative L2 error; a reference that is (analytically) zero, e.g. d weights / d logits at
    # k = 1, is compared on the scale of 1e-2 per element
    floor = 1e-2 * max(1, b.numel()) ** 0.5
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(floor)).item()


def _close(name, a, b, tol):
    assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
    assert _rel(a, b) < tol, (name, _rel(a, b))


# ----------------------------------------------------------------------------- router
@pytest.mark.parametrize("T,E,K,block_t", [(37, 6, 2, 4), (50, 64, 6, None), (9, 5, 5, 2), (3, 13, 1, None)])
def test_router_matches_reference(T, E, K, block_t):
    g = torch.Generator().manual_seed(T * 100 + E)
    # spread past softplus's threshold (20) and deep into its log1p range (-45)
    logits = (torch.randn(T, E, generator=g) * 15).to(DEVICE).requires_grad_()
    bias = (torch.randn(E, generator=g) * 0.5).to(DEVICE)
    ref = topk_routing(logits, bias, K, 1.5)
    got = topk_routing_triton(logits, bias, K, 1.5, block_t=block_t)
    assert torch.equal(got[1], ref[1])          # same experts in the same (descending) order
    _close("weights", got[0], ref[0], 1e-6)
    _close("scores", got[2], ref[2], 1e-6)
    cw, cs = torch.randn_like(ref[0]), torch.randn_like(ref[2])
    g_ref, = torch.autograd.grad((ref[0] * cw).sum() + (ref[2] * cs).sum(), [logits], retain_graph=True)
    g_got, = torch.autograd.grad((got[0] * cw).sum() + (got[2] * cs).sum(), [logits], retain_graph=True)
    _close("dlogits", g_got, g_ref, 1e-5)
    # weights alone (the scores' gradient arrives as zeros)
    g_ref, = torch.autograd.grad((ref[0] * cw).sum(), [logits])
    g_got, = torch.autograd.grad((got[0] * cw).sum(), [logits])
    _close("dlogits (weights only)", g_got, g_ref, 1e-5)


def test_router_backward_fills_no_zero_gradient_for_the_indices(op_names):
    """The indices carry no gradient: autograd must not zero-fill one for them (a [T, K] launch);
    the scores-only gradient (weights unused) still matches the reference."""

    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(11, 7, generator=g) * 3).to(DEVICE).requires_grad_()
    bias = torch.zeros(7, device=DEVICE)
    w, idx, s = topk_routing_triton(logits, bias, 3, 1.5)
    cw, cs = torch.randn_like(w), torch.randn_like(s)
    loss = (w * cw).sum() + (s * cs).sum()
    with op_names() as ops:
        loss.backward()
    assert not [n for n in ops.names if n.startswith(("zeros", "fill", "zero_"))], ops.names
    ref = topk_routing(logits, bias, 3, 1.5)
    got = topk_routing_triton(logits, bias, 3, 1.5)
    _close("dlogits (scores only)", torch.autograd.grad((got[2] * cs).sum(), logits)[0],
           torch.autograd.grad((ref[2] * cs).sum(), logits)[0], 1e-5)


def test_router_ties_take_the_lower_expert_and_empty_input():
    logits = torch.zeros(4, 8, device=DEVICE)
    w, idx, s = topk_routing_triton(logits, torch.zeros(8, device=DEVICE), 3, 1.0)
    assert idx.tolist() == [[0, 1, 2]] * 4
    torch.testing.assert_close(w, torch.full((4, 3), 1 / 3, device=DEVICE))
    w, idx, s = topk_routing_triton(torch.zeros(0, 8, device=DEVICE), torch.zeros(8, device=DEVICE), 3, 1.0)
    assert w.shape == (0, 3) and idx.shape == (0, 3) and s.shape == (0, 8)
    with pytest.raises(ValueError, match="fp32"):
        topk_routing_triton(logits.half(), torch.zeros(8, device=DEVICE), 3, 1.0)


# ----------------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("N,I,limit,weighted,tiles", [
    (37, 24, 10.0, True, (4, 16)),     # I = 1.5 tiles, 37 rows = 9.25 blocks
    (37, 24, 10.0, False, (None, None)),
    (5, 40, 0.0, True, (2, 16)),       # clamp disabled
    (1, 384, 7.0, True, (None, None)),
])
def test_swiglu_matches_reference(dtype, tol, N, I, limit, weighted, tiles):
    g = torch.Generator().manual_seed(N * 1000 + I)
    gate = (torch.randn(N, I, generator=g) * 6)
    up = (torch.randn(N, I, generator=g) * 6)
    if limit > 0:   # values exactly at the clamp boundaries: gradient passes (torch.clamp's rule)
        gate.view(-1)[::7] = limit
        up.view(-1)[1::9] = -limit
        up.view(-1)[2::11] = limit
    gate, up = (t.to(DEVICE, dtype).requires_grad_() for t in (gate, up))
    weight = (torch.rand(N, generator=g) + 0.1).to(DEVICE).requires_grad_() if weighted else None
    ref = swiglu_activation(gate, up, limit, weight)
    got = swiglu_activation_triton(gate, up, limit, weight, block_n=tiles[0], block_i=tiles[1])
    _close("h", got, ref, tol)
    dh = torch.randn_like(ref.float()).to(dtype)
    leaves = [gate, up] + ([weight] if weighted else [])
    g_ref = torch.autograd.grad(ref, leaves, dh)
    g_got = torch.autograd.grad(got, leaves, dh)
    for name, a, b in zip(["dgate", "dup", "dweight"], g_got, g_ref):
        _close(name, a, b, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("N,I,limit,weighted,tiles", [(37, 24, 7.0, False, (4, 16)), (5, 40, 0.0, True, (None, None))])
def test_swiglu_fused_gate_up_matches_reference(dtype, tol, N, I, limit, weighted, tiles):
    """up=None: gate is [N, 2I] = [gate | up] (the shared expert's one GEMM); h and the one [N, 2I]
    gradient (and the weight's) equal the reference's, itself the split form's."""
    g = torch.Generator().manual_seed(N + I)
    gu = (torch.randn(N, 2 * I, generator=g) * 6).to(DEVICE, dtype).requires_grad_()
    weight = (torch.rand(N, generator=g) + 0.1).to(DEVICE).requires_grad_() if weighted else None
    ref = swiglu_activation(gu, None, limit, weight)
    split = swiglu_activation(gu[:, :I], gu[:, I:], limit, weight)
    got = swiglu_activation_triton(gu, None, limit, weight, block_n=tiles[0], block_i=tiles[1])
    assert torch.equal(ref, split)
    _close("h", got, ref, tol)
    dh = torch.randn(N, I, generator=g).to(DEVICE, dtype)
    leaves = [gu] + ([weight] if weighted else [])
    for name, a, b in zip(["dgate_up", "dweight"], torch.autograd.grad(got, leaves, dh),
                          torch.autograd.grad(ref, leaves, dh)):
        _close(name, a, b, tol)
    with pytest.raises(ValueError, match="2I"):
        swiglu_activation_triton(gu[:, 1:], None, limit)


def test_swiglu_empty_rows():
    gate = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    w = torch.zeros(0, device=DEVICE, requires_grad=True)
    h = swiglu_activation_triton(gate, gate, 10.0, w)
    assert h.shape == (0, 16)
    dg, dw = torch.autograd.grad(h.sum(), [gate, w])
    assert dg.shape == (0, 16) and dw.shape == (0,)


# ----------------------------------------------------------------------------- permute / unpermute
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("T,K,D,tiles", [(13, 3, 40, (4, 16)), (7, 2, 24, (None, None)), (1, 6, 1024, (None, None))])
def test_permute_unpermute_match_reference(dtype, tol, T, K, D, tiles):
    g = torch.Generator().manual_seed(T * 10 + K)
    E = 5
    # experts 1 and 3 get no tokens
    experts = torch.tensor([0, 2, 4])[torch.randint(0, 3, (T * K,), generator=g)].to(DEVICE)
    order = torch.argsort(experts, stable=True)
    x = torch.randn(T, D, generator=g).to(DEVICE, dtype).requires_grad_()
    out = torch.randn(T * K, D, generator=g).to(DEVICE, dtype).requires_grad_()
    kw = dict(block_rows=tiles[0], block_d=tiles[1])
    xs_ref, xs = permute_tokens(x, order, K), permute_tokens_triton(x, order, K, **kw)
    assert torch.equal(xs, xs_ref)
    y_ref, y = unpermute_tokens(out, order, K, T), unpermute_tokens_triton(out, order, K, T, **kw)
    _close("y", y, y_ref, 1e-6)
    cot = torch.randn(T * K, D, generator=g).to(DEVICE, dtype)
    _close("dx", torch.autograd.grad(xs, x, cot)[0], torch.autograd.grad(xs_ref, x, cot)[0], tol)
    dy = torch.randn(T, D, generator=g).to(DEVICE)
    assert torch.equal(torch.autograd.grad(y, out, dy)[0], torch.autograd.grad(y_ref, out, dy)[0])
    del E


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("T,K,D,tiles", [(13, 3, 40, (4, 16)), (5, 6, 24, (None, None))])
def test_permute_two_handles_sum_both_gradients_in_the_gather(dtype, tol, T, K, D, tiles):
    """handles=2 (the W1 and W3 GEMMs' inputs): the same rows twice, dx = the reference's gradient
    of both (which autograd adds first); either handle alone gives its own gradient."""
    g = torch.Generator().manual_seed(T * 3 + K)
    order = torch.argsort(torch.tensor([0, 2, 5])[torch.randint(0, 3, (T * K,), generator=g)], stable=True).to(DEVICE)
    x = torch.randn(T, D, generator=g).to(DEVICE, dtype).requires_grad_()
    a_ref, b_ref = permute_tokens(x, order, K, 2)
    a, b = permute_tokens_triton(x, order, K, 2, block_rows=tiles[0], block_d=tiles[1])
    assert torch.equal(a, a_ref) and torch.equal(b, b_ref) and a.data_ptr() == b.data_ptr()
    ca, cb = (torch.randn(T * K, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    got = torch.autograd.grad((a.float() * ca).sum() + (b.float() * cb).sum(), x)[0]
    ref = torch.autograd.grad((a_ref.float() * ca).sum() + (b_ref.float() * cb).sum(), x)[0]
    _close("dx (both)", got, ref, tol)
    a, b = permute_tokens_triton(x, order, K, 2, block_rows=tiles[0], block_d=tiles[1])
    a_ref, b_ref = permute_tokens(x, order, K, 2)
    _close("dx (second only)", torch.autograd.grad(b, x, cb)[0], torch.autograd.grad(b_ref, x, cb)[0], tol)
    with pytest.raises(ValueError, match="handles"):
        permute_tokens_triton(x, order, K, 3)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("handles,passthrough", [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("T,K,D,tiles", [(13, 3, 40, (4, 16)), (5, 6, 24, (None, None))])
def test_permute_carries_the_routing_weights(dtype, tol, handles, passthrough, T, K, D, tiles):
    """weights [T, K] fp32 come back sorted as the rows are ([T*K], last output), gradient
    gathered back in the same backward launch; with the rows' gradients or alone. passthrough:
    x itself (the shared expert's input) before them, its gradient added in the same sum."""
    g = torch.Generator().manual_seed(T * 5 + K + handles)
    order = torch.argsort(torch.tensor([1, 2, 4])[torch.randint(0, 3, (T * K,), generator=g)], stable=True).to(DEVICE)
    x = torch.randn(T, D, generator=g).to(DEVICE, dtype).requires_grad_()
    w = torch.rand(T, K, generator=g).to(DEVICE).requires_grad_()
    kw = dict(block_rows=tiles[0], block_d=tiles[1])
    ref = permute_tokens(x, order, K, handles, w, passthrough)
    got = permute_tokens_triton(x, order, K, handles, w, passthrough, **kw)
    assert len(got) == len(ref) == handles + 1 + passthrough
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    cots = [torch.randn(T * K, D, generator=g).to(DEVICE, dtype) for _ in range(handles)] + \
        [torch.randn(T, D, generator=g).to(DEVICE, dtype)] * passthrough + [torch.randn(T * K, generator=g).to(DEVICE)]
    loss = lambda outs: sum((o.float() * c.float()).sum() for o, c in zip(outs, cots))
    gx, gw = torch.autograd.grad(loss(got), [x, w])
    rx, rw = torch.autograd.grad(loss(ref), [x, w])
    _close("dx", gx, rx, tol)
    assert torch.equal(gw, rw)
    got = permute_tokens_triton(x, order, K, handles, w, passthrough, **kw)     # the weights' gradient alone
    ref = permute_tokens(x, order, K, handles, w, passthrough)
    assert torch.equal(torch.autograd.grad(got[-1], w, cots[-1])[0], torch.autograd.grad(ref[-1], w, cots[-1])[0])
    if passthrough:   # the passthrough's gradient alone
        got = permute_tokens_triton(x, order, K, handles, w, passthrough, **kw)
        assert torch.equal(torch.autograd.grad(got[handles], x, cots[handles])[0], cots[handles])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("T,K,D,tiles", [(13, 3, 40, (4, 16)), (6, 1, 24, (None, None))])
def test_unpermute_with_shared_output_added_matches_reference(dtype, tol, T, K, D, tiles):
    """The shared expert's output joins the combine: y + add in add's dtype, fwd and both gradients."""
    g = torch.Generator().manual_seed(T * 7 + K)
    order = torch.argsort(torch.randint(0, 4, (T * K,), generator=g), stable=True).to(DEVICE)
    out = torch.randn(T * K, D, generator=g).to(DEVICE, dtype).requires_grad_()
    add = torch.randn(T, D, generator=g).to(DEVICE, dtype).requires_grad_()
    y_ref = unpermute_tokens(out, order, K, T, add)
    y = unpermute_tokens_triton(out, order, K, T, add, block_rows=tiles[0], block_d=tiles[1])
    assert y.dtype == dtype
    _close("y", y, y_ref, tol)
    dy = torch.randn(T, D, generator=g).to(DEVICE, dtype)
    for a, b, name in zip(torch.autograd.grad(y, [out, add], dy), torch.autograd.grad(y_ref, [out, add], dy),
                          ["dout", "dadd"]):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="add must be"):
        unpermute_tokens_triton(out, order, K, T, add[:-1])


def test_permute_empty_and_bad_order():
    x = torch.zeros(0, 8, device=DEVICE, requires_grad=True)
    order = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert permute_tokens_triton(x, order, 2).shape == (0, 8)
    assert unpermute_tokens_triton(x, order, 2, 0).shape == (0, 8)
    with pytest.raises(ValueError, match="order"):
        permute_tokens_triton(torch.zeros(3, 8, device=DEVICE), torch.arange(5, device=DEVICE), 2)


# ----------------------------------------------------------------------------- a whole MoE layer
@pytest.mark.parametrize("layer_idx", [0, 1])   # hash layer, learned layer
def test_moe_layer_with_kernels_matches_reference(monkeypatch, layer_idx):
    from model.config import ModelConfig

    cfg = ModelConfig.from_preset("tiny", vocab_size=64, dim=16, n_routed_experts=6, n_activated_experts=2,
                                  moe_inter_dim=12, n_shared_experts=1, n_hash_layers=1)
    torch.manual_seed(7)
    moe = moe_mod.MoE(cfg, layer_idx).to(DEVICE)
    with torch.no_grad():   # larger weights than the init so routing and clamps matter
        for p in moe.parameters():
            p.normal_(0, 0.5)
        if not moe.is_hash:
            moe.gate.bias.normal_(0, 0.1)
    B, L = 2, 9
    x = torch.randn(B, L, moe.cfg.dim, device=DEVICE, requires_grad=True)
    ids = torch.randint(0, moe.cfg.vocab_size, (B, L), device=DEVICE)

    def run():
        y, aux = moe(x, ids)
        loss = (y * cot).sum() + aux["balance_loss"] * 100
        return y, aux, torch.autograd.grad(loss, [x] + [p for p in moe.parameters()])

    cot = torch.randn(B, L, moe.cfg.dim, device=DEVICE)
    y_ref, aux_ref, g_ref = run()
    kernels = {"get_topk_routing": topk_routing_triton, "get_swiglu_activation": swiglu_activation_triton,
               "get_permute_tokens": permute_tokens_triton, "get_unpermute_tokens": unpermute_tokens_triton}
    calls = []

    def counted(fn):
        def wrapper(*a, **k):
            calls.append(fn.__name__)
            return fn(*a, **k)
        return wrapper

    for name, fn in kernels.items():
        monkeypatch.setattr(moe_mod, name, lambda *a, _fn=counted(fn), **k: _fn)
    y, aux, g = run()
    expected = set(kernels.values()) - ({topk_routing_triton} if moe.is_hash else set())
    assert set(calls) == {f.__name__ for f in expected}
    assert torch.equal(aux["indices"], aux_ref["indices"])
    _close("y", y, y_ref, 1e-5)
    torch.testing.assert_close(aux["balance_loss"], aux_ref["balance_loss"])
    for (name, _), a, b in zip([("x", None)] + list(moe.named_parameters()), g, g_ref):
        _close(f"d{name}", a, b, 1e-5)
