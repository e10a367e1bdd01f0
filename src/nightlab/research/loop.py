"""The research loop: propose, commit, train, judge, repeat, until a limit or a signal.

The next proposal is prepared in a thread while the current experiment trains, so the GPU does
not wait for the agent. Proposer calls never overlap: ``observe`` of one experiment happens after
the next proposal is in and before the one after it is asked for. Nothing here stops the loop but
a limit, ``stop`` (a signal) or a baseline that cannot train.
"""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from nightlab.config import Config, dumps
from nightlab.paths import state_dir
from nightlab.research import git, standby
from nightlab.research.agents.base import Context, Proposal, ProposalError, Proposer
from nightlab.research.experiment import (
    Lab, admit, context, execute, invalid_proposal, measure_baseline, observe, recover,
)
from nightlab.research.store import Experiment, Run, Store, now

PROPOSE_WORKTREE = "propose"
MAX_BACKOFF_S = 60.0  # waiting after consecutive agent failures grows to this


@dataclass(frozen=True)
class Prepared:
    """A proposal ready in the propose worktree (or why there is none)."""

    parent: str
    proposal: Proposal | None
    error: str = ""
    spent: Proposal | None = None  # what a failed attempt cost


def prepare(lab_dir: Path, proposer: Proposer, ctx: Context, parent: str, worktree: str = PROPOSE_WORKTREE,
            vcs=git) -> Prepared:
    """Ask the proposer for an edit of ``parent`` in ``worktree``; any exception becomes the error
    (the loop goes on). ``vcs``: the lab's code history (``Lab.git``)."""
    try:
        work = vcs.worktree(lab_dir, worktree, parent)
        return Prepared(parent, proposer.propose(ctx, work))
    except ProposalError as e:
        spent = Proposal("(agent failed)", cost_usd=e.cost_usd, tokens_in=e.tokens_in, tokens_out=e.tokens_out)
        return Prepared(parent, None, f"agent {proposer.name} failed: {e}", spent)
    except Exception as e:  # noqa: BLE001 -- an agent failure of any kind is recorded, never fatal
        return Prepared(parent, None, f"agent {proposer.name} failed: {type(e).__name__}: {e}")


def in_background(fn, *args) -> Future:
    """Run ``fn(*args)`` in a daemon thread (an agent still thinking must not block exit)."""
    future: Future = Future()

    def target() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001
            future.set_exception(e)

    threading.Thread(target=target, daemon=True, name="nightlab-propose").start()
    return future


def start_run(lab_dir: Path, store: Store, config: Config, agent: str, tag: str, resume: bool, vcs=git) -> Run:
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


def _free_tag(lab_dir: Path, store: Store, base: str, vcs=git) -> str:
    tag, n = base, 1
    while store.run(tag) or vcs.resolve(lab_dir, f"refs/heads/{vcs.branch_name(tag)}"):
        n += 1
        tag = f"{base}-{n}"
    return tag


def run_loop(lab: Lab, proposer: Proposer, *, max_experiments: int = 0, hours: float = 0.0,
             stop: threading.Event | None = None) -> list[Experiment]:
    """Experiments until ``max_experiments`` (counted over the run), ``hours`` or ``stop``; returns the new ones."""
    stop = stop or threading.Event()
    standby.attach(lab)
    try:
        return _loop(lab, proposer, max_experiments, hours, stop)
    finally:
        if lab.standby is not None:
            lab.standby.close()
        close_agent(proposer)


def close_agent(proposer: Proposer) -> None:
    """Stop what ``proposer`` still runs (a CLI agent's process group) once the loop is over: the
    thread that waits for it dies with the interpreter, and the agent would edit on unwatched."""
    close = getattr(proposer, "close", None)
    if close is not None:
        close()


def _loop(lab: Lab, proposer: Proposer, max_experiments: int, hours: float, stop: threading.Event) -> list[Experiment]:
    deadline = time.monotonic() + hours * 3600 if hours > 0 else float("inf")
    for exp in recover(lab):
        lab.say(f"#{exp.id}: resuming ({exp.description})")
        _guarded(lab, exp, execute, lab, exp)  # one that keeps failing must not block every resume
    done: list[Experiment] = []

    def counted() -> int:
        return sum(lab.store.status_counts(lab.run.tag, kind="experiment").values())

    def more() -> bool:
        limit = max_experiments and counted() >= max_experiments
        return not (stop.is_set() or limit or time.monotonic() >= deadline)

    def ask(parent: str) -> Future:
        return in_background(prepare, lab.dir, proposer, context(lab), parent, PROPOSE_WORKTREE, lab.git)

    # The first proposal is prepared while the baseline trains (and its standby waits behind it).
    pending = ask(lab.best_commit()) if more() else None
    work = state_dir(lab.dir) / "worktrees" / PROPOSE_WORKTREE
    if lab.standby is not None:
        lab.standby.upcoming = functools.partial(_expected, lab, pending, work)
    measure_baseline(lab)
    previous: tuple[Proposal, Experiment] | None = None
    failures = 0
    while pending is not None:
        prepared = _wait(pending, stop)
        if prepared is None:
            break
        if previous:
            observe(lab, proposer, *previous)
            previous = None
        best = lab.best_commit()
        if prepared.proposal is None:
            exp = invalid_proposal(lab, prepared.parent, proposer.name, prepared.error, prepared.spent)
            failures += 1
            stop.wait(min(MAX_BACKOFF_S, 2.0 ** (failures - 1)) if failures > 1 else 0)
        elif prepared.parent != best and not lab.git.move_changes(work, best):
            lab.say("the prepared proposal conflicts with the new best; asking again")
            pending = ask(best)
            continue
        else:
            failures = 0
            exp = _guarded(lab, None, admit, lab, work, best, prepared.proposal, proposer.name,
                           author=(proposer.name, prepared.proposal))
        pending = ask(best) if more() else None
        if lab.standby is not None:  # the next proposal, once it is ready and still on the best
            lab.standby.upcoming = functools.partial(_expected, lab, pending, work)
        if exp.commit_sha and not exp.finished:
            exp = _guarded(lab, exp, execute, lab, exp)
        if prepared.proposal is not None:
            previous = (prepared.proposal, exp)
        done.append(exp)
        if lab.on_finished:
            lab.on_finished(exp)
        if pending is not None and not more():
            pending = None
    if previous:
        observe(lab, proposer, *previous)
    return done


def _expected(lab: Lab, pending: Future | None, work: Path) -> standby.Expected | None:
    """What the loop will train next, if it knows yet: the prepared proposal, while still on the best."""
    if pending is None or not pending.done():
        return None
    prepared = pending.result()
    if prepared.proposal is None or prepared.parent != lab.best_commit():
        return None
    return standby.Expected(standby.files_in(work, lab.config.lab.allowed_files), lab.config.lab.seed)


def _guarded(lab: Lab, exp: Experiment | None, fn, *args,
             author: tuple[str, Proposal] | None = None) -> Experiment:
    """``fn(*args)``; an unexpected error ends this experiment (``crash``), not the loop. Before an
    experiment exists, the failed proposal is recorded against its ``author`` (agent, proposal)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 -- e.g. a full disk or a git failure in one experiment
        reason = f"nightlab error: {type(e).__name__}: {e}"
        if exp is None:
            agent, spent = author or ("", None)
            return invalid_proposal(lab, lab.best_commit(), agent, reason, spent)
        lab.say(f"#{exp.id} crash: {reason}")
        return lab.store.update(exp.id, status="crash", stage="done", pgid=None, reason=reason, finished_at=now())


def _wait(pending: Future, stop: threading.Event) -> Prepared | None:
    while not stop.is_set():
        try:
            return pending.result(timeout=0.2)
        except FutureTimeout:
            continue
    return None
