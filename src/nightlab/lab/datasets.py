"""Datasets: from a spec (``pycode``, ``pycode:stdlib``, ``hostcode``, ``climbmix``, ``local:PATH``) to a prepared folder.

``prepare`` runs four steps into ``<cache>/datasets/<slug>/`` (layout in docs/architecture.md), each
skipped when its output is already there, each writing under a temporary name and renaming:

1. text: the documents as Parquet text shards in ``text/``, with the sources, the validation and
   holdout rules and the corpus hash in ``text/index.json``;
2. tokenizer: BPE learned from the train split only (``tokenizer.pkl``, ``token_bytes.npy``);
3. tokens: the three splits tokenized once (``train.tokens.npy``, ``train.docs.npy``, ``val.*``,
   ``holdout.*``);
4. ``manifest.json``: everything above in one record. Its presence means the dataset is ready.

The holdout is sealed: training never gets it, and the judge scores it for kept experiments only.
A ClimbMix folder prepared before the holdout existed gets it at its next ``prepare`` (its train
and val splits, tokenizer and corpus hash unchanged). ``pycode`` and ``local:PATH`` carve their
holdout out of what used to be training, so their folder names carry the recipe (``-r2``): the
old folder stays as it was, for replays of the runs made on it, and ``prepare`` says so.

A ``prepare`` holds an exclusive lock on ``.lock`` in the folder throughout, so a second one of the
same dataset (another lab sharing the cache) waits, then finds it ready. To rebuild from scratch,
delete the dataset folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import numpy as np

from nightlab import paths
from nightlab.lab import progress as progress_bars
from nightlab.lab import tokenizer as bpe
from nightlab.lab import climbmix, localtext, pycode, tokens
from nightlab.lab.shards import INDEX_FILE, SPLITS, DatasetError, TextIndex, iter_text_batches, shard_paths

SPECS = "pycode, pycode:stdlib, hostcode, climbmix or local:PATH"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"  # held by the prepare at work on the folder
TEXT_DIR = "text"
TOKENIZER_FILES = [bpe.TOKENIZER_FILE, bpe.TOKEN_BYTES_FILE]
TOKEN_FILES = [f"{split}.{kind}.npy" for split in SPLITS for kind in ("tokens", "docs")]


class DatasetNotPrepared(FileNotFoundError):
    """The dataset's folder has no manifest: ``nightlab prepare`` has not finished for it."""


@dataclass(frozen=True)
class DatasetSpec:
    kind: str  # pycode | climbmix | local
    scope: str = ""  # pycode: all | stdlib | host (the spec ``hostcode``)
    path: Path | None = None  # local: the folder, resolved

    def slug(self, num_shards: int = 8) -> str:
        """The folder name without the vocabulary size. ClimbMix's names its shard count, so labs
        that train on different counts never rebuild each other's data."""
        return self.slug_of_recipe(self.recipe(), num_shards)

    def recipe(self) -> int:
        """The version of the dataset's split recipe (1 for ClimbMix, which gained its holdout in place)."""
        return {"pycode": pycode.RECIPE, "local": localtext.RECIPE}.get(self.kind, 1)

    def slug_of_recipe(self, recipe: int, num_shards: int = 8) -> str:
        """The folder name the dataset had under ``recipe`` (recipe 1 names no version)."""
        suffix = f"-r{recipe}" if recipe > 1 else ""
        if self.kind == "climbmix":
            return f"climbmix-s{num_shards}"
        if self.kind == "pycode":
            return {"all": "pycode", "host": "hostcode"}.get(self.scope, f"pycode-{self.scope}") + suffix
        if self.kind == "local":
            assert self.path is not None
            name = re.sub(r"[^A-Za-z0-9_.]+", "-", self.path.name).strip("-.") or "data"
            return f"local-{name}-{hashlib.sha256(str(self.path).encode()).hexdigest()[:8]}{suffix}"
        return self.kind


def parse_spec(spec: str) -> DatasetSpec:
    kind, sep, arg = spec.strip().partition(":")
    if kind == "pycode" and arg in ("", "stdlib"):
        return DatasetSpec("pycode", scope=arg or "all")
    if kind == "hostcode" and not sep:
        return DatasetSpec("pycode", scope="host")
    if kind == "climbmix" and not sep:
        return DatasetSpec("climbmix")
    if kind == "local" and arg:
        return DatasetSpec("local", path=Path(arg).expanduser().resolve())
    raise DatasetError(f"unknown dataset {spec!r}: use {SPECS}")


def dataset_dir(spec: str, vocab_size: int, num_shards: int = 8, *, home: Path | None = None) -> Path:
    """``<home>/datasets/<slug>-v<vocab_size>``; the home defaults to ``$NIGHTLAB_HOME`` or ``~/.cache/nightlab``.
    ``num_shards`` counts for ClimbMix only."""
    base = Path(home) / "datasets" if home is not None else paths.datasets_home()
    return base / f"{parse_spec(spec).slug(num_shards)}-v{vocab_size}"


@dataclass(frozen=True)
class Prepared:
    dir: Path
    manifest: dict[str, Any]
    corpus_hash: str
    bos_id: int
    vocab_size: int


def open_prepared(spec: str, vocab_size: int, num_shards: int = 8, *, home: Path | None = None) -> Prepared:
    """The prepared dataset for ``spec`` and ``vocab_size``; fails with the command that prepares it."""
    directory = dataset_dir(spec, vocab_size, num_shards, home=home)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        shards = f" --num-shards {num_shards}" if parse_spec(spec).kind == "climbmix" else ""
        raise DatasetNotPrepared(f"dataset {spec} (vocab {vocab_size}) is not prepared in {directory}: run "
                                 f"`nightlab prepare --dataset {spec} --vocab-size {vocab_size}{shards}` first")
    manifest = json.loads(path.read_text())
    return Prepared(dir=directory, manifest=manifest, corpus_hash=manifest["corpus_hash"],
                    bos_id=int(manifest["bos_id"]), vocab_size=int(manifest["vocab_size"]))


def prepare(spec: str, vocab_size: int = 8192, num_shards: int = 8, *, home: Path | None = None,
            progress: bool = True, tokenizer_chars: int = bpe.TRAIN_CHARS) -> Path:
    """Build (or finish building) the dataset and return its folder. Safe to re-run: finished steps are kept.

    ``num_shards`` is the number of ClimbMix training shards (other datasets ignore it);
    ``tokenizer_chars`` bounds the train-split text the tokenizer learns from.
    """
    parsed = parse_spec(spec)
    directory = dataset_dir(spec, vocab_size, num_shards, home=home)
    home_dir = Path(home) if home is not None else paths.cache_home()
    if not (directory / MANIFEST_FILE).is_file():
        _say_if_recipe_changed(parsed, directory, vocab_size, num_shards, progress)
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory, progress):
        _steps(parsed, spec, directory, home_dir, vocab_size, num_shards, tokenizer_chars, progress)
    return directory


def _say_if_recipe_changed(parsed: DatasetSpec, directory: Path, vocab_size: int, num_shards: int,
                           progress: bool) -> None:
    """Tell a user whose dataset was prepared under an older recipe why it is built again, under a new name."""
    for recipe in range(parsed.recipe() - 1, 0, -1):
        old = directory.with_name(f"{parsed.slug_of_recipe(recipe, num_shards)}-v{vocab_size}")
        if (old / MANIFEST_FILE).is_file():
            _say(progress, f"{old.name} has no holdout split: its holdout is carved out of what was its train split, "
                           f"so this prepares a new dataset {directory.name} (train changes, val stays the same); "
                           f"{old.name} stays as it was for replays of the runs made on it")
            return


@contextlib.contextmanager
def _locked(directory: Path, progress: bool) -> Iterator[None]:
    """Hold the folder's lock; say so when another prepare has it, then wait for it."""
    lock = filelock.FileLock(directory / LOCK_FILE)
    try:
        lock.acquire(blocking=False)
    except filelock.Timeout:
        _say(progress, f"another nightlab prepare is preparing {directory.name}; waiting for it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _steps(parsed: DatasetSpec, spec: str, directory: Path, home_dir: Path, vocab_size: int, num_shards: int,
           tokenizer_chars: int, progress: bool) -> None:
    index = _text_step(parsed, directory, home_dir, num_shards, progress)
    tokenizer = _tokenizer_step(directory, vocab_size, tokenizer_chars, progress)
    for split in SPLITS:
        if not tokens.is_tokenized(directory, split):
            _remove(directory, [MANIFEST_FILE])
            tokens.tokenize_split(tokenizer, shard_paths(directory / TEXT_DIR, split), directory, split,
                                  progress=progress)
    if not (directory / MANIFEST_FILE).is_file():
        _write_manifest(directory, spec, index, tokenizer, tokenizer_chars)


def _say(enabled: bool, line: str) -> None:
    if enabled:
        print(line, flush=True)


def _remove(directory: Path, names: list[str]) -> None:
    """Delete outputs of later steps, which an earlier step's new output makes stale."""
    for name in names:
        (directory / name).unlink(missing_ok=True)


def _text_step(spec: DatasetSpec, directory: Path, home: Path, num_shards: int, progress: bool) -> TextIndex:
    text_dir = directory / TEXT_DIR
    if (text_dir / INDEX_FILE).is_file():
        index = TextIndex.load(text_dir)
        if index.holdout or spec.kind != "climbmix":
            return index
        return _add_holdout(index, directory, home, progress)
    _remove(directory, TOKENIZER_FILES + TOKEN_FILES + [MANIFEST_FILE])
    partial = directory / f"{TEXT_DIR}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(text_dir, ignore_errors=True)
    partial.mkdir()
    if spec.kind == "pycode":
        index = pycode.build(spec.scope, partial, progress=progress)
    elif spec.kind == "climbmix":
        index = climbmix.build(num_shards, partial, home / "downloads" / "climbmix", progress=progress)
    else:
        assert spec.path is not None
        index = localtext.build(spec.path, partial, progress=progress)
    index.save(partial)
    os.replace(partial, text_dir)
    return index


def _add_holdout(index: TextIndex, directory: Path, home: Path, progress: bool) -> TextIndex:
    """Give a ClimbMix folder prepared before the holdout existed its holdout shard, in place: the
    train and val splits, the tokenizer and the corpus hash stay as they are."""
    _say(progress, f"{directory.name}: adding the sealed holdout split ({climbmix.HOLDOUT_RULE}); "
                   "train, val, the tokenizer and the corpus hash stay as they are")
    text_dir = directory / TEXT_DIR
    # Downloaded and linked first: offline, the folder stays usable as it was (the error says so).
    index = climbmix.add_holdout(index, text_dir, home / "downloads" / "climbmix", progress=progress)
    _remove(directory, [f"holdout.{kind}.npy" for kind in ("tokens", "docs")] + [MANIFEST_FILE])
    index.save(text_dir)  # after the shard is linked: a kill before leaves the old index, and this runs again
    return index


def _tokenizer_step(directory: Path, vocab_size: int, max_chars: int, progress: bool) -> bpe.Tokenizer:
    if (directory / bpe.TOKENIZER_FILE).is_file() and (directory / bpe.TOKEN_BYTES_FILE).is_file():
        return bpe.Tokenizer.load(directory)
    _remove(directory, TOKEN_FILES + [MANIFEST_FILE])
    with progress_bars.bar(f"training the tokenizer (vocab {vocab_size})", None, enabled=progress) as bar:
        def texts():
            for batch in iter_text_batches(shard_paths(directory / TEXT_DIR, "train")):
                yield from batch
                bar.advance(len(batch))

        tokenizer = bpe.train(texts(), vocab_size, max_chars=max_chars)
    tokenizer.save(directory)
    return tokenizer


def _write_manifest(directory: Path, spec: str, index: TextIndex, tokenizer: bpe.Tokenizer,
                    tokenizer_chars: int) -> None:
    docs = {split: np.load(tokens.token_paths(directory, split)[1]) for split in SPLITS}
    for split in ("train", "val"):  # the holdout may be empty (a tiny local folder): then nothing scores it
        if len(docs[split]) < 2:  # a document's start and the end: at least one document
            raise DatasetError(f"dataset {spec}: the {split} split has no documents in {directory}; delete that "
                               "folder and run `nightlab prepare` again")
    val = np.load(tokens.token_paths(directory, "val")[0], mmap_mode="r")
    holdout = np.load(tokens.token_paths(directory, "holdout")[0], mmap_mode="r")
    manifest = {
        "spec": spec,
        "sources": index.sources,
        "split": index.split,
        "holdout": index.holdout,
        "corpus_hash": index.corpus_hash,
        "details": index.details,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "tokenizer": {"kind": "bpe (rustbpe, tiktoken)", "pattern": tokenizer.pattern,
                      "trained_on": f"the train split, at most {tokenizer_chars:,} characters"},
        "train_documents": len(docs["train"]) - 1,
        "val_documents": len(docs["val"]) - 1,
        "train_tokens": int(docs["train"][-1]),
        "val_tokens": int(docs["val"][-1]),
        "val_bytes": _byte_count(val, tokenizer.token_bytes),
        "holdout_documents": len(docs["holdout"]) - 1,
        "holdout_tokens": int(docs["holdout"][-1]),
        "holdout_bytes": _byte_count(holdout, tokenizer.token_bytes),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = directory / f".{MANIFEST_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, directory / MANIFEST_FILE)


def _byte_count(ids: np.ndarray, token_bytes: np.ndarray, chunk: int = 1 << 24) -> int:
    """UTF-8 bytes of a token stream, counted in chunks so a large split stays out of memory."""
    counts = np.zeros(len(token_bytes), dtype=np.int64)
    for start in range(0, len(ids), chunk):
        counts += np.bincount(ids[start:start + chunk], minlength=len(token_bytes))
    return int(counts @ token_bytes.astype(np.int64))
