"""The verdict on a measured experiment: keep, discard or re-apply on a moved best; the best model saved."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil

from nightlab.night import policy
from nightlab.night.policy import CONFLICT
from nightlab.night.proposals import Proposal, admit, commit_message
from nightlab.night.state import Lab
from nightlab.night.store import Experiment, now
from nightlab.paths import state_dir

REAPPLY_WORKTREE = "reapply"


def conclude(lab: Lab, exp: Experiment) -> Experiment:
    """The verdict on a measured experiment, recorded; a stale win is re-applied on the best (``reapply``)."""
    exp = lab.store.get(exp.id)
    recorded = lab.store.measurements(exp.id)
    failed = [m for m in recorded if m.status != "ok"]
    if failed:
        return finish(lab, exp, failed[-1].status, exp.reason)
    reference = reference_of(lab, exp)
    verdict = judge(lab, exp, reference)
    if verdict.decision == "keep" and exp.commit_sha and exp.parent_commit != lab.best_commit():
        return reapply(lab, exp, verdict)
    review = ""
    if verdict.decision == "keep" and lab.reviewer is not None:
        judged = lab.store.update(exp.id, val_bpb=policy.mean(lab.store.values(exp.id)))
        said = lab.reviewer(lab, judged, reference)
        review = said.text()
        if not said.approve:
            why = f"vetoed by {said.reviewer}: {said.reason} (measured: {verdict.reason})"
            verdict = policy.Verdict("discard", why)
    exp = finish(lab, exp, verdict.decision, verdict.reason, review=review)
    if exp.status == "keep":
        save_best(lab, exp)
        lab.git.set_branch(lab.dir, lab.run.branch, exp.commit_sha or "")
    return exp


def reapply(lab: Lab, exp: Experiment, verdict: policy.Verdict) -> Experiment:
    """``exp`` beat the best it was built on, but the best has moved: its change goes on top of the
    current best as a new queued experiment (``origin_id``), and ``exp`` is discarded saying so. A
    change that no longer applies is discarded with a ``conflict:`` reason its author is shown."""
    best = lab.best()
    assert best is not None and exp.commit_sha and exp.parent_commit
    work = lab.git.worktree(lab.dir, REAPPLY_WORKTREE, exp.commit_sha)
    if not lab.git.reapply(work, exp.parent_commit, exp.commit_sha, best.commit_sha or lab.run.base_commit):
        reason = (f"{CONFLICT} beat its parent ({verdict.reason}) but does not apply on the new best #{best.id} "
                  f"({best.description}); propose it again on top of the best")
        return finish(lab, exp, "discard", reason)
    if not lab.git.changed_files(work):
        return finish(lab, exp, "discard", f"beat its parent, but the new best #{best.id} already holds the change")
    again = admit(lab, work, best.commit_sha or lab.run.base_commit,
                  Proposal(exp.description, f"re-applied from #{exp.id} on top of #{best.id}", 0.0, 0, 0),
                  exp.agent, origin_id=exp.id, claim=exp.claim)
    return finish(lab, exp, "discard", f"superseded: beat its parent ({verdict.reason}); the best moved to "
                                        f"#{best.id}, so it is measured again on top of it as #{again.id}")


def rebase(lab: Lab, exp: Experiment) -> Experiment:
    """Move a queued experiment that has not trained yet onto the current best, so that it is
    measured on top of it (its row and ref follow the new commit). One that does not apply there,
    or that the best already holds, stays where it is: its verdict then re-applies or discards it."""
    best = lab.best_commit()
    if not exp.commit_sha or not exp.parent_commit or exp.parent_commit == best or lab.store.measurements(exp.id):
        return exp
    work = lab.git.worktree(lab.dir, REAPPLY_WORKTREE, exp.commit_sha)
    if not lab.git.reapply(work, exp.parent_commit, exp.commit_sha, best) or not lab.git.changed_files(work):
        return exp
    commit = lab.git.commit_all(work, commit_message(exp.description, exp.rationale, lab.run.tag))
    stats = lab.git.diff_stats(lab.dir, best, commit)
    exp = lab.store.update(exp.id, parent_commit=best, commit_sha=commit, files_changed=len(stats.files),
                           lines_added=stats.added, lines_removed=stats.removed, code_lines=lab.code_lines(commit))
    lab.git.set_ref(lab.dir, lab.git.experiment_ref(exp.id), commit)
    return exp


def reference_of(lab: Lab, exp: Experiment) -> Experiment:
    """The kept experiment ``exp`` was built on (its parent commit), else the current best."""
    if exp.parent_commit:
        rows = lab.store.select(lab.run.tag, statuses=("keep",), commit=exp.parent_commit, limit=1, newest_first=True)
        if rows:
            return rows[0]
    best = lab.best()
    assert best is not None, "measure the baseline first"
    return best


def judge(lab: Lab, exp: Experiment, reference: Experiment) -> policy.Verdict:
    if exp.budget and reference.budget and exp.budget != reference.budget:
        return policy.Verdict("discard", f"not comparable: trained under a budget of {exp.budget}, its reference "
                                         f"#{reference.id} under {reference.budget}; measure both under one budget")
    lines_delta = (exp.code_lines or 0) - (reference.code_lines or 0)
    verdict = policy.judge(lab.store.values(exp.id), lab.store.values(reference.id), lab.noise(), lab.config.run,
                           lines_delta, estimator=lab.noise_estimator())
    return dataclasses.replace(verdict, reason=verdict.reason + epoch_note(exp, reference))


def epoch_note(exp: Experiment, reference: Experiment) -> str:
    """A word on the verdict when the two runs ended in different passes over the train split.

    On data read more than once, val_bpb also moves with where in an epoch a run ends (by about
    0.01 on pycode at 300 s, bench/RESULTS.md), so a change of speed alone can look like a gain.
    """
    ran, ref = exp.epochs, reference.epochs
    if ran is None or ref is None or math.floor(ran) == math.floor(ref):
        return ""
    return (f"; it ended at {ran:.2f} epochs of the train split, its reference at {ref:.2f}: on data read "
            f"more than once, where in an epoch a run ends moves val_bpb too")


def finish(lab: Lab, exp: Experiment, status: str, reason: str, review: str = "") -> Experiment:
    judged = status in ("keep", "discard")  # one write: a verdict is never on disk without its numbers
    numbers = {}
    if judged:
        numbers = dict(error="", val_bpb=policy.mean(lab.store.values(exp.id)), noise=noise_with(lab, exp))
    lab.count_noise(exp)
    exp = lab.store.update(exp.id, status=status, stage="done", pgid=None, reason=reason, review=review,
                           finished_at=now(), **numbers)
    lab.say(f"#{exp.id} {exp.status}: {exp.reason}")
    return exp


def noise_with(lab: Lab, exp: Experiment) -> float:
    """The noise estimate once the measurements of ``exp`` (not yet finished) are counted in it."""
    lab.noise()  # the estimate of the experiments finished before it
    lab.count_noise(exp)
    return lab.noise()


def save_best(lab: Lab, exp: Experiment) -> None:
    """Copy the kept experiment's weights and code to ``.nightlab/best/`` (replaced whole, by rename)."""
    source = lab.runs_dir / str(exp.id)
    best = state_dir(lab.dir) / "best"
    tmp = state_dir(lab.dir) / f".best.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("model.pt", "summary.json", "eval.json"):
        if (source / name).exists():
            shutil.copy2(source / name, tmp / name)
    for name in lab.config.lab.allowed_files:
        text = lab.git.read_file(lab.dir, exp.commit_sha or "", name)
        if text is not None:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
    (tmp / "experiment.txt").write_text(f"{exp.id}\t{exp.commit_sha}\t{exp.val_bpb}\t{exp.description}\n")
    old = state_dir(lab.dir) / f".best.{os.getpid()}.old"
    shutil.rmtree(old, ignore_errors=True)  # left by a killed process of the same pid
    if best.exists():
        best.rename(old)
    tmp.rename(best)
    shutil.rmtree(old, ignore_errors=True)
