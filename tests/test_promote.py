"""run.promote_budget_s: each new best trained again at a larger budget, scored, marked "holds at scale"."""

from __future__ import annotations

from pathlib import Path

from fixtures.standin.helpers import STANDIN, constant_step, lab_toml, make_dataset, make_lab, open_lab, set_constant

from nightlab.agents.scripted import ScriptedProposer
from nightlab.night.scheduler import run_single


def test_each_new_best_is_trained_at_the_larger_budget_and_marked(tmp_path: Path) -> None:
    data_dir = make_dataset(tmp_path / "data", holdout_tokens=4_000)
    toml = lab_toml(allowance_s=60.0, policy="greedy", confirm_runs=0) + "promote_budget_s = 1.5\n"
    lab_dir = make_lab(tmp_path / "lab", toml, set_constant(STANDIN.read_text(), "SHARPNESS", 0.5))
    lab = open_lab(lab_dir, data_dir)
    run_single(lab, ScriptedProposer([constant_step("sharper unigram", "SHARPNESS", 1.0)]), max_experiments=1)
    base, sharper = lab.experiments()
    scale = {c.best_id: c for c in lab.store.checks("t", "scale")}
    assert sorted(scale) == [base.id, sharper.id]  # the baseline is the reference at scale
    assert all(c.status == "ok" and c.budget_s == 1.5 and c.holdout_bpb is not None for c in scale.values())
    assert scale[sharper.id].val_bpb < scale[base.id].val_bpb
    assert sharper.status == "keep" and sharper.at_scale == "holds" and base.at_scale == ""
    assert "budget 1.5 s" in (Path(scale[sharper.id].run_dir) / "train.log").read_text()


def test_with_several_workers_promotions_run_beside_the_night(tmp_path: Path) -> None:
    from nightlab.night.store import Store
    from nightlab.sim import simulate

    result = simulate.run("t", tmp_path / "lab", experiments=24, workers=2, seconds=0.05,
                          overrides=["run.promote_budget_s=600"])
    keeps = [e for e in result.rows if e.status == "keep"]
    with Store.open(tmp_path / "lab") as store:
        scale = {c.best_id: c for c in store.checks("t", "scale")}
    assert len(keeps) >= 2 and sorted(scale) == [e.id for e in keeps]  # every best (the baseline and at least one), once
    assert all(c.status == "ok" and c.budget_s == 600 and c.holdout_bpb is not None for c in scale.values())
    assert all(e.at_scale in ("holds", "fails") for e in keeps if e.kind == "experiment")
    last = max(e.finished_at for e in result.rows if e.kind == "experiment")
    assert min(c.created_at for c in scale.values()) < last  # trained while the night went on
