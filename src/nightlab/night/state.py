"""A lab during one run, and the seams the night is built on.

``Lab`` is where a run is (its folder, settings, dataset, store and run row) and what it plugs in:
``trainer`` (``nightlab.trial.runner.run_trial``, a Ray task, or the simulator), ``git`` (the
``nightlab.night.git`` module or the simulator's in-memory history; ``CodeHistory`` names what
the night asks of it) and ``reviewer``. ``start_run`` opens a run: a new branch, or the last one
with ``--resume``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Protocol

import nightlab.night.git as real_git
from nightlab.config import Config, dumps
from nightlab.night import policy
from nightlab.night.git import DiffStats
from nightlab.night.store import FINISHED, Experiment, Run, Store, last_judged
from nightlab.paths import state_dir
from nightlab.trial.runner import Trainer, run_trial


class CodeHistory(Protocol):
    """The git operations the night uses: ``nightlab.night.git`` (a module) or the simulator's ``MemoryGit``."""

    def branch_name(self, tag: str) -> str: ...
    def experiment_ref(self, exp_id: int) -> str: ...
    def resolve(self, repo: Path, ref: str) -> str | None: ...
    def current_branch(self, repo: Path) -> str: ...
    def set_ref(self, repo: Path, ref: str, commit: str) -> None: ...
    def set_branch(self, repo: Path, branch: str, commit: str) -> None: ...
    def worktree(self, repo: Path, name: str, commit: str) -> Path: ...
    def changed_files(self, work: Path) -> list[str]: ...
    def disallowed(self, paths: list[str], allowed: tuple[str, ...]) -> list[str]: ...
    def commit_all(self, work: Path, message: str) -> str: ...
    def diff_stats(self, repo: Path, parent: str, commit: str) -> DiffStats: ...
    def read_file(self, repo: Path, commit: str, path: str) -> str | None: ...
    def read_bytes(self, repo: Path, commit: str, path: str) -> bytes | None: ...
    def code_lines(self, repo: Path, commit: str, files: tuple[str, ...]) -> int: ...
    def move_changes(self, work: Path, onto: str) -> bool: ...
    def reapply(self, work: Path, parent: str, commit: str, onto: str) -> bool: ...
    def worktree_reset(self, work: Path, commit: str) -> None: ...


@dataclass(frozen=True)
class Review:
    """A reviewer's word on a winning diff: a veto keeps it from becoming the best."""

    approve: bool
    reason: str
    reviewer: str = "reviewer"

    def text(self) -> str:
        return f"{'approve' if self.approve else 'veto'} by {self.reviewer}: {self.reason}"


Reviewer = Callable[["Lab", Experiment, Experiment], Review]  # (lab, the winner, the best it beat)
HoldoutScorer = Callable[[Path, Path, Config, int], float | None]  # (workdir, run_dir, config, seed) -> holdout_bpb


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
    git: CodeHistory = real_git  # the ``git`` module, or the simulator's in-memory ``MemoryGit``
    reviewer: Reviewer | None = None  # reads a winning diff before it becomes the best; None: no review
    holdout: HoldoutScorer | None = None  # scores a kept trial on the sealed holdout; None: the trusted judge
    _code_lines: dict[str, int] = field(default_factory=dict)
    _noise: policy.NoiseMeter | None = None
    _measured: set[int] = field(default_factory=set)  # experiments the noise meter has counted

    @property
    def runs_dir(self) -> Path:
        return state_dir(self.dir) / "runs"

    def experiments(self) -> list[Experiment]:
        return self.store.experiments(self.run.tag)

    def best(self) -> Experiment | None:
        kept = self.store.select(self.run.tag, statuses=("keep",))
        return last_judged(kept) if kept else None

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

    def noise_estimator(self) -> str:
        """How ``noise()`` is estimated, in words for a verdict's reason (``policy.NoiseMeter.estimator``)."""
        self.noise()
        assert self._noise is not None
        return self._noise.estimator

    def count_noise(self, exp: Experiment) -> None:
        """Add a finished experiment's measurements to the noise estimate (once)."""
        if self._noise is not None and exp.id not in self._measured:
            self._measured.add(exp.id)
            self._noise.add(self.store.values(exp.id))

    def code_lines(self, commit: str) -> int:
        if commit not in self._code_lines:
            self._code_lines[commit] = self.git.code_lines(self.dir, commit, self.config.lab.allowed_files)
        return self._code_lines[commit]


def start_run(lab_dir: Path, store: Store, config: Config, agent: str, tag: str, resume: bool,
              vcs: CodeHistory = real_git) -> Run:
    """The run to work on: the named or latest one with ``resume``, else a new branch from HEAD
    (``vcs``: the lab's code history, ``Lab.git``)."""
    if resume:
        runs = [r for r in store.runs() if not tag or r.tag == tag]
        if not runs:
            raise LookupError(f"no run {'named ' + repr(tag) + ' ' if tag else ''}to resume in {lab_dir}; "
                              "start one with `nightlab run`")
        return runs[-1]
    tag = tag or _free_tag(lab_dir, store, date.today().isoformat(), vcs)
    branch = vcs.branch_name(tag)
    if store.run(tag) or vcs.resolve(lab_dir, f"refs/heads/{branch}"):
        raise LookupError(f"run {tag!r} exists already; continue it with `nightlab run --resume --tag {tag}` "
                          "or choose another --tag")
    base = vcs.resolve(lab_dir, "HEAD")
    if base is None:
        raise LookupError(f"{lab_dir} has no commit yet; commit train.py first")
    run = store.add_run(tag, branch, base, agent, dumps(config))  # first: a kill before the branch exists is
    vcs.set_branch(lab_dir, branch, base)  # mended by `--resume` (recover moves the branch to the best)
    return run


def _free_tag(lab_dir: Path, store: Store, base: str, vcs: CodeHistory) -> str:
    tag, n = base, 1
    while store.run(tag) or vcs.resolve(lab_dir, f"refs/heads/{vcs.branch_name(tag)}"):
        n += 1
        tag = f"{base}-{n}"
    return tag
