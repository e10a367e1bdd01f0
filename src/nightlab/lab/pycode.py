"""The ``pycode`` and ``hostcode`` datasets: source and text already on the machine, needing no network.

The recipe (the same on every machine, so the corpus and its hash can be rebuilt anywhere):

- roots: ``site.getsitepackages()`` plus ``sysconfig.get_paths()["stdlib"]``, walked with
  ``os.walk``; every file ending in ``.py`` whose bytes decode as UTF-8. ``pycode:stdlib`` walks the
  standard library only, without the ``site-packages``/``dist-packages`` folders inside it.
  ``hostcode`` (the GPU benchmark corpus, about twice ``pycode`` on a CUDA image) walks ``/usr``,
  ``/opt`` and ``/etc`` (symbolic links not followed) and keeps Python (``.py``, ``.pyi``), C, C++
  and CUDA sources and headers (``.c``, ``.h``, ``.cc``, ``.cpp``, ``.cxx``, ``.hpp``, ``.hh``,
  ``.cu``, ``.cuh``) and documentation text (``.rst``, ``.md``, ``.txt``), files of at most 1 MB;
- unique by the SHA-1 of the file's bytes (first one seen wins; same bytes, same text);
- corpus hash: SHA-256 of the 20-byte SHA-1 digests of all kept files, sorted and concatenated;
  the first 16 hex digits;
- validation: the files whose SHA-1 digest's first byte is 0, 1 or 2; the sealed holdout: those
  whose first byte is 3, 4 or 5 (recipe 2; recipe 1 had no holdout and trained on these files);
  training: the rest;
- documents: passages of a file. Split the text at blank lines (``\\n\\s*\\n``), drop empty pieces,
  cut a piece longer than 6,000 characters into 6,000-character pieces, and join consecutive
  pieces with ``\\n\\n`` while the passage stays within 6,000 characters.
"""

from __future__ import annotations

import hashlib
import os
import re
import site
import sysconfig
from pathlib import Path
from typing import Iterator

from nightlab.lab import progress as progress_bars
from nightlab.lab.shards import ShardWriter, TextIndex

SCOPES = ("all", "stdlib", "host")
HOST_ROOTS = ("/usr", "/opt", "/etc")
HOST_SUFFIXES = (".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".cu", ".cuh", ".rst", ".md", ".txt")
HOST_MAX_BYTES = 1 << 20  # larger files are generated tables and logs more than code or prose
PASSAGE_CHARS = 6000
VAL_FIRST_BYTES = (0, 1, 2)
HOLDOUT_FIRST_BYTES = (3, 4, 5)  # as many files as validation, taken from what recipe 1 trained on
RECIPE = 2  # 2: the holdout split exists; its files left the train split, so the dataset's folder name changed
BLANK_LINES = re.compile(r"\n\s*\n")
PACKAGE_FOLDERS = ("site-packages", "dist-packages")  # pruned from the stdlib walk of pycode:stdlib

SPLIT_RULE = "validation = the files whose SHA-1 digest's first byte is 0, 1 or 2; training = the rest"
HOLDOUT_RULE = "holdout = the files whose SHA-1 digest's first byte is 3, 4 or 5 (not in training)"


def roots(scope: str) -> list[Path]:
    """The folders the recipe walks, in order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if scope == "host":
        return [Path(p) for p in HOST_ROOTS]
    if scope == "stdlib":
        return [stdlib]
    return [Path(p) for p in site.getsitepackages()] + [stdlib]


def source_files(folders: list[Path], *, prune: tuple[str, ...] = (),
                 suffixes: tuple[str, ...] = (".py",)) -> Iterator[Path]:
    """Every file ending in one of ``suffixes`` under the folders, walked in sorted order so runs agree."""
    for root in folders:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in prune)
            for name in sorted(filenames):
                if name.endswith(suffixes):
                    yield Path(dirpath) / name


def passages(text: str) -> list[str]:
    """Cut a file's text into passages of at most ``PASSAGE_CHARS`` characters (see the recipe)."""
    pieces = []
    for piece in BLANK_LINES.split(text):
        pieces.extend(piece[i:i + PASSAGE_CHARS] for i in range(0, len(piece), PASSAGE_CHARS))
    out: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + 2 + len(piece) <= PASSAGE_CHARS:
            current += "\n\n" + piece
        else:
            if current:
                out.append(current)
            current = piece
    if current:
        out.append(current)
    return out


def corpus_hash(digests: list[bytes]) -> str:
    return hashlib.sha256(b"".join(sorted(digests))).hexdigest()[:16]


def build(scope: str, text_dir: Path, *, progress: bool = True) -> TextIndex:
    """Write the passages of every unique UTF-8 ``.py`` file into train/val/holdout text shards under ``text_dir``."""
    if scope not in SCOPES:
        raise ValueError(f"pycode scope {scope!r}: use one of {', '.join(SCOPES)}")
    folders = roots(scope)
    prune = PACKAGE_FOLDERS if scope == "stdlib" else ()
    suffixes = HOST_SUFFIXES if scope == "host" else (".py",)
    seen: set[bytes] = set()
    counts = {"files": 0, "bytes": 0, "not_utf8": 0, "duplicates": 0}
    with ShardWriter(text_dir, "train") as train, ShardWriter(text_dir, "val") as val, \
            ShardWriter(text_dir, "holdout") as holdout, \
            progress_bars.bar(f"reading {'source and text' if scope == 'host' else '.py'} files", None,
                              enabled=progress) as bar:
        for path in source_files(folders, prune=prune, suffixes=suffixes):
            bar.advance()
            try:
                if scope == "host" and (path.is_symlink() or path.stat().st_size > HOST_MAX_BYTES):
                    continue
                data = path.read_bytes()
            except OSError:
                continue  # a dangling link or an unreadable file is not part of the corpus
            digest = hashlib.sha1(data).digest()
            if digest in seen:
                counts["duplicates"] += 1
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                counts["not_utf8"] += 1
                continue
            seen.add(digest)
            counts["files"] += 1
            counts["bytes"] += len(data)
            writer = val if digest[0] in VAL_FIRST_BYTES else holdout if digest[0] in HOLDOUT_FIRST_BYTES else train
            for passage in passages(text):
                writer.add(passage)
    sources = [{"name": str(folder), "split": "by file"} for folder in folders]
    return TextIndex(sources=sources, split=SPLIT_RULE, corpus_hash=corpus_hash(list(seen)),
                     details={"scope": scope, "recipe": RECIPE, **counts}, holdout=HOLDOUT_RULE)
