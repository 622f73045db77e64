import numpy as np
import pytest
import torch

from data.packing import doc_ids_from_inputs, num_windows, pack_windows

EOS = 999  # the synthetic streams' separator (conftest.synthetic_stream)


def test_stream_selects_documents_and_slices(make_stream):
    synthetic_stream = make_stream
    lengths = [5, 1, 8, 3, 12, 2, 7]
    full = synthetic_stream(lengths)
    select = [0, 2, 3, 6]  # runs: [0], [2, 3], [6]
    part = synthetic_stream(lengths, select=select)
    offsets = np.cumsum([0] + [n + 1 for n in lengths])
    expected = np.concatenate([full.tokens[offsets[d]: offsets[d + 1]] for d in select])
    assert len(part) == len(expected) and len(part.run_src) == 3
    for a in range(len(expected)):
        for b in range(a, len(expected) + 1, 3):
            np.testing.assert_array_equal(part.slice(a, b), expected[a:b])
    with pytest.raises(IndexError):
        part.slice(0, len(expected) + 1)


def naive_doc_ids(inputs, eos):
    out, d = [], 0
    for t, tok in enumerate(inputs):
        if t > 0 and inputs[t - 1] == eos:
            d += 1
        out.append(d)
    return out


def test_doc_ids_change_exactly_after_eos():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, size=(3, 40))
    x[x == 4] = EOS
    x[0, -1] = EOS  # eos as the last input: no new document inside this row
    x[1, 0] = EOS   # eos as the first input: the second token starts document 1
    got = doc_ids_from_inputs(x, EOS)
    for row in range(3):
        assert got[row].tolist() == naive_doc_ids(x[row].tolist(), EOS)
    assert got[1, 1] == 1 and got[0, -1] == got[0, -2] + (x[0, -2] == EOS)


def test_pack_windows_shift_and_layout(make_stream):
    synthetic_stream = make_stream
    stream = synthetic_stream([3, 10, 1, 6, 20, 4])
    seq_len = 7
    n = num_windows(len(stream), seq_len)
    assert n == (len(stream) - 1) // seq_len
    full = stream.slice(0, len(stream)).astype(np.int64)
    batch = pack_windows(stream, np.arange(n), seq_len, EOS)
    for w in range(n):
        window = full[w * seq_len: w * seq_len + seq_len + 1]
        np.testing.assert_array_equal(batch["input_ids"][w], window[:-1])
        np.testing.assert_array_equal(batch["labels"][w], window[1:])  # next token
        assert batch["doc_ids"][w].tolist() == naive_doc_ids(window[:-1].tolist(), EOS)
    # consecutive windows overlap by one token: labels' last = next inputs' first
    np.testing.assert_array_equal(batch["labels"][:-1, -1], batch["input_ids"][1:, 0])
    # the doc_ids feed the model's layout: positions restart right after every eos
    from model.layout import DocLayout

    layout = DocLayout.from_doc_ids(torch.from_numpy(batch["doc_ids"]))
    inputs = torch.from_numpy(batch["input_ids"])
    after_eos = torch.zeros_like(inputs, dtype=torch.bool)
    after_eos[:, 1:] = inputs[:, :-1] == EOS
    assert torch.equal(layout.positions[:, 1:] == 0, after_eos[:, 1:])
