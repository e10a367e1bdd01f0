"""A dataset from a local folder (``local:PATH``): ``.parquet`` (a ``text`` column), ``.jsonl`` (a ``text``
field per line) or ``.txt`` files (one document per file), searched recursively.

Validation split: the files whose name starts with ``val`` (``val.parquet``, ``val-0.jsonl``, ...).
When no file does, a document is validation when the first byte of the SHA-1 of its UTF-8 text is
below ``HASH_SPLIT_BELOW`` (about 5 % of the documents), so the split depends on the text alone.

Holdout split (sealed: scored for kept experiments only): the files whose name starts with
``holdout``. When no file does, the training documents whose SHA-1's first byte is at least
``HASH_SPLIT_BELOW`` and below twice that (another 5 %). Recipe 2; recipe 1 had no holdout and
trained on those documents, so the dataset's folder name changed with it.
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
HOLDOUT_PREFIX = "holdout"
HASH_SPLIT_BELOW = 13  # first SHA-1 byte below this: validation (13/256, about 5 %); below twice this: holdout
RECIPE = 2  # 2: the holdout split exists

FILE_RULE = "validation = the files whose name starts with 'val'; training = the other files"
HASH_RULE = (f"no file name starts with 'val': validation = the documents whose SHA-1 (of the UTF-8 text) "
             f"has a first byte below {HASH_SPLIT_BELOW} (about 5 %); training = the rest")
HOLDOUT_FILE_RULE = "holdout = the files whose name starts with 'holdout' (not in training)"
HOLDOUT_HASH_RULE = (f"no file name starts with 'holdout': holdout = the training documents whose SHA-1 (of the "
                     f"UTF-8 text) has a first byte from {HASH_SPLIT_BELOW} to {2 * HASH_SPLIT_BELOW - 1} (about 5 %)")


def list_files(folder: Path) -> list[Path]:
    """The data files under ``folder``, sorted by relative path; hidden files and folders are skipped."""
    files = [p for p in Path(folder).rglob("*")
             if p.suffix in SUFFIXES and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def is_val_file(path: Path) -> bool:
    return path.name.startswith(VAL_PREFIX)


def is_holdout_file(path: Path) -> bool:
    return path.name.startswith(HOLDOUT_PREFIX)


def document_split(text: str) -> str:
    """The split of a document by the hash of its text: val, holdout or train."""
    first = hashlib.sha1(text.encode("utf-8")).digest()[0]
    return "val" if first < HASH_SPLIT_BELOW else "holdout" if first < 2 * HASH_SPLIT_BELOW else "train"


def is_val_document(text: str) -> bool:
    return document_split(text) == "val"


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
    """Write the folder's documents into train/val/holdout text shards under ``text_dir``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"local:{folder}: no such folder; give a folder of .parquet, .jsonl or .txt files")
    files = list_files(folder)
    if not files:
        raise DatasetError(f"local:{folder}: no .parquet, .jsonl or .txt files in it")
    by_file = any(is_val_file(p) for p in files)
    holdout_by_file = any(is_holdout_file(p) for p in files)
    sources = []
    with ShardWriter(text_dir, "train") as train, ShardWriter(text_dir, "val") as val, \
            ShardWriter(text_dir, "holdout") as holdout, \
            progress_bars.bar(f"reading {folder.name}", len(files), enabled=progress) as bar:
        writers = {"train": train, "val": val, "holdout": holdout}
        for path in files:
            for texts in read_documents(path):
                for text in texts:
                    writers[split_of(path, text, by_file, holdout_by_file)].add(text)
            split = _file_split(path, by_file, holdout_by_file)
            sources.append({"name": path.relative_to(folder).as_posix(), "sha256": file_sha256(path),
                            "bytes": path.stat().st_size, "split": split})
            bar.advance()
    rule = FILE_RULE if by_file else HASH_RULE
    if train.documents == 0 or val.documents == 0:
        empty = "training" if train.documents == 0 else "validation"
        raise DatasetError(f"local:{folder}: the {empty} split is empty ({rule}); add documents to it")
    return TextIndex(sources=sources, split=rule, corpus_hash=sources_hash(sources, rule),
                     details={"folder": str(folder.resolve()), "recipe": RECIPE},
                     holdout=HOLDOUT_FILE_RULE if holdout_by_file else HOLDOUT_HASH_RULE)


def split_of(path: Path, text: str, by_file: bool, holdout_by_file: bool) -> str:
    """The split of one document of ``path``: by its file's name where the folder names that split
    (``by_file``: some file starts with ``val``; ``holdout_by_file``: with ``holdout``), else by its hash."""
    if holdout_by_file and is_holdout_file(path):
        return "holdout"
    if by_file and is_val_file(path):
        return "val"
    split = document_split(text)
    if (split == "val" and by_file) or (split == "holdout" and holdout_by_file):
        return "train"
    return split


def _file_split(path: Path, by_file: bool, holdout_by_file: bool) -> str:
    """A file's split as the index records it: val, holdout, train, or "by document" (its documents' hashes decide)."""
    if holdout_by_file and is_holdout_file(path):
        return "holdout"
    if by_file and is_val_file(path):
        return "val"
    return "train" if by_file and holdout_by_file else "by document"
