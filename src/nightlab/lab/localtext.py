"""A dataset from a local folder (``local:PATH``): ``.parquet`` (a ``text`` column), ``.jsonl`` (a ``text``
field per line) or ``.txt`` files (one document per file), searched recursively.

Validation split: the files whose name starts with ``val`` (``val.parquet``, ``val-0.jsonl``, ...).
When no file does, a document is validation when the first byte of the SHA-1 of its UTF-8 text is
below ``HASH_SPLIT_BELOW`` (about 5 % of the documents), so the split depends on the text alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

from nightlab.lab import progress as progress_bars
from nightlab.lab.shards import DatasetError, ShardWriter, TextIndex, file_sha256, iter_text_batches, sources_hash

SUFFIXES = (".parquet", ".jsonl", ".txt")
VAL_PREFIX = "val"
HASH_SPLIT_BELOW = 13  # first SHA-1 byte below this: validation (13/256, about 5 %)

FILE_RULE = "validation = the files whose name starts with 'val'; training = the other files"
HASH_RULE = (f"no file name starts with 'val': validation = the documents whose SHA-1 (of the UTF-8 text) "
             f"has a first byte below {HASH_SPLIT_BELOW} (about 5 %); training = the rest")


def list_files(folder: Path) -> list[Path]:
    """The data files under ``folder``, sorted by relative path; hidden files and folders are skipped."""
    files = [p for p in Path(folder).rglob("*")
             if p.suffix in SUFFIXES and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def is_val_file(path: Path) -> bool:
    return path.name.startswith(VAL_PREFIX)


def is_val_document(text: str) -> bool:
    return hashlib.sha1(text.encode("utf-8")).digest()[0] < HASH_SPLIT_BELOW


def read_documents(path: Path) -> Iterator[list[str]]:
    """Batches of the non-empty documents of one file."""
    if path.suffix == ".parquet":
        yield from iter_text_batches([path])
    elif path.suffix == ".jsonl":
        batch: list[str] = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DatasetError(f"{path}:{number}: not a JSON object with a \"text\" field; each line of a "
                                       ".jsonl file must look like {\"text\": \"...\"}") from None
                if text:
                    batch.append(text)
        if batch:
            yield batch
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DatasetError(f"{path} is not UTF-8 text; convert it or remove it from the folder") from None
        if text:
            yield [text]


def build(folder: Path, text_dir: Path, *, progress: bool = True) -> TextIndex:
    """Write the folder's documents into train/val text shards under ``text_dir``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"local:{folder}: no such folder; give a folder of .parquet, .jsonl or .txt files")
    files = list_files(folder)
    if not files:
        raise DatasetError(f"local:{folder}: no .parquet, .jsonl or .txt files in it")
    by_file = any(is_val_file(p) for p in files)
    sources = []
    with ShardWriter(text_dir, "train") as train, ShardWriter(text_dir, "val") as val, \
            progress_bars.bar(f"reading {folder.name}", len(files), enabled=progress) as bar:
        for path in files:
            for texts in read_documents(path):
                for text in texts:
                    to_val = is_val_file(path) if by_file else is_val_document(text)
                    (val if to_val else train).add(text)
            split = ("val" if is_val_file(path) else "train") if by_file else "by document"
            sources.append({"name": path.relative_to(folder).as_posix(), "sha256": file_sha256(path),
                            "bytes": path.stat().st_size, "split": split})
            bar.advance()
    rule = FILE_RULE if by_file else HASH_RULE
    if train.documents == 0 or val.documents == 0:
        empty = "training" if train.documents == 0 else "validation"
        raise DatasetError(f"local:{folder}: the {empty} split is empty ({rule}); add documents to it")
    return TextIndex(sources=sources, split=rule, corpus_hash=sources_hash(sources, rule),
                     details={"folder": str(folder.resolve())})
