"""Shared pieces of the stability tests: a small model, a synthetic resumable loader and a
compact plain-PyTorch training loop driven by StabilityController."""
from __future__ import annotations

import copy

import pytest
import torch

from model.config import ModelConfig
from model.transformer import Transformer
from optim.builder import build_lr_scheduler, build_optimizer

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Imported by the stability test modules (autouse there): many small steps run about 3x
    faster on one intra-op thread than on two competing with other processes on a shared
    2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


OPTIM = {"name": "adamw", "lr": 1e-2, "warmup_steps": 1, "decay_fraction": 0.5}


def small_model(seed: int = 0) -> Transformer:
    cfg = ModelConfig.from_preset(
        "tiny", vocab_size=128, dim=32, n_layers=3, compress_ratios=[0, 4, 16], n_heads=2,
        head_dim=16, rope_dim=8, q_lora_rank=16, o_groups=2, o_lora_rank=16, index_n_heads=2,
        index_head_dim=16, index_topk=4, n_routed_experts=4, n_activated_experts=2,
        moe_inter_dim=32, hc_sinkhorn_iters=5, window=8)
    torch.manual_seed(seed)
    return Transformer(cfg)


def build(seed: int = 0, total_steps: int = 50):
    model = small_model(seed)
    opt = build_optimizer(model, OPTIM)
    sched = build_lr_scheduler(opt, OPTIM, total_steps=total_steps)
    return model, opt, sched


class SyntheticLoader:
    """Micro-batch ``i`` is a pure function of (seed, i, seq_len); ``poison`` marks positions
    whose loss the test loop scales up (a corrupted batch); ``skip`` positions are left out."""

    def __init__(self, seed=0, micro_batch=2, seq_len=32, vocab=128, poison=(), skip=()):
        self.seed, self.micro_batch, self.seq_len, self.vocab = seed, micro_batch, seq_len, vocab
        self.poison, self.skip = set(poison), set(skip)
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self):
        while self.position in self.skip:
            self.position += 1
        g = torch.Generator().manual_seed(self.seed * 100003 + self.position * 7 + self.seq_len)
        toks = torch.randint(0, self.vocab, (self.micro_batch, self.seq_len + 1), generator=g)
        batch = {"input_ids": toks[:, :-1].contiguous(), "labels": toks[:, 1:].contiguous(),
                 "poison": torch.tensor(self.position in self.poison), "position": self.position}
        self.position += 1
        return batch

    def set_seq_len(self, seq_len):
        self.seq_len = seq_len

    def state_dict(self):
        return {"position": self.position, "seq_len": self.seq_len}

    def load_state_dict(self, state):
        self.position, self.seq_len = state["position"], state["seq_len"]


def run_loop(model, opt, sched, loader, ctl, steps, grad_accum, record=None, start=0, poison_scale=1e3):
    """Train until ``steps`` optimizer steps are done; returns {step: loss} of the accepted
    steps (a rolled-back step is overwritten by its replay). ``record`` collects, per
    (step, micro), the batch, the indices passed in and the indices the model used."""
    objects = {"model": model, "optimizer": opt, "scheduler": sched, "loader": loader}
    losses, step = {}, start
    while step < steps:
        batches = ctl.begin_step(step, model, loader, grad_accum, objects)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for m, b in enumerate(batches):
            ri = ctl.routing_for(step, m, b)
            out = model(b["input_ids"], labels=b["labels"], routing_indices=ri)
            loss = out.loss * (poison_scale if bool(b["poison"]) else 1.0)
            (loss / grad_accum).backward()
            total += loss.item() / grad_accum
            if record is not None:
                record[(step, m)] = {"batch": b, "passed": ri,
                                     "used": [r.clone() for r in out.routing_indices]}
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9).item()
        opt.step()
        sched.step()
        model.update_router_biases()
        losses[step] = total
        step = ctl.end_step(step, {"loss": total, "grad_norm": gn}, objects)
    return losses


def params_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def clone_model(model):
    return copy.deepcopy(model)
