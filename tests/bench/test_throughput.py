"""bench/throughput.py: the one-call GPU benchmark runs its whole pipeline on CPU (--tiny --check:
kernels in Triton's interpreter) in a process where DeepSpeed, Hydra, wandb, datasets and PyYAML
cannot be imported (the GPU image has none of them)."""
import os
import re
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


def test_interleave_alternates_order_and_discards_warmup():
    from bench.timing import Variant, interleave

    calls = []
    vs = [Variant(n, [("all", lambda n=n: calls.append(n))]) for n in "ABC"]
    vs.append(Variant("D", [("all", lambda: 1 / 0)]))
    interleave(vs, "cpu", rounds=3, steps=2, warmup=1)
    # round 1: each warms up once then 2 timed steps, in order; round 2 reversed; round 3 in order
    assert calls == list("AAABBBCCC") + list("CCBBAA") + list("AABBCC")
    assert [len(v.times["step"]) for v in vs[:3]] == [6, 6, 6]
    assert vs[3].error.startswith("ZeroDivisionError") and not vs[3].times


def test_interleave_skips_a_warmup_expected_to_end_past_the_budget():
    from bench.timing import Variant, interleave

    calls = []
    vs = [Variant("A", [("all", lambda: calls.append("A"))]),
          Variant("B", [("all", lambda: calls.append("B"))], warmup_s=3600.0)]
    interleave(vs, "cpu", rounds=2, steps=1, warmup=1, budget_s=60.0)
    assert calls == ["A", "A", "A"] and vs[0].error is None
    assert vs[1].error == "skipped: its warm-up (~3600s expected) would end past the time budget"


def test_train_summary_reads_the_steady_state(tmp_path):
    import json

    from bench.throughput import train_summary

    lines = [{"step": 0, "kind": "event", "event": "stage", "micro_batch": 2, "grad_accum": 8, "seq_len": 4096}]
    lines += [{"step": i, "kind": "train", "tokens_per_s": 1000.0 * (1 if i < 5 else 100 + i % 2), "mfu": 0.01 * i,
               "step_time_s": 2.0, "peak_mem_gb": 40.0 + i} for i in range(1, 12)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    r = train_summary(str(tmp_path / "m.jsonl"), skip=5)
    assert r["steps"] == 6 and r["tokens_per_s"] == 100500.0 and r["micro_batch"] == 2 and r["grad_accum"] == 8
    assert r["peak_gb"] == 51.0 and abs(r["mfu"] - 0.085) < 1e-12


@pytest.mark.slow
def test_tiny_pipeline_without_optional_packages(tmp_path):
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in BLOCKED)
    variants = ["mhc-eager-none-1x", "mhc-compiled-none-1x", "dense-eager-1x", "dense-compiled-1x"]
    code = (f"import sys, runpy; {block}; sys.argv = ['bench/throughput.py', '--tiny', '--check', '--out', {str(tmp_path)!r}, "
            f"'--variants', *{variants!r}]; runpy.run_path('bench/throughput.py', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = (tmp_path / "checks.md").read_text()
    assert checks.count("| yes |") == 8 and "NO" not in checks and "ERROR" not in checks, checks
    table = (tmp_path / "throughput.md").read_text()
    assert "device: CPU" in table and "commit " in table and "ERROR" not in table, table
    for key in variants:   # timed in at least one round (the budget may cut the second on a busy CPU)
        assert re.search(rf"\[{key}\] \| 1 x 64 \| [12] \| ", table), (key, table)
