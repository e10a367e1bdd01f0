from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import GUTENBERG
from nightlab.lab import tokenizer as bpe

SAMPLES = [
    "It was the best of times, it was the worst of times.",
    "def f(x):\n    return x ** 2  # squares\n\n\n",
    "naïve café — 東京 🌙 ünïcödé",
    "a literal <|bos|> in the text stays text",
    "",
    "   \t\n  trailing   ",
]


@pytest.fixture(scope="module")
def trained() -> bpe.Tokenizer:
    texts = pq.read_table(GUTENBERG / "tiny.parquet", columns=["text"]).column("text").to_pylist()[:100]
    return bpe.train(texts, 400)


def test_round_trip_and_byte_lengths(trained: bpe.Tokenizer) -> None:
    assert trained.vocab_size == 400
    assert trained.bos_id == 399
    assert trained.token_bytes[trained.bos_id] == 0
    for text in SAMPLES:
        ids = trained.encode(text)
        assert trained.decode(ids) == text
        assert trained.bos_id not in ids
        assert all(0 <= i < trained.vocab_size for i in ids)
        assert int(trained.token_bytes[ids].sum()) == len(text.encode("utf-8"))
    assert trained.encode(SAMPLES[0], bos=True) == [trained.bos_id, *trained.encode(SAMPLES[0])]
    assert trained.encode_batch(SAMPLES) == [trained.encode(t) for t in SAMPLES]


def test_merges_make_tokens_longer_than_a_byte(trained: bpe.Tokenizer) -> None:
    text = "It was the best of times, it was the worst of times."
    assert len(trained.encode(text)) < len(text.encode("utf-8")) / 2
    assert trained.token_bytes.max() > 2


def test_save_and_load_give_the_same_tokenizer(trained: bpe.Tokenizer, tmp_path) -> None:
    trained.save(tmp_path)
    loaded = bpe.Tokenizer.load(tmp_path)
    assert loaded.vocab_size == trained.vocab_size and loaded.bos_id == trained.bos_id
    np.testing.assert_array_equal(np.load(tmp_path / bpe.TOKEN_BYTES_FILE), trained.token_bytes)
    for text in SAMPLES:
        assert loaded.encode(text) == trained.encode(text)


def test_training_reads_no_more_than_max_chars() -> None:
    seen, unseen = "ab " * 2000, "xyz " * 2000
    tok = bpe.train([seen, unseen], 300, max_chars=len(seen))
    learned = [token for token, rank in tok.mergeable_ranks.items() if len(token) > 1]
    assert learned and all(b"x" not in t and b"y" not in t for t in learned)


def test_a_small_corpus_keeps_bos_at_the_last_id() -> None:
    tok = bpe.train(["aaaa bbbb"], 1000)
    assert tok.vocab_size == 1000 and tok.bos_id == 999
    assert len(tok.token_bytes) == 1000
    assert tok.decode(tok.encode("aaaa bbbb")) == "aaaa bbbb"


def test_load_names_the_fix_when_missing(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nightlab prepare"):
        bpe.Tokenizer.load(tmp_path)
