"""HybridOptimizer as DeepSpeed's client optimizer at ZeRO stage 0 (fp32 and bf16).

Slow (DeepSpeed JIT-builds its shm comm op on first use, ~1 min) and run in a subprocess so that
the process group it creates does not leak into other tests.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys, tempfile, torch, deepspeed
    from optim import build_optimizer, build_lr_scheduler

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 16)
            self.wkv = torch.nn.Linear(16, 16, bias=False)
            self.experts = torch.nn.ParameterDict({"w1": torch.nn.Parameter(torch.randn(2, 16, 16) / 4)})
            self.norm = torch.nn.RMSNorm(16)
            self.head = torch.nn.Linear(16, 50, bias=False)
        def forward(self, ids):
            h = self.wkv(self.embed(ids))
            h = h + torch.einsum("bld,eod->blo", h, self.experts["w1"])
            return torch.nn.functional.cross_entropy(self.head(self.norm(h)).flatten(0, 1), ids.flatten())

    torch.manual_seed(0)
    model = M()
    ocfg = {"name": "muon", "lr": 1e-2, "warmup_steps": 1, "decay_fraction": 0.5, "ns_dtype": "fp32"}
    opt = build_optimizer(model, ocfg)
    sched = build_lr_scheduler(opt, ocfg, total_steps=10)
    ds = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 0},
          "bf16": {"enabled": sys.argv[1] == "bf16"}, "gradient_clipping": 1.0}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    assert engine.basic_optimizer is opt
    ids = torch.randint(0, 50, (2, 8))
    losses = []
    for _ in range(5):
        loss = engine(ids); engine.backward(loss); engine.step(); losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert [g["lr"] for g in opt.param_groups] == [g["initial_lr"] for g in opt.param_groups]
    rms = opt.last_update_rms()
    assert set(rms) == {"muon", "adamw"} and 0.1 < rms["muon"] <= 0.19, rms
    d = tempfile.mkdtemp()
    engine.save_checkpoint(d, tag="t")
    loss = engine(ids); engine.backward(loss); engine.step()
    ref = {k: v.clone() for k, v in engine.module.state_dict().items()}
    engine.load_checkpoint(d, tag="t")
    loss = engine(ids); engine.backward(loss); engine.step()
    assert all(torch.equal(ref[k], v) for k, v in engine.module.state_dict().items())
    print("OK")
""")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deepspeed_stage0_client_optimizer(precision, tmp_path):
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29500 + os.getpid() % 1000), PYTHONPATH=str(ROOT))
    script = tmp_path / "ds_stage0.py"
    script.write_text(SCRIPT)
    result = subprocess.run([sys.executable, str(script), precision], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
