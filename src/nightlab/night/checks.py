"""Trials that check kept work after its verdict: the best with a keep reverted (``nightlab
finalize``), the chain without its idle keeps, the best at a larger budget.

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
from pathlib import Path

from nightlab.night import holdout
from nightlab.night.state import Lab
from nightlab.night.store import Check
from nightlab.trial import sandbox
from nightlab.trial.processes import group_alive, stop_group
from nightlab.trial.runner import runs_processes

WORKTREE = "check"


def run_dir(lab: Lab, kind: str, best_id: int, keep_id: int, seed: int, budget_s: float) -> Path:
    """``.nightlab/runs/<kind>-<tag>/<best>/<keep>-<seed>-<budget>s/``."""
    return lab.runs_dir / f"{kind}-{lab.run.tag}" / str(best_id) / f"{keep_id}-{seed}-{budget_s:g}s"


def find(lab: Lab, kind: str, best_id: int, keep_id: int, seed: int, budget_s: float) -> Check | None:
    found = lab.store.checks(lab.run.tag, kind, best_id, keep_id=keep_id, seed=seed, budget_s=budget_s)
    return found[0] if found else None


def run(lab: Lab, kind: str, best_id: int, keep_id: int, commit: str, seed: int, *,
        budget_s: float | None = None, label: str = "") -> Check:
    """The check of ``commit`` with ``seed`` at ``budget_s`` (default: the lab's budget), measured
    once: a finished one is returned as recorded (its holdout scored if it was not), one left
    running by a killed process is stopped and run again."""
    budget = float(budget_s if budget_s is not None else lab.config.lab.budget_s)
    done = find(lab, kind, best_id, keep_id, seed, budget)
    if done is not None and done.status != "running":
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
    work = lab.git.worktree(lab.dir, WORKTREE, commit)
    lab.say(f"{label}: training (seed {seed}, {budget:g} s)")
    guard = sandbox.Guard.take(lab.dir, lab.store.path, 0) if runs_processes(lab.trainer) else None
    result = lab.trainer(work, folder, config, seed, data_dir=lab.data_dir, on_progress=lab.on_progress,
                         on_stage=lambda stage, pgid: lab.store.update_check(check.id, pgid=pgid))
    status, reason = result.status, result.reason
    if guard is not None and (touched := guard.check()):
        status, reason = "invalid", f"the trial changed the lab outside its run folder: {'; '.join(touched)}"
    value = result.val_bpb if status == "ok" else None
    lab.store.update_check(check.id, status=status, val_bpb=value, reason=reason, pgid=None)
    check = find(lab, kind, best_id, keep_id, seed, budget)
    assert check is not None
    lab.say(f"{label}: {_shown(check)}")
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
