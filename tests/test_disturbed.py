"""A trial slowed from outside is set aside and run again, never judged nor counted in the noise.

Real processes: the stand-in train.py does real CPU work in steps, pinned to one CPU, and a busy
sibling process is pinned beside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.standin.helpers import STANDIN, constant_step, lab_toml, make_dataset, make_lab, open_lab, set_constant
from nightlab.agents.scripted import ScriptedProposer
from nightlab.night.outcome import outcome
from nightlab.night.policy import noise_width
from nightlab.night.scheduler import run_single
from nightlab.night.store import JUDGED_KINDS
from nightlab.night.trials import OUTSIDE, baseline_row, set_aside_disturbed
from nightlab.report.data import load_night
from nightlab.report.live import render_text, take_snapshot
from nightlab.report.markdown import render_markdown

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU pinning (Linux)")]

BUSY = "import os, sys; os.sched_setaffinity(0, {0}); sys.stdout.write('busy\\n'); sys.stdout.flush()\nwhile True: pass"


def _busy_sibling() -> subprocess.Popen:
    """A process that keeps CPU 0 busy, started and running before this returns."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "busy\n"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _working_standin() -> str:
    source = set_constant(STANDIN.read_text(), "STEP_WORK", 20_000)
    return set_constant(set_constant(source, "PIN_CPU", 0), "NOISE", 0.05)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def test_a_trial_slowed_by_a_busy_sibling_is_disturbed_rerun_and_left_out_of_the_noise(tmp_path, data_dir):
    toml = lab_toml(allowance_s=30, baseline_runs=2, confirm_runs=1).replace("budget_s = 0.5", "budget_s = 1.5")
    lab_dir = make_lab(tmp_path / "lab", toml + "noise_floor = 0.0\n", _working_standin())
    said: list[str] = []
    busy = _busy_sibling()  # shares CPU 0 with the baseline's first seed only

    def say(line: str) -> None:
        said.append(line)
        if line.startswith("#1 ok:"):
            _stop(busy)

    lab = open_lab(lab_dir, data_dir, say=say)
    try:
        run_single(lab, ScriptedProposer([constant_step("sharper", "SHARPNESS", 1.5)]), max_experiments=1)
    finally:
        _stop(busy)
    baseline = next(e for e in lab.experiments() if e.kind == "baseline")
    assert baseline.status == "keep" and baseline.disturbed >= 1, said  # others' load may slow another one too
    rows = lab.store.measurements(baseline.id, kinds=(*JUDGED_KINDS, "disturbed"))
    disturbed = [m for m in rows if m.kind == "disturbed"]
    judged = [m for m in rows if m.kind != "disturbed"]
    assert 0 in [m.seed for m in disturbed] and sorted(m.seed for m in judged) == [0, 1]  # same seed again
    slowed = next(m for m in disturbed if m.seed == 0)
    assert slowed.tok_per_s < 0.8 * max(m.tok_per_s for m in judged)
    assert slowed.val_bpb > min(m.val_bpb for m in judged)  # it trained less: believed, it would mislead
    assert "disturbed:" in slowed.reason and any("seed 0 disturbed" in line for line in said)
    assert slowed.outside_cores >= OUTSIDE and "cores busy" in slowed.reason  # the runner saw the sibling
    # The noise is that of the two undisturbed seeds, as if the busy process had never run.
    values = [m.val_bpb for m in judged]
    assert baseline.noise == pytest.approx(noise_width([values], floor=0.0))
    assert baseline.val_bpb == pytest.approx(sum(values) / 2)
    assert "standard deviation over" in next(e for e in lab.experiments() if e.kind == "experiment").reason
    # The live view (`nightlab status`), its JSON and the report show the disturbed trials and the budget.
    snap = take_snapshot(lab.store, lab_dir)
    assert snap.disturbed == baseline.disturbed and snap.to_dict()["budget"] == "1.5s"
    assert f"{snap.disturbed} disturbed trial(s) re-run" in render_text(snap)
    ended = outcome(lab.store, "t")
    assert ended.disturbed == baseline.disturbed and ended.experiments == 1
    assert f"{ended.disturbed} disturbed trial(s) re-run" in ended.text()
    report = render_markdown(load_night(lab_dir))
    assert "- budget: 1.5s" in report and "re-run with the same seed, never judged" in report


def test_a_trial_slow_while_the_machine_was_otherwise_idle_is_believed(tmp_path, data_dir):
    """Slowness is a disturbance only with the runner's evidence of other processes at work; else
    train.py slowed itself (as one could, on a run whose training loss disappoints, to have its
    seed drawn again), and the trial is judged like any other. Real store, real lab."""
    lab = open_lab(make_lab(tmp_path / "lab", lab_toml(), _working_standin()), data_dir)
    exp = baseline_row(lab)
    for seed, speed in ((1, 1000.0), (2, 1000.0)):
        lab.store.add_measurement(exp.id, seed, "baseline", "ok", 2.0, tmp_path, tok_per_s=speed, shape="s",
                                  outside_cores=0.0)
    lab.store.add_measurement(exp.id, 0, "baseline", "ok", 2.5, tmp_path, tok_per_s=400.0, shape="s",
                              outside_cores=0.05)  # slow, nothing else running
    assert set_aside_disturbed(lab, exp) == [] and lab.store.get(exp.id).disturbed == 0
    lab.store.add_measurement(exp.id, 3, "baseline", "ok", 2.5, tmp_path, tok_per_s=400.0, shape="s",
                              outside_cores=None)  # not measured: no evidence either
    assert set_aside_disturbed(lab, exp) == []
    lab.store.add_measurement(exp.id, 4, "baseline", "ok", 2.5, tmp_path, tok_per_s=400.0, shape="s",
                              outside_cores=1.6)  # slow while others kept 1.6 cores busy
    assert set_aside_disturbed(lab, exp) == [4] and lab.store.get(exp.id).disturbed == 1
    assert {m.seed for m in lab.store.measurements(exp.id)} == {0, 1, 2, 3}  # the believed stay judged
