"""kernels/tuning.py off CUDA (the interpreter): the first candidate runs unless a config dict
overrides its meta-parameters; the grid follows the meta-parameters."""
import torch
import triton
import triton.language as tl

from kernels.tuning import Tuned


@triton.jit
def _write_block(OUT, N, BLOCK: tl.constexpr, OTHER: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(OUT + r, tl.zeros([BLOCK], dtype=tl.int32) + BLOCK * 10 + OTHER, mask=r < N)


def test_first_candidate_off_cuda_and_dict_overrides():
    k = Tuned(_write_block, [({"BLOCK": 4, "OTHER": 1}, 4, 1), ({"BLOCK": 8, "OTHER": 2}, 4, 1)], key=["N"])
    out = torch.zeros(10, dtype=torch.int32)
    grid = lambda m: (triton.cdiv(10, m["BLOCK"]),)
    for config, want in ((None, 41), ("default", 41), ({"BLOCK": 16}, 161), ({"OTHER": 3, "UNUSED": 7}, 43)):
        out.zero_()
        k.launch(grid, (out, 10), {}, config, on_cuda=False)
        assert out.tolist() == [want] * 10, (config, out.tolist())
    assert k.picks() == {}   # nothing timed off CUDA
