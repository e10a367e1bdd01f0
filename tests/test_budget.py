"""A budget in training tokens: train.py stops at the same step however fast the machine runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import template_env
from fixtures.standin.helpers import STANDIN, lab_toml, make_dataset, make_lab, set_constant
from nightlab.config import load
from nightlab.lab import evaluate as ev
from nightlab.trial.runner import run_trial

TEMPLATE = Path(__file__).resolve().parents[1] / "src" / "nightlab" / "template" / "train.py"


def test_the_template_stops_at_the_token_budget_not_the_clock(
    prepared_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    template_env(monkeypatch, prepared_tiny, tmp_path / "out")
    monkeypatch.setenv("NIGHTLAB_BUDGET_S", "0.001")  # the clock alone would stop after the first step
    monkeypatch.setenv("NIGHTLAB_BUDGET_TOKENS", "10000")  # three steps of the CPU preset (4,096 tokens each)
    monkeypatch.syspath_prepend(str(TEMPLATE.parent))
    train = ev.import_train_py(TEMPLATE)
    assert train.TOTAL_BATCH_SIZE == 4096
    train.main()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["num_steps"], summary["total_tokens"], summary["budget_tokens"]) == (3, 3 * 4096, 10000)
    assert train.progress_of(0.0, 2) < 1.0 <= train.progress_of(0.0, 3)  # the schedule runs on tokens, not seconds


@pytest.mark.slow
def test_a_token_budget_stops_a_slow_and_a_fast_run_at_the_same_step(tmp_path: Path) -> None:
    data_dir = make_dataset(tmp_path / "data")
    fast_py = set_constant(STANDIN.read_text(), "STEP_WORK", 20_000)
    slow_py = set_constant(fast_py, "STEP_WORK", 80_000)  # four times the work a step: a slower machine
    summaries: dict[str, dict] = {}
    for name, source in (("fast", fast_py), ("slow", slow_py)):
        lab_dir = make_lab(tmp_path / name, lab_toml(allowance_s=30), source)
        for budget in ("tokens", "clock"):
            sets = ["lab.budget_tokens=20000", "lab.budget_s=0.05"] if budget == "tokens" else ["lab.budget_s=0.5"]
            result = run_trial(lab_dir, tmp_path / f"{name}-{budget}", load(lab_dir, sets), 0, data_dir=data_dir)
            assert result.status == "ok", result.reason
            summaries[f"{name} {budget}"] = result.summary
    # A budget in tokens: both stop at step 200 (0.05 s of wall clock would have stopped them far earlier).
    assert summaries["fast tokens"]["num_steps"] == summaries["slow tokens"]["num_steps"] == 200
    assert summaries["fast tokens"]["total_tokens"] == summaries["slow tokens"]["total_tokens"] == 20000
    assert summaries["slow tokens"]["training_seconds"] > 1.5 * summaries["fast tokens"]["training_seconds"]
    # A budget in seconds: the slow run trains fewer steps.
    assert summaries["slow clock"]["num_steps"] < 0.7 * summaries["fast clock"]["num_steps"]
