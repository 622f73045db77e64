"""bench/mhc.py --ops site: one mHC site's launches counted (CPU: top-level ATen ops; the Triton
kernels run in the interpreter and are not counted), forward below forward+backward."""
import os

import pytest


def _rows(lines):
    return {r[0]: r for r in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines if ln.startswith("|"))}


def test_site_launches_counts_the_reference_and_runs_the_fused_site():
    from bench.mhc import site_launches

    lines = []
    modes = ("reference", "unfused", "fused", "split") if os.environ.get("TRITON_INTERPRET") == "1" else ("reference",)
    out = site_launches(T=16, n=4, D=32, device="cpu", log=lines.append, modes=modes)
    rows = _rows(lines)
    assert rows["reference"][1] == "16x4x32", lines
    n_fwd, n_fb = out["reference"][:2]
    assert 20 < n_fwd < n_fb, lines   # 20 Sinkhorn iterations alone are > 40 ops
    if "fused" in modes:
        assert set(out) == set(modes), lines   # no ERROR row
        # the fused pre is one autograd node: fewer host-side ops than the three unfused ones
        assert out["fused"][1] < out["unfused"][1], lines


@pytest.mark.slow
def test_model_overhead_times_residual_and_both_mhc_pres():
    """bench/mhc.py --ops model at micro size on CPU (~30 s): three rows, none an error."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the unfused pre runs the Triton kernels: needs the interpreter on CPU")
    from bench.mhc import model_overhead

    lines = []
    res = model_overhead(seq=32, preset="micro", device="cpu", log=lines.append, rounds=1, steps=1, warmup=1)
    assert list(res) == ["residual", "mhc, fused pre (before)", "mhc, split pre (after)"], lines
    assert all(v == v and v > 0 for v in res.values()), lines
    assert not any("ERROR" in ln for ln in lines), lines


def test_pre_kernels_checks_and_times_both_pres():
    """bench/mhc.py --ops pre, in the interpreter at a tiny size: both pres pass their checks, the
    profile table has rows for both paths and the copy ceiling, nothing is an ERROR."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the pres run the Triton kernels: needs the interpreter on CPU")
    from bench.mhc import pre_kernels

    lines = []
    res = pre_kernels(T=19, n=4, D=24, log=lines.append, check_shapes=((19, 4, 24), (7, 3, 20)), device="cpu")
    text = "\n".join(lines)
    assert set(res) == {"fused (before)", "split (after)"}, text
    assert text.count("checks pass") == 3 and "checks pass" in text and ": False" not in text, text
    assert "x.clone()" in text and "ERROR" not in text and "failed" not in text, text
    assert "replay == eager bitwise: True" in text, text   # off CUDA: train/cuda_graph.py's EagerGraph
    rows = _rows(lines)
    assert {"fused (before)", "split (after)"} <= set(rows), text


def test_head_kernels_checks_and_times_both_paths():
    """bench/mhc.py --ops head, in the interpreter at a tiny size: the Triton head passes its checks
    against the reference at both token counts, both paths are profiled, nothing is an ERROR."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the head runs the Triton kernels: needs the interpreter on CPU")
    from bench.mhc import head_kernels

    lines = []
    res = head_kernels(T=19, n=4, D=24, log=lines.append, device="cpu", check_T=7)
    text = "\n".join(lines)
    assert set(res) == {"reference (before)", "triton (after)"}, text
    rows = _rows(lines)
    assert rows["19"][-1] == "yes" and rows["7"][-1] == "yes", text
    assert "x.clone()" in text and "ERROR" not in text and "failed" not in text, text
