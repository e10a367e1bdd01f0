from __future__ import annotations

import shutil
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from nightlab.lab.loader import TrainLoader

BOS = 0


def write_split(directory: Path, lengths: list[int]) -> np.ndarray:
    """train.* files whose content tokens are all distinct (1, 2, 3, ...), so each names its own position."""
    directory.mkdir(parents=True, exist_ok=True)
    parts, starts, next_token = [], [0], 1
    for n in lengths:
        parts.append(np.concatenate([[BOS], np.arange(next_token, next_token + n)]))
        next_token += n
        starts.append(starts[-1] + n + 1)
    tokens = np.concatenate(parts).astype(np.uint16)
    np.save(directory / "train.tokens.npy", tokens)
    np.save(directory / "train.docs.npy", np.asarray(starts, dtype=np.int64))
    return tokens


def first_epoch(loader: TrainLoader) -> list[np.ndarray]:
    """The rows (seq_len + 1 tokens each) of epoch 0."""
    rows = []
    for inputs, targets, epoch in loader:
        assert inputs.dtype == torch.int64 and targets.dtype == torch.int64
        assert inputs.shape == targets.shape == (loader.batch_size, loader.seq_len)
        if epoch > 0:
            return rows
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        rows.extend(torch.cat([inputs, targets[:, -1:]], dim=1).numpy())
    raise AssertionError("unreachable")


def segments(row: np.ndarray) -> list[np.ndarray]:
    """The pieces of a row: each from a BOS up to the next BOS."""
    cuts = np.flatnonzero(row == BOS)
    return [row[a + 1:b] for a, b in zip(cuts, [*cuts[1:], len(row)])]


@pytest.fixture
def varied(tmp_path: Path) -> tuple[Path, np.ndarray, list[int]]:
    rng = np.random.default_rng(7)
    lengths = [int(n) for n in rng.integers(1, 300, size=300)] + [700, 1500, 2500, 0]  # some longer than a row
    return tmp_path, write_split(tmp_path, lengths), lengths


def test_rows_start_with_bos_and_pieces_are_document_slices_in_order(varied) -> None:
    directory, tokens, lengths = varied
    loader = TrainLoader(directory, batch_size=4, seq_len=127, seed=3)
    doc_of = np.concatenate([np.full(n, d) for d, n in enumerate(lengths)])  # token t - 1 belongs to doc_of[t - 1]
    served_upto = {}
    for row in first_epoch(loader):
        assert row[0] == BOS
        for piece in segments(row):
            if len(piece) == 0:
                continue
            assert np.all(np.diff(piece.astype(np.int64)) == 1), "a piece is a contiguous run of one document"
            doc = doc_of[piece[0] - 1]
            assert doc_of[piece[-1] - 1] == doc
            assert served_upto.get(doc, piece[0] - 1) == piece[0] - 1, "a document's pieces come in order"
            served_upto[doc] = piece[-1]


def test_an_epoch_serves_every_token_once_except_its_last_incomplete_batch(varied) -> None:
    directory, tokens, lengths = varied
    for batch_size, seq_len in ((1, 127), (4, 127), (3, 1000)):
        loader = TrainLoader(directory, batch_size=batch_size, seq_len=seq_len, seed=0)
        served = Counter(int(t) for row in first_epoch(loader) for t in row if t != BOS)
        assert max(served.values()) == 1, "no token is served twice in an epoch"
        missing = int((tokens != BOS).sum()) - sum(served.values())
        assert 0 <= missing < batch_size * (seq_len + 1)


def test_bos_is_added_at_most_once_per_row(varied) -> None:
    directory, tokens, lengths = varied
    loader = TrainLoader(directory, batch_size=2, seq_len=255, seed=1)
    rows = first_epoch(loader)
    bos_served = sum(int((row == BOS).sum()) for row in rows)
    # every document brings its own BOS, and a split adds at most one more per row
    assert bos_served <= len(lengths) + len(rows)
    assert bos_served >= len(rows)


def test_same_seed_same_batches_other_seed_other_batches(varied) -> None:
    directory = varied[0]

    def first(seed: int) -> list[np.ndarray]:
        batches = iter(TrainLoader(directory, batch_size=2, seq_len=63, seed=seed))
        return [next(batches)[0].numpy() for _ in range(5)]

    assert all(np.array_equal(a, b) for a, b in zip(first(5), first(5)))
    assert not all(np.array_equal(a, b) for a, b in zip(first(5), first(6)))


def test_epochs_are_reshuffled(varied) -> None:
    loader = TrainLoader(varied[0], batch_size=2, seq_len=63, seed=0)
    assert not np.array_equal(loader.epoch_order(0), loader.epoch_order(1))
    epochs = {}
    for inputs, _, epoch in loader:
        epochs.setdefault(epoch, inputs.numpy())
        if epoch == 1:
            break
    assert not np.array_equal(epochs[0], epochs[1])


def test_real_dataset_uses_only_the_train_files(prepared_tiny: Path, tmp_path: Path) -> None:
    for name in ("train.tokens.npy", "train.docs.npy"):
        shutil.copy(prepared_tiny / name, tmp_path / name)
    loader = TrainLoader(tmp_path, batch_size=2, seq_len=256, seed=0)
    inputs, targets, epoch = next(iter(loader))
    assert epoch == 0 and inputs.shape == (2, 256)
    train = np.load(prepared_tiny / "train.tokens.npy")
    assert loader.bos_id == int(train[0])
    assert (inputs[:, 0] == loader.bos_id).all()
    starts = np.load(prepared_tiny / "train.docs.npy")
    docs = {train[a + 1:b].tobytes() for a, b in zip(starts[:-1], starts[1:])}
    for row in torch.cat([inputs, targets[:, -1:]], dim=1).numpy().astype(np.uint16):
        cuts = [*np.flatnonzero(row == loader.bos_id), len(row)]
        for a, b in zip(cuts[:-1], cuts[1:]):
            piece = row[a + 1:b].tobytes()
            assert any(piece in doc for doc in docs), "every piece is a slice of a training document"


def test_too_small_a_split_is_a_clear_error(tmp_path: Path) -> None:
    write_split(tmp_path, [10, 10])
    with pytest.raises(ValueError, match="fewer than one batch"):
        TrainLoader(tmp_path, batch_size=4, seq_len=64)


def test_missing_files_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nightlab prepare"):
        TrainLoader(tmp_path, batch_size=1, seq_len=8)


def test_closing_the_batches_stops_the_packing_thread(varied) -> None:
    # A thread still packing (inside torch) while the interpreter exits can abort a finished trial.
    before = set(threading.enumerate())
    batches = iter(TrainLoader(varied[0], batch_size=2, seq_len=63, seed=0))
    next(batches)
    packers = [t for t in set(threading.enumerate()) - before if t.name == "nightlab-train-loader"]
    assert len(packers) == 1 and packers[0].is_alive()
    batches.close()
    assert not packers[0].is_alive()
