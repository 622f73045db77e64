"""bench/compressor.py (the issue-16 GPU check and timing of the compressor's fast path) runs its
whole pipeline on CPU at toy sizes, the pooling kernel in Triton's interpreter: its checks pass
and every timing row is filled (so the one GPU call cannot fail on a typo)."""
from bench import compressor as bc


def test_tiny_pipeline(tmp_path):
    lines = []
    assert bc.check(lines.append, "cpu", tiny=True)
    assert sum("| yes |" in s for s in lines) == 3 * len(bc.KINDS), "\n".join(lines)
    rows = []
    bc.bench(rows.append, "cpu", tiny=True, batches=(2,), L=24)
    body = [r for r in rows[2:] if r.startswith("|")]
    assert len(body) == len(bc.KINDS) * len(bc.VARIANTS) and not any("ERROR" in r for r in rows), "\n".join(rows)
