"""Two "nodes" on one host: two torchrun agents meet through a c10d rendezvous on localhost and
run ``python -m train`` as one 2-rank job (ZeRO-2, V4's Muon, expert parallelism 2)."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from conftest import REPO, base_env, free_port, train_fixtures

pytestmark = pytest.mark.slow   # ~1 minute: two DeepSpeed processes training a few steps


def test_two_node_rendezvous_trains_with_zero2_muon_and_ep(tmp_path):
    fx = train_fixtures()
    corpus = fx.write_corpus(tmp_path / "corpus", chapters=30)
    runs = tmp_path / "runs"
    overrides = fx.SMALL_MODEL + [
        "data=files", f"data.paths=[{corpus}]", f"data.cache_dir={tmp_path / 'cache'}",
        "data.val_fraction=0.1", "data.val_batches=1", "train.seq_len=64",
        "train.global_batch_tokens=256", "train.micro_batch_tokens=128", "train.tokens=1024",
        "train.val_every=0", "train.ckpt_every=0", "train.progress=false", "train.device=cpu",
        f"train.runs_root={runs}", f"hydra.run.dir={runs / 'run'}", "optim.warmup_steps=1",
        "deepspeed=zero2", "parallel.ep_size=2", "logging.wandb.mode=disabled"]
    endpoint = f"127.0.0.1:{free_port()}"
    run_id = uuid.uuid4().hex[:8]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
         "-m", "train", *overrides],
        env=base_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(o[-4000:] for o in outputs)
    records = [json.loads(line) for line in (runs / "run" / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r.get("event") == "start")
    assert start["world_size"] == 2
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 4 and all(r["loss"] == r["loss"] for r in train)
    # both EP ranks' experts processed tokens; Muon ran on the ZeRO shards (update RMS near
    # V4's 0.18: below it where NS leaves tiny singular values short of 1)
    tokens = [r[k] for r in train for k in r if k.startswith("ep/tokens/")]
    assert tokens and all(len(t) == 2 and min(t) > 0 for t in tokens)
    assert 0.1 < train[-1]["update_rms/muon"] <= 0.19
    assert any(r.get("event") == "end" for r in records)
