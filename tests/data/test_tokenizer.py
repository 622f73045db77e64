import numpy as np
import pytest

from data.token_cache import token_dtype
from data.tokenizer import load_tokenizer


def test_embedded_gpt2_basics(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.eos_id == 50256
    # Known GPT-2 ids (from the published encoder.json): "Hello" = 15496, " world" = 995.
    assert gpt2.encode("Hello world") == [15496, 995]
    text = "In the beginning God created the heaven and the earth.\n\n  Tabs\tand ünïcödé ✓"
    assert gpt2.decode(gpt2.encode(text)) == text


def test_literal_endoftext_is_plain_text(gpt2):
    ids = gpt2.encode("a <|endoftext|> b")
    assert gpt2.eos_id not in ids  # a document cannot fake a boundary
    assert gpt2.decode(ids) == "a <|endoftext|> b"


def test_identity_depends_on_definition(gpt2):
    assert gpt2.identity == load_tokenizer("gpt2-embedded").identity
    assert len(gpt2.identity) == 64


def test_dtype_by_vocab():
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32


def test_unknown_tokenizer_path_named(tmp_path):
    missing = str(tmp_path / "no_such_tokenizer")
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        load_tokenizer(missing)


def test_hf_tokenizer_from_local_dir(tmp_path, gpt2):
    """A Hugging Face tokenizer directory (AutoTokenizer path) gives the same ids as the
    embedded GPT-2 when it holds the same BPE."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from data.tokenizer import _gpt2_files

    bpe = ByteLevelBPETokenizer.from_file(*_gpt2_files())
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    hf.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.eos_id == 50256 and tok.vocab_size == 50257
    texts = ["Hello world", "To be, or not to be: that is the question.\n", "x <|endoftext|> y"]
    assert tok.encode_batch(texts) == gpt2.encode_batch(texts)
    assert tok.decode(tok.encode(texts[1])) == texts[1]
    assert tok.identity != gpt2.identity  # different wrapper class: keyed apart
    with pytest.raises(ValueError, match="eos_token"):
        load_tokenizer(str(tmp_path / "tok"), eos_token="<|no_such_token|>")
