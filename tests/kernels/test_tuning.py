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


def test_tuning_on_cuda_keeps_every_candidates_time():
    """The CUDA branch's bookkeeping, with Triton's autotuner stood in for: a key tuned by a launch
    gets its candidates' times in picks(); a later launch of the same key adds nothing."""
    class FakeAutotuner:
        def __init__(self):
            self.cache, self.launches = {}, 0
            self.next_timings = {"BLOCK: 4": [0.0021, 0.002, 0.0022], "BLOCK: 8": 0.0012}

        def __getitem__(self, grid):
            def run(*args, **kw):
                self.launches += 1
                if (args[1],) not in self.cache:
                    self.cache[(args[1],)] = "BLOCK: 8"
                    self.configs_timings = self.next_timings
            return run

    k = Tuned(_write_block, [({"BLOCK": 4, "OTHER": 1}, 4, 1)], key=["N"])
    k.tuned = FakeAutotuner()
    for _ in range(2):
        k.launch(lambda m: (1,), (None, 10), {}, None, on_cuda=True)
    assert k.tuned.launches == 2
    assert k.picks() == {"(10,)": "BLOCK: 8 [BLOCK: 4: 2.1 us, BLOCK: 8: 1.2 us]"}
    k.tuned.next_timings = {"BLOCK: 4": "?"}
    k.tuned.cache.clear()
    k.launch(lambda m: (1,), (None, 10), {}, None, on_cuda=True)
    assert "timings unreadable" in k.picks()["(10,)"]


def test_accumulated_outputs_are_zeroed_around_autotuning():
    """Outputs a kernel adds into (the indexer loss's dk atomics, or its dense G's rows) go to Triton's reset_to_zero:
    zeroed before every timed candidate and before the real launch, so tuning cannot add into them."""
    from kernels import indexer_loss as il

    assert Tuned(_write_block, [({"BLOCK": 4, "OTHER": 1}, 4, 1)], key=["N"], reset_to_zero=["OUT"]).tuned.reset_to_zero \
        == ["OUT"]
    assert il._tuned("scores_bwd", 16, 128).tuned.reset_to_zero == ["DK", "GF"]
    assert il._tuned("scores_dk", 16, 128).tuned.reset_to_zero == []   # plain stores of its partials
    assert il._tuned("scores_fwd", 16, 128).tuned.reset_to_zero == []
