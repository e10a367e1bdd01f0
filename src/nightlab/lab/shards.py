"""Parquet text shards: a ``text`` column, one document per row, written and read in batches.

Every dataset is brought into this one form under ``<dataset dir>/text/`` (``train-00000.parquet``,
``val-00000.parquet``, ...), so the tokenizer and the token cache read all of them the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator


class DatasetError(Exception):
    """A dataset cannot be built: the message names the input and the fix."""


SPLITS = ("train", "val", "holdout")  # holdout: the sealed split, scored for kept experiments only

ROWS_PER_GROUP = 1024  # documents per Parquet row group
SHARD_CHARS = 256_000_000  # a shard rolls over after about this many characters


class ShardWriter:
    """Writes the documents of one split as ``<split>-00000.parquet``, ``<split>-00001.parquet``, ..."""

    def __init__(self, text_dir: Path, split: str) -> None:
        self.text_dir, self.split = Path(text_dir), split
        self.documents = 0
        self.chars = 0
        self._rows: list[str] = []
        self._writer = None
        self._shard = 0
        self._shard_chars = 0

    def add(self, text: str) -> None:
        self._rows.append(text)
        self.documents += 1
        self.chars += len(text)
        self._shard_chars += len(text)
        if len(self._rows) >= ROWS_PER_GROUP:
            self._flush()

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _flush(self) -> None:
        import pyarrow as pa  # deferred: heavy (0.1 s); only writing or reading shards needs it
        import pyarrow.parquet as pq

        if not self._rows:
            return
        table = pa.table({"text": pa.array(self._rows, type=pa.large_string())})
        if self._writer is None:
            path = self.text_dir / f"{self.split}-{self._shard:05d}.parquet"
            self._writer = pq.ParquetWriter(path, table.schema, compression="zstd")
        self._writer.write_table(table)
        self._rows = []
        if self._shard_chars >= SHARD_CHARS:
            self._writer.close()
            self._writer = None
            self._shard += 1
            self._shard_chars = 0


def shard_paths(text_dir: Path, split: str) -> list[Path]:
    """The shards of one split, in order."""
    return sorted(Path(text_dir).glob(f"{split}-*.parquet"))


def iter_text_batches(paths: list[Path], batch_size: int = ROWS_PER_GROUP) -> Iterator[list[str]]:
    """Lists of documents, in file order; rows with no text (null or empty) are skipped."""
    import pyarrow.parquet as pq  # deferred: heavy (0.1 s)

    for path in paths:
        file = pq.ParquetFile(path)
        if "text" not in file.schema_arrow.names:
            raise ValueError(f"{path} has no `text` column (columns: {', '.join(file.schema_arrow.names)}); "
                             "nightlab reads documents from a string column named `text`")
        for batch in file.iter_batches(batch_size=batch_size, columns=["text"]):
            texts = [t for t in batch.column(0).to_pylist() if t]
            if texts:
                yield texts


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


INDEX_FILE = "index.json"  # written last into text/: the text step is finished when it exists


@dataclass(frozen=True)
class TextIndex:
    """What ``text/`` holds: where the documents came from, how they were split, and the corpus hash."""

    sources: list[dict[str, Any]]  # [{name, sha256, bytes, split}, ...] or, for pycode, one entry per root
    split: str  # the validation rule, in words
    corpus_hash: str  # 16 hex digits, of the train and val text; printed beside every figure made from it
    details: dict[str, Any] = field(default_factory=dict)  # facts of one source (climbmix: num_shards)
    holdout: str = ""  # the holdout rule, in words; "" in a folder built before the holdout existed

    def save(self, text_dir: Path) -> None:
        (Path(text_dir) / INDEX_FILE).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, text_dir: Path) -> "TextIndex":
        return cls(**json.loads((Path(text_dir) / INDEX_FILE).read_text()))


def sources_hash(sources: list[dict[str, Any]], split_rule: str) -> str:
    """Corpus hash of a dataset made of whole files: SHA-256 over the rule and each train or val file's
    split and SHA-256 (holdout files are left out, so adding a holdout keeps the hash of train and val)."""
    lines = sorted(f"{s['split']} {s['sha256']}\n" for s in sources if s["split"] != "holdout")
    return hashlib.sha256((split_rule + "\n" + "".join(lines)).encode()).hexdigest()[:16]
