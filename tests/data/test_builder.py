import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import build_data

DOCS = [f"Document number {i}: " + "some words here and there. " * (3 + i % 5) for i in range(24)]


def stream_tokens(loader):
    return loader.stream.slice(0, len(loader.stream)).tolist()


def expected_stream(tok, texts):
    out = []
    for ids in tok.encode_batch(texts):
        out += ids + [tok.eos_id]
    return out


def check_bundle(bundle, texts):
    """train + val streams together are exactly the documents (each + eos), nothing lost."""
    tok = bundle.tokenizer
    train = stream_tokens(bundle.train_loader)
    val = stream_tokens(bundle.val_loader) if bundle.val_loader is not None else []
    assert sorted(train + val) == sorted(expected_stream(tok, texts))
    assert bundle.stats["documents"] == len(texts)
    # each held-out document appears whole in the validation stream
    if val:
        docs_val = [d for d in texts if " ".join(map(str, tok.encode(d) + [tok.eos_id])) in " ".join(map(str, val))]
        assert len(docs_val) == bundle.stats["val_documents"]


def test_text_files_one_document_each(tmp_path):
    for i, d in enumerate(DOCS):
        (tmp_path / f"doc{i:02d}.txt").write_text(d, encoding="utf-8")
    bundle = build_data({"kind": "files", "paths": [str(tmp_path)], "cache_dir": str(tmp_path / "c"),
                         "val_fraction": 0.1, "val_batches": 2}, seq_len=16, micro_batch=2, seed=0)
    check_bundle(bundle, DOCS)
    assert bundle.stats["val_documents"] >= 1 and len(bundle.val_loader) >= 1
    assert next(bundle.train_loader)["input_ids"].shape == (2, 16)


def test_text_file_by_line(tmp_path):
    (tmp_path / "lines.txt").write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    bundle = build_data({"kind": "files", "paths": [str(tmp_path / "lines.txt")], "sample_by": "line",
                         "cache_dir": str(tmp_path / "c"), "val_fraction": 0.0},
                        seq_len=16, micro_batch=2, seed=0)
    check_bundle(bundle, [d + "\n" for d in DOCS])
    assert bundle.val_loader is None


def test_jsonl_and_parquet(tmp_path):
    with open(tmp_path / "a.jsonl", "w", encoding="utf-8") as f:
        for d in DOCS[:12]:
            f.write(json.dumps({"body": d, "id": 1}) + "\n")
    pq.write_table(pa.table({"body": DOCS[12:], "n": list(range(12))}), tmp_path / "b.parquet")
    cfg = {"kind": "files", "paths": [str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")],
           "text_field": "body", "cache_dir": str(tmp_path / "c"), "val_fraction": 0.1}
    bundle = build_data(cfg, seq_len=16, micro_batch=2, seed=0)
    check_bundle(bundle, DOCS)
    with pytest.raises(KeyError, match="nope"):
        build_data({**cfg, "text_field": "nope"}, seq_len=16, micro_batch=2, seed=0)


def test_hf_kind_on_local_dataset_dir(tmp_path):
    """The hub path (load_dataset(name, streaming=True)), exercised offline on a local dataset."""
    ds_dir = tmp_path / "my_dataset"
    ds_dir.mkdir()
    with open(ds_dir / "train.jsonl", "w", encoding="utf-8") as f:
        for d in DOCS:
            f.write(json.dumps({"text": d}) + "\n")
    cfg = {"kind": "hf", "name": str(ds_dir), "split": "train", "max_documents": 20,
           "cache_dir": str(tmp_path / "c"), "val_fraction": 0.1}
    bundle = build_data(cfg, seq_len=16, micro_batch=2, seed=0)
    check_bundle(bundle, DOCS[:20])


def test_empty_and_undecodable_skipped_and_counted(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text(DOCS[0], encoding="utf-8")
    (corpus / "blank.txt").write_text("  \n\n", encoding="utf-8")
    (corpus / "zero.txt").write_bytes(b"")
    (corpus / "bad.txt").write_bytes(b"latin-1 bytes: caf\xe9 \xff\xfe")
    (corpus / "more.txt").write_text(DOCS[1], encoding="utf-8")
    rows = [{"text": DOCS[2]}, {"text": ""}, {"text": None}, {"text": "   "}, {"text": DOCS[3]}]
    with open(corpus / "rows.jsonl", "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.table({"text": pa.array([DOCS[4].encode(), b"\xc3\x28 broken", b""],
                                              type=pa.binary())}), corpus / "bin.parquet")
    with caplog.at_level(logging.WARNING, logger="data.builder"):
        bundle = build_data({"kind": "files", "paths": [str(corpus)], "cache_dir": str(tmp_path / "c"),
                             "val_fraction": 0.0}, seq_len=8, micro_batch=1, seed=0)
    s = bundle.stats
    # empty: blank.txt, zero.txt, "", "   ", b"" ; undecodable: bad.txt, null, b"\xc3\x28..."
    assert (s["skipped_empty"], s["skipped_undecodable"], s["documents"]) == (5, 3, 5)
    assert s["documents_read"] == 13
    assert sorted(stream_tokens(bundle.train_loader)) == sorted(expected_stream(bundle.tokenizer, DOCS[:5]))
    assert "skipped 5 empty and 3 undecodable" in caplog.text
    # the counts survive a cache hit
    again = build_data({"kind": "files", "paths": [str(corpus)], "cache_dir": str(tmp_path / "c"),
                        "val_fraction": 0.0}, seq_len=8, micro_batch=1, seed=0)
    assert again.stats["cache_hit"] and again.stats["skipped_undecodable"] == 3


def test_bad_input_fails_before_heavy_work(tmp_path):
    ok = tmp_path / "ok.txt"
    ok.write_text(DOCS[0], encoding="utf-8")
    cache = str(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="missing_file.txt"):
        build_data({"kind": "files", "paths": [str(ok), str(tmp_path / "missing_file.txt")],
                    "cache_dir": cache}, 16, 2, 0)
    with pytest.raises(FileNotFoundError, match="no_such_tok"):
        build_data({"kind": "files", "paths": [str(ok)], "tokenizer": str(tmp_path / "no_such_tok"),
                    "cache_dir": cache}, 16, 2, 0)
    with pytest.raises(ValueError, match="seq_len"):
        build_data({"cache_dir": cache}, seq_len=1, micro_batch=2, seed=0)
    with pytest.raises(ValueError, match="micro_batch"):
        build_data({"cache_dir": cache}, seq_len=16, micro_batch=0, seed=0)
    with pytest.raises(ValueError, match="rank"):
        build_data({"cache_dir": cache}, 16, 2, 0, rank=2, world_size=2)
    with pytest.raises(KeyError, match="text_feild"):
        build_data({"cache_dir": cache, "text_feild": "x"}, 16, 2, 0)
    with pytest.raises(ValueError, match="val_fraction"):
        build_data({"cache_dir": cache, "val_fraction": 1.0}, 16, 2, 0)
    with pytest.raises(ValueError, match="kind"):
        build_data({"kind": "web", "cache_dir": cache}, 16, 2, 0)
    with pytest.raises(ValueError, match="data.packing"):
        build_data({"packing": "bins", "cache_dir": cache}, 16, 2, 0)
    with pytest.raises(ValueError, match="needs data.packing=documents"):
        build_data({"passkey_rate": 0.1, "cache_dir": cache}, 16, 2, 0)
    with pytest.raises(ValueError, match="passkey_rate"):
        build_data({"passkey_rate": 1.5, "packing": "documents", "cache_dir": cache}, 16, 2, 0)
    with pytest.raises(ValueError, match="unsupported extension"):
        (tmp_path / "x.csv").write_text("a,b", encoding="utf-8")
        build_data({"kind": "files", "paths": [str(tmp_path / "x.csv")], "cache_dir": cache}, 16, 2, 0)
    # nothing was tokenised by any of these
    assert not (tmp_path / "c" / "tokens").exists() or not list((tmp_path / "c" / "tokens").glob("*.tokens"))


def test_unknown_hub_tokenizer_named(tmp_path, monkeypatch):
    """A name that is neither a path nor loadable raises an error naming it (offline here)."""
    ok = tmp_path / "ok.txt"
    ok.write_text(DOCS[0], encoding="utf-8")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import transformers

    def refuse(*args, **kwargs):  # stand-in for a failed hub lookup, without touching the network
        raise OSError("not a valid model identifier (offline)")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    with pytest.raises(ValueError, match="unknown tokenizer 'no-such-org/no-such-tokenizer'"):
        build_data({"kind": "files", "paths": [str(ok)], "tokenizer": "no-such-org/no-such-tokenizer",
                    "cache_dir": str(tmp_path / "c")}, 16, 2, 0)


def test_sharded_bundles_disjoint(tmp_path):
    for i in range(12):  # no repeated text, so equal rows would mean the same window
        text = " ".join(str(1000 * i + j) for j in range(30))
        (tmp_path / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    cfg = {"kind": "files", "paths": [str(tmp_path)], "cache_dir": str(tmp_path / "c"), "val_fraction": 0.0}
    rows = []
    for rank in range(2):
        b = build_data(cfg, seq_len=16, micro_batch=2, seed=3, rank=rank, world_size=2)
        rows.append({tuple(r.tolist()) for _ in range(3) for r in next(b.train_loader)["input_ids"]})
    assert len(rows[0]) == len(rows[1]) == 6 and not rows[0] & rows[1]


@pytest.mark.slow
def test_embedded_long_fills_1m_rows_offline(tmp_path):
    """data=embedded_long: the KJV as one ~1.06M-token document fills a 1M row of its own (the
    next row starts with its tail), and the held-out text still fills a 1M validation row."""
    import yaml
    from pathlib import Path

    preset = Path(__file__).resolve().parents[2] / "conf" / "data" / "embedded_long.yaml"
    cfg = {**yaml.safe_load(preset.read_text()), "cache_dir": str(tmp_path / "c")}
    L = 1 << 20
    b = build_data(cfg, seq_len=L, micro_batch=1, seed=0)
    assert b.stats["kind"] == "embedded_long" and b.stats["rows"]["packing"] == "documents"
    rows = b.train_loader.rows
    kjv = max(range(len(rows.stream.doc_lengths)), key=lambda d: rows.stream.doc_lengths[d])
    assert 1_040_000 < rows.stream.doc_lengths[kjv] < 1_070_000 > L
    text = b.tokenizer.decode(rows.row(0)["input_ids"][:64].tolist())
    assert text.startswith("Genesis 1\n1 In the beginning God created")
    assert rows.row(0)["labels"][-1] != -100            # the KJV continues in another row
    assert b.val_loader is not None and len(b.val_loader) == 1
    assert b.stats["rows"]["padding_fraction"] < 0.35
