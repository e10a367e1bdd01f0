"""Trials that check kept work after its verdict: the best with a keep reverted (``nightlab
finalize``), the chain without its idle keeps, each new best at a larger budget
(``run.promote_budget_s``: it "holds at scale" when it beats the best before it there too).

They run through the night's runner (``Lab.trainer``) and the trusted judge, in the same worktrees
and run folders as experiments, and are recorded in the store's ``checks`` table: a row as the
trial starts (with its process group once it has one), the same row with its val_bpb and its
holdout score when it ends. The policy never reads them. ``run`` continues from what the store
holds, so after a ``kill -9`` the same command stops the orphaned trial and runs it again, and
finished checks are never run twice.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

from nightlab.config import Config
from nightlab.night import holdout
from nightlab.night.state import Lab
from nightlab.night.store import Check, Experiment
from nightlab.night.verdict import reference_of
from nightlab.trial import sandbox
from nightlab.trial.processes import group_alive, stop_group
from nightlab.trial.runner import TrialResult, runs_processes

WORKTREE = "check"


def run_dir(lab: Lab, kind: str, best_id: int, keep_id: int, seed: int, budget_s: float) -> Path:
    """``.nightlab/runs/<kind>-<tag>/<best>/<keep>-<seed>-<budget>s/``."""
    return lab.runs_dir / f"{kind}-{lab.run.tag}" / str(best_id) / f"{keep_id}-{seed}-{budget_s:g}s"


def find(lab: Lab, kind: str, best_id: int, keep_id: int, seed: int, budget_s: float) -> Check | None:
    found = lab.store.checks(lab.run.tag, kind, best_id, keep_id=keep_id, seed=seed, budget_s=budget_s)
    return found[0] if found else None


@dataclass(frozen=True)
class Started:
    """A check's trial, recorded as started and checked out: what ``lab.trainer`` is to run."""

    check: Check
    work: Path
    folder: Path
    config: Config
    label: str


def run(lab: Lab, kind: str, best_id: int, keep_id: int, commit: str, seed: int, *,
        budget_s: float | None = None, label: str = "", retry_failed: bool = False) -> Check:
    """The check of ``commit`` with ``seed`` at ``budget_s`` (default: the lab's budget), measured
    once: a finished one is returned as recorded (its holdout scored if it was not; with
    ``retry_failed``, one that failed is run again), one left running by a killed process is
    stopped and run again."""
    started = begin(lab, kind, best_id, keep_id, commit, seed, budget_s=budget_s, label=label,
                    retry_failed=retry_failed)
    if isinstance(started, Check):
        return started
    guard = sandbox.Guard.take(lab.dir, lab.store.path, 0) if runs_processes(lab.trainer) else None
    result = lab.trainer(started.work, started.folder, started.config, seed, data_dir=lab.data_dir,
                         on_progress=lab.on_progress,
                         on_stage=lambda stage, pgid: lab.store.update_check(started.check.id, pgid=pgid))
    if guard is not None and (touched := guard.check()):
        result = dataclasses.replace(result, status="invalid", val_bpb=None,
                                     reason=f"the trial changed the lab outside its run folder: {'; '.join(touched)}")
    return end(lab, started, result)


def begin(lab: Lab, kind: str, best_id: int, keep_id: int, commit: str, seed: int, *,
          budget_s: float | None = None, label: str = "", worktree: str = WORKTREE,
          retry_failed: bool = False) -> Started | Check:
    """Record that a check's trial starts and check its commit out in ``worktree``; the recorded
    ``Check`` instead when it was measured before (a trial left running by a killed process is stopped)."""
    budget = float(budget_s if budget_s is not None else lab.config.lab.budget_s)
    done = find(lab, kind, best_id, keep_id, seed, budget)
    if done is not None and done.status != "running" and not (retry_failed and done.status != "ok"):
        lab.say(f"{label}: measured before: {_shown(done)}")
        return _with_holdout(lab, done)
    if done is not None and done.pgid and group_alive(done.pgid):
        lab.say(f"{label}: stopping the trial left running by the previous process (group {done.pgid})")
        stop_group(done.pgid)
    folder = run_dir(lab, kind, best_id, keep_id, seed, budget)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    check = lab.store.start_check(lab.run.tag, kind, best_id, keep_id, commit, seed, budget, folder)
    config = lab.config if budget == lab.config.lab.budget_s else dataclasses.replace(
        lab.config, lab=dataclasses.replace(lab.config.lab, budget_s=budget))
    work = lab.git.worktree(lab.dir, worktree, commit)
    lab.say(f"{label}: training (seed {seed}, {budget:g} s)")
    return Started(check, work, folder, config, label)


def end(lab: Lab, started: Started, result: TrialResult) -> Check:
    """Record a check's trial as it ended, then score its holdout."""
    value = result.val_bpb if result.status == "ok" else None
    lab.store.update_check(started.check.id, status=result.status, val_bpb=value, reason=result.reason, pgid=None)
    c = started.check
    check = find(lab, c.kind, c.best_id, c.keep_id, c.seed, c.budget_s)
    assert check is not None
    lab.say(f"{started.label}: {_shown(check)}")
    return _with_holdout(lab, check)


def _shown(check: Check) -> str:
    return f"val_bpb {check.val_bpb:.6f}" if check.val_bpb is not None else f"{check.status}: {check.reason}"


def _with_holdout(lab: Lab, check: Check) -> Check:
    """``check`` with its holdout scored (after its val_bpb is recorded, as for experiments)."""
    scores = holdout.scorer(lab)
    if check.status != "ok" or check.holdout_bpb is not None or scores is None:
        return check
    work = lab.git.worktree(lab.dir, WORKTREE, check.commit_sha)
    value = scores(work, Path(check.run_dir), lab.config, check.seed)
    if value is None:
        return check
    lab.store.update_check(check.id, holdout_bpb=value)
    return dataclasses.replace(check, holdout_bpb=value)


# -- the best at a larger budget (run.promote_budget_s) -----------------------------------------

SCALE = "scale"
HOLDS, FAILS = "holds", "fails"


def promotions(lab: Lab) -> list[Experiment]:
    """The run's bests (the baseline, then each keep) not yet measured at ``run.promote_budget_s``; none when off."""
    budget = lab.config.run.promote_budget_s
    if budget <= 0:
        return []
    done = {c.best_id for c in lab.store.checks(lab.run.tag, SCALE, budget_s=budget) if c.status != "running"}
    return [e for e in lab.store.select(lab.run.tag, statuses=("keep",)) if e.id not in done and e.commit_sha]


def begin_promotion(lab: Lab, best: Experiment, worktree: str = WORKTREE) -> Started | Check:
    """``begin`` the check of ``best`` trained at ``run.promote_budget_s`` with the lab's seed."""
    budget = lab.config.run.promote_budget_s
    return begin(lab, SCALE, best.id, 0, best.commit_sha or "", lab.config.lab.seed, budget_s=budget,
                 label=f"#{best.id} at {budget:g} s", worktree=worktree)


def judge_scale(lab: Lab) -> None:
    """Mark each keep whose check at scale and whose reference's (the best it beat) are both in:
    it ``holds`` at scale when it beats that best at the larger budget too, else it ``fails``."""
    budget, seed = lab.config.run.promote_budget_s, lab.config.lab.seed
    if budget <= 0:
        return
    for keep in lab.store.select(lab.run.tag, statuses=("keep",), kind="experiment"):
        mine = find(lab, SCALE, keep.id, 0, seed, budget)
        if keep.at_scale or mine is None or mine.status == "running":
            continue
        reference = reference_of(lab, keep)
        theirs = find(lab, SCALE, reference.id, 0, seed, budget)
        if theirs is None or theirs.val_bpb is None:
            continue
        holds = mine.val_bpb is not None and mine.val_bpb < theirs.val_bpb
        lab.store.update(keep.id, at_scale=HOLDS if holds else FAILS)
        at = f"val_bpb {mine.val_bpb:.6f}" if mine.val_bpb is not None else mine.status
        lab.say(f"#{keep.id} {'holds' if holds else 'does not hold'} at scale: {at} at {budget:g} s against "
                f"{theirs.val_bpb:.6f} for #{reference.id}")
