import numpy as np
import pytest
import torch

from data.loader import TokenLoader, ValLoader
from data.packing import num_windows

EOS = 999
LENGTHS = [13, 40, 7, 25, 3, 60, 18, 9, 33, 11, 21, 5, 44, 16]  # 313 tokens incl. eos


def take(loader, k):
    return [next(loader) for _ in range(k)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def window_index(stream, row, seq_len):
    """Which window a row is (windows are distinct, so match against all of them)."""
    full = torch.from_numpy(stream.slice(0, len(stream)).astype(np.int64))
    for w in range(num_windows(len(stream), seq_len)):
        if torch.equal(full[w * seq_len: w * seq_len + seq_len], row):
            return w
    raise AssertionError("row is not a window of the stream")


def test_batch_format_and_epoch_permutation(make_stream):
    stream = make_stream(LENGTHS)
    loader = TokenLoader(stream, EOS, seq_len=8, micro_batch=3, seed=5)
    n = num_windows(len(stream), 8)  # 39
    assert loader.windows_per_epoch == 39
    seen = []
    for _ in range(13):  # exactly one epoch
        b = next(loader)
        assert set(b) == {"input_ids", "labels", "doc_ids"}
        for v in b.values():
            assert v.dtype == torch.long and v.shape == (3, 8)
        seen += [window_index(stream, r, 8) for r in b["input_ids"]]
    assert sorted(seen) == list(range(n))  # each window once per epoch
    assert loader.epoch == 0
    nxt = [window_index(stream, r, 8) for r in next(loader)["input_ids"]]
    assert loader.epoch == 1 and nxt != seen[:3]  # new epoch, new order
    # same seed -> same order; another seed -> another order
    again = TokenLoader(stream, EOS, 8, 3, seed=5)
    assert_same(take(again, 2), take(TokenLoader(stream, EOS, 8, 3, seed=5), 2))
    other = next(TokenLoader(stream, EOS, 8, 3, seed=6))["input_ids"]
    assert not torch.equal(other, next(TokenLoader(stream, EOS, 8, 3, seed=5))["input_ids"])


def test_epoch_drops_partial_optimizer_step(make_stream):
    stream = make_stream(LENGTHS)
    loader = TokenLoader(stream, EOS, seq_len=8, micro_batch=2, seed=0, world_size=2, grad_accum=3)
    assert loader.windows_per_epoch == (39 // 12) * 12 == 36
    take(loader, 9)  # 9 micro-steps x 4 windows = 36
    assert loader.epoch == 0
    next(loader)
    assert (loader.epoch, loader.position) == (1, 4)


@pytest.mark.parametrize("k", [1, 5, 13, 14, 30])  # 13 = exactly at the epoch end
def test_resume_exact_including_epoch_boundary(make_stream, k):
    stream = make_stream(LENGTHS)
    ref = TokenLoader(stream, EOS, 8, 3, seed=11)
    expected = take(ref, k + 20)
    first = TokenLoader(stream, EOS, 8, 3, seed=11)
    assert_same(take(first, k), expected[:k])
    state = first.state_dict()
    resumed = TokenLoader(stream, EOS, 8, 3, seed=11)
    resumed.load_state_dict(state)
    assert_same(take(resumed, 20), expected[k:])


def test_resume_exact_across_set_seq_len(make_stream):
    stream = make_stream(LENGTHS * 3, seed=3)
    switch_at, total = 6, 70  # curriculum: seq_len 8 x mb 2 -> seq_len 16 x mb 1 after batch 6

    def drive(loader, start, stop):
        out = []
        for i in range(start, stop):
            if i == switch_at:
                loader.set_seq_len(16, micro_batch=1, grad_accum=3)
            out.append(next(loader))
        return out

    expected = drive(TokenLoader(stream, EOS, 8, 2, seed=7, grad_accum=2), 0, total)
    assert expected[5]["input_ids"].shape == (2, 8) and expected[6]["input_ids"].shape == (1, 16)
    first = TokenLoader(stream, EOS, 8, 2, seed=7, grad_accum=2)
    drive(first, 0, total)
    assert first.epoch >= 1  # the run crosses an epoch boundary at the new length
    for stop in (3, 6, 7, 20, 58, 59, 64):  # before, at and after the change
        loader = TokenLoader(stream, EOS, 8, 2, seed=7, grad_accum=2)
        got = drive(loader, 0, stop)
        fresh = TokenLoader(stream, EOS, 8, 2, seed=7, grad_accum=2)  # built with stage-0 shape
        fresh.load_state_dict(loader.state_dict())
        assert_same(got + drive(fresh, stop, total), expected)


def test_set_seq_len_maps_tokens_consumed(make_stream):
    stream = make_stream(LENGTHS * 4)
    loader = TokenLoader(stream, EOS, 8, 2, seed=0, grad_accum=2)
    take(loader, 6)  # 12 windows x 8 = 96 tokens into epoch 0
    loader.set_seq_len(20, micro_batch=1)
    # ceil(96 / 20) = 5 windows, rounded up to whole steps of 1 x 1 x 2 windows -> 6
    assert (loader.epoch, loader.position, loader.seq_len, loader.micro_batch) == (0, 6, 20, 1)
    next(loader)
    with pytest.raises(ValueError, match="optimizer-step boundary"):
        loader.set_seq_len(8)


def test_rank_sharding_disjoint(make_stream):
    stream = make_stream(LENGTHS * 2)
    world = 3
    loaders = [TokenLoader(stream, EOS, 8, 2, seed=4, rank=r, world_size=world) for r in range(world)]
    n_steps = num_windows(len(stream), 8) // (world * 2)
    per_rank = [[window_index(stream, row, 8) for _ in range(n_steps) for row in next(ld)["input_ids"]]
                for ld in loaders]
    flat = [w for ws in per_rank for w in ws]
    assert len(flat) == len(set(flat)) == n_steps * world * 2  # disjoint, none repeated
    # rank r's rows are the single-rank loader's order entries r*mb ... of each step
    order = loaders[0].epoch_order(0)
    assert per_rank[1][:2] == order[2:4].tolist()
    assert all(ld.state_dict() == loaders[0].state_dict() for ld in loaders)


def test_state_mismatch_errors(make_stream):
    stream = make_stream(LENGTHS)
    state = TokenLoader(stream, EOS, 8, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(stream, EOS, 8, 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="stream"):
        TokenLoader(make_stream(LENGTHS + [4]), EOS, 8, 2, seed=1).load_state_dict(state)


@pytest.mark.parametrize("kwargs, match", [
    ({"seq_len": 1}, "seq_len"), ({"micro_batch": 0}, "micro_batch"),
    ({"rank": 2, "world_size": 2}, "rank"), ({"seq_len": 200, "micro_batch": 2}, "too small"),
])
def test_loader_shape_errors(make_stream, kwargs, match):
    args = {"seq_len": 8, "micro_batch": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        TokenLoader(make_stream(LENGTHS), EOS, **args)


def test_val_loader_fixed_and_sharded(make_stream):
    stream = make_stream(LENGTHS)
    full = torch.from_numpy(stream.slice(0, len(stream)).astype(np.int64))
    vals = [ValLoader(stream, EOS, 8, 2, max_batches=3, rank=r, world_size=2) for r in range(2)]
    assert len(vals[0]) == 3
    first, second = list(vals[0]), list(vals[0])
    assert_same(first, second)  # the same batches every pass
    for r in range(2):
        for k, batch in enumerate(vals[r]):
            for b in range(2):
                w = k * 4 + r * 2 + b  # first N windows in stream order
                assert torch.equal(batch["input_ids"][b], full[w * 8: w * 8 + 8])
                assert torch.equal(batch["labels"][b], full[w * 8 + 1: w * 8 + 9])
    capped = ValLoader(stream, EOS, 8, 4, max_batches=100)
    assert len(capped) == num_windows(len(stream), 8) // 4


def test_resume_on_another_world_size_keeps_global_position(make_stream):
    stream = make_stream(LENGTHS * 2)
    one = TokenLoader(stream, EOS, 8, 2, seed=9)
    take(one, 3)  # 6 windows consumed
    two = TokenLoader(stream, EOS, 8, 2, seed=9, rank=1, world_size=2)
    two.load_state_dict(one.state_dict())
    assert two.position == 8  # rounded up to a whole step of 2 x 2 windows
    order = two.epoch_order(0)
    expected = [window_index(stream, r, 8) for r in next(two)["input_ids"]]
    assert expected == order[10:12].tolist()  # rank 1's rows of the step at 8


@pytest.mark.parametrize("old_world, micro, accum, new_world, new_micro", [
    (2, 1, 2, 1, None),     # 2 -> 1 rank: 4 accumulation steps of 1 sequence
    (2, 2, 1, 4, 1),        # 2 -> 4 ranks with a smaller micro batch
    (3, 1, 2, 2, None),     # 3 -> 2 ranks (global batch 6)
])
def test_remap_state_continues_the_same_global_batches(make_stream, old_world, micro, accum,
                                                       new_world, new_micro):
    """The global order is a function of (seed, epoch): after ``remap_state`` another world size
    trains on exactly the micro-batch chunks the saving ranks would have, step by step, across
    an epoch boundary (chunk c of a step = micro-step c // W of rank c % W)."""
    from data.loader import remap_state

    stream = make_stream(LENGTHS * 2)
    old = [TokenLoader(stream, EOS, 8, micro, seed=3, rank=r, world_size=old_world, grad_accum=accum)
           for r in range(old_world)]
    global_batch = old_world * micro * accum
    steps_per_epoch = old[0].windows_per_epoch // global_batch
    for ld in old:                       # two steps done
        take(ld, 2 * accum)
    state = remap_state(old[0].state_dict(), new_world, new_micro)
    new_micro = micro if new_micro is None else new_micro
    assert state["grad_accum"] * new_world * new_micro == global_batch
    new = [TokenLoader(stream, EOS, 8, new_micro, seed=3, rank=r, world_size=new_world,
                       grad_accum=state["grad_accum"]) for r in range(new_world)]
    for ld in new:
        ld.load_state_dict(state)

    def global_rows(loaders, world, per_rank_steps):
        rows = []
        for m in range(per_rank_steps):
            for ld in loaders:              # chunk order: micro-step m, then rank
                rows.extend(next(ld)["input_ids"])
        return [window_index(stream, r, 8) for r in rows]

    n = steps_per_epoch + 1              # past the end of epoch 0
    expected = global_rows(old, old_world, n * accum)
    got = global_rows(new, new_world, n * state["grad_accum"])
    assert got == expected
    assert old[0].epoch == new[0].epoch == 1 and old[0].position == new[0].position


def test_remap_state_refuses_what_it_cannot_continue(make_stream):
    from data.loader import remap_state

    stream = make_stream(LENGTHS * 2)
    state = TokenLoader(stream, EOS, 8, 2, seed=3, rank=0, world_size=2, grad_accum=1).state_dict()
    with pytest.raises(ValueError) as err:    # global batch 4 on 3 ranks x 2
        remap_state(state, 3)
    msg = str(err.value)
    for needle in ("global batch of 4", "2 ranks x micro batch 2 x 1 accumulation",
                   "3 ranks x micro batch 2 = 6", "train.micro_batch_tokens"):
        assert needle in msg
    with pytest.raises(ValueError, match="optimizer-step boundary"):
        remap_state({**state, "position": 2}, 1)


def test_document_packing_loader_resumes_exactly_and_refuses_another_packing(make_stream):
    stream = make_stream(LENGTHS)
    loader = TokenLoader(stream, EOS, seq_len=16, micro_batch=2, seed=1, packing="documents")
    assert loader.rows.describe() == "documents" and loader.num_windows == len(loader.rows)
    take(loader, 3)
    state = loader.state_dict()
    assert state["packing"] == "documents"
    expected = take(loader, 4)
    again = TokenLoader(stream, EOS, seq_len=16, micro_batch=2, seed=1, packing="documents")
    again.load_state_dict(state)
    assert_same(take(again, 4), expected)
    # a length change and back: the plan of each length is the same plan
    again.set_seq_len(32, 1)
    assert next(again)["input_ids"].shape == (1, 32)
    with pytest.raises(ValueError, match="packing"):
        TokenLoader(stream, EOS, seq_len=16, micro_batch=2, seed=1).load_state_dict(state)
    val = ValLoader(stream, EOS, seq_len=16, micro_batch=2, max_batches=2, packing="documents")
    rows = [r for b in val for r in b["input_ids"]]
    first = torch.from_numpy(loader.rows_for(16).batch(np.array([0]))["input_ids"][0])
    assert len(rows) == 4 and torch.equal(rows[0], first)   # validation: rows in plan order
