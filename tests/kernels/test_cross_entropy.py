"""Triton chunk cross-entropy (kernels/cross_entropy.py, interpreter on CPU) vs model.loss's
chunk_cross_entropy: nll and d loss / d logits in fp32 and fp16, odd V and c, several V-blocks with
a partial last one, ignored rows, an all-ignored chunk, large logits; and the whole
linear_cross_entropy forward + backward (hidden and weight gradients) with the kernel vs the
reference, plus its selection (model.loss_kernel_impl through model/dispatch.py)."""
import pytest
import torch

import model.loss as loss_mod
from kernels.cross_entropy import chunk_cross_entropy_triton
from model.config import ModelConfig
from model.loss import IGNORE_INDEX, LMHead, chunk_cross_entropy, linear_cross_entropy, reference_linear_cross_entropy
from hopper_compile import run_fresh

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _chunk(c, V, seed, scale=3.0, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(c, V, generator=g) * scale).to(DEVICE)
    labels = torch.randint(0, V, (c,), generator=g)
    labels[torch.rand(c, generator=g) < ignore_frac] = IGNORE_INDEX
    labels[0] = V - 1   # the last column, in the partial last block
    n_valid = int((labels != IGNORE_INDEX).sum())
    inv = torch.tensor(1.0 / max(n_valid, 1), device=DEVICE)
    return logits, labels.to(DEVICE), inv


def _both(logits, labels, inv, grad_dtype, **tiles):
    got = chunk_cross_entropy_triton(logits.clone(), labels, inv, grad_dtype, **tiles)
    ref = chunk_cross_entropy(logits.clone(), labels, inv, grad_dtype)
    return got, ref


def _close(a, b, tol):
    assert a.dtype == b.dtype and a.shape == b.shape
    err = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()
    assert err <= tol, f"relative error {err:.3g} > {tol}"


@pytest.mark.parametrize("grad_dtype,tol", [(None, 0), (torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("c,V,block_v", [(7, 1000, None), (5, 4099, 256), (1, 17, None), (13, 257, 64)])
def test_chunk_matches_reference(grad_dtype, tol, c, V, block_v):
    logits, labels, inv = _chunk(c, V, seed=c * 1000 + V)
    (nll, g), (nll_r, g_r) = _both(logits, labels, inv, grad_dtype, block_v=block_v)
    _close(nll, nll_r, 1e-5)
    assert (nll[labels == IGNORE_INDEX] == 0).all()
    if grad_dtype is None:
        assert g is None and g_r is None
    else:
        _close(g, g_r, tol)
        assert (g[labels == IGNORE_INDEX] == 0).all()
        # each labelled row's gradient sums to 0 (softmax minus one-hot), times 1 / n_valid
        assert g.double().sum(1).abs().max() < 1e-3 * inv.item()


def test_fp32_gradient_overwrites_the_logits_as_the_reference_does():
    logits, labels, inv = _chunk(4, 300, seed=1)
    _, g = chunk_cross_entropy_triton(logits, labels, inv, torch.float32)
    assert g.data_ptr() == logits.data_ptr()


def test_all_ignored_chunk_gives_zero_loss_and_gradient():
    logits, labels, inv = _chunk(6, 1000, seed=2)
    labels.fill_(IGNORE_INDEX)
    nll, g = chunk_cross_entropy_triton(logits, labels, inv, torch.float16)
    assert (nll == 0).all() and (g == 0).all()


def test_large_logits_stay_finite_and_match():
    """Logits in the thousands, shifted far from 0: only the max subtraction keeps exp finite."""
    logits, labels, inv = _chunk(5, 4099, seed=3, scale=2000.0)
    logits[1] += 3e4
    logits[2, 7] = 5e4   # one dominant logit: softmax ~ one-hot
    labels[2] = 7
    (nll, g), (nll_r, g_r) = _both(logits, labels, inv, torch.float32, block_v=512)
    assert torch.isfinite(nll).all() and torch.isfinite(g).all()
    _close(nll, nll_r, 1e-5)
    _close(g, g_r, 1e-5)


def test_label_outside_the_vocabulary_is_nan_not_a_silent_value():
    logits, labels, inv = _chunk(3, 100, seed=4, ignore_frac=0.0)
    labels[1] = 100
    nll, _ = chunk_cross_entropy_triton(logits, labels, inv)
    assert torch.isnan(nll[1]) and torch.isfinite(nll[[0, 2]]).all()


def test_bad_inputs_name_the_problem():
    logits, labels, inv = _chunk(3, 64, seed=5)
    with pytest.raises(ValueError, match="fp32"):
        chunk_cross_entropy_triton(logits.half(), labels, inv)
    with pytest.raises(ValueError, match="contiguous rows"):
        chunk_cross_entropy_triton(logits.t().contiguous().t(), labels, inv)
    with pytest.raises(ValueError, match="labels"):
        chunk_cross_entropy_triton(logits, labels[:2], inv)
    with pytest.raises(ValueError, match="grad_dtype"):
        chunk_cross_entropy_triton(logits, labels, inv, torch.float64)


def _loss_and_grads(hidden, weight, labels, **kw):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss, nll = linear_cross_entropy(h, w, labels, return_nll=True, **kw)
    (loss * 0.7).backward()   # a non-unit upstream gradient, as mtp_loss_weight gives
    return loss.detach(), nll, h.grad, w.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("N,D,V,chunk,count", [(37, 16, 1000, 8, None), (9, 8, 4099, 1000, 20), (5, 12, 53, 1, None)])
def test_linear_cross_entropy_with_the_kernel_matches_the_reference(monkeypatch, dtype, tol, N, D, V, chunk, count):
    g = torch.Generator().manual_seed(N + V)
    hidden = (torch.randn(N, D, generator=g) * 2).to(DEVICE, dtype)
    weight = (torch.randn(V, D, generator=g) * 0.5).to(DEVICE, dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.2] = IGNORE_INDEX
    labels = labels.to(DEVICE)
    ref = _loss_and_grads(hidden, weight, labels, chunk_tokens=chunk, count=count, kernel_impl="torch")
    calls = []
    monkeypatch.setattr(loss_mod, "get_chunk_cross_entropy",
                        lambda *a: calls.append(a) or chunk_cross_entropy_triton)
    got = _loss_and_grads(hidden, weight, labels, chunk_tokens=chunk, count=count, kernel_impl="triton")
    assert calls == [("triton", hidden.device, dtype)]
    for name, a, b in zip(("loss", "nll", "grad hidden", "grad weight"), got, ref):
        assert a.dtype == b.dtype, name
        _close(a, b, tol)
    if dtype == torch.float32:   # and the unfused head's loss and gradients
        full = reference_linear_cross_entropy(hidden.requires_grad_(), weight.requires_grad_(), labels,
                                              count=count) * 0.7
        for a, b in zip(got[2:], torch.autograd.grad(full, [hidden, weight])):
            _close(a, b, 1e-5)


def test_selection_by_config_and_impl():
    assert loss_mod.get_chunk_cross_entropy("auto", "cpu", torch.float32) is chunk_cross_entropy
    # auto on CUDA: the kernel once measured, the reference while held back (AUTO_KEEPS_REFERENCE)
    from model.dispatch import AUTO_KEEPS_REFERENCE

    held = "chunk_cross_entropy" in AUTO_KEEPS_REFERENCE
    assert loss_mod.get_chunk_cross_entropy("auto", "cuda", torch.bfloat16) is \
        (chunk_cross_entropy if held else chunk_cross_entropy_triton)
    assert loss_mod.get_chunk_cross_entropy("auto", "cuda", torch.float64) is chunk_cross_entropy
    assert loss_mod.get_chunk_cross_entropy("triton", "cuda", torch.bfloat16) is chunk_cross_entropy_triton
    with pytest.raises(RuntimeError, match="needs CUDA"):
        loss_mod.get_chunk_cross_entropy("triton", "cpu", torch.float32)
    cfg = ModelConfig.from_preset("micro", loss_kernel_impl="torch")
    assert LMHead(cfg.dim, cfg.vocab_size, cfg.loss_impl, cfg.loss_kernel_impl).kernel_impl == "torch"
    with pytest.raises(Exception, match="loss_kernel_impl"):
        ModelConfig.from_preset("micro", loss_kernel_impl="fast")
    with pytest.raises(ValueError, match="kernel_impl"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long),
                             kernel_impl="fast")


def test_model_main_and_mtp_losses_with_the_kernel(monkeypatch):
    """A micro model (main head and MTP share the head's loss), packed with padding, fp32: with the
    kernel, the same losses and the head's gradient as with the reference, and every parameter's
    gradient as close to the fp64 truth as the reference's (the mHC parameters' fp32 gradients
    are ill-conditioned: tests/model/test_loss.py)."""
    from model.transformer import Transformer

    cfg = ModelConfig.from_preset("micro", vocab_size=97, moe_impl="loop", attention_impl="torch",
                                  mhc_impl="torch", embed_init_std=0.02)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 97, (2, 30), generator=g)
    labels = torch.randint(0, 97, (2, 30), generator=g)
    labels[0, -5:] = IGNORE_INDEX
    res, calls = [], []
    for dtype, kernel in ((torch.float64, False), (torch.float32, False), (torch.float32, True)):
        if kernel:
            monkeypatch.setattr(loss_mod, "get_chunk_cross_entropy",
                                lambda *a: calls.append(a) or chunk_cross_entropy_triton)
        torch.manual_seed(0)
        model = Transformer(cfg).to(dtype)
        out = model(ids, labels=labels)
        out.loss.backward()
        res.append((out.losses, {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}))
    (_, truth), (ref_losses, ref), (losses, got) = res
    assert len(calls) == 2 and {"lm", "mtp"} <= set(losses) and set(got) == set(ref)   # both heads
    for k in ref_losses:
        assert abs(float(losses[k]) - float(ref_losses[k])) <= 1e-6 * abs(float(ref_losses[k])), k
    _close(got["head.weight"], ref["head.weight"], 1e-5)
    err = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
    for n in ref:
        assert err(got[n], truth[n]) <= 2 * err(ref[n], truth[n]) + 1e-6, n


_COMPILE_FOR_HOPPER = """
import triton
from triton.backends import backends
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import cross_entropy as ce

if "nvidia" not in backends:
    print("SKIP no NVIDIA backend")
    raise SystemExit(0)
names = ["X", "LABELS", "INV_COUNT", "NLL", "G", "V", "stride_x", "stride_g", "ignore_index", "WRITE_G", "BLOCK_V"]
bv, nw = ce.tiles(129280)
for write_g, g_type in ((True, "*bf16"), (True, "*fp16"), (True, "*fp32"), (False, "*fp32")):
    types = ["*fp32", "*i64", "*fp32", "*fp32", g_type, "i32", "i32", "i32", "i32", "constexpr", "constexpr"]
    src = ASTSource(fn=ce._cross_entropy_rows, signature=dict(zip(names, types)),
                    constexprs={"WRITE_G": write_g, "BLOCK_V": bv},
                    attrs={(i,): [["tt.divisibility", 16]] for i in range(8)})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": nw})
    assert k.asm.get("cubin") and "ld.global.v4" in k.asm["ptx"], (write_g, g_type)
print("OK")
"""


@pytest.mark.slow   # ~13 s on a busy 2-core CPU: a fresh process importing torch, four compiles
def test_kernel_compiles_for_hopper_without_a_gpu():
    """The interpreter runs the kernel as Python; this compiles it as the H200 would (sm_90:
    TTIR -> PTX -> cubin; in a fresh process, outside the interpreter) for every gradient dtype
    and without, so a type or lowering error shows here, not in a GPU call. With V and the strides
    divisible by 16 (Triton's specialisation at V = 129280) the row loads are 128-bit."""
    run_fresh(_COMPILE_FOR_HOPPER, timeout=300)
