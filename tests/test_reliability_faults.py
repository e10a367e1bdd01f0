"""Faults of a long night, thrown at the real loop (bench/reliability): every experiment gets a
truthful status, nothing is lost, duplicated or recorded against the wrong commit, the loop goes on,
and a canary API key is written nowhere."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests" / "fixtures" / "agents")]

from fixtures.standin.helpers import make_dataset  # noqa: E402
from reliability import faults  # noqa: E402
from reliability.canary import scan  # noqa: E402
from reliability.kill_campaign import campaign  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def _quiet(line: str) -> None:
    pass


@pytest.mark.slow
def test_every_fault_gets_a_truthful_status_and_the_loop_goes_on(tmp_path, data_dir):
    result = faults.fault_loop(tmp_path, data_dir, lock_s=3.0, say=_quiet)
    got = {r.fault: (r.status, r.reason) for r in result.rows}
    assert {fault: status for fault, (status, _) in got.items()} == {
        "a healthy change": "keep",
        "training killed by SIGKILL": "crash",
        "GPU out of memory": "crash",
        "host out of memory": "crash",
        "disk full while saving the checkpoint": "crash",
        "NaN loss": "crash",
        "ignores SIGTERM and leaves a child": "timeout",
        "evaluator killed by SIGKILL": "crash",
        "store locked by another connection": "discard",
        faults.HEALTHY: "discard",
    }
    assert got["training killed by SIGKILL"][1].startswith("killed by SIGKILL")
    assert "OutOfMemoryError" in got["GPU out of memory"][1]
    assert "MemoryError" in got["host out of memory"][1]
    assert "No space left on device" in got["disk full while saving the checkpoint"][1]
    assert got["NaN loss"][1].startswith("NaN")
    assert got["evaluator killed by SIGKILL"][1] == "evaluation failed: killed by SIGKILL (out of memory?)"
    assert any("holding an exclusive lock" in n for n in result.notes)
    assert "stale .git/index.lock in the lab: still there, untouched" in result.notes
    assert result.audit is not None and result.audit.breaches() == []
    assert result.continued


@pytest.mark.slow
def test_kill_9_of_nightlab_run_at_random_moments_loses_nothing(tmp_path, data_dir):
    result = campaign(tmp_path, data_dir, trials=4, seed=3, max_delay=8.0, say=_quiet)
    assert result.kills == 4
    assert result.breaches_after_kill == []
    assert result.final_exit == 0 and result.final_new_experiments >= 1
    assert result.audit is not None and result.audit.breaches() == []
    assert result.audit.statuses.get("keep", 0) >= 1 and result.audit.measurements >= 3


def test_api_outage_is_recorded_and_the_canary_key_is_written_nowhere(tmp_path, data_dir):
    from nightlab.report.write import write_report

    result, lab_dir, logs = faults.api_outage(tmp_path, data_dir, failed_proposals=5, say=_quiet)
    assert [r.status for r in result.rows] == ["agent_failed"] * 5 + ["keep"]
    assert [r.fault for r in result.rows][:5] == ["429 Too Many Requests", "500 Internal Server Error", "timeout",
                                                   "garbage body", "a reply with no edit"]
    assert "HTTP 429" in result.rows[0].reason and "after 3 attempts" in result.rows[0].reason
    assert "timed out" in result.rows[2].reason.lower()
    assert result.continued and result.audit is not None and result.audit.breaches() == []
    assert "the key reached the server: True" in result.notes[0]  # the canary was really used
    write_report(lab_dir)
    assert (lab_dir / ".nightlab" / "report" / "report.html").exists()
    assert scan(lab_dir, faults.CANARY, {"logs": logs}) == []
    assert "api" in logs and len(logs) > 1000  # the logs scanned hold the agent's and the loop's lines


def test_a_hanging_agent_cli_is_stopped_with_its_children(tmp_path, data_dir):
    result = faults.cli_hang(tmp_path, data_dir, timeout_s=1.0, say=_quiet)
    assert [r.status for r in result.rows] == ["agent_failed", "agent_failed"]
    assert all("ran past cli.timeout_s = 1 s" in r.reason for r in result.rows)
    assert result.notes == ["agent processes still alive afterwards: none"]
    assert result.continued and result.audit is not None and result.audit.breaches() == []


def test_canary_scan_finds_a_key_in_files_git_objects_and_logs(tmp_path):
    from fixtures.standin.helpers import git, make_lab

    lab_dir = make_lab(tmp_path / "lab")
    (lab_dir / "leak.txt").write_text(f"key={faults.CANARY}\n")
    git(lab_dir, "add", "leak.txt")
    git(lab_dir, "commit", "-qm", "oops")
    git(lab_dir, "rm", "-q", "leak.txt")
    git(lab_dir, "commit", "-qm", "removed, but still in history")
    found = scan(lab_dir, faults.CANARY, {"logs": f"Authorization: Bearer {faults.CANARY}", "clean": "nothing"})
    assert "leak.txt" not in found  # gone from the checkout...
    assert "git log -p --all" in found and any(f.startswith("git objects") for f in found)  # ...not from history
    assert "logs" in found and "clean" not in found


def test_a_kill_between_the_run_row_and_its_branch_is_resumable(tmp_path, data_dir):
    import types

    from fixtures.standin.helpers import git, lab_toml, make_lab, open_lab
    from nightlab.config import load
    from nightlab.night import git as real_git
    from nightlab.night.recovery import recover
    from nightlab.night.state import start_run
    from nightlab.night.store import Store

    class Killed(BaseException):
        pass

    def killed(*args):
        raise Killed

    lab_dir = make_lab(tmp_path / "lab", lab_toml())
    dying = types.SimpleNamespace(**{n: getattr(real_git, n) for n in dir(real_git) if not n.startswith("__")})
    dying.set_branch = killed
    with Store.open(lab_dir) as store, pytest.raises(Killed):
        start_run(lab_dir, store, load(lab_dir), "scripted", "t", False, vcs=dying)
    lab = open_lab(lab_dir, data_dir, tag="t", resume=True)  # `nightlab run --resume --tag t`
    recover(lab)
    assert git(lab_dir, "rev-parse", "nightlab/t") == git(lab_dir, "rev-parse", "HEAD") == lab.run.base_commit


def test_a_crash_on_a_really_full_disk_says_the_disk_is_full(tmp_path, data_dir):
    from nightlab.config import Config
    from nightlab.trial.runner import run_trial
    from reliability.standins import train_py

    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text(train_py("fault_disk_full", SHARPNESS=1.0))
    config = Config().with_overrides(["lab.budget_s=0.5", "lab.device='cpu'", "lab.eval_timeout_s=60"])
    with faults.small_disk(tmp_path / "disk", size="1m") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        result = run_trial(work, tmp_path / "disk" / "run", config, 0, data_dir=data_dir)
    assert result.status == "crash"
    assert "disk full after" in result.log_tail  # the fragment filled a real file system
    assert f"(the disk holding {tmp_path / 'disk' / 'run'} is full:" in result.reason
