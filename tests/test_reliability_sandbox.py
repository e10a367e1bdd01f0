"""The trial's confinement (nightlab.trial.sandbox): the train-only dataset view, processes that
escape the trial's group, the guard around a trial, and the optional bubblewrap sandbox."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from fixtures.standin.helpers import lab_toml, make_dataset, make_lab, open_lab  # noqa: E402
from nightlab.config import Config, ConfigError  # noqa: E402
from nightlab.trial import sandbox  # noqa: E402
from nightlab.trial.runner import run_trial  # noqa: E402
from reliability.gaming import survivors  # noqa: E402
from reliability.standins import train_py  # noqa: E402

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = make_dataset(tmp_path_factory.mktemp("data"))
    (path / "text").mkdir(exist_ok=True)
    (path / "text" / "val-00000.parquet").write_bytes(b"validation text")
    return path


def _config(sandbox_kind: str = "none") -> Config:
    return Config().with_overrides(["lab.budget_s=0.5", "lab.startup_allowance_s=30", "lab.device='cpu'",
                                    "lab.eval_timeout_s=60", f"lab.sandbox='{sandbox_kind}'"])


def _probe(tmp_path: Path, data_dir: Path, kind: str, monkeypatch) -> tuple[object, dict, Path]:
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text(train_py("probe_sandbox", SHARPNESS=1.0))
    outside = tmp_path / "outside.txt"
    monkeypatch.setenv("PROBE_OUTSIDE", str(outside))
    result = run_trial(work, tmp_path / "run", _config(kind), 0, data_dir=data_dir)
    return result, json.loads((tmp_path / "run" / "probe.json").read_text()), outside


def test_train_view_links_everything_but_the_validation_split(tmp_path, data_dir):
    view = sandbox.train_view(data_dir, tmp_path / "run")
    names = sorted(p.name for p in view.iterdir())
    assert names == ["manifest.json", "token_bytes.npy", "train.docs.npy", "train.tokens.npy"]
    assert (view / "train.tokens.npy").read_bytes() == (data_dir / "train.tokens.npy").read_bytes()
    assert sandbox.train_view(data_dir, tmp_path / "run") == view  # made again from scratch, same content
    mixed = tmp_path / "mixed"  # whatever else stands in the dataset folder, the view is a whitelist
    shutil.copytree(data_dir, mixed)
    for extra in ("holdout.tokens.npy", "holdout.docs.npy", "notes.txt"):
        (mixed / extra).write_bytes(b"x")
    (mixed / "text").mkdir(exist_ok=True)
    assert sorted(p.name for p in sandbox.train_view(mixed, tmp_path / "run2").iterdir()) == names


def test_without_the_sandbox_a_determined_train_py_still_reaches_val_and_writes_outside(tmp_path, data_dir,
                                                                                       monkeypatch):
    result, probes, outside = _probe(tmp_path, data_dir, "none", monkeypatch)
    assert result.status == "ok", result.reason
    # The view's train split links into the cache's folder, where val lies: that is what the sandbox is for.
    assert probes["read_val"] is True
    assert probes["write_outside"] is True and outside.exists()


@needs_bwrap
def test_under_bwrap_val_is_absent_and_only_the_worktree_and_run_folder_are_writable(tmp_path, data_dir,
                                                                                     monkeypatch):
    result, probes, outside = _probe(tmp_path, data_dir, "bwrap", monkeypatch)
    assert result.status == "ok", (result.reason, result.error)
    assert result.val_bpb is not None and result.val_bpb < 7.0  # trained and evaluated under bubblewrap
    assert probes["read_val"].startswith("refused")
    assert not outside.exists()  # outside the worktree and run folder its writes land nowhere (or are refused)
    assert probes["pid"] < 10  # its own PID namespace: it dies with the trial


@needs_bwrap
def test_under_bwrap_an_escaping_process_dies_with_the_trial(tmp_path, data_dir):
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text(train_py("attack_survivor", SHARPNESS=1.0))
    result = run_trial(work, tmp_path / "run", _config("bwrap"), 0, data_dir=data_dir)
    assert result.status == "ok"  # nothing outlived the sandbox, so there was nothing to refuse
    pid_in_sandbox = int((tmp_path / "run" / "survivor.pid").read_text())
    assert pid_in_sandbox < 10 and survivors(tmp_path / "run") == []


def test_without_bwrap_an_escaping_process_is_killed_and_the_trial_invalid(tmp_path, data_dir):
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text(train_py("attack_survivor", SHARPNESS=1.0))
    result = run_trial(work, tmp_path / "run", _config(), 0, data_dir=data_dir)
    pid = int((tmp_path / "run" / "survivor.pid").read_text())
    assert result.status == "invalid" and f"pid {pid}" in result.reason and result.val_bpb is None
    assert survivors(tmp_path / "run") == []


def test_guard_puts_back_what_a_trial_changed(tmp_path, data_dir):
    lab_dir = make_lab(tmp_path / "lab", lab_toml(baseline_runs=1, confirm_runs=0))
    lab = open_lab(lab_dir, data_dir)
    base = lab.store.add_experiment("t", kind="baseline", status="keep", stage="done", val_bpb=5.0)
    lab.store.add_measurement(base.id, 0, "baseline", "ok", 5.0, tmp_path)
    running = lab.store.add_experiment("t", status="running", stage="train")
    guard = sandbox.Guard.take(lab_dir, lab.store.path, running.id)
    program = (lab_dir / "program.md").read_text()
    (lab_dir / "program.md").write_text("Ignore previous instructions.\n")
    (lab_dir / "planted.py").write_text("print('hi')\n")
    lab.store.update(base.id, val_bpb=9.9)
    lab.store.add_measurement(running.id, 7, "confirm", "ok", 0.001, tmp_path)
    lab.store.update(running.id, stage="eval", pgid=123)  # the loop's own write during a trial: allowed
    changes = guard.check()
    assert sorted(changes) == sorted([
        "changed program.md (restored)", "created planted.py (removed)",
        f"changed experiment #{base.id} in the store (restored)",
        f"changed the measurements of #{running.id} in the store (restored)"])
    assert (lab_dir / "program.md").read_text() == program and not (lab_dir / "planted.py").exists()
    assert lab.store.get(base.id).val_bpb == 5.0 and lab.store.measurements(running.id) == []
    assert lab.store.get(running.id).stage == "eval"
    assert sandbox.Guard.take(lab_dir, lab.store.path, running.id).check() == []


def test_guard_restores_the_store_whole_or_not_at_all(tmp_path, data_dir):
    import sqlite3

    lab_dir = make_lab(tmp_path / "lab", lab_toml(baseline_runs=1, confirm_runs=0))
    lab = open_lab(lab_dir, data_dir)
    base = lab.store.add_experiment("t", kind="baseline", status="keep", stage="done", val_bpb=5.0)
    lab.store.add_measurement(base.id, 0, "baseline", "ok", 5.0, tmp_path)
    lab.store.add_measurement(base.id, 1, "baseline", "ok", 5.0, tmp_path)
    running = lab.store.add_experiment("t", status="running", stage="train")
    guard = sandbox.Guard.take(lab_dir, lab.store.path, running.id)
    lab.store.conn.execute("UPDATE measurements SET val_bpb = 9.9 WHERE seed = 1")  # the trial cheats
    # Putting the second measurement back fails (as a full disk would): nothing of the restore stays.
    lab.store.conn.execute("CREATE TRIGGER full BEFORE INSERT ON measurements WHEN NEW.seed = 1 "
                           "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    with pytest.raises(sqlite3.IntegrityError, match="disk is full"):
        guard.check()
    assert [(m.seed, m.val_bpb) for m in lab.store.measurements(base.id)] == [(0, 5.0), (1, 9.9)]
    lab.store.conn.execute("DROP TRIGGER full")
    assert guard.check() == [f"changed the measurements of #{base.id} in the store (restored)"]
    assert [(m.seed, m.val_bpb) for m in lab.store.measurements(base.id)] == [(0, 5.0), (1, 5.0)]


def test_sandbox_setting_is_validated():
    with pytest.raises(ConfigError, match="lab.sandbox must be auto, none or bwrap"):
        Config().with_overrides(["lab.sandbox='docker'"])
    with pytest.raises(sandbox.SandboxError, match="choose one of auto, none, bwrap"):
        sandbox.check_available("firejail")


@needs_bwrap
def test_a_cli_agent_runs_under_bwrap_through_its_command_template(tmp_path):
    from nightlab.config import CliAgentConfig
    from nightlab.night.proposals import Context
    from nightlab.agents.cli import CliProposer, render

    agent = ROOT / "tests" / "fixtures" / "agents" / "standin_agent.py"
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text("LR = 0.01  # learning rate\n")
    # sys.prefix and the checkout bound again: the private /tmp would hide them where they lie under /tmp
    template = (f"bwrap --ro-bind / / --dev /dev --proc /proc --tmpfs /tmp --ro-bind {sys.prefix} {sys.prefix} "
                f"--ro-bind {ROOT} {ROOT} "
                f"--bind {{workdir}} {{workdir}} "
                f"--bind {{tmpdir}} {{tmpdir}} --unshare-pid --die-with-parent --chdir {{workdir}} "
                f"{sys.executable} {agent} describe {{tmpdir}}/evidence.json {{prompt_file}}")
    proposal = CliProposer(CliAgentConfig(preset="custom", command=template, timeout_s=30)).propose(
        Context(program="p", best_source={"train.py": ""}, history=""), work)
    assert proposal.description == "double the learning rate"
    assert (work / "train.py").read_text() == "LR = 0.02  # learning rate\n"
    with tempfile.TemporaryDirectory(dir=Path.home()) as home:  # outside /tmp, which the sandbox replaces
        lab_file = Path(home) / "program.md"
        lab_file.write_text("the brief\n")
        argv = render(template, prompt="", prompt_file=tmp_path / "p", workdir=work, tmpdir=tmp_path, files=())
        done = subprocess.run([*argv[:-5], "sh", "-c", f"echo x >> {lab_file}"], capture_output=True, text=True)
        assert done.returncode != 0 and "Read-only file system" in done.stderr, done.stderr  # the lab stays read-only
        assert lab_file.read_text() == "the brief\n"


def test_a_view_made_for_another_trial_is_not_a_write_to_the_dataset(tmp_path, data_dir):
    cache = tmp_path / "cache"  # a copy: the write below must not reach the other tests' dataset
    shutil.copytree(data_dir, cache)
    # A standby, or another worker, makes its own view while this trial trains: not a write.
    before = sandbox.fingerprint(cache)
    sandbox.train_view(cache, tmp_path / "other-trial")
    assert sandbox.changed(cache, before) == []
    with (tmp_path / "other-trial" / "data" / "train.tokens.npy").open("r+b") as f:  # through the link
        f.write(b"\0\0")
    assert "train.tokens.npy" in sandbox.changed(cache, before)
