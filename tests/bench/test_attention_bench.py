"""bench/attention.py --tune off CUDA (kernels in Triton's interpreter): the one GPU call's
autotune check runs end to end on a packed micro-batch (every candidate of every kernel pinned and
compared with the named tiles, then autotune's path), so it does not die on a pipeline error."""
import pytest
import torch

from bench import attention as ba


@pytest.mark.slow   # ~25 s on a busy 2-core CPU: every candidate of three layer kinds interpreted
def test_tune_mode_checks_every_candidate():
    lines = []
    assert ba.run_tune(batch=2, L=37, heads=(4, 16, 5), doc_cuts=(13,), log=lines.append, tol=1e-5,
                       dtype=torch.float32)
    text = "\n".join(lines)
    for kind in ba.TUNE_KINDS:
        assert f"| {kind} | candidate 1: " in text and f"| {kind} | autotune: " in text, kind
    assert "| NO |" not in text and text.endswith("all checks passed: True")


def test_small_preset_heads_read_from_the_model_config():
    assert ba.small_preset_heads() == (16, 256, 256)
