"""``nightlab --help`` and every subcommand's help, against the snapshots in tests/snapshots/cli_help/.

The help is the CLI's contract (commands, flags, defaults drawn from the config dataclasses): a
change to it shows in review as a change to these files. When a change is meant, refresh them:

    NIGHTLAB_UPDATE_SNAPSHOTS=1 pytest tests/test_cli_help.py

The terminal width is fixed (COLUMNS) so the layout does not depend on the terminal. argparse lays
help out a little differently from one Python version to the next, so the snapshots are compared
on the version that wrote them (recorded in ``python-version``) and skipped on others.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nightlab.cli import build_parser, main
from nightlab.config import LabConfig

SNAPSHOTS = Path(__file__).parent / "snapshots" / "cli_help"
VERSION_FILE = SNAPSHOTS / "python-version"
COLUMNS = 100
UPDATE = os.environ.get("NIGHTLAB_UPDATE_SNAPSHOTS") == "1"
REFRESH = "refresh the snapshots with NIGHTLAB_UPDATE_SNAPSHOTS=1 pytest tests/test_cli_help.py"
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command line that has its own help: ``()``, ``("init",)``, ..., ``("org", "check")``."""
    yield words
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*words, name))


COMMANDS = list(commands(build_parser()))


def snapshot(words: tuple[str, ...]) -> Path:
    return SNAPSHOTS / f"{'-'.join(('nightlab', *words))}.txt"


@pytest.fixture(autouse=True)
def fixed_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", str(COLUMNS))
    if UPDATE:
        SNAPSHOTS.mkdir(parents=True, exist_ok=True)
        VERSION_FILE.write_text(PYTHON + "\n")
    elif VERSION_FILE.exists() and VERSION_FILE.read_text().strip() != PYTHON:
        pytest.skip(f"the help snapshots were written with Python {VERSION_FILE.read_text().strip()}, "
                    f"whose argparse lays help out differently from {PYTHON}'s")


@pytest.mark.parametrize("words", COMMANDS, ids=lambda words: " ".join(("nightlab", *words)))
def test_help_matches_its_snapshot(words: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([*words, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    path = snapshot(words)
    if UPDATE:
        path.write_text(text)
        return
    command = " ".join(("nightlab", *words, "--help"))
    assert path.exists(), f"`{command}` has no snapshot: {REFRESH}"
    assert text == path.read_text(), f"`{command}` differs from {path}; if the change is meant, {REFRESH}"


def test_every_snapshot_is_of_a_command() -> None:
    wanted = {snapshot(words) for words in COMMANDS}
    stale = set(SNAPSHOTS.glob("*.txt")) - wanted
    if UPDATE:
        for path in stale:
            path.unlink()
        return
    assert not stale, f"snapshots of commands that no longer exist: {sorted(p.name for p in stale)}; {REFRESH}"


def test_defaults_in_the_help_come_from_the_config() -> None:
    text = snapshot(("init",)).read_text()
    assert f"(default {LabConfig.budget_s:g})" in text and f"(default {LabConfig.dataset})" in text
    assert f"{LabConfig.vocab_size} unless set" in " ".join(snapshot(("prepare",)).read_text().split())
