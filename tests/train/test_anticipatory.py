"""Anticipatory routing: indices of step t come from theta_{t-dt}, per micro-batch, checked
against routing recomputed with saved copies of the earlier parameters; exact resume."""
from __future__ import annotations

import copy

import pytest
import torch

from stability_helpers import (SyntheticLoader, assert_same_state, build, one_thread,  # noqa: F401
                               params_of, run_loop)
from train.anticipatory import AnticipatoryRouter, batch_fingerprint, compute_routing
from train.prefetch import Prefetcher
from train.spikes import SpikeDetector
from train.stability_control import StabilityController


def quiet_detector():
    return SpikeDetector(window=5, z_threshold=1e9, min_history=3)


class SavingOptimizerStep:
    """Keeps a copy of the model as it was before every optimizer step (theta_s for step s)."""

    def __init__(self, model, opt):
        self.model, self.opt, self.copies = model, opt, []
        self._step = opt.step

        def step(*a, **kw):
            self.copies.append(copy.deepcopy(model))
            return self._step(*a, **kw)
        opt.step = step


@pytest.mark.parametrize("dt,grad_accum", [(1, 2), (2, 1)])
def test_on_routes_with_parameters_of_step_t_minus_dt(dt, grad_accum):
    model, opt, sched = build()
    saver = SavingOptimizerStep(model, opt)
    ctl = StabilityController(mode="on", dt=dt, detector=quiet_detector())
    record = {}
    steps = 5
    run_loop(model, opt, sched, Prefetcher(SyntheticLoader()), ctl, steps, grad_accum, record=record)
    differs = 0
    for (t, m), r in record.items():
        if t < dt:
            assert r["passed"] is None  # no older parameters exist yet: normal routing
            continue
        assert r["passed"] is not None
        # independent computation: the model copy saved before optimizer step t - dt
        expected = compute_routing(saver.copies[t - dt], r["batch"])
        current = compute_routing(saver.copies[t], r["batch"])
        assert len(r["used"]) == len(expected) == 4  # 3 layers + MTP
        for used, exp in zip(r["used"], expected):
            assert torch.equal(used, exp)
        differs += any(not torch.equal(c, e) for c, e in zip(current, expected))
    assert differs > 0, "routing never changed between steps: the test would not see an off-by-one"
    stats = ctl.pop_metrics(steps)
    assert stats["stability/anticipatory_hits"] == (steps - dt) * grad_accum
    assert stats["stability/anticipatory_misses"] == 0
    assert stats["stability/anticipatory_forward_s"] > 0


def test_no_grad_prepass_matches_training_forward_and_leaves_load_alone():
    model, _, _ = build()
    batch = next(SyntheticLoader())
    before = [b.clone() for b in model.router_load_buffers()]
    pre = compute_routing(model, batch)
    assert all(torch.equal(a, b) for a, b in zip(before, model.router_load_buffers()))
    out = model(batch["input_ids"], labels=batch["labels"])
    assert all(torch.equal(a, b) for a, b in zip(pre, out.routing_indices))


def test_wrong_batch_or_shape_is_recomputed_not_used():
    model, _, _ = build()
    router = AnticipatoryRouter(dt=1)
    loader = SyntheticLoader()
    b0, b1 = next(loader), next(loader)
    router.precompute(model, 3, [b0], params_step=2)
    assert router.indices_for(3, 0, b1) is None  # another batch under the same key
    router.precompute(model, 4, [b0], params_step=3)
    loader.set_seq_len(16)
    short = next(loader)
    assert router.indices_for(4, 0, short) is None
    router.precompute(model, 5, [b0], params_step=4)
    assert router.indices_for(5, 0, b0) is not None
    assert router.pop_stats()["misses"] == 2
    with pytest.raises(ValueError, match="step - dt"):
        router.precompute(model, 5, [b0], params_step=3)
    assert batch_fingerprint(b0) != batch_fingerprint(b1)


def test_curriculum_switch_drops_lookahead_and_recomputes():
    model, opt, sched = build()
    pf = Prefetcher(SyntheticLoader())
    ctl = StabilityController(mode="on", dt=1, detector=quiet_detector())
    run_loop(model, opt, sched, pf, ctl, 2, 1)
    assert pf.buffered == 1  # step 2's batch was drawn for its routing
    pf.set_seq_len(16)       # curriculum boundary: the old-shape look-ahead is dropped
    assert pf.buffered == 0
    record = {}
    run_loop(model, opt, sched, pf, ctl, 4, 1, record=record, start=2)
    assert record[(2, 0)]["batch"]["input_ids"].shape == (2, 16)
    assert record[(2, 0)]["passed"] is None and record[(3, 0)]["passed"] is not None
    assert ctl.pop_metrics(4)["stability/anticipatory_misses"] == 1
    assert record[(2, 0)]["batch"]["position"] == 2  # no batch lost by the rewind


def test_resume_mid_window_is_exact(tmp_path):
    steps, ga = 6, 2
    model, opt, sched = build()
    ctl = StabilityController(mode="on", dt=1, detector=quiet_detector())
    ref_losses = run_loop(model, opt, sched, Prefetcher(SyntheticLoader()), ctl, steps, ga)
    ref = params_of(model)

    model, opt, sched = build()
    pf = Prefetcher(SyntheticLoader())
    ctl = StabilityController(mode="on", dt=1, detector=quiet_detector())
    first = run_loop(model, opt, sched, pf, ctl, 3, ga)
    assert len(ctl.router) == ga  # step 3's indices are cached, computed with theta_2
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "loader": pf.state_dict(),
                "stability": ctl.state_dict()}, path)
    del model, opt, sched, pf, ctl

    state = torch.load(path, weights_only=False)
    model, opt, sched = build(seed=1)  # different init: everything must come from the checkpoint
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    pf = Prefetcher(SyntheticLoader())
    pf.load_state_dict(state["loader"])
    ctl = StabilityController(mode="on", dt=1, detector=quiet_detector())
    ctl.load_state_dict(state["stability"])
    second = run_loop(model, opt, sched, pf, ctl, steps, ga, start=3)
    assert ctl.pop_metrics(steps)["stability/anticipatory_misses"] == 0
    assert {**first, **second} == ref_losses
    assert_same_state(params_of(model), ref)
