"""After a kill: stop orphaned trials, restore refs and the branch tip, and say what is left to finish."""

from __future__ import annotations

from nightlab.night.state import Lab
from nightlab.night.store import Experiment
from nightlab.night.verdict import save_best
from nightlab.paths import state_dir
from nightlab.trial import sandbox, standby
from nightlab.trial.processes import group_alive, stop_group


def recover(lab: Lab) -> list[Experiment]:
    """Mend what a kill left: stop orphaned trials, restore refs and the branch tip.

    Returns the experiments left unfinished (committed, partly measured): the caller executes
    them again, which runs only their missing trials.
    """
    for line in standby.reap(state_dir(lab.dir) / "standby"):
        lab.say(f"stopped a standby process left by the previous run: {line}")
    unfinished = []
    for exp in lab.experiments():
        if exp.finished:
            continue
        if exp.pgid and group_alive(exp.pgid):
            lab.say(f"#{exp.id}: stopping the trial left running by the previous process (group {exp.pgid})")
            stop_group(exp.pgid)
        if exp.commit_sha:
            lab.git.set_ref(lab.dir, lab.git.experiment_ref(exp.id), exp.commit_sha)
        exp = lab.store.update(exp.id, status="queued" if exp.kind != "baseline" else exp.status, pgid=None)
        unfinished.append(exp)
    tip = lab.git.resolve(lab.dir, f"refs/heads/{lab.run.branch}")
    checked_out = lab.git.current_branch(lab.dir) == lab.run.branch  # `nightlab experiment` runs: the user's branch
    if tip != lab.best_commit() and not checked_out:
        lab.say(f"branch {lab.run.branch}: moved to the last kept commit {lab.best_commit()[:10]}")
        lab.git.set_branch(lab.dir, lab.run.branch, lab.best_commit())
    best = lab.best()
    if best is not None and sandbox.best_id(lab.dir) != str(best.id):  # killed between the verdict and the copy
        lab.say(f"best/: copying the best model, #{best.id}")
        save_best(lab, best)
    return [e for e in unfinished if e.kind != "baseline"]
