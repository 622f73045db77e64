"""bench/cross_entropy.py's check and timing pipeline on CPU (the kernel in Triton's interpreter)
at a tiny head, so the one GPU call does not fail on a bug the CPU can show."""
import torch

from bench import cross_entropy as bce


def test_checks_pass_and_tables_have_every_variant():
    device = torch.device("cpu")
    h, w, y = bce.head_inputs(20, 8, 300, torch.float32, device)
    results = bce.checks(h, w, y, 7, device)
    assert len(results) == 3 and all(ok for _, ok, _ in results), results
    rows = bce.chunk_table(h, w, y, 7, device, 1, bce.TINY_TILES)
    assert sum(r.startswith("| reference") for r in rows) == 2 and sum("| kernel |" in r for r in rows) == 4, rows
    assert sum(r.startswith("- with") for r in rows) == 2, rows   # the fastest tile, with and without the gradient
    rows = bce.head_table(h, w, y, 7, device, 1, [5, 7])
    assert [r.split(" | ")[1] for r in rows[2:]] == ["7 (default)", "5"], rows   # CPU: the reference only


def test_checks_fail_on_a_wrong_kernel(monkeypatch):
    """The checks can fail: a kernel whose gradient is 1% off is caught."""
    real = bce.chunk_cross_entropy_triton

    def wrong(logits, labels, inv, grad_dtype=None, **kw):
        nll, g = real(logits, labels, inv, grad_dtype, **kw)
        return nll, (None if g is None else g * 1.01)

    monkeypatch.setattr(bce, "chunk_cross_entropy_triton", wrong)
    device = torch.device("cpu")
    h, w, y = bce.head_inputs(20, 8, 300, torch.float32, device)
    assert [ok for _, ok, _ in bce.checks(h, w, y, 7, device)] == [False, True, False]
