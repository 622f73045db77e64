"""Context parallelism (model/context_parallel.py): one attention layer of each kind on P token
shards (contiguous and zigzag layouts) equals the unsharded layer in fp64 (outputs, input and
parameter gradients, indexer KL; bytes moved == the model; tied indexer scores; activation
checkpointing), and the shard bookkeeping (who pools which compressed entry, the halo limit,
who reads whose entries, the work model) in-process."""
from __future__ import annotations

import pytest
import torch

from model.chunk_layout import halo_rows
from model.config import ModelConfig
from model.context_parallel import CPGroup, EntryOwnership, HaloSpec, ShardPlan
from model.cp_layout import check_pieces, entry_need, layout_pieces, piece_owners, rank_work
from model.layout import CompressedLayout, DocLayout


@pytest.mark.slow
@pytest.mark.parametrize("world, args", [
    (2, "--layout contiguous --mode sparse"), (2, "--layout contiguous --mode dense --bounds 0,7,96"),        # first shard below the halo
    (3, "--layout contiguous --mode sparse --bounds 0,7,22,96"), (3, "--layout contiguous --mode dense"),     # ranks owning no HCA entry
    (4, "--layout contiguous --mode sparse"), (4, "--layout contiguous --mode dense --bounds 0,30,45,60,96"),  # middle shards = the halo (15)
    (3, "--layout contiguous --mode sparse --ties"),                                      # every indexer score ties
    (3, "--layout contiguous --mode dense --checkpoint --bounds 0,7,22,96"),              # under activation checkpointing
    # zigzag: rank r owns pieces r and 2P-1-r
    (2, "--layout zigzag --mode sparse"),                             # docs end at piece ends (48, 72)
    (3, "--layout zigzag --mode sparse --bounds 0,7,48,63,79,94,96"),   # rank 2 owns no HCA entry in row 1
    (3, "--layout zigzag --mode dense --checkpoint --length 97"),     # odd length, checkpointing
    (4, "--layout zigzag --mode sparse --ties --length 128"),         # 8 pieces of 16 rows (halo 15)
])
def test_sharded_layer_equals_unsharded(ranks, world, args):
    outputs = ranks("context_parallel.py", args.split(), world=world)
    assert all(f"OK {r}" in out for r, out in enumerate(outputs))
    if "0,7,22,96" in args:
        assert "EMPTY rank 0 ratio 16" in outputs[0], "the case meant to hold a rank owning no entry does not"
    if "0,7,48,63,79,94,96" in args:
        assert "EMPTY rank 2 ratio 16 rows [1]" in outputs[2], "the case meant to hold a rank owning no entry does not"


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
    lay = _layouts()
    cl = CompressedLayout.build(lay, ratio)
    own = EntryOwnership.build(cl, bounds, lay.doc_start)
    assert torch.equal(own.first[-1], cl.valid.sum(1))
    for r, (s, e) in enumerate(bounds):
        for b in range(cl.c_end.shape[0]):
            mine = cl.c_end[b, own.first[r, b]:own.first[r + 1, b]]
            assert ((mine >= s) & (mine < e)).all()          # global end positions, not shifted
        assert own.widths[r] == int((own.first[r + 1] - own.first[r]).max())
        for b in range(cl.c_end.shape[0]):   # the first entry of the document open at s
            f, ds = int(own.open_first[r, b]), int(lay.doc_start[b, s])
            assert (f == 0 or cl.c_end[b, f - 1] < ds) and (f == cl.c_end.shape[1] or cl.c_end[b, f] >= ds)


def test_shard_bounds_and_halo_limit():
    assert layout_pieces("contiguous", 10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert layout_pieces("zigzag", 10, 2) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert piece_owners("zigzag", 3) == [0, 1, 2, 2, 1, 0]
    with pytest.raises(ValueError, match="parallel.cp_size=4"):
        layout_pieces("contiguous", 3, 4)
    with pytest.raises(ValueError, match="parallel.cp_size=2"):
        layout_pieces("zigzag", 3, 2)
    with pytest.raises(ValueError, match="parallel.cp_layout='ring' is not a context-parallel layout"):
        layout_pieces("ring", 30, 2)
    check_pieces([(0, 3), (3, 18), (18, 20)], [0, 1, 2], 15)   # first and last may be short
    with pytest.raises(ValueError, match="rank 1's shard \\[3, 17\\) has 14 rows, fewer than the 15 halo"):
        check_pieces([(0, 3), (3, 17), (17, 40)], [0, 1, 2], 15)


def test_entries_go_to_the_ranks_with_a_later_piece():
    assert entry_need(piece_owners("contiguous", 3)) == [[1, 2], [2], []]
    # zigzag: every early piece is read by every other rank (their late pieces follow it); a
    # late piece only by the ranks whose late piece comes after it (the lower ranks)
    assert entry_need(piece_owners("zigzag", 3)) == [[1, 2], [0, 2], [0, 1], [0, 1], [0], []]


def test_zigzag_balances_causal_work():
    """The work model on one document: contiguous ranges leave the last rank ~2x the mean
    indexer work (the model's reason for zigzag); zigzag is within 3% at 4 ranks."""
    cfg = ModelConfig.from_preset("small")
    L, P = 16384, 4
    layout = DocLayout.single(1, L)
    spread = {}
    for name in ("contiguous", "zigzag"):
        work = rank_work(cfg, layout, layout_pieces(name, L, P), piece_owners(name, P), P)
        idx = [w["index"] for w in work]
        spread[name] = max(idx) / (sum(idx) / P)
        assert all(w["rows"] == L // P for w in work)
    assert 1.7 < spread["contiguous"] < 1.8 and spread["zigzag"] < 1.03, spread


def test_plan_refuses_bad_ranges():
    cfg = ModelConfig.from_preset("micro")
    layout = _layouts()
    assert halo_rows(cfg) == 15
    with pytest.raises(ValueError, match="must tile"):
        ShardPlan.build(cfg, layout, CPGroup(0, 2), bounds=[(0, 40), (41, 96)], cp_layout="contiguous")
    with pytest.raises(ValueError, match="fewer than the 15 halo rows"):
        ShardPlan.build(cfg, layout, CPGroup(0, 3), bounds=[(0, 40), (40, 50), (50, 96)],
                        cp_layout="contiguous")
    plan = ShardPlan.build(cfg, layout, CPGroup(1, 2), cp_layout="contiguous")
    assert (plan.mine, plan.frames[0].start, plan.frames[0].end, plan.frames[0].halo, plan.halo.sends) == (
        [1], 48, 96, 15, ())
    plan = ShardPlan.build(cfg, layout, CPGroup(1, 2), cp_layout="zigzag")   # pieces 1 and 2, adjacent
    assert plan.mine == [1, 2] and plan.rows.tolist() == list(range(24, 72))
    assert plan.halo == HaloSpec(sends=((0, 48 - 15, 15, 3),), recvs=((0, 15, 1),))   # piece 2's halo is local
    with pytest.raises(ValueError, match="fewer than the 15 halo rows"):   # 8 pieces of 12 rows
        ShardPlan.build(cfg, layout, CPGroup(0, 4), cp_layout="zigzag")
