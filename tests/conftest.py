"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
GUTENBERG = SHARED_DATA / "gutenberg_en_v1"


# ---------------------------------------------------------------------------------------------
# Data: a small prepared dataset, built once per test session
# ---------------------------------------------------------------------------------------------

TINY_VOCAB = 512


def gutenberg_sample(folder: Path) -> Path:
    """The shared tiny book sample as training text and the pinned validation books as `val*`."""
    folder.mkdir()
    (folder / "tiny.parquet").symlink_to(GUTENBERG / "tiny.parquet")
    (folder / "val.parquet").symlink_to(GUTENBERG / "val.parquet")
    return folder


def template_env(monkeypatch: pytest.MonkeyPatch, data: Path, out: Path | None = None) -> None:
    """The lab's variables for importing a train.py in this process on the CPU preset; with ``out``,
    also for running it there, for one second."""
    monkeypatch.setenv("NIGHTLAB_DATA", str(data))
    if out is not None:
        monkeypatch.setenv("NIGHTLAB_OUT", str(out))
        monkeypatch.setenv("NIGHTLAB_BUDGET_S", "1")
    monkeypatch.setenv("NIGHTLAB_DEVICE", "cpu")
    monkeypatch.setenv("NIGHTLAB_PRESET", "cpu")


@pytest.fixture(scope="session")
def prepared_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prepared-dataset folder of ``local:<folder holding tiny.parquet>`` with a 512-token vocabulary.

    About 1.1 M training tokens in 390 documents and 40 K validation tokens in 14 documents (the
    validation documents are chosen by the hash of their text). Its cache home is
    ``prepared_tiny.parents[1]``; ``manifest.json``'s ``spec`` names it for ``open_prepared``.
    Treat it as read-only: other tests share it.
    """
    from nightlab.lab import datasets

    source = tmp_path_factory.mktemp("tiny_text")
    (source / "tiny.parquet").symlink_to(GUTENBERG / "tiny.parquet")
    home = tmp_path_factory.mktemp("nightlab_home")
    return datasets.prepare(f"local:{source}", TINY_VOCAB, home=home, progress=False)
