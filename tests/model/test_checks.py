"""kernels/checks.py: value checks raise ValueError on CPU (on CUDA they are device-side asserts)."""
import pytest
import torch

from kernels.checks import require


def test_require_raises_the_message_on_cpu_and_passes_true():
    require(torch.tensor(True), "never")
    require((torch.arange(4) < 4).all(), "never")
    with pytest.raises(ValueError, match="index >= N = 3"):
        require(torch.tensor([1, 3]).max() < 3, "topk_idx holds an index >= N = 3")


def test_check_selected_runs_the_range_check_once_per_selection_version_and_n(monkeypatch):
    """The indexer loss's two ops check one selection against the same N: the second check is
    skipped, unless the tensor, its contents (version counter) or N changed; a bad index after an
    in-place change still raises."""
    import kernels.checks as kc

    calls = []
    real = kc.require
    monkeypatch.setattr(kc, "require", lambda ok, msg: calls.append(msg) or real(ok, msg))
    q, table = torch.zeros(1, 4, 2, 8), torch.zeros(1, 5, 8)
    idx = torch.tensor([[[0, 4], [1, -1], [2, 3], [4, 4]]])
    other = idx.clone()
    kc.check_selected("a", q, table, idx)
    kc.check_selected("b", q, table, idx)
    assert len(calls) == 1
    kc.check_selected("c", q, torch.zeros(1, 6, 8), idx)          # another N
    kc.check_selected("d", q, table, other)                        # another tensor
    kc.check_selected("e", q, table, other)
    assert len(calls) == 3
    other[0, 0, 0] = 5                                            # in place: version bumped, now bad
    with pytest.raises(ValueError, match="index >= N = 5"):
        kc.check_selected("f", q, table, other)
