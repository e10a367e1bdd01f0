"""`kill -9` of `nightlab run` during training and during evaluation, then `--resume`; and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.standin.helpers import STANDIN, git, lab_toml, make_dataset, make_lab, open_lab, set_constant
from nightlab.night.recovery import recover
from nightlab.trial.processes import group_alive
from nightlab.night.store import Store

SHARPER = {"file": "train.py", "old": "SHARPNESS = 0.5", "new": "SHARPNESS = 1.0"}
SLOWER = {"file": "train.py", "old": "SLEEP_S = 0.0", "new": "SLEEP_S = 4.0"}
NOISIER = {"file": "train.py", "old": "NOISE = 0.0", "new": "NOISE = 0.5"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def _lab(tmp_path: Path, steps: list[dict]) -> Path:
    lab_dir = make_lab(tmp_path / "lab", lab_toml(baseline_runs=1, confirm_runs=0),
                       set_constant(STANDIN.read_text(), "SHARPNESS", 0.5))
    (lab_dir / ".nightlab").mkdir()
    (lab_dir / ".nightlab" / "scripted.json").write_text(json.dumps(steps))
    return lab_dir


def _nightlab_run(lab_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nightlab", "run", "--agent", "scripted", "--lab", str(lab_dir), "--data",
            str(data_dir), "--tag", "t", "--max-experiments", "1", *extra]


def _wait_for_stage(lab_dir: Path, proc: subprocess.Popen, exp_id: int, stage: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "nightlab run exited early"
        if (lab_dir / ".nightlab" / "store.db").exists():
            with Store.open(lab_dir) as store:
                rows = store.experiments()
            if len(rows) >= exp_id and rows[exp_id - 1].stage == stage and rows[exp_id - 1].pgid:
                return rows[exp_id - 1]
        time.sleep(0.05)
    raise AssertionError(f"experiment {exp_id} never reached stage {stage}")


def _kill_and_resume(tmp_path: Path, data_dir: Path, steps: list[dict], stage: str) -> tuple[Path, str]:
    lab_dir = _lab(tmp_path, steps)
    proc = subprocess.Popen(_nightlab_run(lab_dir, data_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    row = _wait_for_stage(lab_dir, proc, 2, stage)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert group_alive(row.pgid), f"the {stage} process should outlive the killed loop (own session)"
    with Store.open(lab_dir) as store:
        assert store.get(2).status == "running" and store.measurements(2) == []

    resumed = subprocess.run(_nightlab_run(lab_dir, data_dir, "--resume"), capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert not group_alive(row.pgid)
    return lab_dir, resumed.stdout


def _assert_consistent(lab_dir: Path) -> None:
    with Store.open(lab_dir) as store:
        rows = store.experiments()
        assert [(e.kind, e.description, e.status) for e in rows] == [
            ("baseline", "baseline", "keep"), ("experiment", "sharper", "keep")]
        measured = store.measurements(2)
        assert [(m.kind, m.status) for m in measured] == [("first", "ok")]  # once, not twice
        assert rows[1].val_bpb == measured[0].val_bpb < rows[0].val_bpb
        assert rows[1].stage == "done" and rows[1].pgid is None
    commit = rows[1].commit_sha
    assert git(lab_dir, "rev-parse", "nightlab/t") == commit == git(lab_dir, "rev-parse", "refs/nightlab/exp/2")
    assert git(lab_dir, "rev-parse", f"{commit}^") == rows[0].commit_sha
    assert git(lab_dir, "log", "--format=%s", "nightlab/t").splitlines() == ["sharper", "initial lab"]
    tsv = (lab_dir / ".nightlab" / "results.tsv").read_text().splitlines()
    assert len(tsv) == 3 and tsv[2].startswith(commit[:7]) and tsv[2].endswith("keep\tsharper")
    summary = json.loads((lab_dir / ".nightlab" / "runs" / "2" / "summary.json").read_text())
    assert summary["num_steps"] == 1


@pytest.mark.slow
def test_kill_9_during_training_then_resume(tmp_path, data_dir):
    steps = [{"description": "sharper", "replace": [SHARPER, SLOWER]}]
    lab_dir, out = _kill_and_resume(tmp_path, data_dir, steps, "train")
    assert "#2: resuming (sharper)" in out
    _assert_consistent(lab_dir)


@pytest.mark.slow
def test_kill_9_during_evaluation_then_resume(tmp_path, data_dir):
    steps = [{"description": "sharper", "replace": [SHARPER]}]
    lab_dir, out = _kill_and_resume(tmp_path, data_dir, steps, "eval")
    assert "stopping the trial left running" in out
    _assert_consistent(lab_dir)


@pytest.mark.slow
def test_ctrl_c_finishes_the_current_experiment_and_exits_cleanly(tmp_path, data_dir):
    steps = [{"description": "sharper", "replace": [SHARPER, SLOWER]}, {"description": "noisier", "replace": [NOISIER]}]
    lab_dir = _lab(tmp_path, steps)
    command = _nightlab_run(lab_dir, data_dir)
    command[command.index("--max-experiments") + 1] = "5"
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_stage(lab_dir, proc, 2, "train")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "stopping after the current experiment" in out
    with Store.open(lab_dir) as store:  # "sharper" finished; the prepared "noisier" never started: --resume runs it
        assert [(e.description, e.status) for e in store.experiments()] == [
            ("baseline", "keep"), ("sharper", "keep"), ("noisier", "queued")]
        assert store.measurements(3) == []


def test_recover_restores_the_branch_and_refs_after_a_kill_between_writes(tmp_path, data_dir):
    lab_dir = _lab(tmp_path, [])
    lab = open_lab(lab_dir, data_dir)
    base = lab.run.base_commit
    work = git(lab_dir, "worktree", "add", "--detach", str(tmp_path / "w"), base) and tmp_path / "w"
    (work / "train.py").write_text(set_constant((work / "train.py").read_text(), "SHARPNESS", 1.0))
    git(work, "commit", "-qam", "sharper")
    commit = git(work, "rev-parse", "HEAD")
    # A keep recorded, then killed before the branch moved; and a committed row whose ref was never written.
    lab.store.add_experiment("t", kind="baseline", commit_sha=base, status="keep", stage="done")
    lab.store.add_experiment("t", commit_sha=commit, parent_commit=base, status="keep", stage="done")
    pending = lab.store.add_experiment("t", commit_sha=commit, parent_commit=commit, status="running", stage="train",
                                       pgid=2**22 + 12345)
    assert git(lab_dir, "rev-parse", "nightlab/t") == base
    unfinished = recover(lab)
    assert [e.id for e in unfinished] == [pending.id] and unfinished[0].status == "queued"
    assert unfinished[0].pgid is None
    assert git(lab_dir, "rev-parse", "nightlab/t") == commit
    assert git(lab_dir, "rev-parse", f"refs/nightlab/exp/{pending.id}") == commit


# What a kill right after any one write would leave, checked by SQLite as each write happens: a
# verdict without its numbers, or a trial's measurement before the row holds what the trial said.
HALF_WRITES = """
CREATE TEMP TRIGGER verdict_whole AFTER UPDATE OF status ON experiments
WHEN NEW.status IN ('keep', 'discard') AND (NEW.val_bpb IS NULL OR NEW.noise IS NULL)
BEGIN SELECT RAISE(ABORT, 'a verdict without its val_bpb and noise'); END;
CREATE TEMP TRIGGER trial_whole BEFORE INSERT ON measurements
WHEN (SELECT stage FROM experiments WHERE id = NEW.experiment_id) != 'judge'
BEGIN SELECT RAISE(ABORT, 'a measurement before the numbers of its trial'); END;
"""


def test_no_kill_leaves_a_verdict_or_a_trial_half_written(tmp_path, data_dir):
    from nightlab.agents.scripted import ScriptedProposer
    from nightlab.night.scheduler import run_single

    from fixtures.standin.helpers import constant_step

    lab_dir = make_lab(tmp_path / "lab", lab_toml(baseline_runs=1, confirm_runs=1),
                       set_constant(STANDIN.read_text(), "SHARPNESS", 0.5))
    lab = open_lab(lab_dir, data_dir)
    lab.store.conn.executescript(HALF_WRITES)
    steps = [constant_step("broken", "MODE", "crash"), constant_step("sharper", "SHARPNESS", 1.0)]
    run_single(lab, ScriptedProposer(steps), max_experiments=2)
    rows = lab.experiments()
    assert [(e.description, e.status) for e in rows] == [("baseline", "keep"), ("broken", "crash"), ("sharper", "keep")]
    assert all(e.val_bpb is not None and e.noise is not None for e in (rows[0], rows[2]))
    assert rows[1].error and rows[1].reason and rows[2].training_seconds is not None


def test_best_folder_holds_the_best_and_is_mended_on_resume(tmp_path):
    import shutil

    from nightlab.night.trials import measure_baseline
    from nightlab.night.recovery import recover

    lab_dir = make_lab(tmp_path / "lab", lab_toml(baseline_runs=1, confirm_runs=0),
                       set_constant(STANDIN.read_text(), "SHARPNESS", 0.5))
    lab = open_lab(lab_dir, make_dataset(tmp_path / "data"))
    baseline = measure_baseline(lab)
    best = lab_dir / ".nightlab" / "best"
    assert (best / "experiment.txt").read_text().split("\t")[0] == str(baseline.id)
    assert (best / "model.pt").exists() and (best / "train.py").read_text() == (lab_dir / "train.py").read_text()
    shutil.rmtree(best)  # as if killed between a keep's verdict and the copy
    recover(lab)
    assert (best / "experiment.txt").read_text().split("\t")[0] == str(baseline.id)
    # best/ of another experiment, and the old copy of a killed process that had this one's pid
    (best / "experiment.txt").write_text("99\tcommit\t1.0\tanother\n")
    left = lab_dir / ".nightlab" / f".best.{os.getpid()}.old"
    left.mkdir()
    (left / "model.pt").write_text("stale")
    recover(lab)
    assert (best / "experiment.txt").read_text().split("\t")[0] == str(baseline.id) and not left.exists()


@pytest.mark.slow
def test_a_second_ctrl_c_with_several_devices_stops_the_trials_now_and_resume_finishes_them(tmp_path, data_dir):
    from nightlab.trial.processes import group_alive

    long = {"file": "train.py", "old": "SLEEP_S = 0.0", "new": "SLEEP_S = 120.0"}
    lab_dir = _lab(tmp_path, [{"description": "sharper", "replace": [SHARPER, long]}])
    command = _nightlab_run(lab_dir, data_dir, "--devices", "cpu,cpu")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    row = _wait_for_stage(lab_dir, proc, 2, "train")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    out, _ = proc.communicate(timeout=60)
    assert time.monotonic() - started < 30, out  # not the 120 s the trial would have slept
    assert proc.returncode == 130, out
    assert not group_alive(row.pgid)
    with Store.open(lab_dir) as store:
        assert store.get(2).status == "running"  # unfinished, for --resume
