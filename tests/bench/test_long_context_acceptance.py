"""bench/long_context_acceptance.sh --tiny: the one-call GPU acceptance script's pipeline on CPU
(micro preset, short lengths): every part reported, the CPU-runnable ones run and succeed, at
most 6 files under OUT_DIR and no deeper folders."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow   # ~3 min on 2 busy cores: five Python starts and micro steps
def test_tiny_acceptance_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT), BUDGET_S="900")
    res = subprocess.run(["bash", str(ROOT / "bench/long_context_acceptance.sh"), str(out), "--tiny"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 6 and all(len(p.relative_to(out).parts) <= 2 for p in files)
    text = (out / "results.md").read_text()
    for n in range(1, 8):
        assert f"## {n}." in text, n
    # parts 2-5 ran on CPU and succeeded, each with its table
    assert text.count("(exit 0,") == 4 and text.count("| L | path | attention |") == 4
    assert "chunked (128)" in text and "| dense |" in text
