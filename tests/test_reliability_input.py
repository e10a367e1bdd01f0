"""Bad input to the nightlab command: one line naming the problem and the fix, a non-zero exit, and
the lab exactly as it was (its files and its git state)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from fixtures.standin.helpers import git, lab_toml, make_dataset, make_lab
from nightlab.cli import main


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def _state(lab_dir: Path) -> dict:
    files = {str(p.relative_to(lab_dir)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
             for p in sorted(lab_dir.rglob("*")) if ".git" not in p.relative_to(lab_dir).parts}
    refs = git(lab_dir, "for-each-ref") if (lab_dir / ".git").exists() else ""
    status = git(lab_dir, "status", "--porcelain") if (lab_dir / ".git").exists() else ""
    return {"files": files, "refs": refs, "status": status}


def _toml(lab: Path, text: str) -> None:
    (lab / "nightlab.toml").write_text(text)
    git(lab, "commit", "-qam", "settings")


def _dirty(lab: Path) -> None:
    (lab / "train.py").write_text((lab / "train.py").read_text().replace("SHARPNESS = 1.0", "SHARPNESS = 0.7"))


def _scripted(lab: Path, text: str) -> None:
    (lab / ".nightlab").mkdir()
    (lab / ".nightlab" / "scripted.json").write_text(text)


CASES = [  # (name, how to break the lab, command after `nightlab`, what the one line must say)
    ("malformed nightlab.toml", lambda lab: _toml(lab, "[lab\nbudget_s = 1\n"), ["run"], "not valid TOML"),
    ("unknown setting", lambda lab: _toml(lab, "[lab]\nbudget = 1\n"), ["run"], "unknown key lab.budget; known keys"),
    ("bad setting value", lambda lab: _toml(lab, '[lab]\nbudget_s = "soon"\n'), ["run"], "budget_s = 'soon' is not"),
    ("unknown sandbox", lambda lab: _toml(lab, '[lab]\nsandbox = "docker"\n'), ["run"], "lab.sandbox must be auto, none"),
    ("unknown agent", lambda lab: None, ["run", "--agent", "gpt9"], "run.agent must be one of search, api, cli, scripted, got 'gpt9'"),
    ("malformed scripted steps", lambda lab: _scripted(lab, "{bad"), ["run", "--agent", "scripted"], "not valid JSON"),
    ("missing data", lambda lab: None, ["run", "--data", "/nonexistent/data"], "not a prepared dataset"),
    ("mis-laid data (the lab itself)", lambda lab: None, ["run", "--data", "."], "not a prepared dataset"),
    ("a dataset that cannot be prepared", lambda lab: None, ["prepare", "--dataset", "local:/nonexistent/x"],
     "no such folder; give a folder of .parquet"),
    ("not a git repository", lambda lab: shutil.rmtree(lab / ".git"), ["run"], "is not a git repository"),
    ("uncommitted train.py", _dirty, ["run", "--agent", "scripted"], "uncommitted changes"),
    ("state folder is a file", lambda lab: (lab / ".nightlab").write_text("x"), ["run"], "cannot write nightlab's state"),
    ("unknown device", lambda lab: None, ["run", "--devices", "foo"], "device 'foo': give GPU indices or cpu"),
]


@pytest.mark.parametrize("name, breaks, command, says", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_a_nonzero_exit_and_no_change(name, breaks, command, says, tmp_path, data_dir,
                                                            capsys, monkeypatch):
    lab = make_lab(tmp_path / "lab", lab_toml())
    breaks(lab)
    monkeypatch.chdir(lab)
    monkeypatch.setenv("NIGHTLAB_HOME", str(tmp_path / "home"))
    before = _state(lab)
    args = [*command, *(["--data", str(data_dir)] if command[0] == "run" and "--data" not in command else [])]
    code = main(args)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code != 0, out + err
    assert len(lines) == 1 and lines[0].startswith("nightlab: error: ") and says in lines[0], err
    assert "Traceback" not in out + err
    assert _state(lab) == before
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("*.npy"))


def test_read_only_lab_is_named_in_one_line(tmp_path, data_dir, capsys):
    lab = make_lab(tmp_path / "lab", lab_toml())
    (lab / ".nightlab").mkdir()
    (lab / ".nightlab" / "scripted.json").write_text(json.dumps([]))
    mount = subprocess.run(f"mount --bind {lab} {lab} && mount -o remount,ro,bind {lab}", shell=True,
                           capture_output=True)
    if mount.returncode != 0:
        pytest.skip("cannot mount the lab read-only here (needs root)")
    try:
        before = _state(lab)
        code = main(["run", "--agent", "scripted", "--lab", str(lab), "--data", str(data_dir)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0
        assert "cannot write nightlab's state" in err and "Read-only file system" in err
        assert _state(lab) == before
    finally:
        subprocess.run(["umount", str(lab)], capture_output=True)
