"""Training stability through the real trainer (train.trainer.train): anticipatory routing `on`
routes with the previous step's parameters, `auto` rolls an injected spike back and then equals
a run that skipped the bad batch, a resume inside the anticipatory window is exact, retries are
bounded, bad settings fail before the model is built."""
from __future__ import annotations

import json

import pytest
import torch

from model.config import ModelConfig
from stability_helpers import one_thread  # noqa: F401  (autouse: one intra-op thread)
from model.transformer import Transformer
from train.rollback import RollbackExhausted
from train.stability import NonFiniteLossError


def _job(th, corpus_dir, token_cache_dir, root, steps, grad_accum=1):
    """seq_len 32, micro batch 2 (64 tokens), no validation in between, no diagnostics."""
    return th.SMALL_MODEL + [
        "data=files", f"data.paths=[{corpus_dir}]", f"data.cache_dir={token_cache_dir}",
        "data.val_fraction=0.1", "data.val_batches=1", "train.seq_len=32",
        f"train.global_batch_tokens={64 * grad_accum}", "train.micro_batch_tokens=64",
        f"train.tokens={64 * grad_accum * steps}", "train.val_every=0", "train.ckpt_every=100",
        "train.progress=false", f"train.runs_root={root / 'outputs'}", "optim.warmup_steps=2",
        "logging.diagnostics_every=0"]


def _last_per_step(th, metrics_path) -> dict[int, float]:
    """Train loss per step; a step replayed after a rollback keeps its last (accepted) line."""
    return dict(th.train_losses(metrics_path))


def _module_state(ckpt_dir):
    return torch.load(ckpt_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def _events(th, metrics_path, name):
    return [r for r in th.read_metrics(metrics_path) if r.get("event") == f"stability/{name}"]


# --------------------------------------------------------------------- (a) on, dt = 1
def test_on_routes_each_step_with_the_previous_steps_parameters(th, corpus_dir, token_cache_dir,
                                                                tmp_path, monkeypatch):
    """Every training forward is recorded (a hook on Transformer.forward); the indices passed in
    at step t must equal, and be the ones used, those a separate model loaded from the
    checkpoint after step t-1 computes for the same micro-batch."""
    steps, ga = 3, 2
    calls = []
    original = Transformer.forward

    def recording_forward(self, input_ids, doc_ids=None, labels=None, routing_indices=None,
                          diagnostics=False):
        out = original(self, input_ids, doc_ids=doc_ids, labels=labels,
                       routing_indices=routing_indices, diagnostics=diagnostics)
        if torch.is_grad_enabled():   # training forwards only (pre-pass and validation: no grad)
            calls.append({"batch": (input_ids.clone(), doc_ids.clone(), labels.clone()),
                          "passed": None if routing_indices is None else
                          [r.clone() for r in routing_indices],
                          "used": [r.clone() for r in out.routing_indices]})
        return out
    monkeypatch.setattr(Transformer, "forward", recording_forward)
    overrides = _job(th, corpus_dir, token_cache_dir, tmp_path, steps=steps, grad_accum=ga) + [
        "stability.anticipatory_routing=on", "stability.dt=1", "train.ckpt_every=1",
        "train.keep_checkpoints=10", "optim=adamw", "optim.lr=3e-3", "optim.warmup_steps=1"]
    result = th.run_job(tmp_path / "run", overrides)
    monkeypatch.setattr(Transformer, "forward", original)
    assert len(calls) == steps * ga
    save_dir = result.checkpoint.parent
    cfg = ModelConfig.from_dict(json.loads((save_dir / "step_00000001" / "meta.json").read_text())
                                ["model_config"])

    def params_after(k):   # theta_k: the model after k optimizer steps
        torch.manual_seed(1234)      # theta_0: the trainer's init (train.seed, then the model)
        m = Transformer(cfg)
        if k > 0:                    # from the checkpoint written after step k
            m.load_state_dict(_module_state(save_dir / f"step_{k:08d}"))
        return m.train()

    changed = 0
    for i, call in enumerate(calls):
        t = i // ga
        if t == 0:
            assert call["passed"] is None          # no older parameters yet: normal routing
            continue
        assert call["passed"] is not None
        assert all(torch.equal(p, u) for p, u in zip(call["passed"], call["used"]))
        with torch.no_grad():
            input_ids, doc_ids, labels = call["batch"]
            expected = params_after(t - 1)(input_ids, doc_ids=doc_ids, labels=labels).routing_indices
            current = params_after(t)(input_ids, doc_ids=doc_ids, labels=labels).routing_indices
        assert len(expected) == len(call["used"]) == 4            # 3 layers + MTP
        assert all(torch.equal(e, u) for e, u in zip(expected, call["used"])), f"step {t}"
        changed += any(not torch.equal(c, e) for c, e in zip(current, expected))
    assert changed, "routing never changed between steps: the check could not see an off-by-one"
    train = [r for r in th.read_metrics(result.metrics_path) if r["kind"] == "train"]
    assert [r["stability/anticipatory_hits"] for r in train] == [0] + [ga] * (steps - 1)
    assert all(r["stability/anticipatory_misses"] == 0 for r in train)
    assert all(r["stability/anticipatory_ms"] > 0 for r in train[:-1])   # measured and logged


# --------------------------------------------------------------------- (b), (c) auto + rollback
SPIKE_STEP, STEPS = 3, 6
AUTO = ["stability.anticipatory_routing=auto", "stability.on_steps=3",
        "stability.rollback.snapshot_every=2", "stability.rollback.skip_batches=1",
        "stability.detector.metrics=[loss,grad_norm]", "stability.detector.window=8",
        "stability.detector.min_history=3", "stability.detector.z_threshold=1000"]


@pytest.fixture(scope="module")
def auto_runs(th, tmp_path_factory, corpus_dir, token_cache_dir):
    """Runs made on first use (0-based steps): `spiked` (auto, a x1e4 gradient at step 3:
    detected, rolled back to the snapshot after step 2, the batch skipped, anticipatory routing
    on for steps 2..4, so steps 3 and 4 route with older parameters), `reference` (no spike: the
    same batch skipped and the same window switched on by hand) and `resumed` (`spiked` stopped
    after 4 steps, inside the window, then resumed)."""
    root = tmp_path_factory.mktemp("stability")
    base = _job(th, corpus_dir, token_cache_dir, root, steps=STEPS) + AUTO
    jobs = {
        "spiked": [[f"stability.inject=[{{step:{SPIKE_STEP},kind:scale_grad,factor:1e4}}]"]],
        "reference": [[f"stability.inject=[{{step:{SPIKE_STEP},kind:skip}},{{step:2,kind:anticipate}}]"]],
        "resumed": [[f"stability.inject=[{{step:{SPIKE_STEP},kind:scale_grad,factor:1e4}}]",
                     "train.stop_at_step=4"],
                    [f"stability.inject=[{{step:{SPIKE_STEP},kind:scale_grad,factor:1e4}}]",
                     "train.resume=auto"]],
    }
    done = {}

    def get(name):
        if name not in done:
            mp = pytest.MonkeyPatch()
            mp.setenv("WANDB_MODE", "disabled")
            try:
                for i, extra in enumerate(jobs[name]):
                    # task overrides: what resume=auto matches runs on (the job's name here)
                    task = [o for o in extra if o.startswith("train.")] + [f"+job={name}"]
                    done[name] = th.run_job(root / "outputs" / "runs" / f"{name}-{i}",
                                            base + extra, task)
            finally:
                mp.undo()
        return done[name]
    return get


def test_auto_rolls_back_an_injected_spike_and_equals_the_run_that_skipped_it(th, auto_runs):
    spiked, reference = auto_runs("spiked"), auto_runs("reference")
    path = spiked.metrics_path
    spikes = _events(th, path, "spike")
    assert {e["metric"] for e in spikes} == {"grad_norm"}   # scale_grad: the loss stays put
    assert all(e["step"] == SPIKE_STEP + 1 for e in spikes)     # the 4th step's train line
    (rollback,) = _events(th, path, "rollback")
    assert rollback["to_step"] == 2 and rollback["retry"] == 1
    assert [e["anticipatory"] for e in _events(th, path, "mode")] == ["on", "off"]
    assert _events(th, path, "skip")[0]["batches"] == 1
    # afterwards the run equals the one that never saw the batch, bit for bit (fp32 CPU)
    assert _last_per_step(th, path) == _last_per_step(th, reference.metrics_path)
    assert len(_last_per_step(th, path)) == STEPS
    a, b = _module_state(spiked.checkpoint), _module_state(reference.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    train = [r for r in th.read_metrics(path) if r["kind"] == "train"]
    assert max(r["grad_norm"] for r in train) < 100       # the spike never became a train line
    assert train[-1]["stability/rollbacks"] == 1
    assert sum(r.get("stability/anticipatory_hits", 0) for r in train) == 2   # steps 3 and 4


def test_resume_inside_the_anticipatory_window_is_exact(th, auto_runs):
    spiked, resumed = auto_runs("spiked"), auto_runs("resumed")
    assert resumed.step == STEPS
    assert _last_per_step(th, resumed.metrics_path) == _last_per_step(th, spiked.metrics_path)
    a, b = _module_state(spiked.checkpoint), _module_state(resumed.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    train = [r for r in th.read_metrics(resumed.metrics_path) if r["kind"] == "train"]
    after = [r for r in train if r["step"] > 4]
    # step 4 (0-based) routed with the indices the first invocation cached under theta_3 and
    # checkpointed: a hit, not a recomputation
    assert after[0]["stability/anticipatory_hits"] == 1 and after[0]["stability/anticipatory_misses"] == 0


# --------------------------------------------------------------------- (d) failures
def test_retries_are_bounded_with_a_clear_message(th, corpus_dir, token_cache_dir, tmp_path):
    """Not skipping the bad batch: every replay spikes again; after max_retries rollbacks the
    run stops, naming the metric, the step and the setting to change."""
    overrides = _job(th, corpus_dir, token_cache_dir, tmp_path, steps=5) + AUTO + [
        "optim=adamw", "optim.lr=3e-3", "optim.warmup_steps=1",
        "stability.rollback.skip_batches=0", "stability.rollback.max_retries=1",
        "stability.inject=[{step:3,kind:scale_grad,factor:1e4}]"]
    with pytest.raises(RollbackExhausted, match=r"at step 4 after 1 rollback\(s\) in a row") as err:
        th.run_job(tmp_path / "run", overrides)
    assert "stability.max_retries" in str(err.value)


def test_nan_without_rollback_still_stops_the_run(th, corpus_dir, token_cache_dir, tmp_path):
    overrides = _job(th, corpus_dir, token_cache_dir, tmp_path, steps=4) + [
        "stability.inject=[{step:1,kind:nan}]"]
    with pytest.raises(NonFiniteLossError, match="non-finite loss = nan at optimizer step 2"):
        th.run_job(tmp_path / "run", overrides)


@pytest.fixture
def no_model(monkeypatch):
    import train.setup

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the bad setting was reported")
    monkeypatch.setattr(train.setup, "Transformer", refuse)


@pytest.mark.parametrize("override, needle", [
    ("stability.anticipatory_routing=sometimes", "stability.anticipatory_routing"),
    ("stability.dt=0", "stability.dt"),
    ("stability.detector.metrics=[loss,perplexity]", "stability.detector.metrics"),
    ("stability.detector.min_history=100", "stability.detector.min_history"),
    ("stability.rollback.location=tape", "stability.rollback.location"),
    ("stability.rollback.max_retries=-1", "stability.rollback.max_retries"),
    ("stability.inject=[{step:1,kind:meteor}]", "stability.inject[0].kind"),
])
def test_bad_stability_settings_fail_before_the_model_is_built(th, small_job, tmp_path, no_model,
                                                               override, needle):
    with pytest.raises(ValueError) as err:
        th.run_job(tmp_path / "run", small_job + ["stability.anticipatory_routing=auto", override])
    assert needle in str(err.value)


def test_rollback_under_zero2_restores_the_sharded_optimizer(th, corpus_dir, token_cache_dir,
                                                             tmp_path):
    """ZeRO-2 (DeepSpeed's optimizer wrapper holds the fp32 master shards and the Muon momentum
    on them): the rolled-back run equals the run that skipped the batch, bit for bit."""
    base = _job(th, corpus_dir, token_cache_dir, tmp_path, steps=5) + AUTO + ["deepspeed=zero2"]
    spiked = th.run_job(tmp_path / "spiked", base + [
        f"stability.inject=[{{step:{SPIKE_STEP},kind:scale_grad,factor:1e4}}]"])
    reference = th.run_job(tmp_path / "reference", base + [
        f"stability.inject=[{{step:{SPIKE_STEP},kind:skip}},{{step:2,kind:anticipate}}]"])
    assert len(_events(th, spiked.metrics_path, "rollback")) == 1
    assert _last_per_step(th, spiked.metrics_path) == _last_per_step(th, reference.metrics_path)
    a, b = _module_state(spiked.checkpoint), _module_state(reference.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
