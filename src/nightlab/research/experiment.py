"""One experiment from commit to verdict, through the runner, the store, the policy and git.

Every step is recorded before and after it runs, and each function here continues from what the
store already holds: ``execute`` on a half-measured experiment runs only the missing trials, so
the same code serves a fresh experiment and one resumed after ``kill -9``.

Order of writes (what a kill between two of them leaves, and how ``recover`` mends it):
commit → row with the commit → ref ``refs/nightlab/exp/<id>`` (missing ref: re-created) →
stage and process group before each trial (live group: stopped, trial re-run) → the trial's
numbers in the row, then its measurement (no measurement: trial re-run, numbers written again) →
verdict in the row, with its val_bpb and noise in the same write → branch tip (behind the last
keep: moved there).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nightlab.research.git as real_git
from nightlab.config import Config
from nightlab.paths import state_dir
from nightlab.research import history, policy, sandbox, standby
from nightlab.research.agents.base import Context, Proposal
from nightlab.research.runner import TrialResult, group_alive, run_trial, stop_group
from nightlab.research.store import FINISHED, Experiment, Run, Store, now

TRAIN_WORKTREE = "train"
REAPPLY_WORKTREE = "reapply"
Trainer = Callable[..., TrialResult]  # ``runner.run_trial``'s signature


@dataclass(frozen=True)
class Review:
    """A reviewer's word on a winning diff: a veto keeps it from becoming the best."""

    approve: bool
    reason: str
    reviewer: str = "reviewer"

    def text(self) -> str:
        return f"{'approve' if self.approve else 'veto'} by {self.reviewer}: {self.reason}"


Reviewer = Callable[["Lab", Experiment, Experiment], Review]  # (lab, the winner, the best it beat)


@dataclass
class Lab:
    """A lab during one run: where it is, its settings, its dataset, its store and its run."""

    dir: Path
    config: Config
    data_dir: Path
    store: Store
    run: Run
    say: Callable[[str], None] = print  # one-line events for the user
    on_progress: Callable[[str], None] | None = None  # train.py's output lines
    on_finished: Callable[["Experiment"], None] | None = None  # each experiment once it has its verdict
    worker: str = "local"
    trainer: Trainer = run_trial  # the runner seam: executors and the simulator plug in here
    git: Any = real_git  # code history: the ``git`` module, or ``simulate.MemoryGit`` (same functions)
    reviewer: Reviewer | None = None  # reads a winning diff before it becomes the best; None: no review
    standby: standby.Standby | None = None  # the plain loop's: starts the expected next trial early
    _code_lines: dict[str, int] = field(default_factory=dict)
    _noise: policy.NoiseMeter | None = None
    _measured: set[int] = field(default_factory=set)  # experiments the noise meter has counted

    @property
    def runs_dir(self) -> Path:
        return state_dir(self.dir) / "runs"

    def experiments(self) -> list[Experiment]:
        return self.store.experiments(self.run.tag)

    def best(self) -> Experiment | None:
        kept = self.store.select(self.run.tag, statuses=("keep",), limit=1, newest_first=True)
        return kept[0] if kept else None

    def best_commit(self) -> str:
        best = self.best()
        return best.commit_sha if best and best.commit_sha else self.run.base_commit

    def noise(self) -> float:
        """Pooled run-to-run noise of the finished experiments' reruns (kept up to date, not re-read)."""
        if self._noise is None:
            self._noise = policy.NoiseMeter(self.config.run.noise_floor)
            for e in self.store.select(self.run.tag, statuses=FINISHED):
                self.count_noise(e)
        return self._noise.width

    def count_noise(self, exp: Experiment) -> None:
        """Add a finished experiment's measurements to the noise estimate (once)."""
        if self._noise is not None and exp.id not in self._measured:
            self._measured.add(exp.id)
            self._noise.add(self.store.values(exp.id))

    def code_lines(self, commit: str) -> int:
        if commit not in self._code_lines:
            self._code_lines[commit] = self.git.code_lines(self.dir, commit, self.config.lab.allowed_files)
        return self._code_lines[commit]


# -- proposals become experiments -------------------------------------------------------------


def context(lab: Lab, program: str | None = None, agent: str | None = None, claim: str = "",
            history_chars: int = history.MAX_CHARS) -> Context:
    """What the next proposer sees: its brief (program.md unless given), the best code, the history,
    the notes board, the agenda item it claimed and the last error (of ``agent``'s own experiments
    when named)."""
    best = lab.best()
    commit = lab.best_commit()
    source = {name: lab.git.read_file(lab.dir, commit, name) or "" for name in lab.config.lab.allowed_files}
    done = lab.store.select(lab.run.tag, statuses=FINISHED, agent=agent, limit=1, newest_first=True)
    last = done[0] if done else None
    last_error = ""
    if last is not None and last.status in ("crash", "timeout", "invalid"):
        last_error = f"experiment #{last.id} ({last.description}) was {last.status}: {last.reason}"
        if last.error:
            last_error += f"\n{last.error}"
    elif last is not None and last.status == "discard" and last.review.startswith("veto"):
        last_error = f"experiment #{last.id} ({last.description}) was vetoed by review: {last.reason}"
    elif last is not None and last.status == "discard" and last.reason.startswith(CONFLICT):
        last_error = f"experiment #{last.id} ({last.description}): {last.reason}"
    noise = lab.noise() if best else None
    return Context(
        program=_read(lab.dir / "program.md") if program is None else program,
        best_source=source,
        history=history.digest(lab.store, lab.run.tag, noise, max_chars=history_chars),
        notes=_notes(lab.dir / "notes"),
        last_error=last_error,
        best_val_bpb=best.val_bpb if best else None,
        noise=noise,
        allowed_files=lab.config.lab.allowed_files,
        claim=claim,
    )


def admit(lab: Lab, work: Path, parent: str, proposal: Proposal, agent: str, kind: str = "experiment",
          allowed: tuple[str, ...] | None = None, **extra: Any) -> Experiment:
    """Check the edit in ``work`` (a checkout of ``parent``), commit it and record the experiment.

    An edit outside the allowed files, or no edit at all, is recorded as ``invalid`` with no
    commit and the worktree is reverted; the reason reaches the next proposer as its last error.
    ``allowed`` narrows ``lab.allowed_files`` (a role's ``edits``); ``extra`` are more columns of the
    row (``claim``, ``origin_id``).
    """
    git = lab.git
    allowed = allowed or lab.config.lab.allowed_files
    common = dict(kind=kind, worker=lab.worker, agent=agent, parent_commit=parent,
                  description=proposal.description.strip() or "(no description)", rationale=proposal.rationale,
                  cost_usd=proposal.cost_usd, tokens_in=proposal.tokens_in, tokens_out=proposal.tokens_out, **extra)
    changed = git.changed_files(work)
    refused = git.disallowed(changed, allowed)
    if refused or not changed:
        reason = "the proposal changed nothing"
        if refused:
            undo = "restore them and run again" if kind == "manual" else "the edit was reverted"
            reason = (f"edited files outside the allowed ones ({', '.join(allowed)}): "
                      f"{', '.join(refused)}; {undo}")
        if kind != "manual":  # the lab's own checkout is the user's: never reset it
            git.worktree_reset(work, parent)
        exp = lab.store.add_experiment(lab.run.tag, **common, status="invalid", stage="done", reason=reason,
                                       finished_at=now())
        lab.say(f"#{exp.id} invalid: {reason}")
        return exp
    message = f"{common['description']}\n\n{proposal.rationale}\n\nnightlab-run: {lab.run.tag}\n".replace("\n\n\n", "\n\n")
    commit = git.commit_all(work, message)
    stats = git.diff_stats(lab.dir, parent, commit)
    exp = lab.store.add_experiment(
        lab.run.tag, **common, commit_sha=commit, files_changed=len(stats.files), lines_added=stats.added,
        lines_removed=stats.removed, code_lines=lab.code_lines(commit), seed=lab.config.lab.seed,
    )
    git.set_ref(lab.dir, git.experiment_ref(exp.id), commit)
    return exp


def invalid_proposal(lab: Lab, parent: str, agent: str, reason: str, spent: Proposal | None = None,
                     **extra: Any) -> Experiment:
    """Record an agent that failed to propose (bad reply, timeout, error): ``invalid``, the loop goes on."""
    spent = spent or Proposal("(agent failed)")
    exp = lab.store.add_experiment(lab.run.tag, kind="experiment", worker=lab.worker, agent=agent,
                                   parent_commit=parent, description=spent.description, status="invalid",
                                   stage="done", reason=reason, cost_usd=spent.cost_usd, tokens_in=spent.tokens_in,
                                   tokens_out=spent.tokens_out, finished_at=now(), **extra)
    lab.say(f"#{exp.id} invalid: {reason}")
    return exp


# -- measuring and judging --------------------------------------------------------------------


def measure_baseline(lab: Lab) -> Experiment:
    """The run's first best: the base commit measured with ``baseline_runs`` seeds (once per run)."""
    exp = baseline_row(lab)
    if exp.finished:
        return exp
    after = lab.standby.upcoming if lab.standby is not None else None
    trials = baseline_trials(lab, exp)
    for i, trial in enumerate(trials):
        if lab.standby is not None and i + 1 < len(trials):  # the next seed: same files
            names, folder = lab.config.lab.allowed_files, state_dir(lab.dir) / "worktrees" / TRAIN_WORKTREE
            lab.standby.upcoming = lambda s=trials[i + 1].seed: standby.Expected(standby.files_in(folder, names), s)
        elif lab.standby is not None:
            lab.standby.upcoming = after  # what the loop expects after the baseline
        run(lab, exp, trial)
    return finish_baseline(lab, exp)


def baseline_row(lab: Lab) -> Experiment:
    """The run's baseline experiment (the base commit), created with its ref the first time."""
    rows = lab.store.select(lab.run.tag, kind="baseline", limit=1)
    exp = rows[0] if rows else lab.store.add_experiment(
        lab.run.tag, kind="baseline", worker=lab.worker, agent="", parent_commit=lab.run.base_commit,
        commit_sha=lab.run.base_commit, description="baseline", code_lines=lab.code_lines(lab.run.base_commit),
        seed=lab.config.lab.seed,
    )
    if not exp.finished:
        lab.git.set_ref(lab.dir, lab.git.experiment_ref(exp.id), lab.run.base_commit)
    return exp


def baseline_trials(lab: Lab, exp: Experiment) -> list[Trial]:
    """The baseline's trials not yet recorded: one per seed, ``baseline_runs`` of them (1 when greedy)."""
    runs = 1 if lab.config.run.policy == "greedy" else lab.config.run.baseline_runs
    done = {m.seed for m in lab.store.measurements(exp.id)}
    seeds = [lab.config.lab.seed + k for k in range(runs)]
    return [Trial(exp.id, lab.run.base_commit, seed, "baseline", k) for k, seed in enumerate(seeds) if seed not in done]


def finish_baseline(lab: Lab, exp: Experiment) -> Experiment:
    """Judge the measured baseline: kept with the mean of its seeds, or ``BaselineError`` when none trained."""
    values = lab.store.values(exp.id)
    if not values:
        failed = [m for m in lab.store.measurements(exp.id) if m.status != "ok"]
        why = failed[-1].reason if failed else "no result"
        lab.store.update(exp.id, status="crash", stage="done", reason=f"baseline failed: {why}", finished_at=now())
        raise BaselineError(f"the baseline train.py failed ({why}); fix train.py at "
                            f"{lab.run.base_commit[:10]} and run again (log: {lab.runs_dir / str(exp.id)})")
    exp = lab.store.update(exp.id, status="keep", stage="done", val_bpb=policy.mean(values),
                           noise=_noise_with(lab, exp), reason=f"baseline over {len(values)} seed(s)", finished_at=now())
    _save_best(lab, exp)  # a night with no keep still leaves its best model in best/
    lab.say(f"#{exp.id} baseline: val_bpb {exp.val_bpb:.6f} over {len(values)} seed(s), noise {lab.noise():.6f}")
    return exp


class BaselineError(RuntimeError):
    """The run's starting train.py does not train: there is nothing to compare experiments against."""


@dataclass(frozen=True)
class Trial:
    """One training and evaluation of an experiment's commit with one seed."""

    exp_id: int
    commit: str
    seed: int
    kind: str  # first | confirm | baseline
    k: int  # the experiment's k-th trial: 0 runs in its run folder, later ones in <kind>-<seed>/


def execute(lab: Lab, exp: Experiment) -> Experiment:
    """Measure ``exp`` and judge it, running only trials not yet recorded."""
    while (trial := next_trial(lab, exp)) is not None:
        run(lab, exp, trial)
    return conclude(lab, exp)


def next_trial(lab: Lab, exp: Experiment) -> Trial | None:
    """The trial ``exp`` needs next, or None when it is measured (or failed) and ready for ``conclude``."""
    assert exp.commit_sha, "a refused edit is never executed"
    reference = _reference(lab, exp)
    seeds = [lab.config.lab.seed + k for k in range(1 + lab.config.run.confirm_runs)]
    recorded = lab.store.measurements(exp.id)
    if any(m.status != "ok" for m in recorded) or len(recorded) >= len(seeds):
        return None
    if recorded and _judge(lab, exp, reference).decision != "confirm":
        return None
    k = len(recorded)
    return Trial(exp.id, exp.commit_sha, seeds[k], "first" if k == 0 else "confirm", k)


def run(lab: Lab, exp: Experiment, trial: Trial) -> TrialResult:
    """Run one trial with ``lab.trainer`` in the ``train`` worktree and record it."""
    work, run_dir = start_trial(lab, exp, trial)
    guard = sandbox.Guard.take(lab.dir, lab.store.path, exp.id) if runs_processes(lab.trainer) else None
    result = lab.trainer(work, run_dir, lab.config, trial.seed, data_dir=lab.data_dir, on_progress=lab.on_progress,
                         on_stage=lambda stage, pgid: lab.store.update(exp.id, stage=stage, pgid=pgid))
    if guard is not None and (touched := guard.check()):
        result = dataclasses.replace(result, status="invalid", val_bpb=None,
                                     reason=f"the trial changed the lab outside its run folder: {'; '.join(touched)}")
    record_trial(lab, exp, trial, result)
    return result


def observe(lab: Lab, proposer: Any, proposal: Proposal, exp: Experiment) -> None:
    """Tell ``proposer`` how its proposal did; a proposer that fails to listen is reported, not fatal."""
    try:
        proposer.observe(proposal, exp.status, exp.val_bpb)
    except Exception as e:  # noqa: BLE001 -- e.g. the search agent's study database is locked
        lab.say(f"agent {getattr(proposer, 'name', '?')}: could not record the outcome of #{exp.id}: {e}")


def runs_processes(trainer: Trainer) -> bool:
    """Whether ``trainer`` runs train.py as real processes on this machine (not a simulation): the
    runner itself, or the runner wrapped in partials (a local worker's device binding)."""
    while isinstance(trainer, functools.partial):
        if run_trial in (trainer.func, *trainer.args):
            return True
        trainer = trainer.func
    return trainer is run_trial


def trial_dir(lab: Lab, trial: Trial) -> Path:
    run_dir = lab.runs_dir / str(trial.exp_id)
    return run_dir / f"{trial.kind}-{trial.seed}" if trial.k else run_dir


def start_trial(lab: Lab, exp: Experiment, trial: Trial, worker: str | None = None) -> tuple[Path, Path]:
    """Record that ``trial`` starts (on ``worker``, default ``lab.worker``), clear its run folder and
    check its commit out in the worker's worktree (``train``, or ``train-<worker>``)."""
    run_dir = trial_dir(lab, trial)
    if run_dir.exists():  # a trial interrupted by a kill: start it over in a clean folder
        shutil.rmtree(run_dir) if trial.k else _clear_files(run_dir)
    lab.store.update(exp.id, status="running", stage="train", started_at=exp.started_at or now(),
                     worker=worker or lab.worker)
    work = lab.git.worktree(lab.dir, f"{TRAIN_WORKTREE}-{worker}" if worker else TRAIN_WORKTREE, trial.commit)
    label = f"#{exp.id}" + (f" seed {trial.seed}" if trial.k else "")
    lab.say(f"{label} training: {exp.description}")
    return work, run_dir


def record_trial(lab: Lab, exp: Experiment, trial: Trial, result: TrialResult) -> None:
    """Store the outcome of ``trial`` (and, for the first, the run's numbers): the row first, the
    measurement last, so that a trial is recorded only with everything the verdict reads from it."""
    if trial.k == 0:
        s = result.summary
        lab.store.update(exp.id, stage="judge", pgid=None, training_seconds=s.get("training_seconds", result.train_s),
                         total_seconds=result.total_s, total_tokens=s.get("total_tokens"), num_steps=s.get("num_steps"),
                         num_params=s.get("num_params"), peak_memory_mb=s.get("peak_memory_mb"),
                         mfu_percent=s.get("mfu_percent"), epochs=s.get("epochs"),
                         error=result.error if result.status != "ok" else "",
                         reason=result.reason)
    elif result.status != "ok":
        lab.store.update(exp.id, stage="judge", pgid=None, error=result.error,
                         reason=f"seed {trial.seed}: {result.reason}")
    else:
        lab.store.update(exp.id, stage="judge", pgid=None)
    lab.store.add_measurement(exp.id, trial.seed, trial.kind, result.status, result.val_bpb, trial_dir(lab, trial),
                              result.reason)
    if result.status == "ok":  # a failure is told once, with the experiment's verdict
        label = f"#{exp.id}" + (f" seed {trial.seed}" if trial.k else "")
        lab.say(f"{label} ok: val_bpb {result.val_bpb:.6f} ({result.total_s:.1f} s)")


def conclude(lab: Lab, exp: Experiment) -> Experiment:
    """The verdict on a measured experiment, recorded; a stale win is re-applied on the best (``reapply``)."""
    exp = lab.store.get(exp.id)
    recorded = lab.store.measurements(exp.id)
    failed = [m for m in recorded if m.status != "ok"]
    if failed:
        return _finish(lab, exp, failed[-1].status, exp.reason)
    reference = _reference(lab, exp)
    verdict = _judge(lab, exp, reference)
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
    exp = _finish(lab, exp, verdict.decision, verdict.reason, review=review)
    if exp.status == "keep":
        _save_best(lab, exp)
        lab.git.set_branch(lab.dir, lab.run.branch, exp.commit_sha or "")
    return exp


CONFLICT = "conflict:"  # reason of a stale win that no longer applies on the best: back to its author


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
        return _finish(lab, exp, "discard", reason)
    if not lab.git.changed_files(work):
        return _finish(lab, exp, "discard", f"beat its parent, but the new best #{best.id} already holds the change")
    again = admit(lab, work, best.commit_sha or lab.run.base_commit,
                  Proposal(exp.description, f"re-applied from #{exp.id} on top of #{best.id}", 0.0, 0, 0),
                  exp.agent, origin_id=exp.id, claim=exp.claim)
    return _finish(lab, exp, "discard", f"superseded: beat its parent ({verdict.reason}); the best moved to "
                                        f"#{best.id}, so it is measured again on top of it as #{again.id}")


def _reference(lab: Lab, exp: Experiment) -> Experiment:
    """The kept experiment ``exp`` was built on (its parent commit), else the current best."""
    if exp.parent_commit:
        rows = lab.store.select(lab.run.tag, statuses=("keep",), commit=exp.parent_commit, limit=1, newest_first=True)
        if rows:
            return rows[0]
    best = lab.best()
    assert best is not None, "measure the baseline first"
    return best


def _judge(lab: Lab, exp: Experiment, reference: Experiment) -> policy.Verdict:
    lines_delta = (exp.code_lines or 0) - (reference.code_lines or 0)
    verdict = policy.judge(lab.store.values(exp.id), lab.store.values(reference.id), lab.noise(), lab.config.run,
                           lines_delta)
    return dataclasses.replace(verdict, reason=verdict.reason + _epoch_note(exp, reference))


def _epoch_note(exp: Experiment, reference: Experiment) -> str:
    """A word on the verdict when the two runs ended in different passes over the train split.

    On data read more than once, val_bpb also moves with where in an epoch a run ends (by about
    0.01 on pycode at 300 s, bench/RESULTS.md), so a change of speed alone can look like a gain.
    """
    ran, ref = exp.epochs, reference.epochs
    if ran is None or ref is None or math.floor(ran) == math.floor(ref):
        return ""
    return (f"; it ended at {ran:.2f} epochs of the train split, its reference at {ref:.2f}: on data read "
            f"more than once, where in an epoch a run ends moves val_bpb too")


def _finish(lab: Lab, exp: Experiment, status: str, reason: str, review: str = "") -> Experiment:
    judged = status in ("keep", "discard")  # one write: a verdict is never on disk without its numbers
    numbers = {}
    if judged:
        numbers = dict(error="", val_bpb=policy.mean(lab.store.values(exp.id)), noise=_noise_with(lab, exp))
    lab.count_noise(exp)
    exp = lab.store.update(exp.id, status=status, stage="done", pgid=None, reason=reason, review=review,
                           finished_at=now(), **numbers)
    lab.say(f"#{exp.id} {exp.status}: {exp.reason}")
    return exp


def _noise_with(lab: Lab, exp: Experiment) -> float:
    """The noise estimate once the measurements of ``exp`` (not yet finished) are counted in it."""
    lab.noise()  # the estimate of the experiments finished before it
    lab.count_noise(exp)
    return lab.noise()


def _save_best(lab: Lab, exp: Experiment) -> None:
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


# -- after a kill -----------------------------------------------------------------------------


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
        _save_best(lab, best)
    return [e for e in unfinished if e.kind != "baseline"]


def _clear_files(run_dir: Path) -> None:
    for path in run_dir.iterdir():
        if path.is_file():
            path.unlink()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")  # a stray byte in a note must not end the night
    except OSError:
        return ""


def _notes(folder: Path) -> str:
    if not folder.is_dir():
        return ""
    return "\n\n".join(f"## {p.name}\n{_read(p).strip()}" for p in sorted(folder.glob("*.md")))
