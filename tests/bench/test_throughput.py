"""bench/throughput.py: the one-call GPU benchmark runs its whole pipeline on CPU (--tiny --check:
kernels in Triton's interpreter) in a process where DeepSpeed, Hydra, wandb, datasets and PyYAML
cannot be imported (the GPU image has none of them)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("deepspeed", "hydra", "omegaconf", "wandb", "datasets", "yaml")


def test_fast_path_switch_restores_the_getters():
    import model.moe as mm
    from bench.throughput import ALL, fast_paths

    before = {g: getattr(mm, g) for g in ("get_topk_routing", "get_swiglu_activation", "get_permute_tokens",
                                          "get_unpermute_tokens")}
    with fast_paths(frozenset()):
        assert mm.get_swiglu_activation("triton", "cuda") is mm.swiglu_activation
    with fast_paths(ALL):
        from kernels.swiglu import swiglu_activation_triton

        assert mm.get_swiglu_activation("torch", "cpu") is swiglu_activation_triton
        assert mm.get_unpermute_tokens() is not mm.unpermute_tokens
        import model.rope as mr
        from kernels.rope import rope_rotate_triton

        assert mr.get_rope_rotate("torch") is rope_rotate_triton
    assert {g: getattr(mm, g) for g in before} == before


@pytest.mark.slow
def test_tiny_pipeline_without_optional_packages(tmp_path):
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in BLOCKED)
    code = (f"import sys, runpy; {block}; sys.argv = ['bench/throughput.py', '--tiny', '--check', '--out', {str(tmp_path)!r}]; "
            "runpy.run_path('bench/throughput.py', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = (tmp_path / "checks.md").read_text()
    assert checks.count("| yes |") == 6 and "NO" not in checks and "ERROR" not in checks, checks
    table = (tmp_path / "throughput.md").read_text()
    assert "device: CPU" in table and "ERROR" not in table, table
    for row in ("| hybridlm, new kernels off", "| hybridlm, all new kernels", "| dense GPT peer, eager",
                "| dense GPT peer, compiled"):
        assert row in table, (row, table)
    assert "profile of one step" in (tmp_path / "profiles.md").read_text()
