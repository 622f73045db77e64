"""DocLayout / CompressedLayout / masks against naive python loops over documents."""
import torch

from model.layout import CompressedLayout, DocLayout, compressed_mask, window_mask


def _docs(row):
    """[(start, end_exclusive)] of the documents of one doc_ids row."""
    out, s = [], 0
    for i in range(1, len(row) + 1):
        if i == len(row) or row[i] != row[i - 1]:
            out.append((s, i))
            s = i
    return out


def _naive_blocks(row, ratio):
    """Per row: list of (block_start, c_end, c_pos, prev_index) in order."""
    blocks = []
    for s, e in _docs(row):
        first = len(blocks)
        for j in range((e - s) // ratio):
            blocks.append((s + j * ratio, s + j * ratio + ratio - 1, j * ratio, first + j - 1 if j else -1))
    return blocks


DOC_IDS = torch.tensor([
    [0] * 23,
    [0] * 5 + [1] * 9 + [2] * 3 + [3] * 6,
    [7] * 12 + [3] * 11,
    [1, 2] * 3 + [5] * 17,
])


def test_doc_layout_matches_naive():
    lay = DocLayout.from_doc_ids(DOC_IDS)
    for b, row in enumerate(DOC_IDS.tolist()):
        for s, e in _docs(row):
            for t in range(s, e):
                assert lay.doc_start[b, t] == s and lay.positions[b, t] == t - s


def test_compressed_layout_matches_naive():
    lay = DocLayout.from_doc_ids(DOC_IDS)
    L = DOC_IDS.shape[1]
    for ratio in (2, 3, 4, 16):
        cl = CompressedLayout.build(lay, ratio)
        assert cl.c_end.shape == (DOC_IDS.shape[0], L // ratio)
        for b, row in enumerate(DOC_IDS.tolist()):
            want = _naive_blocks(row, ratio)
            n = len(want)
            assert cl.valid[b].sum() == n and bool(cl.valid[b, :n].all())
            got = list(zip(cl.block_start[b, :n].tolist(), cl.c_end[b, :n].tolist(),
                           cl.c_pos[b, :n].tolist(), cl.prev_index[b, :n].tolist()))
            assert got == want, (ratio, b)
            assert bool((cl.c_end[b, n:] == L).all())  # pads are never visible


def test_masks_match_naive():
    lay = DocLayout.from_doc_ids(DOC_IDS)
    B, L = DOC_IDS.shape
    window, ratio = 5, 3
    wm = window_mask(lay.doc_start, window)
    cl = CompressedLayout.build(lay, ratio)
    cm = compressed_mask(lay.doc_start, cl.c_end)
    for b, row in enumerate(DOC_IDS.tolist()):
        blocks = _naive_blocks(row, ratio)
        for s, e in _docs(row):
            for t in range(s, e):
                for k in range(L):
                    assert bool(wm[b, t, k]) == (max(s, t - window + 1) <= k <= t)
                for i in range(cl.c_end.shape[1]):
                    vis = i < len(blocks) and s <= blocks[i][0] and blocks[i][1] <= t
                    assert bool(cm[b, t, i]) == vis


def test_single_document_visibility_rule():
    # one document from 0: entry i visible to t iff i < (t + 1) // m
    L, m = 29, 4
    lay = DocLayout.single(1, L)
    cm = compressed_mask(lay.doc_start, CompressedLayout.build(lay, m).c_end)[0]
    for t in range(L):
        for i in range(L // m):
            assert bool(cm[t, i]) == (i < (t + 1) // m)


def test_previous_block_is_the_entry_before():
    # the fused compressor pooling (kernels/compressor_pool.py) finds the entry whose previous
    # block is e as e + 1: every layout the compressor pools with, global and per chunk frame,
    # lists a document's blocks consecutively (prev_index is -1 or e - 1)
    from model.chunk_layout import build_frame

    lay = DocLayout.from_doc_ids(DOC_IDS)
    L = DOC_IDS.shape[1]
    for ratio in (2, 3, 4):
        gl = CompressedLayout.build(lay, ratio)
        layouts = [gl] + [build_frame(lay, {ratio: gl}, s, min(L, s + 7), 8, ratio).entries[ratio].new_layout
                          for s in range(0, L, 7)]
        for cl in layouts:
            e = torch.arange(cl.prev_index.shape[1]).expand_as(cl.prev_index)
            assert bool(((cl.prev_index == -1) | (cl.prev_index == e - 1)).all()), ratio
