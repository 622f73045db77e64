"""bench/gpu_check.py's indexer_loss section on the CPU (kernels in Triton's interpreter, tiny
sizes, fp32): the check passes and writes its table, the interleaved timing writes a row per op
(so that the one GPU call does not die on a pipeline error)."""
import torch

from bench import gpu_check as gc

TINY = ("tiny: 2x16, Hi 3x16, top-5", 2, 12, (2, 16), (3, 16), 5)


def test_check_and_bench_run_on_cpu(tmp_path):
    rep = gc.Report(str(tmp_path))
    name, B, _, hd, ihd, K = TINY
    assert gc.check_indexer_loss(rep, checks=[(name, B, 40, hd, ihd, K, (17,))], device="cpu", dtypes=(torch.float32,))
    rows = [r for r in rep.files["checks.md"] if r.startswith(f"| {name}")]
    assert len(rows) == 1 and rows[0].endswith("| yes |"), rows
    gc.bench_indexer_loss(rep, sizes=TINY, device="cpu", rounds=1, steps=1, dtype=torch.float32)
    table = rep.files["indexer_loss.md"]
    for op in ("KL target", "selected scores, forward |", "selected scores, forward + backward", "whole indexer loss"):
        row = [r for r in table if r.startswith(f"| {op}")]
        assert len(row) == 1 and "x |" in row[0], (op, table)
    assert (tmp_path / "indexer_loss.md").exists()
