"""train.eval: passkey accuracy and NLL by position bucket, scored from the final hidden state
(no [L, V] logits), checked against the full-logits forward of the micro model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.loader import ValLoader
from data.packing import TokenStream
from data.passkey import PasskeyTemplate
from data.tokenizer import load_tokenizer
from model.config import ModelConfig
from model.layout import DocLayout
from model.transformer import IGNORE_INDEX, Transformer
from train import eval as long_eval


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("micro")).eval()


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2-embedded")


def test_size_and_bucket_names():
    assert [long_eval.size_name(n) for n in (4096, 65536, 262144, 1 << 20, 1000)] == \
        ["4K", "64K", "256K", "1M", "1000"]
    assert long_eval.bucket_names(long_eval.DEFAULT_BUCKETS) == ["0-4K", "4K-64K", "64K-256K", "256K-1M"]


def test_hidden_states_and_token_nll_match_the_full_forward(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50257, (2, 96), generator=g)
    doc_ids = torch.cat([torch.zeros(2, 40, dtype=torch.long), torch.ones(2, 56, dtype=torch.long)], 1)
    labels = torch.randint(0, 50257, (2, 96), generator=g)
    labels[:, 70:75] = IGNORE_INDEX
    with torch.no_grad():
        out = model(ids, doc_ids=doc_ids, labels=labels, return_logits=True)
        hidden = model.hidden_states(ids, doc_ids)
        torch.testing.assert_close(model.head(hidden), out.logits, rtol=0, atol=0)
        nll = long_eval.token_nll(model, ids, doc_ids, labels, chunk_tokens=37)  # 37 does not divide B * L
    ref = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(),
                          ignore_index=IGNORE_INDEX, reduction="none").view(2, 96)
    torch.testing.assert_close(nll, ref, rtol=1e-6, atol=1e-6)
    assert (nll[:, 70:75] == 0).all()
    torch.testing.assert_close(nll.sum() / (labels != IGNORE_INDEX).sum(), out.losses["lm"],
                               rtol=1e-5, atol=1e-6)


def test_scoring_goes_through_the_head_module_not_its_weight(model):
    """A ZeRO-3 partitioned head holds an empty weight outside its forward (its pre-forward hook
    gathers it): token NLL and passkey scoring must call the module, never read .weight."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50257, (1, 48), generator=g)
    labels = torch.randint(0, 50257, (1, 48), generator=g)
    with torch.no_grad():
        ref = long_eval.token_nll(model, ids, None, labels, chunk_tokens=13)
    head = model.head
    full = head.weight.data
    head.weight.data = full.new_empty(0)                    # "partitioned" outside forward
    calls = []

    def gather(mod, args, kwargs):
        calls.append(1)
        mod.weight.data = full

    def release(mod, args, kwargs, out):
        mod.weight.data = full.new_empty(0)

    hooks = [head.register_forward_pre_hook(gather, with_kwargs=True),
             head.register_forward_hook(release, with_kwargs=True)]
    try:
        with torch.no_grad():
            got = long_eval.token_nll(model, ids, None, labels, chunk_tokens=13)
    finally:
        for h in hooks:
            h.remove()
        head.weight.data = full
    assert calls and torch.equal(got, ref)


def test_passkey_decision_matches_full_logits(model, gpt2):
    template = PasskeyTemplate(gpt2)
    length = template.min_length + 40
    for depth, key in ((0.0, 12345), (0.5, 67890), (1.0, 55555)):
        doc = template.document(length, depth, key)
        with torch.no_grad():
            logits = model(torch.as_tensor(doc.tokens).unsqueeze(0)).logits[0]
        a, n = doc.answer_start, doc.answer_len
        ref = bool((logits[a - 1: a - 1 + n].argmax(-1) == torch.as_tensor(doc.tokens[a: a + n])).all())
        assert long_eval.passkey_correct(model, template, length, depth, key) == ref
    # a model that always predicts the right answer token scores 1, one that never does 0
    doc = template.document(length, 0.5, 67890)
    answer = torch.as_tensor(doc.tokens[doc.answer_start: doc.answer_start + doc.answer_len])

    class FixedHead(torch.nn.Module):   # predicts the given tokens, whatever the hidden state
        def __init__(self, tokens):
            super().__init__()
            self.tokens = tokens

        def forward(self, h):
            return F.one_hot(self.tokens, 50304).float()[: h.shape[0]]

    real_head = model.head
    try:
        for fake, expect in ((answer, True), ((answer + 1) % 50257, False)):
            model.head = FixedHead(fake)
            assert long_eval.passkey_correct(model, template, length, 0.5, 67890) is expect
    finally:
        model.head = real_head
    res = long_eval.passkey_accuracy(model, template, [length], [0.0, 1.0], trials=2, seed=0)
    assert set(res) == {f"eval/passkey/{length}", f"eval/passkey/{length}/d0", f"eval/passkey/{length}/d1"}
    assert all(0.0 <= v <= 1.0 for v in res.values())
    assert res == long_eval.passkey_accuracy(model, template, [length], [0.0, 1.0], trials=2, seed=0)


def test_nll_buckets_equal_a_per_token_reference(model):
    rng = np.random.default_rng(2)
    lengths = [150, 20, 300, 90, 33, 400, 12]
    tokens = np.concatenate([np.append(rng.integers(0, 50000, n), 50256) for n in lengths]).astype(np.uint16)
    offsets = np.cumsum([0] + [n + 1 for n in lengths])
    stream = TokenStream(tokens, offsets, np.arange(len(lengths)))
    edges = [0, 16, 64, 256, 1024]
    val = ValLoader(stream, 50256, seq_len=256, micro_batch=2, max_batches=2, packing="documents")
    res = long_eval.long_context_metrics(model, None, val, long_eval.EvalSettings(
        passkey_lengths=[], nll_buckets=edges), max_len=256)
    sums, counts = np.zeros(4), np.zeros(4)
    for batch in val:
        with torch.no_grad():
            logits = model(batch["input_ids"], doc_ids=batch["doc_ids"]).logits
        pos = DocLayout.from_doc_ids(batch["doc_ids"]).positions
        for b in range(logits.shape[0]):
            for t in range(logits.shape[1]):
                y = int(batch["labels"][b, t])
                if y == IGNORE_INDEX:
                    continue
                k = int(np.searchsorted(edges, int(pos[b, t]), side="right")) - 1
                sums[k] += float(F.cross_entropy(logits[b, t].float()[None], torch.tensor([y])))
                counts[k] += 1
    names = long_eval.bucket_names(edges)
    for k, name in enumerate(names):
        if counts[k]:
            assert res[f"val/nll_bucket/{name}"] == pytest.approx(sums[k] / counts[k], rel=1e-5)
            assert res[f"val/nll_bucket_tokens/{name}"] == counts[k]
        else:
            assert f"val/nll_bucket/{name}" not in res
    assert model.training is False


def test_out_of_memory_is_recorded_and_ends_the_passkey_sweep(model, gpt2, monkeypatch):
    template = PasskeyTemplate(gpt2)
    n = template.min_length + 8
    real = long_eval.passkey_correct

    def limited(model, template, length, depth, key, seq_chunk=0):
        if length > 2 * n:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(model, template, length, depth, key, seq_chunk)

    monkeypatch.setattr(long_eval, "passkey_correct", limited)
    res = long_eval.long_context_metrics(model, template, None, long_eval.EvalSettings(
        passkey_lengths=[4 * n, n, 2 * n, 3 * n], passkey_depths=[0.5], nll_buckets=[]), max_len=1 << 20)
    assert res["eval/passkey_oom_at"] == 3 * n                       # shortest first, stops there
    assert {f"eval/passkey/{n}", f"eval/passkey/{2 * n}"} <= set(res)
    assert f"eval/passkey/{3 * n}" not in res and f"eval/passkey/{4 * n}" not in res
    assert "out of device memory" in long_eval.table(res, [n, 2 * n, 3 * n], [0.5])


def test_shuffled_control_keeps_every_token_with_its_label(model):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (2, 70), generator=g)
    labels = torch.randint(0, 1000, (2, 70), generator=g)
    docs = torch.tensor([[0] * 30 + [1] * 25 + [2] * 15, [0] * 70])
    ctl = long_eval.shuffled_control({"input_ids": ids, "labels": labels, "doc_ids": docs}, 16, seed=1)
    for b in range(2):
        pairs = sorted(zip(ids[b].tolist(), labels[b].tolist()))
        assert sorted(zip(ctl["input_ids"][b].tolist(), ctl["labels"][b].tolist())) == pairs
        assert torch.equal(ctl["input_ids"][b, 64:], ids[b, 64:])          # partial block stays
        blocks = {tuple(ids[b, 16 * k: 16 * k + 16].tolist()) for k in range(4)}
        assert {tuple(ctl["input_ids"][b, 16 * k: 16 * k + 16].tolist()) for k in range(4)} == blocks
    assert not torch.equal(ctl["input_ids"], ids)
    # document starts travel with their tokens: row 0's three (at 0, 30, 55) each start one
    # (one more document in front unless the block of token 0 came first); row 1 has one
    moved = [int(torch.nonzero(ctl["input_ids"][0] == ids[0, p])[0]) for p in (0, 30, 55)]
    assert int(ctl["doc_ids"][0].max()) + 1 == 3 + (min(moved) > 0)
    assert int(ctl["doc_ids"][1].max()) == 0 or (ctl["input_ids"][1, 0] != ids[1, 0])
    assert ctl["doc_ids"][0, 0] == 0
    res = long_eval.long_context_metrics(
        model, None, [ctl | {}, {"input_ids": ids, "labels": labels, "doc_ids": docs}],
        long_eval.EvalSettings(passkey_lengths=[], nll_buckets=[0, 16, 64], control_block=16), max_len=70)
    assert {"val/nll_bucket/0-16", "val/nll_bucket_control/0-16", "val/nll_bucket_control/16-64"} <= set(res)
    assert "shuffled-block control" in long_eval.table(res, [], [])


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="nll_buckets"):
        long_eval.EvalSettings(nll_buckets=[4096, 0]).check()
    with pytest.raises(ValueError, match="passkey_depths"):
        long_eval.EvalSettings(passkey_depths=[1.5]).check()


def test_cli_on_a_saved_micro_model(model, tmp_path, capsys):
    ckpt = tmp_path / "run"
    ckpt.mkdir()
    torch.save(model.state_dict(), ckpt / "model.pt")
    (ckpt / "model_config.json").write_text(json.dumps(model.cfg.to_dict()))
    template = PasskeyTemplate(load_tokenizer("gpt2-embedded"))
    n = template.min_length + 8
    rc = long_eval.main([str(ckpt / "model.pt"), "--lengths", f"{n},{2 * n}", "--depths", "0,1",
                         "--data", "none", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["model"] == "micro" and set(report["metrics"]) >= {
        f"eval/passkey/{n}", f"eval/passkey/{2 * n}", f"eval/passkey/{n}/d0"}
    assert "| length | depth 0 | depth 1 | mean |" in capsys.readouterr().out
    assert long_eval.main([str(tmp_path / "missing"), "--data", "none"]) == 2


def test_trainer_logs_the_long_context_metrics_at_validation(th, small_job, tmp_path):
    result = th.run_job(tmp_path / "run", small_job + [
        "train.seq_len=128", "train.tokens=512", "eval.passkey_lengths=[128,100000]",
        "eval.passkey_depths=[0.5]", "eval.nll_buckets=[0,32,128]", "data.packing=documents",
        "optim.warmup_steps=1", "data.passkey_rate=0.1"])
    records = th.read_metrics(result.metrics_path)
    start = next(r for r in records if r.get("event") == "start")
    rows = start["data"]["rows"]         # whole documents per row, passkey documents mixed in
    assert rows["packing"].startswith("documents+passkey") and rows["synthetic_documents"] > 0
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2]
    for r in evals:
        assert r["eval/passkey/128"] in (0.0, 1.0) and "eval/passkey/100000" not in r
        assert np.isfinite(r["val/nll_bucket/0-32"]) and np.isfinite(r["val/nll_bucket/32-128"])
    with pytest.raises(ValueError, match="nll_buckets"):
        th.run_job(tmp_path / "bad", small_job + ["eval.nll_buckets=[5,1]"])


def _fp64_micro(mode="sparse", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("micro", attention_impl="torch", mhc_impl="torch", attention_mode=mode, **kw)
    return Transformer(cfg).double().eval()


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_chunked_scoring_equals_the_whole_forward(mode, gpt2):
    """--seq-chunk / train.seq_chunk: the per-token NLL and the passkey decisions from the chunked
    no-grad forward equal the whole forward's (fp64, chunks not dividing L, documents across
    chunk boundaries)."""
    model = _fp64_micro(mode)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 50257, (2, 150), generator=g)
    labels = torch.randint(0, 50257, (2, 150), generator=g)
    labels[1, 60:70] = IGNORE_INDEX
    doc_ids = torch.zeros(2, 150, dtype=torch.long)
    doc_ids[0, 47:] = 1
    doc_ids[1, 100:] = 1
    whole = long_eval.token_nll(model, ids, doc_ids, labels)
    got = long_eval.token_nll(model, ids, doc_ids, labels, seq_chunk=41)
    assert float((got - whole).abs().max()) <= 1e-10 * float(whole.abs().max())
    assert (got[1, 60:70] == 0).all()
    template = PasskeyTemplate(gpt2)
    length = template.min_length + 70
    for depth, key in ((0.0, 11111), (0.5, 24680), (1.0, 97531)):
        # the answer rows straddle a chunk boundary for some depth/length choices: 37 does not divide
        assert (long_eval.passkey_correct(model, template, length, depth, key, seq_chunk=37)
                == long_eval.passkey_correct(model, template, length, depth, key))


class _Largest(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest tensor any op produces while active (numel and shape)."""

    def __init__(self):
        super().__init__()
        self.numel, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.shape = t.numel(), tuple(t.shape)
        return out


@pytest.mark.slow   # ~35 s on 2 busy cores: every op goes through a Python dispatch mode
def test_no_grad_passes_form_no_vocab_or_quadratic_tensors(monkeypatch):
    """Validation / evaluation / the pre-pass at long L: no [L, V] tensor in the whole no-grad
    forward (labels: the fused loss; hidden states: no head), and under seq_chunk nothing that
    grows faster than L (the CPU reference attention is [B, H, L, L + N] unchunked: quadratic)."""
    import model.loss
    from train.seq_chunk import no_grad_forward

    # logits chunks of 41 rows (not ~1300): L need not be thousands of rows to tell [L, V] apart
    monkeypatch.setattr(model.loss, "CHUNK_ELEMENTS", 1 << 21)
    torch.manual_seed(0)
    net = Transformer(ModelConfig.from_preset("micro", attention_impl="torch", mhc_impl="torch")).eval()
    V, L = net.cfg.vocab_size, 512
    g = torch.Generator().manual_seed(5)
    batch = {"input_ids": torch.randint(0, 50257, (1, L), generator=g), "doc_ids": None,
             "labels": torch.randint(0, 50257, (1, L), generator=g)}
    for run in (lambda: no_grad_forward(net, net, batch, 0),
                lambda: long_eval.token_nll(net, batch["input_ids"], None, batch["labels"])):
        with _Largest() as big:
            run()
        assert big.numel < L * V / 4, big.shape
    # seq_chunk: the largest tensor grows linearly in L (a small vocabulary, so that attention's
    # tensors are the largest), unchunked quadratically
    small = Transformer(ModelConfig.from_preset("micro", attention_impl="torch", mhc_impl="torch",
                                                vocab_size=97)).eval()
    largest = {}
    for n, chunk in ((256, 32), (512, 32), (512, 0)):
        b = {"input_ids": torch.randint(0, 97, (1, n), generator=g), "doc_ids": None,
             "labels": torch.randint(0, 97, (1, n), generator=g)}
        with _Largest() as big:
            losses = no_grad_forward(small, small, b, chunk).losses
        largest[n, chunk] = big.numel
        assert torch.isfinite(losses["lm"])
    assert largest[512, 32] < 2.2 * largest[256, 32] and largest[512, 32] < largest[512, 0] / 5
