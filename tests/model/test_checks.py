"""kernels/checks.py: value checks raise ValueError on CPU (on CUDA they are device-side asserts)."""
import pytest
import torch

from kernels.checks import require


def test_require_raises_the_message_on_cpu_and_passes_true():
    require(torch.tensor(True), "never")
    require((torch.arange(4) < 4).all(), "never")
    with pytest.raises(ValueError, match="index >= N = 3"):
        require(torch.tensor([1, 3]).max() < 3, "topk_idx holds an index >= N = 3")
