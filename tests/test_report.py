"""The night's facts behind the report: rows, parents, the running best, failures, timeline, costs, noise.

``simulated_night`` builds a lab the way the loop leaves one: real git commits made and recorded
by the loop's own ``admit``, rows and measurements written through the store's API, run folders
with logs and eval.json. The other report tests (HTML, plots, live view, export) build on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fixtures.standin.helpers import make_lab
from nightlab.config import Config, dumps
from nightlab.paths import state_dir
from nightlab.report import data
from nightlab.night import git
from nightlab.night.proposals import Proposal
from nightlab.night.state import Lab
from nightlab.night.proposals import admit, agent_failed
from nightlab.night.store import Store

T0 = datetime(2026, 3, 1, 22, 0, tzinfo=timezone.utc)
TRAIN_S, EVAL_S = 300.0, 24.0
OOM = ("Traceback (most recent call last):\n  File \"/lab/.nightlab/worktrees/train/train.py\", line 212, in <module>\n"
       "    main()\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate {gib:.2f} GiB. "
       "GPU 0 has a total capacity of 79.19 GiB")
SHAPES = ("Traceback (most recent call last):\n  File \"train.py\", line 88, in forward\n"
          "RuntimeError: mat1 and mat2 shapes cannot be multiplied (64x{a} and {b}x512)")
PROGRESS = "step {step:05d} | loss {loss:.4f} | lr x1.00 | 1.62M tok/s | mfu 45.1% | epoch 0 | {t:.0f}/300s"
# What each simulated experiment turns out to be, in order (baseline first, then these).
PLAN = ("keep discard discard oom discard keep invalid discard shape discard keep timeout discard discard "
        "nan keep discard oom discard agentfail discard keep discard discard discard shape keep discard").split()


@dataclass(frozen=True)
class SimulatedNight:
    lab: Path
    tag: str
    kept_descriptions: tuple[str, ...]  # in order, baseline first
    best_val: float
    running_id: int | None


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds")


def simulated_night(root: Path, plan: tuple[str, ...] | list[str] = PLAN, workers: int = 2,
                    running: bool = True, tag: str = "night1") -> SimulatedNight:
    """A lab after a night of ``plan`` on ``workers`` workers, optionally with one experiment still training."""
    lab_dir = make_lab(root / "lab")
    config = Config()
    base = git.resolve(lab_dir, "HEAD")
    rng = np.random.default_rng(7)
    store = Store.open(lab_dir)
    run = store.add_run(tag, git.branch_name(tag), base, "api", dumps(config))
    lab = Lab(lab_dir, config, lab_dir, store, run, say=lambda line: None)
    clock = {f"gpu{k}": T0 + timedelta(seconds=40 * k) for k in range(workers)}

    def finish_trials(exp_id: int, worker: str, values: list[float | None], status: str, baseline: bool = False,
                      **fields) -> None:
        start = clock[worker]
        store.update(exp_id, status="running", stage="train", started_at=_iso(start))
        run_dir = state_dir(lab_dir) / "runs" / str(exp_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        lines = [PROGRESS.format(step=s * 40, loss=4.0 - s * 0.1, t=s * 30) for s in range(1, 11)]
        (run_dir / "train.log").write_text("\n".join(lines) + "\n")
        if values and values[0] is not None:
            (run_dir / "eval.json").write_text(json.dumps({"status": "ok", "val_bpb": values[0], "eval_s": EVAL_S}))
        for k, value in enumerate(values):
            trial_status = "ok" if value is not None else status
            kind = "baseline" if baseline else "first" if k == 0 else "confirm"
            store.add_measurement(exp_id, k, kind, trial_status, value, run_dir)
        end = start + timedelta(seconds=(TRAIN_S + EVAL_S + 20) * max(len(values), 1))
        ok = [v for v in values if v is not None]
        judged = float(np.mean(ok)) if ok and status in ("keep", "discard") else None
        store.update(exp_id, status=status, stage="done", val_bpb=judged, training_seconds=TRAIN_S,
                     total_seconds=TRAIN_S + EVAL_S + 20, total_tokens=486_000_000, epochs=4.472, num_steps=400,
                     num_params=50_300_000, peak_memory_mb=44_000 + 100 * exp_id, mfu_percent=45.0,
                     finished_at=_iso(end), **fields)
        clock[worker] = end + timedelta(seconds=int(rng.integers(1, 30)))

    # The baseline: three seeds on the first worker.
    lab.worker = "gpu0"
    baseline = store.add_experiment(tag, kind="baseline", worker="gpu0", parent_commit=base, commit_sha=base,
                                    description="baseline", seed=0)
    git.set_ref(lab_dir, git.experiment_ref(baseline.id), base)
    best = 1.0
    finish_trials(baseline.id, "gpu0", [best + d for d in (0.0006, -0.0004, -0.0002)], "keep", baseline=True,
                  reason="baseline over 3 seed(s)", noise=0.0005)
    best = float(np.mean([best + d for d in (0.0006, -0.0004, -0.0002)]))
    kept = ["baseline"]
    best_commit = base
    sharpness = 1.0
    for i, outcome in enumerate(plan):
        worker = f"gpu{i % workers}"
        lab.worker = worker
        description = f"{outcome}: try sharpness {sharpness + 0.01 * (i + 1):.2f} <& escaped>"
        if outcome == "agentfail":
            exp = agent_failed(lab, best_commit, "api", "agent api failed: APITimeoutError: Request timed out.")
            store.update(exp.id, started_at=_iso(clock[worker]), finished_at=_iso(clock[worker] + timedelta(seconds=5)),
                         cost_usd=0.02)
            continue
        work = git.worktree(lab_dir, "propose", best_commit)
        if outcome == "invalid":
            (work / "prepare.py").write_text("# not allowed\n")
        else:
            text = (work / "train.py").read_text().replace(f"SHARPNESS = {sharpness!r}",
                                                           f"SHARPNESS = {sharpness + 0.01 * (i + 1)!r}")
            (work / "train.py").write_text(text + f"# experiment {i}\n")
        proposal = Proposal(description, rationale=f"because {i}", cost_usd=0.05 + 0.01 * i, tokens_in=20_000 + i,
                            tokens_out=1_500 + i)
        exp = admit(lab, work, best_commit, proposal, "api")
        if outcome == "invalid":
            store.update(exp.id, started_at=_iso(clock[worker]), finished_at=_iso(clock[worker] + timedelta(seconds=3)))
            continue
        if outcome == "keep":
            value = best - 0.004 - 0.001 * rng.random()
            finish_trials(exp.id, worker, [value, value + 0.0003, value - 0.0002], "keep", noise=0.0005,
                          reason="beats the best beyond the noise")
            best = float(np.mean([value, value + 0.0003, value - 0.0002]))
            best_commit = exp.commit_sha
            git.set_branch(lab_dir, run.branch, best_commit)
            kept.append(description)
        elif outcome == "discard":
            finish_trials(exp.id, worker, [best + 0.002 * rng.random() - 0.0003], "discard", noise=0.0005,
                          reason="not better")
        elif outcome in ("oom", "shape"):
            error = OOM.format(gib=1 + 2 * rng.random()) if outcome == "oom" else SHAPES.format(a=i + 300, b=i + 100)
            finish_trials(exp.id, worker, [None], "crash", error=error, reason=f"exit code 1: {error.splitlines()[-1]}")
        elif outcome == "nan":
            finish_trials(exp.id, worker, [None], "crash", error="step 00042 | loss nan | training diverged",
                          reason="NaN: training diverged")
        elif outcome == "timeout":
            finish_trials(exp.id, worker, [None], "timeout", error=PROGRESS.format(step=300, loss=3.1, t=290),
                          reason="training passed the hard cap of 480 s and was stopped")
    running_id = None
    if running:
        lab.worker = "gpu0"
        work = git.worktree(lab_dir, "propose", best_commit)
        (work / "train.py").write_text((work / "train.py").read_text() + "# still training\n")
        exp = admit(lab, work, best_commit, Proposal("wider MLP, still training", cost_usd=0.07), "api")
        store.update(exp.id, status="running", stage="train", started_at=_iso(clock["gpu0"]))
        run_dir = state_dir(lab_dir) / "runs" / str(exp.id)
        run_dir.mkdir(parents=True)
        (run_dir / "train.log").write_text("model: 50.3M params\n" + "\n".join(
            PROGRESS.format(step=s * 40, loss=4.0 - s * 0.1, t=s * 30) for s in range(1, 5)) + "\n")
        running_id = exp.id
    store.close()
    return SimulatedNight(lab_dir, tag, tuple(kept), best, running_id)


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> SimulatedNight:
    return simulated_night(tmp_path_factory.mktemp("night"))


# -- rows ---------------------------------------------------------------------------------------


def test_rows_follow_the_store_with_parents_and_deltas(night: SimulatedNight) -> None:
    n = data.load_night(night.lab)
    assert n.run.tag == night.tag
    assert len(n.rows) == 1 + len(PLAN) + 1
    assert [r.number for r in n.rows] == list(range(1, len(n.rows) + 1))
    assert [r.exp.description for r in n.kept] == list(night.kept_descriptions)
    assert n.best.exp.val_bpb == pytest.approx(night.best_val)
    # Each measured experiment's parent is the keep before it; its delta is against that keep.
    last_keep = None
    for r in n.rows:
        if r.exp.kind == "baseline":
            assert r.delta is None
        elif r.exp.val_bpb is not None:
            assert r.parent_id == last_keep.id
            assert r.delta == pytest.approx(r.exp.val_bpb - last_keep.exp.val_bpb)
        if r.status == "keep":
            last_keep = r
    assert n.improvement() == pytest.approx(n.baseline.exp.val_bpb - night.best_val)
    assert [r.id for r in n.running] == [night.running_id]


def test_diffs_come_from_git_and_only_for_committed_experiments(night: SimulatedNight) -> None:
    n = data.load_night(night.lab)
    keep = n.kept[1]
    diff = n.diff(keep)
    assert diff.startswith("diff --git a/train.py b/train.py")
    assert "+SHARPNESS = 1.01" in diff and "-SHARPNESS = 1.0" in diff
    assert n.diff(n.baseline) == ""
    refused = next(r for r in n.rows if r.status == "invalid" and "prepare.py" in r.exp.reason)
    assert refused.exp.commit_sha is None and n.diff(refused) == ""


def test_running_best_is_a_staircase_down_through_the_keeps(night: SimulatedNight) -> None:
    steps = data.running_best(data.load_night(night.lab).rows)
    assert len(steps) == len(night.kept_descriptions)
    values = [v for _, v in steps]
    assert values == sorted(values, reverse=True)


def test_failures_group_by_cause_with_numbers_generalised(night: SimulatedNight) -> None:
    groups = data.failure_groups(data.load_night(night.lab).rows)
    by_cause = {(g.status, g.cause): g for g in groups}
    oom = by_cause[("crash", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate N GiB. "
                             "GPU N has a total capacity of N GiB")]
    assert len(oom.ids) == PLAN.count("oom") == 2
    shapes = by_cause[("crash", "RuntimeError: mat1 and mat2 shapes cannot be multiplied (NxN and NxN)")]
    assert len(shapes.ids) == PLAN.count("shape")
    assert ("crash", "NaN: training diverged") in by_cause
    assert ("timeout", "training passed the hard cap of N s and was stopped") in by_cause
    assert sum(len(g.ids) for g in groups if g.status == "invalid") == PLAN.count("invalid")
    assert sum(len(g.ids) for g in groups if g.status == "agent_failed") == PLAN.count("agentfail")
    sizes = [len(g.ids) for g in groups]
    assert sizes == sorted(sizes, reverse=True)  # largest group first
    assert sum(len(g.ids) for g in groups) == sum(PLAN.count(s) for s in ("oom", "shape", "nan", "timeout",
                                                                         "invalid", "agentfail"))


def test_timeline_splits_training_evaluation_and_idle_per_worker(night: SimulatedNight) -> None:
    n = data.load_night(night.lab)
    lanes = data.timeline(n.rows)
    assert set(lanes) == {"gpu0", "gpu1"}
    for worker, lane in lanes.items():
        assert all(a.end <= b.start + timedelta(microseconds=1) for a, b in zip(lane, lane[1:])), worker
        seconds = data.busy_share(lane)
        assert seconds["train"] > 5 * seconds["eval"] > 0
        assert seconds["idle"] > 0
    # The baseline's three trials: 3 x (train, eval) and the eval parts are EVAL_S long each.
    base = [s for s in lanes["gpu0"] if s.exp_id == n.baseline.id]
    assert [s.state for s in base] == ["train", "eval"] * 3
    for s in base[1::2]:
        assert (s.end - s.start).total_seconds() == pytest.approx(EVAL_S, rel=1e-3)


def test_costs_sum_the_agents_and_count_keeps(night: SimulatedNight) -> None:
    n = data.load_night(night.lab)
    c = data.costs(n.rows)
    expected = sum(r.exp.cost_usd for r in n.rows)
    assert c.usd == pytest.approx(expected) and c.usd > 1.0
    assert set(c.by_agent) == {"api"}
    assert c.keeps == PLAN.count("keep")
    assert c.usd_per_keep == pytest.approx(expected / PLAN.count("keep"))


def test_noise_is_pooled_over_reruns_like_the_policy(night: SimulatedNight) -> None:
    from nightlab.night import policy

    n = data.load_night(night.lab)
    assert n.noise.policy == "noise" and n.noise.floor == Config().run.noise_floor
    groups = [list(r.values) for r in n.rows if r.exp.finished]
    assert n.noise.measured == pytest.approx(policy.noise_width(groups, 0.0))
    assert n.noise.reruns == 2 + 2 * PLAN.count("keep")
    assert len(n.noise.baseline) == 3


def test_unknown_run_and_empty_lab_name_the_fix(night: SimulatedNight, tmp_path: Path) -> None:
    with pytest.raises(LookupError, match="no run 'nope'.*runs: night1"):
        data.load_night(night.lab, "nope")
    with pytest.raises(LookupError, match="nightlab run"):
        data.load_night(make_lab(tmp_path / "empty"))


def test_a_difference_that_rounds_to_zero_has_no_minus_sign() -> None:
    from nightlab.report.data import fmt_delta
    from nightlab.night import history

    assert fmt_delta(-1e-9) == "+0.000000" and fmt_delta(0.0) == "+0.000000"
    assert fmt_delta(-0.0000126) == "-0.000013" and fmt_delta(0.25) == "+0.250000"
    same = SimpleNamespace(id=3, status="discard", val_bpb=0.5 - 1e-12, description="same as best", reason="",
                           epochs=None)
    assert "(+0.000000)" in history.line(same, best_val=0.5)
