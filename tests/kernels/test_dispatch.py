"""attention.impl selection: torch everywhere, triton only on CUDA, auto falls back (logged once)."""
import logging

import pytest
import torch

from model import dispatch
from model.hyper_connections import get_mhc_coefficients
from model.indexer import get_indexer_topk
from model.moe import get_swiglu_activation
from model.sparse_attention import get_sparse_attention, sparse_attention


def test_torch_and_auto_on_cpu_give_the_reference():
    assert get_sparse_attention("torch", "cpu") is sparse_attention
    assert get_sparse_attention("auto", "cpu") is sparse_attention
    from model.hyper_connections import mhc_coefficients

    assert get_mhc_coefficients("auto", "cpu") is mhc_coefficients


def test_triton_on_cpu_is_an_error_and_bad_impl_names_the_choices():
    with pytest.raises(RuntimeError, match="needs CUDA"):
        get_sparse_attention("triton", "cpu")
    with pytest.raises(ValueError, match="auto"):
        get_sparse_attention("fast", "cpu")


def test_auto_on_cuda_picks_the_kernel_except_fp64():
    from kernels.sparse_attention import sparse_attention_triton

    assert get_sparse_attention("auto", "cuda") is sparse_attention_triton
    assert get_sparse_attention("auto", "cuda", torch.float64) is sparse_attention


@pytest.mark.parametrize("user, getter, module, kernel", [
    ("model.indexer", "get_selected_indexer_scores", "kernels.indexer_loss", "selected_indexer_scores_triton"),
    ("model.indexer", "get_attention_mass_on_selected", "kernels.indexer_loss", "attention_mass_on_selected_triton"),
    ("model.compressor", "get_compressor_pool", "kernels.compressor_pool", "compressor_pool_triton"),
    ("model.moe", "get_topk_routing", "kernels.moe_router", "topk_routing_triton"),
    ("model.moe", "get_swiglu_activation", "kernels.swiglu", "swiglu_activation_triton"),
    ("model.moe", "get_permute_tokens", "kernels.moe_permute", "permute_tokens_triton"),
    ("model.moe", "get_unpermute_tokens", "kernels.moe_permute", "unpermute_tokens_triton"),
    ("model.loss", "get_chunk_cross_entropy", "kernels.cross_entropy", "chunk_cross_entropy_triton"),
])
def test_measured_kernels_are_auto_on_cuda(user, getter, module, kernel):
    """Kernels that won on the H200 (dispatch.AUTO_KEEPS_REFERENCE's comment): auto picks them on
    CUDA in bf16, the reference for fp64."""
    import importlib

    mod = importlib.import_module(user)
    assert getattr(mod, getter)("auto", "cuda", torch.bfloat16) is getattr(importlib.import_module(module), kernel)
    assert getattr(mod, getter)("auto", "cuda", torch.float64) is getattr(mod, getter.removeprefix("get_"))


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
    fn = get_indexer_topk("torch")
    assert torch.equal(fn(q, w, k, c_end, ds, 2), select_topk(indexer_scores(q, w, k, c_end, ds), 2))


def test_dispatch_is_traced_by_torch_compile_without_graph_breaks():
    """The model asks model.dispatch for its ops inside forward: under torch.compile that must not
    break the graph (an imported kernel module is looked up without the import machinery)."""
    import torch._dynamo

    import kernels.swiglu  # noqa: F401  (imported, as after the first eager step)

    def f(a, b):
        return get_swiglu_activation("auto", a.device, a.dtype)(a * 2, b, 10.0) + 1

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(torch.compile(f, backend="eager")(a, b), f(a, b))
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


def test_auto_keeps_the_reference_for_an_op_held_back(monkeypatch):
    """The mechanism for a kernel without a measured win (dispatch.AUTO_KEEPS_REFERENCE, empty
    today): auto keeps the reference on CUDA, triton still selects the kernel."""
    from kernels.moe_permute import permute_tokens_triton
    from model import moe

    monkeypatch.setattr(dispatch, "AUTO_KEEPS_REFERENCE", frozenset({"permute_tokens"}))
    assert moe.get_permute_tokens("auto", "cuda", torch.bfloat16) is moe.permute_tokens
    assert moe.get_permute_tokens("triton", "cuda", torch.bfloat16) is permute_tokens_triton


GETTERS = {"get_sparse_attention": "model.sparse_attention", "get_indexer_topk": "model.indexer",
           "get_selected_indexer_scores": "model.indexer", "get_attention_mass_on_selected": "model.indexer",
           "get_kl_over_selected": "model.indexer",
           "get_mhc_coefficients": "model.hyper_connections", "get_collapse_streams": "model.hyper_connections",
           "get_mhc_pre": "model.hyper_connections", "get_mhc_head": "model.hyper_connections",
           "get_mix_streams": "model.hyper_connections", "get_topk_routing": "model.moe",
           "get_swiglu_activation": "model.moe", "get_permute_tokens": "model.moe",
           "get_unpermute_tokens": "model.moe", "get_rope_rotate": "model.rope", "get_rope_rotate_": "model.rope", "get_rms_norm": "model.norms",
           "get_rms_norm_rope": "model.rope",
           "get_compressor_pool": "model.compressor", "get_chunk_cross_entropy": "model.loss"}


def test_every_kernel_is_opaque_to_compile_and_its_module_preloaded(monkeypatch):
    """Each getter's Triton kernel runs eagerly inside torch.compile'd code (kernels/opaque.py),
    and its module is among those compile_blocks imports before tracing."""
    import importlib

    assert sorted(GETTERS) == sorted(f"get_{op}" for op in dispatch.KERNELS), "new op: add its getter here"
    seen = []
    real = dispatch._select
    monkeypatch.setattr(dispatch, "_select", lambda op, impl, dev, module, name, *a: seen.append(module)
                        or real(op, impl, dev, module, name, *a))
    for getter, module in GETTERS.items():
        fn = getattr(importlib.import_module(module), getter)("triton", "cuda", torch.bfloat16)
        assert getattr(fn, "_torchdynamo_disable", False) or getattr(getattr(fn, "func", None),
                                                                     "_torchdynamo_disable", False), getter
    assert set(seen) == set(dispatch.KERNEL_MODULES)
