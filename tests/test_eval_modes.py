"""bench/eval_modes.py: the other ways of scoring a trained model, on the evaluator's toy model."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluate import BOS, FIXTURES, SEQ_LEN, toy_weights, write_dataset

from nightlab.lab import evaluate as ev

spec = importlib.util.spec_from_file_location("eval_modes", Path(__file__).resolve().parents[1] / "bench/eval_modes.py")
modes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(modes)


def bpb(model, val: ev.ValSplit, rows: tuple) -> float:
    inputs, targets, first = rows
    nats, nbytes, _ = modes._score_rows(model, inputs, targets, first, val, "cpu", batch_size=3)
    return nats / (math.log(2) * nbytes)


@pytest.fixture
def toy(tmp_path: Path):
    data = write_dataset(tmp_path / "data", docs=40)
    weights = tmp_path / "model.pt"
    toy_weights(weights)
    model = ev.load_model(FIXTURES / "toy_train.py", weights, "cpu", data_dir=data, preset=None)
    return model, ev.read_val_split(data), data, weights


def test_stream_scores_what_the_evaluator_scores_over_the_full_windows(toy) -> None:
    model, val, data, weights = toy
    full = (len(val.tokens) - 1) // SEQ_LEN * SEQ_LEN
    expected = ev.evaluate(FIXTURES / "toy_train.py", weights, data, seq_len=SEQ_LEN, max_tokens=full)["val_bpb"]

    with torch.inference_mode():
        got = bpb(model, val, modes.stream_rows(val, SEQ_LEN, BOS, prefix=False))

    assert got == pytest.approx(expected, rel=1e-6)


def test_bos_prefix_scores_the_same_targets_with_bos_in_front(toy) -> None:
    model, val, _, _ = toy
    with torch.inference_mode():
        model.pos.zero_()  # the toy's prediction now depends on the previous token alone
        plain = bpb(model, val, modes.stream_rows(val, SEQ_LEN, BOS, prefix=False))
        prefixed = modes.stream_rows(val, SEQ_LEN, BOS, prefix=True)
        assert (prefixed[0][:, 0] == BOS).all() and prefixed[0].shape[1] == SEQ_LEN + 1
        assert bpb(model, val, prefixed) == pytest.approx(plain, rel=1e-9)


def test_doc_heads_are_the_beginnings_of_the_val_documents_in_order(toy) -> None:
    _, val, data, _ = toy
    inputs, targets = modes.head_rows(val, SEQ_LEN, BOS)
    assert (inputs[:, 0] == BOS).all()
    assert (inputs[:, 1:] == targets[:, :-1]).all()

    rows = np.concatenate([inputs, targets[:, -1:]], axis=1).ravel()
    pieces = np.split(rows, np.flatnonzero(rows == BOS)[1:])
    offsets = np.load(data / "val.docs.npy")
    docs = [val.tokens[a:b] for a, b in zip(offsets, offsets[1:])]
    assert len(pieces) > len(inputs)  # rows hold several documents
    for piece, doc in zip(pieces, docs):
        assert len(piece) <= SEQ_LEN + 1
        assert (piece == doc[: len(piece)]).all()
