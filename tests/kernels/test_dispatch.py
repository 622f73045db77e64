"""attention.impl selection: torch everywhere, triton only on CUDA, auto falls back (logged once)."""
import logging

import pytest
import torch

from model import dispatch
from model.sparse_attention import sparse_attention


def test_torch_and_auto_on_cpu_give_the_reference():
    assert dispatch.get_sparse_attention("torch", "cpu") is sparse_attention
    assert dispatch.get_sparse_attention("auto", "cpu") is sparse_attention
    from model.hyper_connections import mhc_coefficients

    assert dispatch.get_mhc_coefficients("auto", "cpu") is mhc_coefficients


def test_triton_on_cpu_is_an_error_and_bad_impl_names_the_choices():
    with pytest.raises(RuntimeError, match="needs CUDA"):
        dispatch.get_sparse_attention("triton", "cpu")
    with pytest.raises(ValueError, match="auto"):
        dispatch.get_sparse_attention("fast", "cpu")


def test_auto_on_cuda_picks_the_kernel_except_fp64():
    from kernels.sparse_attention import sparse_attention_triton

    assert dispatch.get_sparse_attention("auto", "cuda") is sparse_attention_triton
    assert dispatch.get_sparse_attention("auto", "cuda", torch.float64) is sparse_attention


def test_missing_kernel_module_logs_once(monkeypatch, caplog):
    ref = object()
    with caplog.at_level(logging.WARNING, logger="model.dispatch"):
        for _ in range(3):
            got = dispatch._select("fake_op", "auto", "cuda", "kernels.no_such_module", "f", ref)
            assert got is ref
    assert sum("fake_op" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(RuntimeError, match="did not import"):
        dispatch._select("fake_op", "triton", "cuda", "kernels.no_such_module", "f", ref)


def test_reference_indexer_topk_wrapper_matches_model():
    from model.indexer import indexer_scores, select_topk

    g = torch.Generator().manual_seed(0)
    q, w, k = torch.randn(1, 12, 2, 16, generator=g), torch.randn(1, 12, 2, generator=g), torch.randn(1, 3, 16, generator=g)
    c_end, ds = torch.tensor([[3, 7, 11]]), torch.zeros(1, 12, dtype=torch.long)
    fn = dispatch.get_indexer_topk("torch")
    assert torch.equal(fn(q, w, k, c_end, ds, 2), select_topk(indexer_scores(q, w, k, c_end, ds), 2))


def test_dispatch_is_traced_by_torch_compile_without_graph_breaks():
    """The model asks model.dispatch for its ops inside forward: under torch.compile that must not
    break the graph (an imported kernel module is looked up without the import machinery)."""
    import torch._dynamo

    import kernels.swiglu  # noqa: F401  (imported, as after the first eager step)

    def f(a, b):
        return dispatch.get_swiglu_activation("auto", a.device, a.dtype)(a * 2, b, 10.0) + 1

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(torch.compile(f, backend="eager")(a, b), f(a, b))
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


@pytest.mark.parametrize("getter, module, kernel", [
    ("get_topk_routing", "kernels.moe_router", "topk_routing_triton"),
    ("get_swiglu_activation", "kernels.swiglu", "swiglu_activation_triton"),
    ("get_permute_tokens", "kernels.moe_permute", "permute_tokens_triton"),
    ("get_unpermute_tokens", "kernels.moe_permute", "unpermute_tokens_triton"),
])
def test_moe_kernels_stay_off_under_auto_until_measured(getter, module, kernel):
    """auto keeps the MoE references on CUDA (no measured win: dispatch.AUTO_KEEPS_REFERENCE);
    triton still selects the kernel."""
    import importlib

    import model.moe as mm

    reference = getattr(mm, getter.removeprefix("get_"))
    assert getattr(dispatch, getter)("auto", "cuda", torch.bfloat16) is reference
    assert getattr(dispatch, getter)("triton", "cuda", torch.bfloat16) is getattr(importlib.import_module(module), kernel)


GETTERS = ["get_sparse_attention", "get_indexer_topk", "get_mhc_coefficients", "get_collapse_streams",
           "get_mix_streams", "get_topk_routing", "get_swiglu_activation", "get_permute_tokens",
           "get_unpermute_tokens", "get_rope_rotate", "get_rms_norm"]


def test_every_kernel_is_opaque_to_compile_and_its_module_preloaded(monkeypatch):
    """Each getter's Triton kernel runs eagerly inside torch.compile'd code (kernels/opaque.py),
    and its module is among those compile_blocks imports before tracing."""
    assert sorted(GETTERS) == sorted(n for n in dir(dispatch) if n.startswith("get_")), "new getter: add it here"
    seen = []
    real = dispatch._select
    monkeypatch.setattr(dispatch, "_select", lambda op, impl, dev, module, name, *a: seen.append(module)
                        or real(op, impl, dev, module, name, *a))
    for getter in GETTERS:
        fn = getattr(dispatch, getter)("triton", "cuda", torch.bfloat16)
        assert getattr(fn, "_torchdynamo_disable", False) or getattr(getattr(fn, "func", None),
                                                                     "_torchdynamo_disable", False), getter
    assert set(seen) == set(dispatch.KERNEL_MODULES)
