"""The trials' bytecode cache: filled by the lab's own child process, only read by trials."""

from __future__ import annotations

import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

from nightlab.trial import processes, pycache, runner

SOURCE = "VALUE = 1  # compiled into the cache\n"
CHANGED = "VALUE = 2  # only the source says so\n"


@pytest.fixture
def probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module ``nl_probe`` on the children's path, with no bytecode beside it."""
    src = tmp_path / "src"
    src.mkdir()
    module = src / "nl_probe.py"
    module.write_text(SOURCE)
    (src / "nl_other.py").write_text("OTHER = 3\n")  # never filled into the cache
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")  # as in the containers this cache is for
    monkeypatch.syspath_prepend(str(src))
    return module


def value_in_child(env: dict[str, str]) -> str:
    """nl_probe.VALUE as a child with ``env`` (and no bytecode setting of its own) sees it."""
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    done = subprocess.run([sys.executable, "-c", "import nl_probe, nl_other; print(nl_probe.VALUE)"],
                          env={**base, **env}, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_needed_where_a_module_has_no_bytecode_beside_its_source(probe: Path) -> None:
    assert pycache.needed("nl_probe")
    py_compile.compile(str(probe))
    assert not pycache.needed("nl_probe")
    assert not pycache.needed("no_such_module_anywhere")


def test_the_lab_fills_the_cache_once_and_trials_load_it_without_writing(tmp_path: Path, probe: Path) -> None:
    root = tmp_path / "pycache"
    proc = pycache.fill(root, ("nl_probe", "no_such_module_anywhere"), wait=True)
    assert proc is not None and proc.returncode == 0
    assert pycache.marker(root).exists()
    filled = files_under(root)
    assert any(p.name.startswith("nl_probe.") and p.suffix == ".pyc" for p in filled)
    assert pycache.fill(root, ("nl_probe",)) is None  # filled: nothing to start

    # Same size and time stamp, other text: Python trusts bytecode whose stamp matches its source.
    stat = probe.stat()
    probe.write_text(CHANGED)
    os.utime(probe, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    assert value_in_child(pycache.env(root)) == "1"  # the cached bytecode ran
    assert value_in_child({"PYTHONDONTWRITEBYTECODE": "1"}) == "2"  # without the cache: compiled again
    assert files_under(root) == filled  # the trial wrote nothing into the cache, not even nl_other's bytecode
    assert not list(probe.parent.glob("__pycache__"))


def test_trials_get_the_cache_only_where_it_is_needed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIGHTLAB_HOME", str(tmp_path / "home"))
    from nightlab.config import Config

    monkeypatch.setattr(pycache, "needed", lambda module="torch": True)
    env = processes.train_env(Config(), tmp_path, tmp_path, 0, "cpu", "cpu")
    assert env["PYTHONPYCACHEPREFIX"] == str(tmp_path / "home" / "pycache")
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"

    monkeypatch.setattr(pycache, "needed", lambda module="torch": False)
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    env = processes.train_env(Config(), tmp_path, tmp_path, 0, "cpu", "cpu")
    assert "PYTHONPYCACHEPREFIX" not in env
    assert pycache.fill() is None and not (tmp_path / "home" / "pycache").exists()


def test_prepare_fills_the_cache_before_the_first_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    from nightlab.cli import main

    books = tmp_path / "books"
    books.mkdir()
    for i in range(12):
        (books / f"book{i}.txt").write_text(f"Chapter {i}. The night was long and the lab was quiet. " * 40)
    (books / "val.txt").write_text("The morning came, and with it the report. " * 40)
    monkeypatch.setenv("NIGHTLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(pycache, "needed", lambda module="torch": True)  # as where torch has no bytecode
    monkeypatch.chdir(tmp_path)

    assert main(["prepare", "--dataset", f"local:{books}", "--vocab-size", "300"]) == 0
    root = tmp_path / "home" / "pycache"
    assert "bytecode cache ready" in capsys.readouterr().out
    assert pycache.marker(root).exists()  # done before prepare returned, not left to the first trial
    assert any(p.name.startswith("evaluate.") and p.suffix == ".pyc" for p in files_under(root))
