"""The stream head's Triton path (kernels/mhc_pre_split.py ``mhc_head_triton``: the site pre's
mix / tail / collapse kernels cut to the pre group) vs model.hyper_connections.mhc_head, in the
interpreter on CPU (fp32 / fp16): h and the gradients of x, fn, base, scale; n = 4, 3 (padded
stream tiles) and 2, D not a power of 2, B > 1 with token counts not multiples of the tiles,
dfn's reduction split over several token ranges, the kernels' own tiles; the fp32 kernel as close
to an fp64 reference as the fp32 reference is; HyperHead routing through model.dispatch."""
import pytest
import torch
from hopper_compile import run_fresh

from kernels.mhc_pre_split import mhc_head_triton
from model.hyper_connections import mhc_head
from test_mhc_pre import DEVICE, _rel

SMALL = {"BLOCK_T": 16, "BLOCK_K": 16, "BLOCK_D": 16}
EPS, NORM_EPS = 1e-6, 1e-6


def _inputs(n, D, lead, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, D, generator=g).to(DEVICE, dtype).requires_grad_()
    fn = (torch.randn(n, n * D, generator=g) / (n * D) ** 0.5).to(DEVICE).requires_grad_()
    base = torch.randn(n, generator=g).to(DEVICE).requires_grad_()
    scale = (torch.rand(1, generator=g) + 0.5).to(DEVICE).requires_grad_()
    return x, fn, base, scale


def _run(op, inputs, n, cot, **kw):
    h = op(*inputs, n, EPS, NORM_EPS, **kw)
    return [h] + list(torch.autograd.grad((h.float() * cot).sum(), inputs))


@pytest.mark.parametrize("n,D,lead,dtype,config,tol", [
    (4, 40, (2, 37), torch.float32, dict(SMALL, SPLIT_TOKENS=16), 1e-5),   # 5 dfn splits, B = 2
    (3, 24, (3, 23), torch.float32, dict(SMALL, SPLIT_TOKENS=32), 1e-5),   # padded stream tiles
    (4, 40, (2, 21), torch.float32, "default", 1e-5),                       # the kernels' own tiles
    (4, 40, (1, 33), torch.float16, {"BLOCK_T": 32, "BLOCK_K": 32, "BLOCK_D": 16, "SPLIT_TOKENS": 32}, 1e-3),
    (2, 16, (9,), torch.float32, None, 1e-5),
])
def test_matches_reference(n, D, lead, dtype, config, tol):
    inputs = _inputs(n, D, lead, dtype, n * 100 + D)
    cot = torch.randn(*lead, D, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ref = _run(mhc_head, inputs, n, cot)
    got = _run(mhc_head_triton, inputs, n, cot, config=config)
    for name, a, b in zip(["h", "dx", "dfn", "dbase", "dscale"], got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert _rel(a, b) < (tol if name == "h" else 10 * tol), (name, _rel(a, b))


def test_half_parameters_are_read_and_their_gradients_written_in_their_dtype():
    """fp16 fn / base / scale (as bf16 in training): the kernels convert them as they load them (no
    cast launches) and write their gradients in fp16, as the reference returns them."""
    x, fn, base, scale = _inputs(4, 24, (2, 19), torch.float32, 17)
    inputs = [x] + [p.detach().half().requires_grad_() for p in (fn, base, scale)]
    cot = torch.randn(2, 19, 24, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    ref = _run(mhc_head, inputs, 4, cot)
    got = _run(mhc_head_triton, inputs, 4, cot, config=dict(SMALL, SPLIT_TOKENS=16))
    for name, a, b in zip(["h", "dx", "dfn", "dbase", "dscale"], got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert _rel(a, b) < 1e-3, (name, _rel(a, b))


def test_as_close_to_fp64_as_the_fp32_reference():
    """fp32 kernel and fp32 reference against the fp64 reference: the kernel's error at most 3x
    the reference's (+ 1e-6 for terms the reference happens to get nearly exact)."""
    n, D, lead = 4, 40, (2, 29)
    inputs = _inputs(n, D, lead, torch.float32, 11)
    cot = torch.randn(*lead, D, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    exact = _run(mhc_head, [t.detach().double().requires_grad_() for t in inputs], n, cot.double())
    ref = _run(mhc_head, inputs, n, cot)
    got = _run(mhc_head_triton, inputs, n, cot, config=dict(SMALL, SPLIT_TOKENS=16))
    for name, a, b, c in zip(["h", "dx", "dfn", "dbase", "dscale"], got, ref, exact):
        assert _rel(a, c) <= 3 * _rel(b, c) + 1e-6, (name, _rel(a, c), _rel(b, c))


def test_zero_tokens():
    x, fn, base, scale = _inputs(4, 24, (0,), torch.float32, 1)
    h = mhc_head_triton(x, fn, base, scale, 4, EPS, NORM_EPS)
    assert h.shape == (0, 24)
    g = torch.autograd.grad(h.sum(), [x, fn, base, scale], allow_unused=True)
    assert g[0] is None or g[0].shape == x.shape


def test_bad_input_raises():
    x = torch.randn(5, 4, 8)
    with pytest.raises(ValueError, match="mhc_head_triton: fn must be"):
        mhc_head_triton(x, torch.randn(24, 32), torch.randn(4), torch.randn(1), 4, EPS, NORM_EPS)
    with pytest.raises(ValueError, match="scale"):
        mhc_head_triton(x, torch.randn(4, 32), torch.randn(4), torch.randn(3), 4, EPS, NORM_EPS)
    with pytest.raises(ValueError, match="config"):
        mhc_head_triton(x, torch.randn(4, 32), torch.randn(4), torch.randn(1), 4, EPS, NORM_EPS, config="fast")


def test_dispatch_picks_the_head_kernel_on_cuda_only():
    from model.hyper_connections import get_mhc_head

    assert get_mhc_head("auto", "cpu", torch.bfloat16) is mhc_head
    assert get_mhc_head("auto", "cuda", torch.float64) is mhc_head
    assert get_mhc_head("auto", "cuda", torch.bfloat16) is mhc_head_triton
    assert get_mhc_head("torch", "cuda", torch.bfloat16) is mhc_head


def test_hyper_head_uses_dispatch(monkeypatch):
    """HyperHead.forward routes through model.dispatch: with the getter forced to the Triton
    function, the head's output and parameter gradients equal the reference's."""
    import model.hyper_connections as hcm
    from model.config import ModelConfig

    cfg = ModelConfig.from_preset("tiny", dim=24, hc_mult=4, hyper_connections="mhc")
    head = hcm.HyperHead(cfg).to(DEVICE)
    x = torch.randn(2, 19, 4, 24, device=DEVICE, requires_grad=True)

    def step():
        out = head(x)
        loss = (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)).sum()
        return [out] + list(torch.autograd.grad(loss, [x] + list(head.parameters())))

    ref = step()
    calls = []
    monkeypatch.setattr(hcm, "get_mhc_head", lambda *a: calls.append(a) or mhc_head_triton)
    got = step()
    assert len(calls) == 1
    for a, b in zip(got, ref):
        assert _rel(a, b) < 1e-4, _rel(a, b)


_COMPILE_FOR_HOPPER = """import inspect
import triton
from triton.backends import backends
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels.mhc as mhc
import kernels.mhc_pre_split as sp

if "nvidia" not in backends:
    print("SKIP no NVIDIA backend")
    raise SystemExit(0)


def compile_(fn, types, consts, warps=4):
    # types: {arg: type} of the runtime args ('*fp32' pointers, 'i32', 'fp32'); consts: the constexprs
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: ("constexpr" if n in consts else types[n]) for n in names}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps})
    assert k.asm.get("cubin")
    return k


P32, I, F = "*fp32", "i32", "fp32"
n = 4
for pre_only, PT in ((True, "*bf16"), (False, "*bf16"), (False, P32)):   # PT: the parameters' dtype
    NM = n if pre_only else (2 + n) * n
    compile_(mhc._mhc_tail_fwd, dict(MIX=P32, BASE=PT, SCALE=PT, PRE=P32, POST=P32, COMB=P32, T=I, n=I, NM=I,
                                     iters=I, eps=F), {"BLOCK_T": 32, "NP": 4, "PRE_ONLY": pre_only})
    for saved in ((False,) if pre_only else (False, True)):
        compile_(sp._pre_tail_bwd, dict(MIX=P32, R=P32, BASE=PT, SCALE=PT, DPRE=P32, DPOST=P32, DCOMB=P32, G=P32,
                                        COEF=P32, PART=P32, SCR=P32, T=I, K=I, NM=I, iters=I, eps=F),
                 {"N": n, "NP": 4, "SAVED": saved, "BLOCK_T": 16, "PRE_ONLY": pre_only})
    compile_(mhc._mhc_mix_fwd, dict(X="*bf16", FN=PT, MIX=P32, R=P32, T=I, K=I, NM=I, norm_eps=F),
             {"BLOCK_T": 64, "BLOCK_K": 64, "NM_P": max(16, triton.next_power_of_2(NM)), "X_IN_TF32": True}, 8)
    compile_(sp._pre_dx_dfn, dict(X="*bf16", FN=PT, G=P32, COEF=P32, PRE=P32, DH="*bf16", DXRES="*bf16", DX="*bf16",
                                  DFN=P32, T=I, D=I, NM=I, T_PER=I),
             {"N": n, "NM_P": max(16, triton.next_power_of_2(NM)), "HAS_DXRES": not pre_only, "X_IN_TF32": True,
              "BLOCK_T": 32, "BLOCK_D": 64}, 8)
    compile_(sp._pre_param_grads, dict(DFN_PART=P32, PART=P32, DFN=PT, DBASE=PT, DSCALE=PT, SPLITS=I, NMK=I, P=I,
                                       NM=I, W=I),
             {"BLOCK": sp._GRADS_BLOCK, "BLOCK_P": sp._GRADS_BLOCK_P,
              "W_P": triton.next_power_of_2(NM + (1 if pre_only else 3))})
print("OK")
"""


@pytest.mark.slow   # a fresh process importing torch and ~13 sm_90 compiles
def test_head_and_pre_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter runs the kernels as Python; this compiles them as the H200 would (sm_90,
    bf16 x, outside the interpreter): the tails with and without PRE_ONLY, the mix and dx / dfn
    passes at the head's NM = n and the pre's (2+n)n, with bf16 and fp32 parameters (read and, by
    _pre_param_grads, their gradients written in their own dtype), so a type or lowering error shows here, not in a GPU call (one did: a name typed
    differently in the two branches of _pre_param_grads's runtime if)."""
    run_fresh(_COMPILE_FOR_HOPPER, timeout=600)
