"""Checkpointing without the RNG state (model/recompute.py, Transformer._checkpointed): exact only
because the model draws no random numbers, so both hold here. Stashing the state would read the
CUDA generator's seed on the host at every checkpoint, which a CUDA-graph capture refuses
(bench/cuda_graphs.py captures the whole forward+backward)."""
import pytest
import torch

from model.config import ModelConfig
from model.transformer import Transformer


def _step(model, ids):
    out = model(ids, labels=ids)
    out.loss.backward()
    return out


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_training_step_draws_no_random_numbers(mode):
    """A forward+backward (both losses' paths, MTP, indexer loss, activation checkpointing) leaves
    the global RNG untouched: with nothing drawn, recomputation needs no stashed state."""
    cfg = ModelConfig.from_preset("micro", vocab_size=97, attention_mode=mode)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    model.activation_checkpointing = True
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    before = torch.get_rng_state()
    _step(model, ids)
    assert torch.equal(before, torch.get_rng_state())


def test_checkpoints_stash_no_rng_state(monkeypatch):
    """bf16 (the recompute-in-backward ops engage) with block checkpointing: no checkpoint asks
    for the RNG state; the numbers equal a run that does not checkpoint the blocks."""
    cfg = ModelConfig.from_preset("micro", vocab_size=97)
    torch.manual_seed(0)
    model = Transformer(cfg).to(torch.bfloat16).train()
    ids = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(2))
    ref = _step(model, ids).loss.detach()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    def refuse(*a, **k):
        raise AssertionError("a checkpoint stashed the RNG state")

    monkeypatch.setattr(torch, "get_rng_state", refuse)
    model.activation_checkpointing = True
    got = _step(model, ids).loss.detach()
    assert torch.equal(got, ref)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, ref_grads[n]), n
