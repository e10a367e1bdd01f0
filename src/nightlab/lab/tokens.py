"""The token cache: each split tokenized once into memory-mappable arrays.

``<split>.tokens.npy`` (uint16) holds every document of the split, each preceded by BOS, in shard
order; ``<split>.docs.npy`` (int64) holds the offset of each document's BOS, then the total length.
Tokenizing runs on all cores (tiktoken releases the GIL while it encodes); tokens stream to a raw
temporary file, so memory stays flat however large the split, and the arrays appear under their
final names only when complete.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from nightlab.lab import progress as progress_bars
from nightlab.lab.shards import iter_text_batches
from nightlab.lab.tokenizer import Tokenizer

BATCH_DOCS = 4096  # documents read per batch
CHUNK_DOCS = 64  # documents one thread encodes per task
COPY_TOKENS = 1 << 24  # tokens copied per step from the raw file into the .npy


@dataclass(frozen=True)
class SplitTokens:
    documents: int
    tokens: int


def token_paths(directory: Path, split: str) -> tuple[Path, Path]:
    return Path(directory) / f"{split}.tokens.npy", Path(directory) / f"{split}.docs.npy"


def is_tokenized(directory: Path, split: str) -> bool:
    return all(p.is_file() for p in token_paths(directory, split))


def pack(batch: list[list[int]], bos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One uint16 stream of the documents, each preceded by BOS, and the documents' lengths (BOS included)."""
    lengths = np.fromiter((len(ids) + 1 for ids in batch), dtype=np.int64, count=len(batch))
    flat = np.empty(int(lengths.sum()), dtype=np.uint16)
    starts = np.cumsum(lengths) - lengths
    content = np.ones(len(flat), dtype=bool)
    content[starts] = False
    flat[starts] = bos_id
    flat[content] = np.fromiter(chain.from_iterable(batch), dtype=np.uint16, count=len(flat) - len(batch))
    return flat, lengths


def tokenize_split(tokenizer: Tokenizer, shards: list[Path], directory: Path, split: str, *,
                   progress: bool = True, threads: int | None = None) -> SplitTokens:
    """Tokenize the split's text shards into ``<split>.tokens.npy`` and ``<split>.docs.npy`` in ``directory``."""
    import pyarrow.parquet as pq  # deferred: heavy (0.1 s); only tokenizing reads shards

    if tokenizer.vocab_size > 1 << 16:
        raise ValueError(f"vocab_size {tokenizer.vocab_size} does not fit the uint16 token cache (at most 65536)")
    tokens_path, docs_path = token_paths(directory, split)
    raw = Path(directory) / f".{split}.tokens.{os.getpid()}.raw"
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
    threads = threads or os.cpu_count() or 1
    lengths: list[np.ndarray] = []

    def encode(texts: list[str]) -> list[list[int]]:
        return [tokenizer.encode(t) for t in texts]

    try:
        with open(raw, "wb") as out, ThreadPoolExecutor(threads) as pool, \
                progress_bars.bar(f"tokenizing {split}", rows, enabled=progress) as bar:
            for texts in iter_text_batches(shards, BATCH_DOCS):
                chunks = [texts[i:i + CHUNK_DOCS] for i in range(0, len(texts), CHUNK_DOCS)]
                flat, lens = pack(list(chain.from_iterable(pool.map(encode, chunks))), tokenizer.bos_id)
                out.write(flat.tobytes())
                lengths.append(lens)
                bar.advance(len(texts))
        doc_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        _raw_to_npy(raw, tokens_path, int(doc_lengths.sum()))
    finally:
        raw.unlink(missing_ok=True)
    offsets = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64)
    tmp = docs_path.with_name(f".{docs_path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, offsets)
    os.replace(tmp, docs_path)
    return SplitTokens(documents=len(doc_lengths), tokens=int(offsets[-1]))


def _raw_to_npy(raw: Path, path: Path, count: int) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint16, shape=(count,))
    with open(raw, "rb") as f:
        for start in range(0, count, COPY_TOKENS):
            chunk = np.fromfile(f, dtype=np.uint16, count=min(COPY_TOKENS, count - start))
            array[start:start + len(chunk)] = chunk
    array.flush()
    del array
    os.replace(tmp, path)
