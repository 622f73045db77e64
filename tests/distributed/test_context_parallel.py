"""Context parallelism (model/context_parallel.py): one attention layer of each kind on P token
shards equals the unsharded layer in fp64 (outputs, input and parameter gradients, indexer KL;
bytes moved == the model; tied indexer scores; activation checkpointing), and the shard bookkeeping (who pools which compressed entry, the halo limit) in-process."""
from __future__ import annotations

import pytest
import torch

from model.chunk_layout import halo_rows
from model.config import ModelConfig
from model.context_parallel import CPGroup, EntryOwnership, ShardPlan, check_shards, shard_bounds
from model.layout import CompressedLayout, DocLayout


@pytest.mark.slow
@pytest.mark.parametrize("world, args", [
    (2, "--mode sparse"), (2, "--mode dense --bounds 0,7,96"),        # first shard below the halo
    (3, "--mode sparse --bounds 0,7,22,96"), (3, "--mode dense"),     # ranks owning no HCA entry
    (4, "--mode sparse"), (4, "--mode dense --bounds 0,30,45,60,96"),  # middle shards = the halo (15)
    (3, "--mode sparse --ties"),                                      # every indexer score ties
    (3, "--mode dense --checkpoint --bounds 0,7,22,96"),              # under activation checkpointing
])
def test_sharded_layer_equals_unsharded(ranks, world, args):
    outputs = ranks("context_parallel.py", args.split(), world=world)
    assert all(f"OK {r}" in out for r, out in enumerate(outputs))
    if "0,7,22,96" in args:
        assert "EMPTY rank 0 ratio 16" in outputs[0], "the case meant to hold a rank owning no entry does not"


def _layouts(L=96, docs=((0, 37, 61, 72), (0, 20, 32, 48, 50, 64), (0,))):
    doc = torch.zeros(len(docs), L, dtype=torch.long)
    for b, starts in enumerate(docs):
        for d, s in enumerate(starts):
            doc[b, s:] = d
    return DocLayout.from_doc_ids(doc)


@pytest.mark.parametrize("bounds", [[(0, 48), (48, 96)], [(0, 7), (7, 22), (22, 96)],
                                    [(0, 24), (24, 48), (48, 72), (72, 96)]])
@pytest.mark.parametrize("ratio", [4, 16])
def test_every_entry_has_one_owner_holding_its_last_token(bounds, ratio):
    cl = CompressedLayout.build(_layouts(), ratio)
    own = EntryOwnership.build(cl, bounds)
    assert torch.equal(own.first[-1], cl.valid.sum(1))
    for r, (s, e) in enumerate(bounds):
        for b in range(cl.c_end.shape[0]):
            mine = cl.c_end[b, own.first[r, b]:own.first[r + 1, b]]
            assert ((mine >= s) & (mine < e)).all()          # global end positions, not shifted
    assert own.width == int((own.first[1:] - own.first[:-1]).max())


def test_shard_bounds_and_halo_limit():
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError, match="parallel.cp_size=4"):
        shard_bounds(3, 4)
    check_shards([(0, 3), (3, 18), (18, 20)], 15)   # first and last may be short
    with pytest.raises(ValueError, match="rank 1's shard \\[3, 17\\) has 14 rows, fewer than the 15 halo"):
        check_shards([(0, 3), (3, 17), (17, 40)], 15)


def test_plan_refuses_bad_ranges():
    cfg = ModelConfig.from_preset("micro")
    layout = _layouts()
    assert halo_rows(cfg) == 15
    with pytest.raises(ValueError, match="must tile"):
        ShardPlan.build(cfg, layout, CPGroup(0, 2), bounds=[(0, 40), (41, 96)])
    with pytest.raises(ValueError, match="fewer than the 15 halo rows"):
        ShardPlan.build(cfg, layout, CPGroup(0, 3), bounds=[(0, 40), (40, 50), (50, 96)])
    plan = ShardPlan.build(cfg, layout, CPGroup(1, 2))
    assert (plan.start, plan.end, plan.frame.halo, plan.send_rows) == (48, 96, 15, 0)
