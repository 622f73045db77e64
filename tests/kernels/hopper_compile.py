"""Compiling kernels as an H200 would, on a CPU machine: the slow tests' shared runner."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_fresh(script: str, timeout: int) -> None:
    """Run ``script`` (Python that compiles for sm_90: TTIR -> PTX -> cubin) in a fresh process
    outside Triton's interpreter, which the test process runs under. Fails on a non-zero exit,
    skips when the script prints SKIP (no NVIDIA backend), requires it to end by printing OK."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    assert proc.stdout.strip().endswith("OK")
