"""Curriculum layout on the step axis and the shape errors it must name."""
from __future__ import annotations

import pytest

from train.curriculum import PHASE_TRAIN, PHASE_WARMUP, CurriculumError, build_curriculum

RATIOS = [0, 4, 16]


def stage(name, seq_len, tokens, gbt, mode="dense", warmup=0, micro=None):
    return {"name": name, "seq_len": seq_len, "tokens": tokens, "global_batch_tokens": gbt,
            "attention_mode": mode, "indexer_warmup_steps": warmup, "micro_batch": micro}


def build(stages, micro_batch_tokens=512, world_size=1):
    return build_curriculum(stages, micro_batch_tokens=micro_batch_tokens, world_size=world_size,
                            compress_ratios=RATIOS, max_seq_len=4096)


def test_three_stages_laid_out_on_the_step_axis():
    cur = build([stage("a", 64, 2048, 512), stage("b", 128, 2048, 512),
                 stage("c", 256, 4096, 1024, "sparse", warmup=2)])
    a, b, c = cur.stages
    # steps = tokens // global batch tokens; micro batch = 512 tokens // seq_len
    assert (a.steps, a.micro_batch, a.global_batch, a.grad_accum) == (4, 8, 8, 1)
    assert (b.steps, b.micro_batch, b.global_batch, b.grad_accum) == (4, 4, 4, 1)
    assert (c.steps, c.micro_batch, c.global_batch, c.grad_accum) == (4, 2, 4, 2)
    assert [s.first_step for s in cur.stages] == [0, 4, 8]
    assert cur.total_steps == 12 and cur.main_steps == 10
    assert cur.total_tokens == 2048 + 2048 + 4096
    # every step: its stage, phase, and its index on the lr schedule's (main step) axis
    got = [(p.stage.index, p.phase, p.main_step, p.attention_mode) for p in map(cur.at, range(12))]
    expect = ([(0, PHASE_TRAIN, i, "dense") for i in range(4)]
              + [(1, PHASE_TRAIN, 4 + i, "dense") for i in range(4)]
              + [(2, PHASE_WARMUP, -1, "dense")] * 2
              + [(2, PHASE_TRAIN, 8 + i, "sparse") for i in range(2)])
    assert got == expect
    assert [cur.tokens_before(s) for s in (0, 4, 8, 9, 12)] == [0, 2048, 4096, 5120, 8192]
    with pytest.raises(IndexError):
        cur.at(12)


def test_world_size_and_explicit_micro_batch():
    cur = build([stage("a", 64, 4096, 1024, micro=2)], world_size=4)
    (a,) = cur.stages
    assert (a.global_batch, a.micro_batch, a.grad_accum) == (16, 2, 2)
    # long sequences: at least one sequence per micro batch
    (b,) = build([stage("b", 4096, 8192, 8192)], micro_batch_tokens=512).stages
    assert b.micro_batch == 1 and b.grad_accum == 2


def test_seq_len_not_divisible_by_largest_compress_ratio_names_the_values():
    with pytest.raises(CurriculumError) as err:
        build([stage("x", 72, 4096, 576)])
    msg = str(err.value)
    assert "seq_len=72" in msg and "16" in msg and "stages[0] (x)" in msg


def test_micro_batch_not_dividing_global_batch_names_the_values():
    with pytest.raises(CurriculumError) as err:
        build([stage("x", 64, 4096, 64 * 6, micro=4)])
    msg = str(err.value)
    assert "micro batch (4 sequences" in msg and "global batch (6 sequences" in msg
    with pytest.raises(CurriculumError) as err:
        build([stage("x", 64, 4096, 64 * 4, micro=2)], world_size=3)
    assert "3 ranks" in str(err.value)


@pytest.mark.parametrize("bad, needle", [
    (stage("x", 64, 4096, 100), "global_batch_tokens=100"),
    (stage("x", 64, 100, 512), "tokens=100"),
    (stage("x", 64, 4096, 512, "sparse", warmup=8), "indexer_warmup_steps=8"),
    (stage("x", 64, 4096, 512, "dense", warmup=1), "attention_mode=sparse"),
    (stage("x", 64, 4096, 512, "sparce"), "attention_mode"),
    (stage("x", 8192, 8192, 8192), "max_seq_len"),
])
def test_other_impossible_stages(bad, needle):
    with pytest.raises(CurriculumError) as err:
        build([bad])
    assert needle in str(err.value)
