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


# ------------------------------------------------------------------ documents packing
from data.packing import IGNORE_INDEX, DocumentRows, best_fit_decreasing, build_rows  # noqa: E402
from data.passkey import PasskeyMix, PasskeyTemplate  # noqa: E402


def test_ignore_index_is_the_models():
    from model.transformer import IGNORE_INDEX as MODEL_IGNORE

    assert IGNORE_INDEX == MODEL_IGNORE


def test_best_fit_decreasing_fills_tightly_and_never_overflows():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 17, size=200)
    row_of, n_rows = best_fit_decreasing(lengths, 16)
    fill = np.bincount(row_of, weights=lengths, minlength=n_rows)
    assert fill.max() <= 16 and n_rows == len(np.unique(row_of))
    assert n_rows <= int(np.ceil(lengths.sum() / 16 * 11 / 9)) + 1   # BFD's 11/9 OPT bound
    assert np.array_equal(best_fit_decreasing(lengths, 16)[0], row_of)   # deterministic


@pytest.mark.parametrize("seq_len", [8, 9, 13])
def test_document_rows_keep_every_document_whole(make_stream, seq_len):
    lengths = [3, 10, 1, 6, 20, 4, 9, 2, 37, 7, 16]      # + eos each; 10, 20, 37, 16 exceed some rows
    stream = make_stream(lengths)
    full = stream.slice(0, len(stream)).astype(np.int64)
    docs = np.split(full, np.cumsum([n + 1 for n in lengths])[:-1])
    rows = build_rows(stream, seq_len, EOS, "documents")
    assert isinstance(rows, DocumentRows) and rows.describe() == "documents"
    batch = rows.batch(np.arange(len(rows)))
    real = 0
    seen_short, chunks = [], []
    for r in range(len(rows)):
        x, y, d = batch["input_ids"][r], batch["labels"][r], batch["doc_ids"][r]
        n = int(rows.piece_len[rows.row_ptr[r]: rows.row_ptr[r + 1]].sum())
        real += n
        assert 1 <= n <= seq_len
        # padding: eos inputs, ignored labels, a document id of its own
        assert (x[n:] == EOS).all() and (y[n:] == IGNORE_INDEX).all()
        assert len(set(d[n:].tolist())) <= 1 and (n == seq_len or d[n] != d[n - 1])
        # labels are the next token of the row; the last real one is ignored or continues
        np.testing.assert_array_equal(y[:n - 1], x[1:n])
        assert d[:n].tolist() == naive_doc_ids(x[:n].tolist(), EOS)
        # cut the row at its eos tokens: whole documents (or a long document's pieces)
        cuts = np.nonzero(x[:n] == EOS)[0] + 1
        for piece in np.split(x[:n], cuts):
            if len(piece):
                (seen_short if piece[-1] == EOS else chunks).append((r, piece, y[n - 1]))
    assert real == len(stream)                      # no token lost or repeated
    short = [doc for doc in docs if len(doc) <= seq_len]
    assert sorted(map(tuple, short)) == sorted(tuple(p) for _, p, _ in seen_short
                                               if any(np.array_equal(p, s) for s in short))
    for doc in docs:
        if len(doc) <= seq_len:
            continue
        # a long document: full rows of its own for every seq_len tokens, label = next token
        for k in range(len(doc) // seq_len):
            piece = doc[k * seq_len: (k + 1) * seq_len]
            hits = [r for r in range(len(rows)) if np.array_equal(batch["input_ids"][r], piece)]
            assert len(hits) == 1
            last = batch["labels"][hits[0], -1]
            assert last == (doc[(k + 1) * seq_len] if (k + 1) * seq_len < len(doc) else IGNORE_INDEX)
        tail = doc[(len(doc) // seq_len) * seq_len:]
        if len(tail):
            assert sum(np.array_equal(p, tail) for _, p, _ in seen_short) >= 1


def test_stream_packing_refuses_a_passkey_mix(make_stream, gpt2):
    mix = PasskeyMix(PasskeyTemplate(gpt2), 0.2, seed=0)
    with pytest.raises(ValueError, match="packing=documents"):
        build_rows(make_stream([5, 6]), 8, EOS, "stream", mix)
    with pytest.raises(ValueError, match="data.packing"):
        build_rows(make_stream([5, 6]), 8, EOS, "bins")


def test_passkey_document_layout(gpt2):
    t = PasskeyTemplate(gpt2)
    for length, depth in ((t.min_length, 0.0), (500, 0.5), (2048, 1.0)):
        doc = t.document(length, depth, 48213)
        assert len(doc.tokens) == length and doc.tokens[-1] == gpt2.eos_id
        answer = doc.tokens[doc.answer_start: doc.answer_start + doc.answer_len]
        assert gpt2.decode(answer.tolist()).strip() == "48213"
        text = gpt2.decode(doc.tokens[:-1].tolist())
        assert text.startswith("There is an important pass key")
        assert text.endswith("What is the pass key? The pass key is 48213")
        needle = text.index("The pass key is 48213. Remember it.")
        rel = needle / len(text)
        assert abs(rel - depth) < 0.1 + 200 / len(text)
    with pytest.raises(ValueError, match="at least"):
        t.document(t.min_length - 1, 0.5, 48213)


def test_passkey_mix_rate_and_determinism(make_stream, gpt2):
    stream = make_stream([300] * 40 + [50] * 30, eos=gpt2.eos_id)
    t = PasskeyTemplate(gpt2)
    a = DocumentRows(stream, 512, gpt2.eos_id, PasskeyMix(t, 0.25, seed=3))
    b = DocumentRows(stream, 512, gpt2.eos_id, PasskeyMix(t, 0.25, seed=3))
    c = DocumentRows(stream, 512, gpt2.eos_id, PasskeyMix(t, 0.25, seed=4))
    st = a.stats()
    assert st["synthetic_documents"] > 0 and 0.15 < st["synthetic_fraction"] < 0.35
    ids = np.arange(len(a))
    for k in ("input_ids", "labels", "doc_ids"):
        np.testing.assert_array_equal(a.batch(ids)[k], b.batch(ids)[k])
    assert not np.array_equal(a.synthetic[2], c.synthetic[2])
    # every synthetic document is in some row, whole, with its key as the answer
    text = "".join(gpt2.decode(row[row != gpt2.eos_id].tolist()) for row in a.batch(ids)["input_ids"])
    for key in a.synthetic[2]:
        assert f"The pass key is {key}. Remember it." in text
        assert f"What is the pass key? The pass key is {key}" in text
