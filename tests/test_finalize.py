"""The sealed holdout scored on keeps, and ``nightlab finalize``: a chain of one real and one null keep
(stand-in train.py, real runner, judge, git and SQLite), ablated, pruned, killed and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.standin.helpers import STANDIN, constant_step, git, lab_toml, make_dataset, make_lab, open_lab, set_constant

from nightlab.agents.scripted import ScriptedProposer
from nightlab.cli import main
from nightlab.night import holdout
from nightlab.night.scheduler import run_single
from nightlab.night.store import Store
from nightlab.report.data import load_night
from nightlab.report.write import write_report

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), holdout_tokens=4_000)


def _drop_docstring_line(worktree: Path) -> str:
    path = worktree / "train.py"
    path.write_text(path.read_text().replace("measurable change. MODE picks a failure to act out.\n", ""))
    return "shorter docstring"


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory, data_dir) -> Path:
    """A finished night whose chain is a real keep (sharper) and a null one (a docstring line less).
    The tests below share it, in order: the holdout scores, finalize killed and run again, then pruned."""
    train_py = set_constant(STANDIN.read_text(), "SHARPNESS", 0.5)
    lab_dir = make_lab(tmp_path_factory.mktemp("night") / "lab",
                       lab_toml(allowance_s=60.0, baseline_runs=2, confirm_runs=0), train_py)
    lab = open_lab(lab_dir, data_dir)
    run_single(lab, ScriptedProposer([constant_step("sharper unigram", "SHARPNESS", 1.0), _drop_docstring_line]),
               max_experiments=2)
    lab.store.close()
    return lab_dir


def test_keeps_get_a_holdout_score_after_their_verdict(lab_dir, tmp_path, capsys):
    with Store.open(lab_dir) as store:
        rows = {e.description: e for e in store.experiments()}
        assert [rows[d].status for d in ("baseline", "sharper unigram", "shorter docstring")] == ["keep"] * 3
        for e in rows.values():
            scored = [m.holdout_bpb for m in store.measurements(e.id) if m.status == "ok"]
            assert e.holdout_bpb == pytest.approx(sum(scored) / len(scored)) and None not in scored
        base, sharper = rows["baseline"], rows["sharper unigram"]
        assert sharper.holdout_bpb < base.holdout_bpb - 0.05  # the real gain carries to the holdout
        assert sharper.holdout_bpb != sharper.val_bpb  # scored on other tokens
        carried = holdout.carry(base, rows["shorter docstring"])
        assert carried is not None and not carried.alarm and carried.holdout_gain > carried.val_gain / 2
    assert main(["status", "--json", "--lab", str(lab_dir)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["best"]["holdout_bpb"] == pytest.approx(rows["shorter docstring"].holdout_bpb)
    assert status["overfitting"] is False and "holdout gain" in status["holdout"]
    # the report draws val and holdout along the kept chain; results.tsv keeps autoresearch's columns
    files = write_report(lab_dir, tmp_path / "report")
    chart = files.html.with_name("holdout.png").read_bytes()
    assert chart.startswith(b"\x89PNG") and len(chart) > 10_000
    page, summary = files.html.read_text(), files.markdown.read_text()
    assert f"Sealed holdout: {status['holdout']}" in page and page.count("data:image/png") == 3  # the chart too
    assert f"- sealed holdout: {status['holdout']}" in summary
    assert files.results_tsv.read_text().splitlines()[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"


def test_the_alarm_rings_when_the_val_gain_does_not_carry(tmp_path):
    with Store(tmp_path / "store.db") as store:
        base = store.add_experiment("t", kind="baseline", status="keep", val_bpb=1.0, holdout_bpb=1.1, noise=0.001)
        fitted = store.add_experiment("t", status="keep", val_bpb=0.99, holdout_bpb=1.098, noise=0.001)
        carried_well = store.add_experiment("t", status="keep", val_bpb=0.99, holdout_bpb=1.094, noise=0.001)
        alarm, fine = holdout.carry(base, fitted), holdout.carry(base, carried_well)
    assert alarm is not None and alarm.alarm and "overfitting alarm" in alarm.text()
    assert fine is not None and not fine.alarm and "overfitting" not in fine.text()


def test_finalize_killed_then_run_again_loses_nothing(lab_dir, data_dir):
    command = [sys.executable, "-m", "nightlab", "finalize", "--lab", str(lab_dir), "--data", str(data_dir)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    with Store.open(lab_dir) as store:
        running: list = []
        while time.monotonic() < deadline:  # kill it while its second trial trains
            running = [c for c in store.checks("t") if c.status == "running" and c.pgid]
            if len(store.checks("t")) >= 2 and running:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = [c for c in store.checks("t") if c.status == "ok"]
        assert first and running, "the kill came while a trial of finalize was training"
        orphan = running[0]
        assert main(["finalize", "--lab", str(lab_dir), "--data", str(data_dir)]) == 0
        after = store.checks("t")
    assert all(c.status == "ok" and c.holdout_bpb is not None for c in after)
    assert len(after) == 3  # the best, and the best without each keep, once each
    for c in first:  # finished before the kill: recorded once, never run again
        assert next(a for a in after if a.id == c.id).created_at == c.created_at
    assert next(a for a in after if a.keep_id == orphan.keep_id).created_at != orphan.created_at
    with pytest.raises(ProcessLookupError):  # the trial left training by the kill was stopped
        os.killpg(orphan.pgid, 0)


def test_finalize_flags_the_null_keep_and_prunes_it(lab_dir, data_dir, capsys):
    assert main(["finalize", "--prune", "--lab", str(lab_dir), "--data", str(data_dir)]) == 0
    out = capsys.readouterr().out
    with Store.open(lab_dir) as store:
        rows = {e.description: e for e in store.experiments()}
        real, null = rows["sharper unigram"], rows["shorter docstring"]
        checks = store.checks("t")
    table = out.split("---\n", 1)[1]
    assert f"#{real.id:<5}" in table and f"#{null.id:<5}" in table
    real_line = next(line for line in table.splitlines() if line.startswith(f"#{real.id} "))
    null_line = next(line for line in table.splitlines() if line.startswith(f"#{null.id} "))
    assert " contributes" in real_line and "no longer contributes" in null_line
    assert "finalize [1/" in out  # progress
    # the pruned branch holds the real keep only: the sharper constant, the docstring line back
    final = git(lab_dir, "show", "nightlab/t-final:train.py")
    assert "SHARPNESS = 1.0" in final and "measurable change. MODE picks a failure to act out." in final
    pruned = [c for c in checks if c.kind == "pruned"]
    assert len(pruned) == 1 and pruned[0].status == "ok" and pruned[0].holdout_bpb is not None
    assert pruned[0].val_bpb == pytest.approx(real.val_bpb)
    assert all(c.status == "ok" and c.holdout_bpb is not None for c in checks)
    costs = {row.id: (val, held) for row, val, held in load_night(lab_dir).ablations()}  # what the report shows
    assert costs[real.id][0] > 0.1 and costs[real.id][1] > 0.1 and costs[null.id] == (0.0, 0.0)


def test_finalize_without_keeps_or_with_an_unknown_tag_is_one_line(tmp_path, data_dir, capsys):
    lab_dir = make_lab(tmp_path / "lab", lab_toml())
    assert main(["finalize", "--lab", str(lab_dir), "--data", str(data_dir)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    open_lab(lab_dir, data_dir, tag="empty").store.close()  # a run with no experiment yet
    assert main(["finalize", "--tag", "empty", "--lab", str(lab_dir), "--data", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no keeps" in err
    assert main(["finalize", "--tag", "nope", "--lab", str(lab_dir), "--data", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run 'nope'" in err and "empty" in err
