"""The whole model under context parallelism (model/context_parallel_model.py) equals the
unsharded model in fp64 (<= 1e-10 relative), on P gloo ranks: logits and routing of each rank's
rows, every loss term (LM, MTP, balance, indexer) and every parameter gradient summed over the
group, router-bias loads, attention bytes moved == the model. Every layer kind (window, CSA
dense and sparse, HCA), hash and learned MoE, mHC, MTP; packed documents crossing and ending at
rank boundaries; ranks owning no compressed entry; tied indexer scores; odd lengths; supplied
routing; activation checkpointing."""
from __future__ import annotations

import pytest


def _check(ranks, world, args):
    outputs = ranks("context_parallel_model.py", args.split(), world=world)
    assert all(f"OK {r}" in out for r, out in enumerate(outputs))
    return outputs


def test_two_ranks_sparse(ranks):
    """The CI case (seconds): 2 ranks, sparse CSA, documents ending at the boundary (row 1: 48)."""
    _check(ranks, 2, "--layout contiguous --mode sparse")


def test_two_ranks_zigzag(ranks):
    """The CI case of the zigzag layout: rank 0 owns rows [0, 24) + [72, 96), rank 1 [24, 72);
    documents end at piece ends (row 0: 72, row 1: 48)."""
    _check(ranks, 2, "--layout zigzag --mode sparse")


@pytest.mark.slow
@pytest.mark.parametrize("world, args", [
    (2, "--layout contiguous --mode dense --bounds 0,7,96"),                    # first shard below the halo, no HCA entry
    (3, "--layout contiguous --mode sparse --bounds 0,7,22,96"),                # rank 0 owns no HCA entry in any row
    (3, "--layout contiguous --mode dense --checkpoint --length 97"),           # odd length, activation checkpointing
    (3, "--layout contiguous --mode sparse --ties --checkpoint --bounds 0,7,22,96"),  # every indexer score ties
    (4, "--layout contiguous --mode sparse --routing --length 97"),             # supplied (anticipatory) routing
    (4, "--layout contiguous --mode dense --bounds 0,30,45,60,96"),             # middle shards = the halo (15 rows)
    # zigzag (rank r owns pieces r and 2P-1-r)
    (3, "--layout zigzag --mode sparse --ties --bounds 0,7,48,63,79,94,96"),  # rank 2: no HCA entry in row 1
    (3, "--layout zigzag --mode dense --checkpoint --length 97"),            # odd length, checkpointing
    (4, "--layout zigzag --mode sparse --routing --length 128"),             # supplied routing, 8 pieces
])
def test_sharded_model_equals_unsharded(ranks, world, args):
    outputs = _check(ranks, world, args)
    if "0,7,22,96" in args or "0,7,96" in args:
        assert "EMPTY rank 0 ratio 16" in outputs[0], "the case meant to hold a rank owning no entry does not"
    if "0,7,48,63,79,94,96" in args:
        assert "EMPTY rank 2 ratio 16 rows [1]" in outputs[2], "the case meant to hold a rank owning no entry does not"
