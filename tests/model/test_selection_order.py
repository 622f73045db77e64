"""The order of the top-k slots carries no meaning: every consumer of the selection treats it as a
set (what lets model.indexer_select=unsorted skip torch.topk's sort of the K winners).

A CSA layer in sparse mode, fp64 on CPU (the references), with its selection replaced by the same
selection with every query's slots shuffled (empty -1 slots moved to the front, as an unsorted
top-k may leave them anywhere): the layer output, the indexer loss, every parameter's and the
input's gradient and the recall diagnostic equal the sorted run's up to summation order. The
Triton consumers (sparse attention, the indexer loss kernels) are covered under the interpreter
in tests/kernels/test_selection_order_kernels.py."""
import pytest
import torch

from model.attention import Attention
from model.config import ModelConfig
from model.layout import DocLayout

# three packed documents in row 1: queries that see fewer entries than K (empty slots), or none
DOC_IDS = torch.tensor([[0] * 37, [0] * 9 + [1] * 17 + [2] * 11])


def shuffle_slots(idx: torch.Tensor, seed: int) -> torch.Tensor:
    """The same selection, each query's slots in a random order with its empty (-1) slots first."""
    g = torch.Generator().manual_seed(seed)
    key = torch.rand(idx.shape, generator=g).to(idx.device) + (idx >= 0).to(torch.float32)   # -1 slots: keys < 1
    return torch.gather(idx, -1, key.argsort(-1))


@pytest.mark.parametrize("topk", [3, 6])
def test_layer_is_invariant_to_slot_order(monkeypatch, topk):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", attention_mode="sparse", index_topk=topk, attention_impl="torch")
    attn = Attention(cfg, 1).double().train()
    assert attn.indexer is not None
    attn.measure_recall = True
    with torch.no_grad():
        attn.indexer.compressor.ape.normal_(std=0.5)
        attn.sink.normal_()
    lay = DocLayout.from_doc_ids(DOC_IDS)
    x = torch.randn(*DOC_IDS.shape, cfg.dim, dtype=torch.float64)
    params = [p for p in attn.parameters() if p.requires_grad]

    def run():
        xl = x.clone().requires_grad_()
        out, aux = attn(xl, lay)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + aux["indexer_loss"]
        grads = torch.autograd.grad(loss, [xl] + params, allow_unused=True)
        return out.detach(), aux, grads

    out_s, aux_s, grads_s = run()
    sel = aux_s["topk_idx"]
    assert (sel < 0).any() and (sel >= 0).any()   # empty slots are exercised
    shuffled = shuffle_slots(sel, seed=topk)
    assert not torch.equal(shuffled, sel) and torch.equal(shuffled.sort(-1).values, sel.sort(-1).values)
    calls = []
    monkeypatch.setattr(attn, "_select", lambda *a: calls.append(1) or (shuffled, None))
    out_u, aux_u, grads_u = run()
    assert calls == [1] and torch.equal(aux_u["topk_idx"], shuffled)
    torch.testing.assert_close(out_u, out_s, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(aux_u["indexer_loss"], aux_s["indexer_loss"], rtol=1e-12, atol=0)
    for name, a in aux_s["indexer_recall"].items():   # through lse: equal up to its summation order
        torch.testing.assert_close(aux_u["indexer_recall"][name], a, rtol=1e-12, atol=0, msg=name)
    names = ["x"] + [n for n, p in attn.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, grads_u, grads_s):
        if b is None:
            assert a is None, name
            continue
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=name)
