import json
import os

import numpy as np

from data import build_data
from data.corpus import CorpusSpec, embedded_files, iter_embedded, shakespeare_work
from data.token_cache import open_or_build


def test_embedded_corpus_offline(embedded_cache, gpt2):
    cache, cache_dir = embedded_cache
    assert cache.meta["n_tokens"] > 1_000_000
    assert cache.n_documents > 50
    assert cache.n_documents == 1189 + 77  # Bible chapters + Shakespeare texts
    assert cache.tokens.dtype == np.uint16
    ends = cache.offsets[1:] - 1
    assert np.all(np.asarray(cache.tokens[ends]) == gpt2.eos_id)  # every document ends with eos
    assert int((np.asarray(cache.tokens) == gpt2.eos_id).sum()) == cache.n_documents
    docs = list(iter_embedded())
    for d in (0, 1188, 1189, cache.n_documents - 1):  # Genesis 1, Revelation 22, two plays
        text = docs[d].text if isinstance(docs[d].text, str) else docs[d].text.decode("utf-8")
        ids = cache.tokens[cache.offsets[d]: cache.offsets[d + 1] - 1]
        assert gpt2.decode(ids.tolist()) == text
    assert docs[0].text.startswith("Genesis 1\n1 In the beginning God created")
    # the two editions of a play share a hold-out group
    assert shakespeare_work("hamlet_gut_f.txt") == shakespeare_work("hamlet_gut.txt") == "hamlet"
    assert shakespeare_work("twelfe-night_gut_f.txt") == shakespeare_work("twelfth_night_gut.txt")
    groups = {d.group for d in docs}
    assert len(groups) == 1189 + 42  # 35 plays in two editions + 7 works in one


def test_embedded_build_data_uses_cache(embedded_cache):
    cache, cache_dir = embedded_cache
    mtime = os.stat(cache.prefix + ".tokens").st_mtime_ns
    bundle = build_data({"cache_dir": cache_dir, "val_fraction": 0.02}, seq_len=64,
                        micro_batch=2, seed=0)
    assert bundle.stats["cache_hit"] and bundle.stats["cache_path"] == cache.prefix
    assert os.stat(cache.prefix + ".tokens").st_mtime_ns == mtime  # not re-tokenised
    assert bundle.vocab_size == 50257 and bundle.eos_id == 50256
    s = bundle.stats
    assert s["train_tokens"] + s["val_tokens"] == s["tokens"] == cache.meta["n_tokens"]
    assert 0.02 <= s["val_tokens"] / s["tokens"] < 0.05
    assert s["skipped_empty"] == s["skipped_undecodable"] == 0
    batch = next(bundle.train_loader)
    assert batch["input_ids"].shape == (2, 64)
    assert len(list(bundle.val_loader)) == 8


def test_split_holds_out_whole_groups(embedded_cache):
    cache, _ = embedded_cache
    train, val = cache.split(0.05)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == cache.n_documents
    assert not set(cache.groups[val].tolist()) & set(cache.groups[train].tolist())
    val_tokens = cache.doc_lengths[val].sum()
    assert val_tokens >= 0.05 * cache.meta["n_tokens"]
    again_train, again_val = cache.split(0.05)
    np.testing.assert_array_equal(val, again_val)  # deterministic
    assert len(cache.split(0.0)[1]) == 0


def write_corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("The first document.\nIt has two lines.\n", encoding="utf-8")
    (d / "b.txt").write_text("Second document, café ✓.", encoding="utf-8")
    return d


def test_cache_reused_and_keyed(tmp_path, gpt2):
    corpus = write_corpus(tmp_path)
    cache_dir = str(tmp_path / "cache")
    spec = CorpusSpec(kind="files", paths=(str(corpus / "a.txt"), str(corpus / "b.txt")))
    first, hit1 = open_or_build(spec, gpt2, cache_dir)
    mtime = os.stat(first.prefix + ".tokens").st_mtime_ns
    second, hit2 = open_or_build(spec, gpt2, cache_dir)
    assert (hit1, hit2) == (False, True) and second.prefix == first.prefix
    assert os.stat(first.prefix + ".tokens").st_mtime_ns == mtime
    expected = gpt2.encode("The first document.\nIt has two lines.\n") + [gpt2.eos_id] + \
        gpt2.encode("Second document, café ✓.") + [gpt2.eos_id]
    assert np.asarray(second.tokens).tolist() == expected
    assert not any(n.endswith(".json") and "tmp" in n for n in os.listdir(os.path.dirname(first.prefix)))
    # another corpus (fewer files) -> another cache
    other, hit = open_or_build(CorpusSpec(kind="files", paths=(str(corpus / "a.txt"),)), gpt2, cache_dir)
    assert not hit and other.prefix != first.prefix
    # the same path with new content -> another cache
    (corpus / "b.txt").write_text("Changed.", encoding="utf-8")
    changed, hit = open_or_build(spec, gpt2, cache_dir)
    assert not hit and changed.prefix != first.prefix
    # another tokenizer -> another cache
    tok = _tiny_hf_tokenizer(tmp_path)
    keyed, hit = open_or_build(spec, tok, cache_dir)
    assert not hit and keyed.prefix not in (first.prefix, changed.prefix)
    assert np.asarray(keyed.tokens).tolist() == tok.encode("The first document.\nIt has two lines.\n") + \
        [tok.eos_id] + tok.encode("Changed.") + [tok.eos_id]
    with open(keyed.prefix + ".json") as f:
        assert json.load(f)["tokenizer"] == str(tmp_path / "tiny_tok")


def _tiny_hf_tokenizer(tmp_path):
    """A small word-level BPE trained on the spot and saved as a Hugging Face tokenizer dir."""
    from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from data.tokenizer import load_tokenizer

    raw = RawTokenizer(models.BPE(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(["The first document. It has two lines. Changed."] * 3,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]", "[EOS]"]))
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="[EOS]", unk_token="[UNK]").save_pretrained(
        tmp_path / "tiny_tok")
    return load_tokenizer(str(tmp_path / "tiny_tok"))


def test_embedded_package_files_found():
    bible, plays = embedded_files()
    assert bible.endswith(os.path.join("bible", "data", "kjv.jsonl"))
    assert len(plays) == 77 and all(p.endswith(".txt") for p in plays)


def test_concurrent_builders_share_one_build(tmp_path, gpt2):
    """Two builders at once (as ranks on one node): one tokenises, the other waits and maps it."""
    from concurrent.futures import ThreadPoolExecutor

    corpus = write_corpus(tmp_path)
    spec = CorpusSpec(kind="files", paths=(str(corpus / "a.txt"), str(corpus / "b.txt")))
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: open_or_build(spec, gpt2, str(tmp_path / "cache")), range(2)))
    assert sorted(hit for _, hit in results) == [False, True]
    assert results[0][0].prefix == results[1][0].prefix
    leftovers = [n for n in os.listdir(tmp_path / "cache" / "tokens") if ".tmp-" in n]
    assert leftovers == []
