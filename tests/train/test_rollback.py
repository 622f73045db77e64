"""Snapshots restore bit-exactly; a run that spikes, rolls back and skips the bad batch ends
exactly where a run that never saw that batch ends (with and without auto anticipatory
routing); retries are bounded."""
from __future__ import annotations

import copy

import pytest
import torch

from stability_helpers import (SyntheticLoader, assert_same_state, build, one_thread,  # noqa: F401
                               params_of, run_loop)
from train.anticipatory import compute_routing
from train.prefetch import Prefetcher
from train.rollback import RollbackExhausted, SnapshotRing
from train.spikes import SpikeDetector
from train.stability import NonFiniteLossError
from train.stability_control import StabilityController

GA, STEPS, BAD_STEP = 2, 8, 5
BAD_POSITIONS = {BAD_STEP * GA, BAD_STEP * GA + 1}  # the micro-batches of step 5


def detector():
    return SpikeDetector(window=8, z_threshold=50.0, min_history=3, metrics=("loss", "grad_norm"))


@pytest.mark.parametrize("location", ["memory", "disk"])
def test_snapshot_restores_bit_exactly(location, tmp_path):
    model, opt, sched = build()
    pf = Prefetcher(SyntheticLoader())
    ctl = StabilityController(mode="off", detector=detector())
    run_loop(model, opt, sched, pf, ctl, 2, 1)
    objects = {"model": model, "optimizer": opt, "scheduler": sched, "loader": pf}
    ring = SnapshotRing(every=1, keep=2, location=location, directory=tmp_path / "snaps")
    ring.save(2, objects)
    saved = (params_of(model), copy.deepcopy(opt.state_dict()), sched.state_dict(), pf.state_dict())
    rand_after_save = torch.rand(3)
    run_loop(model, opt, sched, pf, ctl, 4, 1, start=2)
    ring.save(4, objects)
    assert not torch.equal(params_of(model)["embed.weight"], saved[0]["embed.weight"])
    assert ring.restore(objects, n_back=2) == 2
    assert ring.steps == [2]  # the abandoned branch's snapshot is gone
    assert_same_state(params_of(model), saved[0])
    for (sa, sb) in zip(opt.state_dict()["state"].values(), saved[1]["state"].values()):
        assert sa.keys() == sb.keys()
        assert all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa)
    assert sched.state_dict() == saved[2] and pf.state_dict() == saved[3]
    assert torch.equal(torch.rand(3), rand_after_save)
    with pytest.raises(RollbackExhausted, match="cannot go 2"):
        ring.restore(objects, n_back=2)


def reference_loop(model, opt, sched, loader, steps, ga, anticipate=()):
    """Plain loop, no controller: for steps in ``anticipate`` the routing comes from a copy of
    the model saved before the previous step's optimizer update (dt = 1)."""
    losses, prev = {}, None
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(ga):
            b = next(loader)
            ri = compute_routing(prev, b) if step in anticipate else None
            out = model(b["input_ids"], labels=b["labels"], routing_indices=ri)
            (out.loss / ga).backward()
            total += out.loss.item() / ga
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        prev = copy.deepcopy(model)
        opt.step()
        sched.step()
        model.update_router_biases()
        losses[step] = total
    return losses


@pytest.mark.parametrize("mode", ["off", "auto"])
def test_rollback_and_skip_matches_run_that_skipped_the_batch(mode):
    model, opt, sched = build()
    ctl = StabilityController(mode=mode, dt=1, on_steps=3, detector=detector(),
                              ring=SnapshotRing(every=2, keep=2), max_retries=2, skip_batches=1)
    loader = Prefetcher(SyntheticLoader(poison=BAD_POSITIONS))
    losses = run_loop(model, opt, sched, loader, ctl, STEPS, GA)
    events = ctl.pop_events()
    kinds = [(e["event"], e["step"]) for e in events]
    assert ("rollback", BAD_STEP) in kinds and ("skip", BAD_STEP) in kinds
    assert {e["metric"] for e in events if e["event"] == "spike"} == {"loss", "grad_norm"}
    rollback = next(e for e in events if e["event"] == "rollback")
    assert rollback["to_step"] == 4

    ref_model, ref_opt, ref_sched = build()
    anticipate = {5, 6} if mode == "auto" else ()  # on for [4, 7); step 4 has no older params
    ref_losses = reference_loop(ref_model, ref_opt, ref_sched, SyntheticLoader(skip=BAD_POSITIONS),
                                STEPS, GA, anticipate=anticipate)
    assert losses == ref_losses
    assert_same_state(params_of(model), params_of(ref_model))
    if mode == "auto":
        assert ("mode", 4) in kinds and ("mode", 7) in kinds
        assert [e["anticipatory"] for e in events if e["event"] == "mode"] == ["on", "off"]
        m = ctl.pop_metrics(STEPS)
        assert m["stability/anticipatory_hits"] == 2 * GA and m["stability/anticipatory_misses"] == 0
        # the mechanism mattered: without it the run differs
        plain_model, plain_opt, plain_sched = build()
        plain = reference_loop(plain_model, plain_opt, plain_sched,
                               SyntheticLoader(skip=BAD_POSITIONS), STEPS, GA)
        assert plain != ref_losses


def test_retries_are_bounded_with_a_clear_message():
    model, opt, sched = build()
    ctl = StabilityController(mode="auto", detector=detector(), ring=SnapshotRing(every=2, keep=3),
                              max_retries=2, skip_batches=0)  # not skipping: the spike recurs
    loader = Prefetcher(SyntheticLoader(poison={6}))
    with pytest.raises(RollbackExhausted, match=r"at step 7 after 2 rollback\(s\) in a row"):
        run_loop(model, opt, sched, loader, ctl, STEPS, 1)


def test_nan_without_rollback_stops_the_run():
    model, opt, sched = build()
    ctl = StabilityController(mode="off", detector=detector())
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        run_loop(model, opt, sched, Prefetcher(SyntheticLoader(poison={1})), ctl, 3, 1,
                 poison_scale=float("nan"))
