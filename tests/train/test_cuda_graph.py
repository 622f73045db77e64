"""train/cuda_graph.py: the graphed micro-batch step (train.cuda_graph=true) on CPU, with
``EagerGraph`` standing in for the CUDA graph: keys and re-capture, each micro-batch copied into
the static inputs, warm-up and capture leaving the model untouched, invalidation when storage is
re-allocated, the refusals; and through the trainer (fp32 CPU, DeepSpeed): a few steps with
gradient accumulation equal the plain path bit for bit, also across a rollback."""
from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.transformer import Transformer
from train.cuda_graph import EagerGraph, GraphedMicroStep, capture_graph, cuda_graph_problem


class Engine:
    """What GraphedMicroStep needs of a DeepSpeed engine at ZeRO 0 in fp32: the client
    optimizer and the backward epilogue (counted)."""

    def __init__(self, model):
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        self.epilogues = 0

    def _backward_epilogue(self):
        self.epilogues += 1


def _model(seed=0):
    cfg = ModelConfig.from_preset("micro", attention_impl="torch", mhc_impl="torch")
    torch.manual_seed(seed)
    return Transformer(cfg).train()


def _batch(cfg, seed, b=2, n=48):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, n + 1), generator=g)
    doc = torch.zeros(b, n, dtype=torch.long)
    doc[0, 20:] = 1
    doc[-1, 31:] = 1
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "doc_ids": doc}


def _plain(model, batches, scale):
    """The eager reference: forward, backward of loss x scale, gradients accumulated."""
    losses = []
    for b in batches:
        out = model(**b)
        (out.loss * scale).backward()
        losses.append((out.loss.detach(), out.losses))
    return losses


def _grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _equal(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert (a[n] is None) == (b[n] is None), n
        assert a[n] is None or torch.equal(a[n], b[n]), n


def test_graphed_micro_batches_equal_the_eager_step_bitwise():
    ref, got = _model(), _model()
    batches = [_batch(ref.cfg, s) for s in range(3)]
    expect = _plain(ref, batches, 0.5)
    engine = Engine(got)
    step = GraphedMicroStep(engine, got, torch.device("cpu"), factory=EagerGraph)
    for b, (loss, losses) in zip(batches, expect):
        res = step(b, None, 0.5)
        assert torch.equal(res.logged, loss)
        assert res.losses.keys() == losses.keys() and all(torch.equal(res.losses[k], losses[k]) for k in losses)
    assert step.captures == 1 and engine.epilogues == 3
    _equal(_grads(got), _grads(ref))
    # the MoE load counters counted each micro-batch once (not the warm-up or the capture)
    assert all(torch.equal(a, b) for a, b in zip(got.router_load_buffers(), ref.router_load_buffers()))
    assert any(float(b.sum()) > 0 for b in ref.router_load_buffers())


def test_static_inputs_take_each_micro_batch():
    model = _model()
    step = GraphedMicroStep(Engine(model), model, torch.device("cpu"), factory=EagerGraph)
    b0, b1 = _batch(model.cfg, 0), _batch(model.cfg, 1)
    step(b0, None, 1.0)
    (c,) = step.graphs.values()
    assert all(torch.equal(c.inputs[k], b0[k]) for k in b0)
    step(b1, None, 1.0)
    assert all(torch.equal(c.inputs[k], b1[k]) for k in b1) and step.captures == 1
    assert all(c.inputs[k].data_ptr() != b1[k].data_ptr() for k in b1)


def test_every_key_change_captures_again():
    model = _model()
    step = GraphedMicroStep(Engine(model), model, torch.device("cpu"), factory=EagerGraph, max_graphs=2)
    b = _batch(model.cfg, 0)
    step(b, None, 0.5)
    step(b, None, 0.5)
    assert step.captures == 1
    other_mode = "dense" if model.attention_mode == "sparse" else "sparse"
    changes = [
        lambda: step(_batch(model.cfg, 1, b=1), None, 0.5),                  # micro-batch shape
        lambda: step(b, None, 0.25),                                           # accumulation steps
        lambda: (model.set_attention_mode(other_mode), step(b, None, 0.25)),  # attention mode
        lambda: (setattr(model, "mtp_loss_weight", 0.1), step(b, None, 0.25)),  # MTP weight at decay
        lambda: (model.embed.weight.requires_grad_(False), step(b, None, 0.25)),  # trainable set
    ]
    for n, change in enumerate(changes, start=2):
        change()
        assert step.captures == n
        assert len(step.graphs) <= 2
    # routing supplied: its own graph; the same routing shapes again: replayed
    routing = model(**b).routing_indices
    step(b, [r.detach() for r in routing], 0.25)
    step(b, [r.detach() for r in routing], 0.25)
    assert step.captures == len(changes) + 2
    # the least recently used graph was dropped: going back captures again
    step(b, None, 0.5)
    assert step.captures == len(changes) + 3


def test_frozen_parameters_get_no_gradient_and_supplied_routing_is_used():
    ref, got = _model(), _model()
    for m in (ref, got):   # the indexer warm-up: only some parameters train
        for n, p in m.named_parameters():
            p.requires_grad_("indexer" in n)
    b = _batch(ref.cfg, 3)
    routing = [r.detach() for r in ref(**_batch(ref.cfg, 4)).routing_indices]
    ref.zero_grad(set_to_none=True)
    for buf in ref.router_load_buffers():
        buf.zero_()
    out = ref(**b, routing_indices=routing)
    out.loss.backward()
    res = GraphedMicroStep(Engine(got), got, torch.device("cpu"), factory=EagerGraph)(b, routing, 1.0)
    assert torch.equal(res.logged, out.loss.detach())
    _equal(_grads(got), _grads(ref))
    assert sum(g is not None for g in _grads(got).values()) > 0


def test_reallocated_storage_and_invalidate_capture_again():
    model = _model()
    step = GraphedMicroStep(Engine(model), model, torch.device("cpu"), factory=EagerGraph)
    b = _batch(model.cfg, 0)
    step(b, None, 1.0)
    with torch.no_grad():   # an in-place load (rollback, resume: load_state_dict copies) keeps the graph
        model.load_state_dict(_model(seed=1).state_dict())
    step(b, None, 1.0)
    assert step.captures == 1
    model.head.weight.data = model.head.weight.data.clone()   # new storage: the graph is stale
    step(b, None, 1.0)
    assert step.captures == 2
    step.invalidate("test")
    step(b, None, 1.0)
    assert step.captures == 3


def test_a_failing_capture_says_so_and_leaves_the_model_as_it_was():
    model = _model()
    b = _batch(model.cfg, 0)
    before = _grads(model)
    loads = [x.clone() for x in model.router_load_buffers()]

    class Refuses(EagerGraph):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    step = GraphedMicroStep(Engine(model), model, torch.device("cpu"), factory=Refuses)
    with pytest.raises(RuntimeError, match="capturing the micro-batch step failed.*train.cuda_graph=false"):
        step(b, None, 1.0)
    _equal(_grads(model), before)
    assert all(torch.equal(a, c) for a, c in zip(model.router_load_buffers(), loads))


def test_capture_graph_warms_up_then_captures():
    calls = []
    x = torch.zeros(3)

    def fn():
        calls.append("run")
        return x + 1

    graph, out = capture_graph(fn, torch.device("cpu"), warmup=2, before_capture=lambda: calls.append("before"),
                               factory=EagerGraph)
    assert calls == ["run", "run", "before", "run"]
    x += 5
    graph.replay()
    assert torch.equal(out, torch.full((3,), 6.0))


GOOD = dict(device=torch.device("cuda"), precision="bf16", zero_stage=0, seq_chunk=0, cp_size=1, ep_size=1,
            compile_mode="none")


@pytest.mark.parametrize("change, says", [
    ({"device": torch.device("cpu")}, "needs a CUDA device; this job runs on cpu"),
    ({"precision": "fp32"}, "train.precision=fp32"),
    ({"zero_stage": 2}, "deepspeed.zero_stage=0"),
    ({"seq_chunk": "auto"}, "train.seq_chunk=0"),
    ({"seq_chunk": 4096}, "train.seq_chunk=0"),
    ({"cp_size": 2}, "parallel.cp_size=1"),
    ({"ep_size": 2}, "parallel.ep_size=1"),
    ({"compile_mode": "block"}, "model.compile=none"),
])
def test_refusals_name_the_setting(change, says):
    assert cuda_graph_problem(**GOOD) is None
    problem = cuda_graph_problem(**{**GOOD, **change})
    assert problem is not None and says in problem and "\n" not in problem
    assert "train.cuda_graph=false" in problem


# --------------------------------------------------------------------- through the trainer
SPIKE_STEP, STEPS = 3, 6
STABILITY = ["stability.anticipatory_routing=auto", "stability.on_steps=3",
             "stability.rollback.snapshot_every=2", "stability.rollback.skip_batches=1",
             "stability.detector.metrics=[loss,grad_norm]", "stability.detector.window=8",
             "stability.detector.min_history=3", "stability.detector.z_threshold=1000",
             f"stability.inject=[{{step:{SPIKE_STEP},kind:scale_grad,factor:1e4}}]"]


@pytest.fixture(scope="module")
def runs(th, tmp_path_factory, corpus_dir, token_cache_dir):
    """fp32 CPU trainer runs (made on first use) of one job: 6 steps of 2 accumulated micro-batches
    (seq_len 32, micro batch 2), diagnostics on every 2nd step's first micro-batch, a x1e4
    gradient injected at step 3 (detected, rolled back to the snapshot after step 2, that batch
    skipped, anticipatory routing on for steps 2..4: routing supplied). `plain`; `graph`
    (train.cuda_graph=true, EagerGraph standing in, the CPU refusal lifted); `resumed` (graph,
    stopped after 4 steps, then train.resume=auto); `plain_bf16`, `graph_bf16` (the same in bf16).
    ``get.optimizers[name]``: the optimizer class each GraphedMicroStep was built over."""
    root = tmp_path_factory.mktemp("cuda_graph")
    base = th.SMALL_MODEL + [
        "data=files", f"data.paths=[{corpus_dir}]", f"data.cache_dir={token_cache_dir}",
        "data.val_fraction=0.1", "data.val_batches=1", "train.seq_len=32", "train.global_batch_tokens=128",
        "train.micro_batch_tokens=64", f"train.tokens={128 * STEPS}", "train.val_every=0",
        "train.ckpt_every=100", "train.progress=false", f"train.runs_root={root / 'outputs'}",
        "optim.warmup_steps=2", "logging.diagnostics_every=2"] + STABILITY
    graph = ["train.cuda_graph=true"]
    # the v4_test curriculum: 64 -> 128 -> 256 tokens, dense, then an indexer warm-up and sparse
    curriculum = ["curriculum=v4_test", "train.micro_batch_tokens=256", "stability.inject=[]",
                  "stability.anticipatory_routing=off"]
    jobs = {"plain": [[]], "graph": [graph], "plain_bf16": [["train.precision=bf16"]],
            "graph_bf16": [graph + ["train.precision=bf16"]],
            "plain_curriculum": [curriculum], "graph_curriculum": [graph + curriculum],
            "resumed": [graph + ["train.stop_at_step=4"], graph + ["train.resume=auto"]]}
    done = {}
    from train.cuda_graph import GraphedMicroStep

    init = GraphedMicroStep.__init__

    def get(name):
        if name not in done:
            mp = pytest.MonkeyPatch()
            mp.setenv("WANDB_MODE", "disabled")
            mp.setattr("train.cuda_graph.cuda_graph_problem", lambda **kw: None)
            seen = get.optimizers.setdefault(name, [])

            def recording_init(self, engine, *a, **kw):
                seen.append(type(engine.optimizer).__name__)
                init(self, engine, *a, **kw)
            mp.setattr(GraphedMicroStep, "__init__", recording_init)
            torch.set_num_threads(1)
            try:
                for i, extra in enumerate(jobs[name]):
                    task = [o for o in extra if o.startswith("train.")] + [f"+job={name}"]
                    done[name] = th.run_job(root / "outputs" / "runs" / f"{name}-{i}", base + extra, task)
            finally:
                mp.undo()
        return done[name]
    get.optimizers = {}
    return get


def _train_lines(th, result):
    """step -> (loss, grad_norm) of the accepted train line (a replayed step keeps its last)."""
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in th.read_metrics(result.metrics_path)
            if r["kind"] == "train"}


def _module(result):
    return torch.load(result.checkpoint / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def _same_run(th, got, ref, steps=STEPS):
    assert _train_lines(th, got) == _train_lines(th, ref) and len(_train_lines(th, ref)) == steps
    a, b = _module(got), _module(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trainer_graph_path_equals_the_plain_path_across_a_rollback(th, runs):
    plain, graph = runs("plain"), runs("graph")
    events = th.read_metrics(graph.metrics_path)
    (rollback,) = [e for e in events if e.get("event") == "stability/rollback"]
    assert rollback["to_step"] == 2
    captures = [e for e in events if e.get("event") == "cuda_graph_capture"]
    # step 0 captures; the rollback drops the graphs (the step it restores captures again), the
    # anticipatory window (routing supplied) and the MTP weight's decay have graphs of their own
    assert [(e["step"], e["routing"], e["mtp_loss_weight"]) for e in captures] == [
        (0, False, 0.3), (2, False, 0.3), (3, True, 0.3), (5, False, 0.1)]
    assert not any(e.get("event") == "cuda_graph_capture" for e in th.read_metrics(plain.metrics_path))
    _same_run(th, graph, plain)


@pytest.mark.slow   # two more trainer runs, ~40 s on 2 busy cores
def test_trainer_graph_path_resumes_exactly(th, runs):
    _same_run(th, runs("resumed"), runs("plain"))


def test_config_check_refuses_cuda_graph_on_cpu(th, small_job):
    from train.config_check import ConfigError, check_job

    with pytest.raises(ConfigError, match=r"train.cuda_graph=true needs a CUDA device; this job runs on cpu"):
        check_job(th.compose(*small_job, "train.device=cpu", "train.cuda_graph=true"), world_size=1)
    check_job(th.compose(*small_job, "train.device=cpu", "train.cuda_graph=false"), world_size=1)


def test_trainer_graph_path_in_bf16_equals_the_plain_path(th, runs):
    """train.precision=bf16 on CPU: DeepSpeed wraps the client optimizer at ZeRO 0 as on the GPU
    (FP16_UnfusedOptimizer over bf16 weights, gradients accumulated in bf16 .grad)."""
    graph = runs("graph_bf16")
    assert runs.optimizers["graph_bf16"] == ["FP16_UnfusedOptimizer"]
    _same_run(th, graph, runs("plain_bf16"))
    assert _train_lines(th, graph) != _train_lines(th, runs("graph"))   # (bf16, not fp32)


def test_a_zero_optimizer_is_refused():
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    model = _model()
    engine = Engine(model)
    engine.optimizer = ZeROOptimizer()
    with pytest.raises(ValueError, match="ZeRO stage 0 only"):
        GraphedMicroStep(engine, model, torch.device("cpu"))


@pytest.mark.slow   # two more trainer runs, ~40 s on 2 busy cores
def test_trainer_graph_path_through_a_curriculum_with_an_indexer_warmup(th, runs):
    """Stage switches (shape, accumulation), the indexer warm-up (only the indexers train, dense)
    and sparse attention each capture their own graph; the run equals the plain one bit for bit."""
    graph = runs("graph_curriculum")
    _same_run(th, graph, runs("plain_curriculum"), steps=8)
    captures = [e for e in th.read_metrics(graph.metrics_path) if e.get("event") == "cuda_graph_capture"]
    assert [(e["step"], e["batch"], e["attention_mode"]) for e in captures][:4] == [
        (0, [4, 64], "dense"), (2, [2, 128], "dense"), (4, [1, 256], "dense"), (6, [1, 256], "sparse")]
    assert captures[2]["trainable"] < captures[1]["trainable"] == captures[3]["trainable"]
