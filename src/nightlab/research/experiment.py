"""One experiment from commit to verdict, through the runner, the store, the policy and git.

Every step is recorded before and after it runs, and each function here continues from what the
store already holds: ``execute`` on a half-measured experiment runs only the missing trials, so
the same code serves a fresh experiment and one resumed after ``kill -9``.

Order of writes (what a kill between two of them leaves, and how ``recover`` mends it):
commit → row with the commit → ref ``refs/nightlab/exp/<id>`` (missing ref: re-created) →
stage and process group before each trial (live group: stopped, trial re-run) → measurement →
verdict in the row → branch tip (behind the last keep: moved there).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nightlab.config import Config
from nightlab.paths import state_dir
from nightlab.research import git, history, policy
from nightlab.research.agents.base import Context, Proposal
from nightlab.research.runner import TrialResult, group_alive, run_trial, stop_group
from nightlab.research.store import Experiment, Run, Store, now

TRAIN_WORKTREE = "train"


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
    _code_lines: dict[str, int] = field(default_factory=dict)

    @property
    def runs_dir(self) -> Path:
        return state_dir(self.dir) / "runs"

    def experiments(self) -> list[Experiment]:
        return self.store.experiments(self.run.tag)

    def best(self) -> Experiment | None:
        kept = [e for e in self.experiments() if e.status == "keep"]
        return kept[-1] if kept else None

    def best_commit(self) -> str:
        best = self.best()
        return best.commit_sha if best and best.commit_sha else self.run.base_commit

    def noise(self) -> float:
        groups = [self.store.values(e.id) for e in self.experiments() if e.finished]
        return policy.noise_width(groups, self.config.run.noise_floor)

    def code_lines(self, commit: str) -> int:
        if commit not in self._code_lines:
            self._code_lines[commit] = git.code_lines(self.dir, commit, self.config.lab.allowed_files)
        return self._code_lines[commit]


# -- proposals become experiments -------------------------------------------------------------


def context(lab: Lab) -> Context:
    """What the next proposer sees: program.md, the best code, the history, notes and the last error."""
    best = lab.best()
    commit = lab.best_commit()
    source = {name: git.read_file(lab.dir, commit, name) or "" for name in lab.config.lab.allowed_files}
    done = [e for e in lab.experiments() if e.finished]
    last = done[-1] if done else None
    last_error = ""
    if last is not None and last.status in ("crash", "timeout", "invalid"):
        last_error = f"experiment #{last.id} ({last.description}) was {last.status}: {last.reason}"
        if last.error:
            last_error += f"\n{last.error}"
    noise = lab.noise() if best else None
    return Context(
        program=_read(lab.dir / "program.md"),
        best_source=source,
        history=history.render(lab.experiments(), noise),
        notes=_notes(lab.dir / "notes"),
        last_error=last_error,
        best_val_bpb=best.val_bpb if best else None,
        noise=noise,
        allowed_files=lab.config.lab.allowed_files,
    )


def admit(lab: Lab, work: Path, parent: str, proposal: Proposal, agent: str, kind: str = "experiment") -> Experiment:
    """Check the edit in ``work`` (a checkout of ``parent``), commit it and record the experiment.

    An edit outside the allowed files, or no edit at all, is recorded as ``invalid`` with no
    commit and the worktree is reverted; the reason reaches the next proposer as its last error.
    """
    common = dict(kind=kind, worker=lab.worker, agent=agent, parent_commit=parent,
                  description=proposal.description.strip() or "(no description)", rationale=proposal.rationale,
                  cost_usd=proposal.cost_usd, tokens_in=proposal.tokens_in, tokens_out=proposal.tokens_out)
    changed = git.changed_files(work)
    refused = git.disallowed(changed, lab.config.lab.allowed_files)
    if refused or not changed:
        reason = "the proposal changed nothing"
        if refused:
            undo = "restore them and run again" if kind == "manual" else "the edit was reverted"
            reason = (f"edited files outside the allowed ones ({', '.join(lab.config.lab.allowed_files)}): "
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


def invalid_proposal(lab: Lab, parent: str, agent: str, reason: str, spent: Proposal | None = None) -> Experiment:
    """Record an agent that failed to propose (bad reply, timeout, error): ``invalid``, the loop goes on."""
    spent = spent or Proposal("(agent failed)")
    exp = lab.store.add_experiment(lab.run.tag, kind="experiment", worker=lab.worker, agent=agent,
                                   parent_commit=parent, description=spent.description, status="invalid",
                                   stage="done", reason=reason, cost_usd=spent.cost_usd, tokens_in=spent.tokens_in,
                                   tokens_out=spent.tokens_out, finished_at=now())
    lab.say(f"#{exp.id} invalid: {reason}")
    return exp


# -- measuring and judging --------------------------------------------------------------------


def measure_baseline(lab: Lab) -> Experiment:
    """The run's first best: the base commit measured with ``baseline_runs`` seeds (once per run)."""
    rows = [e for e in lab.experiments() if e.kind == "baseline"]
    exp = rows[0] if rows else lab.store.add_experiment(
        lab.run.tag, kind="baseline", worker=lab.worker, agent="", parent_commit=lab.run.base_commit,
        commit_sha=lab.run.base_commit, description="baseline", code_lines=lab.code_lines(lab.run.base_commit),
        seed=lab.config.lab.seed,
    )
    if exp.finished:
        return exp
    git.set_ref(lab.dir, git.experiment_ref(exp.id), lab.run.base_commit)
    runs = 1 if lab.config.run.policy == "greedy" else lab.config.run.baseline_runs
    failures: list[TrialResult] = []
    for k in range(runs):
        seed = lab.config.lab.seed + k
        if any(m.seed == seed for m in lab.store.measurements(exp.id)):
            continue
        result = _trial(lab, exp, seed, "baseline", k)
        if result.status != "ok":
            failures.append(result)
    values = lab.store.values(exp.id)
    if not values:
        why = failures[-1] if failures else None
        lab.store.update(exp.id, status="crash", stage="done", reason=f"baseline failed: {why.reason if why else '?'}",
                         error=why.error if why else "", finished_at=now())
        raise BaselineError(f"the baseline train.py failed ({why.reason if why else 'no result'}); fix train.py at "
                            f"{lab.run.base_commit[:10]} and run again (log: {lab.runs_dir / str(exp.id)})")
    exp = lab.store.update(exp.id, status="keep", stage="done", val_bpb=policy.mean(values), noise=lab.noise(),
                           reason=f"baseline over {len(values)} seed(s)", finished_at=now())
    lab.say(f"#{exp.id} baseline: val_bpb {exp.val_bpb:.6f} over {len(values)} seed(s), noise {lab.noise():.6f}")
    return exp


class BaselineError(RuntimeError):
    """The run's starting train.py does not train: there is nothing to compare experiments against."""


def execute(lab: Lab, exp: Experiment) -> Experiment:
    """Measure ``exp`` and judge it against the current best, running only trials not yet recorded."""
    best = lab.best()
    assert best is not None and exp.commit_sha, "measure the baseline first; a refused edit is never executed"
    seeds = [lab.config.lab.seed + k for k in range(1 + lab.config.run.confirm_runs)]
    while True:
        recorded = lab.store.measurements(exp.id)
        failed = [m for m in recorded if m.status != "ok"]
        if failed:
            return _finish_failed(lab, exp, failed[-1].status)
        if len(recorded) >= len(seeds):
            verdict = _judge(lab, exp, best)
            break
        if recorded:
            verdict = _judge(lab, exp, best)
            if verdict.decision != "confirm":
                break
        k = len(recorded)
        _trial(lab, exp, seeds[k], "first" if k == 0 else "confirm", k)
    return _finish_judged(lab, exp, best, verdict)


def _judge(lab: Lab, exp: Experiment, best: Experiment) -> policy.Verdict:
    lines_delta = (exp.code_lines or 0) - (best.code_lines or 0)
    return policy.judge(lab.store.values(exp.id), lab.store.values(best.id), lab.noise(), lab.config.run, lines_delta)


def _trial(lab: Lab, exp: Experiment, seed: int, kind: str, k: int) -> TrialResult:
    run_dir = lab.runs_dir / str(exp.id)
    if k:
        run_dir = run_dir / f"{kind}-{seed}"
    if run_dir.exists():  # a trial interrupted by a kill: start it over in a clean folder
        shutil.rmtree(run_dir) if k else _clear_files(run_dir)
    lab.store.update(exp.id, status="running", stage="train", started_at=exp.started_at or now())
    work = git.worktree(lab.dir, TRAIN_WORKTREE, exp.commit_sha or lab.run.base_commit)
    label = f"#{exp.id}" + (f" seed {seed}" if k else "")
    lab.say(f"{label} training: {exp.description}")
    result = run_trial(work, run_dir, lab.config, seed, data_dir=lab.data_dir, on_progress=lab.on_progress,
                       on_stage=lambda stage, pgid: lab.store.update(exp.id, stage=stage, pgid=pgid))
    lab.store.add_measurement(exp.id, seed, kind, result.status, result.val_bpb, run_dir, result.reason)
    if k == 0:
        s = result.summary
        lab.store.update(exp.id, stage="judge", pgid=None, training_seconds=s.get("training_seconds", result.train_s),
                         total_seconds=result.total_s, total_tokens=s.get("total_tokens"), num_steps=s.get("num_steps"),
                         num_params=s.get("num_params"), peak_memory_mb=s.get("peak_memory_mb"),
                         mfu_percent=s.get("mfu_percent"), error=result.error if result.status != "ok" else "",
                         reason=result.reason)
    elif result.status != "ok":
        lab.store.update(exp.id, stage="judge", pgid=None, error=result.error,
                         reason=f"seed {seed}: {result.reason}")
    else:
        lab.store.update(exp.id, stage="judge", pgid=None)
    if result.status == "ok":  # a failure is told once, with the experiment's verdict
        lab.say(f"{label} ok: val_bpb {result.val_bpb:.6f} ({result.total_s:.1f} s)")
    return result


def _finish_failed(lab: Lab, exp: Experiment, status: str) -> Experiment:
    exp = lab.store.update(exp.id, status=status, stage="done", finished_at=now())
    lab.say(f"#{exp.id} {status}: {exp.reason}")
    return exp


def _finish_judged(lab: Lab, exp: Experiment, best: Experiment, verdict: policy.Verdict) -> Experiment:
    values = lab.store.values(exp.id)
    exp = lab.store.update(exp.id, status=verdict.decision, stage="done", val_bpb=policy.mean(values),
                           noise=lab.noise(), reason=verdict.reason, error="", finished_at=now())
    if exp.status == "keep":
        _save_best(lab, exp)
        git.set_branch(lab.dir, lab.run.branch, exp.commit_sha or "")
    lab.say(f"#{exp.id} {exp.status}: {verdict.reason}")
    return exp


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
        text = git.read_file(lab.dir, exp.commit_sha or "", name)
        if text is not None:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text + "\n")
    (tmp / "experiment.txt").write_text(f"{exp.id}\t{exp.commit_sha}\t{exp.val_bpb}\t{exp.description}\n")
    old = state_dir(lab.dir) / f".best.{os.getpid()}.old"
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
    unfinished = []
    for exp in lab.experiments():
        if exp.finished:
            continue
        if exp.pgid and group_alive(exp.pgid):
            lab.say(f"#{exp.id}: stopping the trial left running by the previous process (group {exp.pgid})")
            stop_group(exp.pgid)
        if exp.commit_sha:
            git.set_ref(lab.dir, git.experiment_ref(exp.id), exp.commit_sha)
        exp = lab.store.update(exp.id, status="queued" if exp.kind != "baseline" else exp.status, pgid=None)
        unfinished.append(exp)
    tip = git.resolve(lab.dir, f"refs/heads/{lab.run.branch}")
    checked_out = git.current_branch(lab.dir) == lab.run.branch  # `nightlab experiment` runs: the user's branch
    if tip != lab.best_commit() and not checked_out:
        lab.say(f"branch {lab.run.branch}: moved to the last kept commit {lab.best_commit()[:10]}")
        git.set_branch(lab.dir, lab.run.branch, lab.best_commit())
    return [e for e in unfinished if e.kind != "baseline"]


def _clear_files(run_dir: Path) -> None:
    for path in run_dir.iterdir():
        if path.is_file():
            path.unlink()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _notes(folder: Path) -> str:
    if not folder.is_dir():
        return ""
    return "\n\n".join(f"## {p.name}\n{p.read_text().strip()}" for p in sorted(folder.glob("*.md")))
