"""bench/cuda_graphs.py: the one-call CUDA-graph benchmark runs its pipeline on CPU (--tiny: the
graph kinds report "needs CUDA") where the GPU image's missing packages cannot be imported, its
host-sync census finds what syncs, and the micro model's training step has no host-syncing op."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("deepspeed", "hydra", "omegaconf", "wandb", "datasets", "yaml")


def _run_tiny(tmp_path, *args):
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in BLOCKED)
    argv = ["bench/cuda_graphs.py", "--tiny", "--out", str(tmp_path), "--budget", "600", *args]
    code = f"import sys, runpy; {block}; sys.argv = {argv!r}; runpy.run_path('bench/cuda_graphs.py', run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return (tmp_path / "cuda_graphs.md").read_text()


def _row(table, kind, mb):
    return next(line for line in table.splitlines() if line.startswith(f"| ({kind}) ") and f"| {mb} x 64 |" in line)


def test_tiny_pipeline_eager_and_the_cuda_only_kinds(tmp_path):
    table = _run_tiny(tmp_path, "--variants", "eager", "graph", "cudagraphs", "--micro-batches", "1", "2",
                      "--rounds", "1", "--steps", "1")
    assert "device: CPU" in table and "date 20" in table and "commit " in table, table
    for mb in (1, 2):
        # timed once, its own check against eager bitwise (CPU is deterministic)
        assert re.search(r"\| 1 \| [\d.]+ \|", _row(table, "a", mb)), table
        assert _row(table, "a", mb).endswith("loss 0.0e+00, grads 0.0e+00: bitwise |"), table
        for kind in ("c", "d"):
            assert "| needs CUDA |" in _row(table, kind, mb), table
    # the micro model's training step (sparse CSA, indexer loss, MTP, hash + learned MoE) reads
    # nothing back to the host: a whole-step capture is not refused by the model code
    assert "none found" in table.split("## Host syncs")[1], table


@pytest.mark.slow
def test_tiny_pipeline_with_compiled_blocks(tmp_path):
    table = _run_tiny(tmp_path, "--variants", "eager", "compiled", "--micro-batches", "1", "2", "--rounds", "2",
                      "--steps", "1")
    for mb in (1, 2):
        row = _row(table, "b", mb)
        assert re.search(r"\| [12] \| [\d.]+ \|", row), table
        assert row.endswith((": pass |", ": bitwise |")), table


def test_host_syncs_finds_reads_and_where():
    from bench.cuda_graphs import HostSyncs
    from kernels.checks import require

    x = torch.arange(6.0)

    def step():
        n = int(x.sum())                      # a read of a value
        kept = x[x > 2]                       # boolean-mask indexing
        idx = torch.nonzero(x)                # value-dependent size
        require(x.min() >= 0, "negative")     # off CUDA reads on purpose; asserts on the device on CUDA
        return n, kept, idx, torch.cumsum(x, 0), x.topk(2)   # no read

    with HostSyncs(cuda=False) as found:
        step()
    whys = {why for (_, why, _), _ in found.found.items()}
    assert any(".item()" in w for w in whys) and any("boolean-mask" in w for w in whys) \
        and any("nonzero" in w for w in whys), found.found
    assert len(found.found) == 3, found.found      # not require, not cumsum / topk
    assert all("tests/bench/test_cuda_graphs.py" in where and "step" in where for (_, _, where) in found.found)
