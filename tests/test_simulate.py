"""The simulator: a known response surface, code history in memory, and whole simulated nights."""

from __future__ import annotations

import math
import shutil
import sqlite3
import statistics
from pathlib import Path

import pytest

from nightlab.cli import main
from nightlab.sim import simulate
from nightlab.night.proposals import Context
from nightlab.sim.simulate import MemoryGit, SimulatedResearcher, Surface, merge3

TEMPLATE_ORG = Path(simulate.__file__).resolve().parents[1] / "template" / "org"
SOURCE = "DEPTH = 8  # layers\nASPECT_RATIO = 64  # width\nMATRIX_LR = 0.04  # lr\nWARMUP = 0.5  # share\n"


def _org(tmp_path: Path, researchers: int, backend: str = "simulated", reviewer: bool = True,
         lead: bool = True) -> Path:
    org = tmp_path / f"org-{researchers}-{backend}-{reviewer}-{lead}"
    org.mkdir()
    front = f"name: r\nkind: researcher\nbackend: {backend}\ncount: {researchers}"
    (org / "researcher.md").write_text(f"---\n{front}\n---\n")
    if reviewer:
        shutil.copy(TEMPLATE_ORG / "reviewer.md", org)
    if lead:
        shutil.copy(TEMPLATE_ORG / "lead.md", org)
    return org


def test_surface_is_lowest_at_its_optima_with_seed_noise_of_a_thousandth():
    surface = Surface({"DEPTH": 10.0, "MATRIX_LR": 0.02}, {"DEPTH": 0.02, "MATRIX_LR": 0.02}, floor=0.9,
                      baseline_text=simulate._masked(SOURCE))
    at_optimum = SOURCE.replace("DEPTH = 8", "DEPTH = 10").replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.02")
    assert surface.expected(at_optimum) == pytest.approx(0.9)
    assert surface.expected(SOURCE) == pytest.approx(0.9 + 0.02 * math.log(0.8) ** 2 + 0.02 * math.log(2) ** 2)
    values = [surface.measure(at_optimum, seed)[1] for seed in range(400)]
    assert statistics.mean(values) == pytest.approx(0.9, abs=0.0003)
    assert statistics.stdev(values) == pytest.approx(simulate.SEED_NOISE, rel=0.15)
    assert surface.measure(at_optimum, 7) == surface.measure(at_optimum, 7)  # same code and seed, same value
    far = SOURCE.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.5")  # 25x the optimum
    outcomes = [surface.measure(far, seed) for seed in range(40)]
    crashes = [o for o in outcomes if o[0] == "crash"]
    assert 5 < len(crashes) < 35 and all(o[2].startswith("NaN") and o[1] is None for o in crashes)
    # An edit that is not a constant has a fixed effect; one that changes nothing has none.
    edited = SOURCE + "x = 1\n"
    assert surface.expected(edited) != surface.expected(SOURCE)
    assert surface.expected(SOURCE.replace("# lr", "# learning rate")) != surface.expected(SOURCE)


def test_memory_git_commits_moves_changes_and_reports_conflicts(tmp_path):
    lab = tmp_path / "lab"
    lab.mkdir()
    (lab / "train.py").write_text(SOURCE)
    vcs = MemoryGit(lab, files=("train.py",))
    base = vcs.resolve(lab, "HEAD")
    a = vcs.worktree(lab, "a", base)
    (a / "train.py").write_text(SOURCE.replace("DEPTH = 8", "DEPTH = 9"))
    (a / "notes.txt").write_text("x")
    assert vcs.changed_files(a) == ["notes.txt", "train.py"]
    assert vcs.disallowed(vcs.changed_files(a), ("train.py",)) == ["notes.txt"]
    vcs.worktree_reset(a, base)
    assert vcs.changed_files(a) == [] and not (a / "notes.txt").exists()
    (a / "train.py").write_text(SOURCE.replace("DEPTH = 8", "DEPTH = 9"))
    deeper = vcs.commit_all(a, "deeper")
    assert vcs.read_file(lab, deeper, "train.py") == SOURCE.replace("DEPTH = 8", "DEPTH = 9").rstrip("\n")
    stats = vcs.diff_stats(lab, base, deeper)
    assert (stats.files, stats.added, stats.removed) == (("train.py",), 1, 1)
    assert "-DEPTH = 8" in vcs.diff(lab, base, deeper) and "+DEPTH = 9" in vcs.diff(lab, base, deeper)
    # A change of another, distant line carries onto the new commit; one of the same line does not.
    b = vcs.worktree(lab, "b", base)
    (b / "train.py").write_text(SOURCE.replace("WARMUP = 0.5", "WARMUP = 0.1"))
    assert vcs.move_changes(b, deeper)
    both = SOURCE.replace("DEPTH = 8", "DEPTH = 9").replace("WARMUP = 0.5", "WARMUP = 0.1")
    assert (b / "train.py").read_text() == both
    c = vcs.worktree(lab, "c", base)
    (c / "train.py").write_text(SOURCE.replace("DEPTH = 8", "DEPTH = 12"))
    assert not vcs.move_changes(c, deeper) and vcs.changed_files(c) == []
    assert merge3("a\nb\n", "a\nb\n", "a\nB\n") == "a\nB\n"
    assert merge3("a\nb\nc\n", "A\nb\nc\n", "a\nb\nC\n") == "A\nb\nC\n"


def test_simulated_researcher_follows_its_claim_and_avoids_failed_moves(tmp_path):
    (tmp_path / "train.py").write_text(SOURCE)
    researcher = SimulatedResearcher(seed=3)
    ctx = Context(program="", best_source={}, history="", claim="MATRIX_LR: try lower (untried)")
    proposal = researcher.propose(ctx, tmp_path)
    assert proposal.description.startswith("sim: MATRIX_LR 0.04→0.0")
    assert float(proposal.description.rsplit("→", 1)[1]) < 0.04
    for _ in range(6):
        researcher.observe(proposal, "discard", 1.0)
        (tmp_path / "train.py").write_text(SOURCE)
        proposal = researcher.propose(ctx, tmp_path)
    assert researcher.failed_moves[("MATRIX_LR", -1)] == 6


def test_a_simulated_night_loses_nothing_and_runs_nothing_twice(tmp_path):
    """Four simulated GPUs, four researchers, a lead and a reviewer: every proposal is one row, every
    row has a verdict, every trial is one measurement, every keep sits on the keep before it."""
    result = simulate.run("four", tmp_path / "lab", org_dir=_org(tmp_path, 4), experiments=150, workers=4)
    rows = [e for e in result.rows if e.kind == "experiment"]
    assert len(rows) == result.tally.rows and result.tally.proposals == len(rows) - result.tally.reapplied
    assert len(rows) >= 150 and all(e.finished for e in result.rows)
    with sqlite3.connect(tmp_path / "lab" / ".nightlab" / "store.db") as db:
        measured = db.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]
        twice = db.execute("SELECT COUNT(*) FROM (SELECT experiment_id, seed FROM measurements "
                           "GROUP BY experiment_id, seed HAVING COUNT(*) > 1)").fetchone()[0]
    assert measured == result.trainer_calls and twice == 0
    kept = sorted((e for e in result.rows if e.status == "keep"), key=lambda e: (e.finished_at, e.id))  # verdicts
    assert all(after.parent_commit == before.commit_sha for before, after in zip(kept, kept[1:]))
    assert {e.worker for e in rows if e.commit_sha} == {"sim0", "sim1", "sim2", "sim3"}
    assert len({e.agent for e in rows}) == 4
    agenda = (tmp_path / "lab" / "notes" / "agenda.md").read_text()
    assert "Written by the lead after" in agenda and "- " in agenda
    assert len({e.claim for e in rows if e.claim}) > 1  # researchers worked on different agenda items


def test_simulated_search_improves_on_the_baseline(tmp_path):
    """One worker, the search proposer (Optuna), the noise policy: the true value of the best goes down."""
    result = simulate.run("one", tmp_path / "lab", overrides=["run.agent=search"], experiments=60, workers=1)
    assert result.best_true < result.baseline_true - 0.002
    measured = [point[1] for point in result.curve]
    assert measured[-1] < measured[0] and len(result.curve) == 60


def test_nightlab_simulate_compares_two_orgs(tmp_path, capsys):
    one, four = _org(tmp_path, 1, lead=False), _org(tmp_path, 4)
    png = tmp_path / "curves.png"
    code = main(["simulate", "--org", str(one), "--org", str(four), "--experiments", "40", "--workers", "2",
                 "--png", str(png), "--dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 0
    assert "experiments" in out and str(one.name) in out and str(four.name) in out
    assert png.stat().st_size > 1000
