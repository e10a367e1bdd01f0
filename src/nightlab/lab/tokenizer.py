"""The BPE tokenizer: trained with ``rustbpe``, used through ``tiktoken``.

The vocabulary size counts the special tokens: ids ``0 .. vocab_size - 2`` are byte-pair tokens and
the last id is ``<|bos|>``, which starts every document. Should the training text offer fewer merges
than asked for, the ids in between stay unused, so the layout is the same for every corpus.
Saved as ``tokenizer.pkl`` (pattern, mergeable ranks, special tokens) and ``token_bytes.npy`` (the
UTF-8 length of each token, 0 for special tokens: the denominator of bits per byte).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import rustbpe
import tiktoken

BOS = "<|bos|>"
TOKENIZER_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.npy"
TRAIN_CHARS = 2_000_000_000  # the tokenizer learns from at most this many characters of the train split


class Tokenizer:
    def __init__(self, pattern: str, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int]) -> None:
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens = special_tokens
        self.vocab_size = max(max(mergeable_ranks.values()), max(special_tokens.values())) + 1
        self.bos_id = special_tokens[BOS]
        self._encoding = tiktoken.Encoding("nightlab", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                           special_tokens=special_tokens)
        self.token_bytes = np.zeros(self.vocab_size, dtype=np.int32)
        for token, rank in mergeable_ranks.items():
            self.token_bytes[rank] = len(token)

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        """Token ids of ``text``; special-token names in the text are ordinary text. ``bos`` prepends BOS."""
        ids = self._encoding.encode_ordinary(text)
        return [self.bos_id, *ids] if bos else ids

    def encode_batch(self, texts: list[str], *, bos: bool = False, num_threads: int | None = None) -> list[list[int]]:
        batch = self._encoding.encode_ordinary_batch(texts, num_threads=num_threads or os.cpu_count() or 1)
        return [[self.bos_id, *ids] for ids in batch] if bos else batch

    def decode(self, ids: Iterable[int]) -> str:
        return self._encoding.decode(list(ids))

    def save(self, directory: Path) -> None:
        """Write ``tokenizer.pkl`` and ``token_bytes.npy``, each to a temporary name first."""
        directory = Path(directory)
        state = {"pattern": self.pattern, "mergeable_ranks": self.mergeable_ranks,
                 "special_tokens": self.special_tokens}
        tmp = directory / f".{TOKEN_BYTES_FILE}.{os.getpid()}.tmp.npy"
        np.save(tmp, self.token_bytes)
        os.replace(tmp, directory / TOKEN_BYTES_FILE)
        tmp = directory / f".{TOKENIZER_FILE}.{os.getpid()}.tmp"
        tmp.write_bytes(pickle.dumps(state))
        os.replace(tmp, directory / TOKENIZER_FILE)

    @classmethod
    def load(cls, directory: Path) -> "Tokenizer":
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}: run `nightlab prepare` for this dataset first")
        state = pickle.loads(path.read_bytes())
        return cls(state["pattern"], state["mergeable_ranks"], state["special_tokens"])


def _bounded(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    left = max_chars
    for text in texts:
        if left <= 0:
            return
        yield text[:left]
        left -= len(text)


def train(texts: Iterable[str], vocab_size: int, *, max_chars: int = TRAIN_CHARS) -> Tokenizer:
    """Learn a BPE vocabulary of ``vocab_size`` ids (BOS included) from at most ``max_chars`` characters."""
    if not 257 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size = {vocab_size}: choose between 257 (256 bytes + BOS) and 65536")
    learner = rustbpe.Tokenizer()
    learner.train_from_iterator(_bounded(texts, max_chars), vocab_size - 1)
    ranks = {bytes(token): rank for token, rank in learner.get_mergeable_ranks()}
    return Tokenizer(learner.get_pattern(), ranks, {BOS: vocab_size - 1})
