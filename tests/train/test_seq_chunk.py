"""train.seq_chunk: the setting, the chunk choice, and one DeepSpeed optimizer step (Muon, two
accumulated micro-batches) chunked vs unchunked at ZeRO-0 and ZeRO-2 on CPU."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from model.config import ModelConfig
from train.memory import Setup
from train.seq_chunk import (AUTO, AUTO_HEADROOM, AUTO_MAX_CHUNK, SeqChunkError, choose_chunk, chunked_estimate,
                             parse_seq_chunk, stage_chunks, state_bytes, whole_sequence_terms)

ROOT = Path(__file__).resolve().parents[2]


def micro():
    return ModelConfig.from_preset("micro")


def test_parse_setting():
    cfg = micro()
    assert parse_seq_chunk(0, cfg) == 0 and parse_seq_chunk("0", cfg) == 0
    assert parse_seq_chunk(4096, cfg) == 4096 and parse_seq_chunk("AUTO", cfg) == AUTO
    for bad in ("big", -1, 2.5, None):
        with pytest.raises(SeqChunkError, match="train.seq_chunk must be"):
            parse_seq_chunk(bad, cfg)
    with pytest.raises(SeqChunkError, match="not longer than the 15 rows"):
        parse_seq_chunk(15, cfg)


def test_choose_chunk():
    cfg = micro()
    assert choose_chunk(0, 8192, 1, model_cfg=cfg) == 0
    assert choose_chunk(4096, 4096, 1, model_cfg=cfg) == 0       # fits in one chunk: unchunked
    assert choose_chunk(4096, 8192, 1, model_cfg=cfg) == 4096
    assert choose_chunk(AUTO, 1 << 20, 1, model_cfg=cfg) == 0    # no memory limit known
    assert choose_chunk(AUTO, 1 << 20, 1, model_cfg=cfg, fits=lambda c: c <= 40000) == 32768
    assert choose_chunk(AUTO, 5000, 1, model_cfg=cfg, fits=lambda c: c <= 5000) == 0
    # longer than AUTO_MAX_CHUNK rows: chunked even where the whole sequence would fit
    assert choose_chunk(AUTO, 1 << 20, 1, model_cfg=cfg, fits=lambda c: True) == AUTO_MAX_CHUNK
    assert choose_chunk(AUTO, AUTO_MAX_CHUNK, 1, model_cfg=cfg, fits=lambda c: True) == 0
    with pytest.raises(SeqChunkError, match="do not fit the device memory"):
        choose_chunk(AUTO, 1 << 20, 1, model_cfg=cfg, fits=lambda c: False)


def test_auto_from_the_memory_estimate():
    """auto picks the longest chunk whose estimate (activations of one chunk + the whole
    sequence's state) fits; the chunked estimate grows with the chunk, not with L."""
    cfg = ModelConfig.from_preset("small", max_seq_len=1 << 20)
    setup = Setup(tokens=0, seq_len=0, precision="bf16", reference_attention=False,
                  activation_checkpointing=True)
    whole = chunked_estimate(cfg, setup, 1 << 20, 1, 0).total
    c16 = chunked_estimate(cfg, setup, 1 << 20, 1, 16384).total
    c16_short = chunked_estimate(cfg, setup, 1 << 16, 1, 16384).total
    assert c16 < whole / 4 and c16 - c16_short < 0.1 * c16   # only the ~1 kB/token state grows
    free = 1.2 * c16 / AUTO_HEADROOM

    class Stage:
        seq_len, micro_batch = 1 << 20, 1

    (chunk,) = stage_chunks(AUTO, [Stage], cfg, setup=setup, free_bytes=free)
    assert 16384 <= chunk <= AUTO_MAX_CHUNK and chunk % 1024 == 0
    assert chunked_estimate(cfg, setup, 1 << 20, 1, chunk).total <= AUTO_HEADROOM * free
    # an H200's ~139 GiB: the 1M stage runs in chunks of at most 64K rows (256K OOMed)
    (chunk,) = stage_chunks(AUTO, [Stage], cfg, setup=setup, free_bytes=139 * 2**30)
    assert chunk == AUTO_MAX_CHUNK


def test_whole_sequence_terms_for_small():
    """The terms behind the 1M stage's estimate (small, bf16, chunks of 16K, as measured on an
    H200): ~2.3 KB/token kept (the compressed entries and their gradients most of it), not the
    ~30 KB/token the halo views of each chunk's input used to keep (13 layers x 1024 x 2 B)."""
    cfg = ModelConfig.from_preset("small")
    t = whole_sequence_terms(cfg, "bf16", 16384, checkpointing=True)
    assert t["routing"] == 13 * 6 * 1                      # uint8 for 64 experts, main + MTP layers
    assert t["entries"] == 2 * (5 * 2 * (256 + 128) / 4 + 4 * 2 * 256 / 128)   # 5 CSA + 4 HCA layers
    assert t["halos"] == 13 * 127 * 1024 * 2 / 16384
    assert t["entry_lists"] == 3 * 2 * (256 + 128) / 4     # one CSA layer's list + 2 gradients
    kept = state_bytes(cfg, 1 << 20, "bf16", chunk=16384) / (1 << 20)
    assert 2000 < kept < 2500


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_state_estimate_matches_the_live_bytes(mode):
    """state_bytes (the whole-sequence state, term by term from the config) is within 1.5x of
    the tensor bytes really alive when the backward sweep starts (micro, fp32, CPU: a gc walk of
    live tensors, deterministic), at two lengths, and so is its growth per token."""
    import torch

    from bench.chunk_memory import packed_batch, state_at_sweep
    from model.transformer import Transformer

    cfg = ModelConfig.from_preset("micro", attention_impl="torch", mhc_impl="torch", attention_mode=mode)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    chunk, got, est = 128, {}, {}
    for L in (1024, 2048):
        ids, lab, doc = packed_batch(cfg.vocab_size, L, doc_len=96)
        got[L] = state_at_sweep(model, ids, lab, doc, chunk)
        est[L] = state_bytes(cfg, L, "fp32", chunk=chunk)
        assert est[L] / 1.5 <= got[L] <= 1.5 * est[L], (L, got[L], est[L])
    grow, est_grow = got[2048] - got[1024], est[2048] - est[1024]
    assert est_grow / 1.5 <= grow <= 1.5 * est_grow, (grow / 1024, est_grow / 1024)


SCRIPT = textwrap.dedent("""
    import sys, torch
    from model.config import ModelConfig
    from model.transformer import Transformer
    from optim.deepspeed import build_sharded_optimizer
    from train.engine import setup_distributed, deepspeed_config, initialize_engine
    from train.seq_chunk import chunked_micro_step
    from omegaconf import OmegaConf

    stage, chunk = int(sys.argv[1]), int(sys.argv[2])
    setup_distributed(torch.device("cpu"))
    cfg = ModelConfig.from_preset("micro", attention_impl="torch", mhc_impl="torch")
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = build_sharded_optimizer(model, {"name": "muon", "lr": 1e-2, "ns_dtype": "fp32"})
    ds = OmegaConf.create({"zero_stage": stage, "overlap_comm": False, "contiguous_gradients": True,
                          "reduce_bucket_size": 1 << 20, "allgather_bucket_size": 1 << 20,
                          "offload_optimizer": "none", "offload_param": "none"})
    engine = initialize_engine(model, opt, deepspeed_config(ds, micro_batch=2, grad_accum=2, world_size=1,
                                                            grad_clip=1.0, precision="fp32"))
    g = torch.Generator().manual_seed(1)
    batches = []
    for m in range(2):
        ids = torch.randint(0, cfg.vocab_size, (2, 97), generator=g)
        doc = torch.zeros(2, 96, dtype=torch.long); doc[0, 40:] = 1; doc[1, 70:] = 1
        batches.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:], "doc_ids": doc})
    losses = []
    for m, b in enumerate(batches):
        engine.set_gradient_accumulation_boundary(m == 1)
        if chunk:
            out = chunked_micro_step(engine, model, b, chunk, boundary=m == 1)
        else:
            out = engine(**b); engine.backward(out.loss)
        losses.append(float(out.loss))
    # the accumulated gradients as the optimizer gets them (ZeRO-2: gathered from the partitions)
    from deepspeed.utils import safe_get_full_grad
    grads = {n: safe_get_full_grad(p).detach().clone() for n, p in model.named_parameters()
             if safe_get_full_grad(p) is not None}
    engine.step()
    torch.save({"losses": losses, "grads": grads}, sys.argv[3])
    print("OK")
""")


def _run(tmp_path, stage, chunk):
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29500 + (os.getpid() + 7 * stage + chunk) % 1000), PYTHONPATH=str(ROOT),
               DS_ACCELERATOR="cpu")
    script, out = tmp_path / "step.py", tmp_path / f"out_{stage}_{chunk}.pt"
    script.write_text(SCRIPT)
    res = subprocess.run([sys.executable, str(script), str(stage), str(chunk), str(out)], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    import torch
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_step_chunked_equals_unchunked(stage, tmp_path):
    import torch

    ref = _run(tmp_path, stage, 0)
    got = _run(tmp_path, stage, 33)     # 96 rows: chunks of 33, 33, 30
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert set(got["grads"]) == set(ref["grads"]) and len(ref["grads"]) > 50
    # fp32 on both sides: equal up to fp32 rounding (the fp64 equality is tests/model/
    # test_chunked_step.py); per parameter looser: a few-element gradient that is a cancelling sum
    # (hc_head.scale) keeps only ~3 digits in fp32, while a mis-scaled state gradient is O(1)
    flat = lambda d: torch.cat([d[n].flatten() for n in sorted(ref["grads"])])
    total = float((flat(got["grads"]) - flat(ref["grads"])).norm() / flat(ref["grads"]).norm())
    assert total < 1e-5, f"relative gradient error {total:.1e}"
    for n, g in ref["grads"].items():
        err = float((got["grads"][n] - g).norm() / g.norm().clamp_min(1e-20))
        assert err < 1e-2, f"{n}: relative gradient error {err:.1e}"


def test_chunk_by_length():
    from train.seq_chunk import chunk_by_length

    class S:
        def __init__(self, n):
            self.seq_len = n

    f = chunk_by_length([S(4096), S(65536), S(1 << 20), S(1 << 20)], [0, 0, 65536, 32768])
    assert (f(4096), f(65536), f(1 << 20), f(123)) == (0, 0, 32768, 0)
    assert chunk_by_length([S(4096)], None)(4096) == 0


def test_validation_and_prepass_run_chunked_as_the_stage_trains():
    """train.seq_chunk: the validation forward and the anticipatory pre-pass (setup.engine_forward)
    run the chunked no-grad forward: the LM loss and the routing equal the whole forward's."""
    import torch

    from model.transformer import Transformer
    from train.anticipatory import compute_routing
    from train.seq_chunk import no_grad_forward
    from train.setup import engine_forward

    cfg = ModelConfig.from_preset("micro", attention_impl="torch", mhc_impl="torch")
    torch.manual_seed(0)
    model = Transformer(cfg).double().train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (2, 97), generator=g)
    doc = torch.zeros(2, 96, dtype=torch.long)
    doc[0, 40:] = 1
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "doc_ids": doc}
    model.eval()
    whole = no_grad_forward(model, model, batch, 0).losses["lm"]
    got = no_grad_forward(model, model, batch, 30)
    assert got.n_chunks == 4 and torch.allclose(got.losses["lm"], whole, rtol=1e-10, atol=0)
    model.train()

    class Engine:   # what engine_forward needs of a DeepSpeed engine
        module = model

        def __call__(self, **kw):
            self.calls = getattr(self, "calls", 0) + 1
            return model(**kw)

    engine = Engine()
    ref = compute_routing(model, batch)
    got = compute_routing(engine_forward(engine, torch.device("cpu"), chunk_for=lambda n: 30 if n == 96 else 0), batch)
    assert engine.calls == 4 and len(got) == len(ref) == cfg.n_layers + cfg.mtp_depth
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.slow   # four python -m train runs, ~1 min each on 2 busy cores
@pytest.mark.parametrize("zero", [1, 2])
def test_python_m_train_chunked_equals_unchunked_under_zero(zero, th, small_job, tmp_path):
    """python -m train with train.seq_chunk under ZeRO-1 / ZeRO-2 (Muon, two accumulated
    micro-batches per step, 2 steps, validation chunked too): the same train and validation
    losses and the same parameters after the last step as the unchunked run (fp32)."""
    import torch

    from train.export import load_checkpoint

    common = small_job + ["train.seq_len=128", "train.tokens=512", f"deepspeed=zero{zero}",
                          "train.device=cpu", "train.ckpt_every=2", "train.val_every=2",
                          "optim.warmup_steps=1"]
    got = {}
    for chunk in (0, 48):   # 128 rows: chunks of 48, 48, 32
        run_dir = tmp_path / f"chunk{chunk}"
        res = th.run_cli(common + [f"train.seq_chunk={chunk}", f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                         timeout=1200)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        records = th.read_metrics(run_dir / "metrics.jsonl")
        sd, _ = load_checkpoint(run_dir)
        got[chunk] = ([r["loss"] for r in records if r["kind"] == "train"],
                      [r["val_loss"] for r in records if r["kind"] == "val"], sd)
    (loss0, val0, sd0), (loss1, val1, sd1) = got[0], got[48]
    assert len(loss0) == 2 and len(val0) >= 2
    assert loss1 == pytest.approx(loss0, rel=1e-5) and val1 == pytest.approx(val0, rel=1e-5)
    assert set(sd0) == set(sd1)
    flat = lambda sd: torch.cat([sd[k].detach().double().flatten() for k in sorted(sd0)])
    err = float((flat(sd1) - flat(sd0)).norm() / flat(sd0).norm())
    # fp32 rounding through two optimizer steps (measured 2.4e-6 at ZeRO-1): a wrongly scaled
    # gradient changes an update by O(lr), i.e. ~1e-2 of the parameters here
    assert err < 1e-4, f"parameters after 2 steps differ: relative {err:.1e}"
