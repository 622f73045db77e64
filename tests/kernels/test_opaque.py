"""Our Triton kernels inside torch.compile'd code (kernels/opaque.py): Dynamo runs them eagerly
(one graph split each) and the compiled function's forward and backward equal eager mode's,
fp32 and fp16, kernels in Triton's interpreter on CPU."""
import pytest
import torch
import torch._dynamo

from kernels.rms_norm import rms_norm_triton
from kernels.swiglu import swiglu_activation_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _block(x, w, up):
    h = rms_norm_triton(x * 1.5, w, 1e-6)               # kernel between elementwise chains
    return swiglu_activation_triton(h.sin(), up, 10.0) * 2.0 + x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernels_run_eagerly_inside_compiled_code(dtype):
    g = torch.Generator().manual_seed(0)
    x, up = ((torch.randn(5, 24, generator=g) * 2).to(DEVICE, dtype).requires_grad_() for _ in range(2))
    w = (torch.rand(24, generator=g) + 0.5).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(5, 24, generator=g).to(DEVICE, dtype)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        y_c = torch.compile(_block, backend="aot_eager")(x, w, up)
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    finally:
        torch._dynamo.reset()
    y_e = _block(x, w, up)
    assert breaks == 2, dict(torch._dynamo.utils.counters["graph_break"])   # one per kernel call
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(y_c, (x, w, up), dy), torch.autograd.grad(y_e, (x, w, up), dy)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
