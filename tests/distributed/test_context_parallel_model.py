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
    _check(ranks, 2, "--mode sparse")


@pytest.mark.slow
@pytest.mark.parametrize("world, args", [
    (2, "--mode dense --bounds 0,7,96"),                    # first shard below the halo, no HCA entry
    (3, "--mode sparse --bounds 0,7,22,96"),                # rank 0 owns no HCA entry in any row
    (3, "--mode dense --checkpoint --length 97"),           # odd length, activation checkpointing
    (3, "--mode sparse --ties --checkpoint --bounds 0,7,22,96"),  # every indexer score ties
    (4, "--mode sparse --routing --length 97"),             # supplied (anticipatory) routing
    (4, "--mode dense --bounds 0,30,45,60,96"),             # middle shards = the halo (15 rows)
])
def test_sharded_model_equals_unsharded(ranks, world, args):
    outputs = _check(ranks, world, args)
    if "0,7,22,96" in args or "0,7,96" in args:
        assert "EMPTY rank 0 ratio 16" in outputs[0], "the case meant to hold a rank owning no entry does not"
