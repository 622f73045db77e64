"""bench/indexer_loss.py --tiny on the CPU (kernels in Triton's interpreter): the one GPU call's
checks and tables run end to end (so it does not die on a pipeline error): unsorted selects
chunked's sets, every loss-kernel candidate is within tolerance of the reference."""
import pytest

from bench import indexer_loss as bil


@pytest.mark.slow   # ~40 s on a busy 2-core CPU: every candidate of three kernels interpreted
def test_tiny_run_checks_and_writes_its_tables(tmp_path):
    assert bil.main(["--tiny", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "indexer_loss.md").read_text()
    assert text.count("rows with a different set: 0 (must be 0)") == 2
    assert "all candidates within tolerance: True" in text
    for row in ("| torch.topk sorted=False (unsorted) |", "| indexer_topk select=unsorted (scores + select) |",
                "| selected scores forward + backward |", "| attention mass on selected |"):
        assert row in text, row
    assert text.count("| scores_bwd |") >= 3 and text.count("| scores_dk |") >= 3
    assert "| selected scores forward + backward, dk atomic -> dense (autotuned) |" in text
    assert text.count("| mass_dense |") >= 3 and "| attention mass on selected, per-query gather -> dense tiles" in text
