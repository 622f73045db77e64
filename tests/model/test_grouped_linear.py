"""model/grouped_linear.py: the copy-free bmm form of the grouped output projection against the
einsum reference, forward and both gradients (fp64 exact, bf16 equal, odd sizes, B > 1, a
non-contiguous input), and the layouts it promises: no copy op forward or backward."""
import pytest
import torch

from model.grouped_linear import grouped_linear, grouped_linear_reference


def _inputs(dtype, lead=(3, 7), groups=4, c=24, r=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, groups * c, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(groups * r, c, generator=g) * 0.2).to(dtype).requires_grad_()
    dy = torch.randn(*lead, groups * r, generator=g).to(dtype)
    return x, w, dy


def _run(fn, x, w, dy, groups):
    y = fn(x, w, groups)
    return (y, *torch.autograd.grad(y, [x, w], dy))


@pytest.mark.parametrize("lead,groups,c,r", [((3, 7), 4, 24, 5), ((2, 5, 3), 3, 11, 7), ((1, 1), 1, 9, 4),
                                             ((4, 13), 2, 32, 16)])
def test_fp64_matches_reference(lead, groups, c, r):
    x, w, dy = _inputs(torch.float64, lead, groups, c, r, seed=sum(lead) + c)
    got, ref = _run(grouped_linear, x, w, dy, groups), _run(grouped_linear_reference, x, w, dy, groups)
    for a, b in zip(got, ref):
        assert a.shape == b.shape and a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bf16_equals_reference_and_gradcheck():
    x, w, dy = _inputs(torch.bfloat16, (2, 9), 4, 16, 8, seed=3)
    for a, b in zip(_run(grouped_linear, x, w, dy, 4), _run(grouped_linear_reference, x, w, dy, 4)):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
    x, w, _ = _inputs(torch.float64, (2, 3), 3, 4, 2, seed=4)
    assert torch.autograd.gradcheck(lambda a, b: grouped_linear(a, b, 3), (x, w))


def test_non_contiguous_input_and_torch_impl():
    x, w, dy = _inputs(torch.float64, (5, 6), 2, 8, 3, seed=5)
    xt = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()   # strided [5, 6, 16]
    got = _run(grouped_linear, xt, w, dy, 2)
    ref = _run(lambda a, b, g: grouped_linear(a, b, g, impl="torch"), x, w, dy, 2)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn,copies", [(grouped_linear, 0), (grouped_linear_reference, 3)])
def test_copies_forward_and_backward(fn, copies, op_names):
    # the reference copies its group-major output forward and the input and weight gradients
    # backward; the bmm form writes every result in its final layout: 3 bmms, no copy
    x, w, dy = _inputs(torch.float32, (2, 8), 4, 16, 8)
    with op_names() as rec:
        y = fn(x, w, 4)
        y.backward(dy)
    copy_ops = [n for n in rec.names if n in ("clone", "copy_", "contiguous", "_to_copy")]
    assert len(copy_ops) == copies, rec.names
    assert rec.names.count("bmm") == 3


def test_bad_shapes():
    with pytest.raises(ValueError, match="groups=3"):
        grouped_linear(torch.randn(2, 12), torch.randn(8, 4), 3)
    with pytest.raises(ValueError, match="groups \\* c"):
        grouped_linear(torch.randn(2, 10), torch.randn(8, 4), 2)


# ----------------------------------------------------------------------------- with o's inverse RoPE
def _rope(rd=8):
    from model.rope import RoPE, yarn_inv_freq

    return RoPE(rd, yarn_inv_freq(rd, 160000.0, 16.0, 4096, 32.0, 1.0), impl="auto")


def _unrotate_inputs(dtype, B=2, L=9, H=4, hd=12, groups=2, r=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(B, L, H, hd, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(groups * r, H * hd // groups, generator=g) * 0.2).to(dtype).requires_grad_()
    pos = torch.randint(0, 70000, (B, L), generator=g)
    pos[:, L // 2:] = torch.arange(L - L // 2)                         # a document boundary: positions restart
    dy = torch.randn(B, L, groups * r, generator=g).to(dtype)
    return o, w, pos, dy


@pytest.mark.parametrize("B,L,H,hd,groups,r", [(2, 9, 4, 12, 2, 5), (3, 7, 6, 10, 3, 4), (1, 5, 2, 8, 1, 3)])
def test_unrotate_grouped_linear_fp64_matches_reference(B, L, H, hd, groups, r):
    from model.grouped_linear import unrotate_grouped_linear

    rope = _rope(8)
    o, w, pos, dy = _unrotate_inputs(torch.float64, B, L, H, hd, groups, r, seed=B + L + H)

    def ref(o, w):
        return grouped_linear_reference(rope.apply(o, pos, inverse=True).flatten(2), w, groups)

    got = unrotate_grouped_linear(o, pos, rope, w, groups)
    want = ref(o, w)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, [o, w], dy), torch.autograd.grad(want, [o, w], dy)):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    o2, w2, _, _ = _unrotate_inputs(torch.float64, 1, 3, 2, 8, 2, 2, seed=9)
    assert torch.autograd.gradcheck(lambda a, b: unrotate_grouped_linear(a, pos[:1, :3], rope, b, 2), (o2, w2))


def test_unrotate_grouped_linear_backward_rotates_in_place(op_names):
    # the backward's rope is the in-place op on the gradient it made (rope_rotate_), no
    # out-of-place rope_rotate and no copy
    import model.rope as mr
    from model.grouped_linear import unrotate_grouped_linear

    rope = _rope(8)
    o, w, pos, dy = _unrotate_inputs(torch.float32)
    y = unrotate_grouped_linear(o, pos, rope, w, 2)
    calls = []
    real = mr.get_rope_rotate_
    mr.get_rope_rotate_ = lambda *a: (lambda x, *b: calls.append(x.data_ptr()) or real(*a)(x, *b))
    try:
        with op_names() as rec:
            (do,) = torch.autograd.grad(y, [o], dy)
    finally:
        mr.get_rope_rotate_ = real
    assert calls == [do.data_ptr()]
    assert not {"clone", "contiguous"} & set(rec.names), rec.names
