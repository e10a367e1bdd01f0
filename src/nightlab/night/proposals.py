"""Proposals: what a proposer is shown, what it returns, and how its edit becomes an experiment.

``Proposer`` is the one interface every agent implements (``nightlab.agents`` holds them);
``context`` builds what it sees, ``admit`` checks and commits its edit as an experiment row (or
refuses it as a ``repeat`` of a change already measured or in flight, before it costs compute),
and ``agent_failed`` records an attempt that produced none.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from nightlab.night import history
from nightlab.night.policy import CONFLICT
from nightlab.night.state import Lab
from nightlab.night.store import FAILED, FINISHED, Experiment, now


@dataclass(frozen=True)
class Context:
    """What a proposer sees before it edits: the brief, the best code, and what happened so far."""

    program: str  # program.md (or the role file's body)
    best_source: dict[str, str]  # allowed file name -> its text at the current best commit
    history: str  # compact, token-budgeted history of experiments and outcomes
    notes: str = ""  # the notes board (agenda, findings)
    last_error: str = ""  # the previous experiment's traceback or rejection reason, if any
    best_val_bpb: float | None = None
    noise: float | None = None  # the policy's current noise width (val_bpb)
    allowed_files: tuple[str, ...] = ("train.py",)
    claim: str = ""  # the agenda item this proposer claimed (no other works on it meanwhile)
    repeats: int = 0  # this proposer's latest proposals in a row that were refused as repeats


@dataclass(frozen=True)
class Proposal:
    """A proposer's answer: the worktree holds the edit; this says what it is and what it cost."""

    description: str  # one line, shown in logs and results.tsv
    rationale: str = ""
    cost_usd: float | None = 0.0  # None: the agent does not say what it cost (never a made-up 0)
    tokens_in: int | None = 0
    tokens_out: int | None = 0
    params: dict[str, float] = field(default_factory=dict)  # search agent: the constants it set


class ProposalError(Exception):
    """The agent failed to produce a usable edit (bad reply, timeout). The loop records it and goes on.

    What the failed attempt cost is still recorded: ``cost_usd``, ``tokens_in``, ``tokens_out``
    (None where the agent does not say).
    """

    def __init__(self, reason: str, *, cost_usd: float | None = 0.0, tokens_in: int | None = 0,
                 tokens_out: int | None = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cost_usd = cost_usd
        self.tokens_in = tokens_in
        self.tokens_out = tokens_out


class Proposer(Protocol):
    name: str

    def propose(self, context: Context, worktree: Path) -> Proposal:
        """Edit the files in ``worktree`` (a checkout of the parent commit) and describe the edit."""
        ...

    def observe(self, proposal: Proposal, status: str, val_bpb: float | None) -> None:
        """Learn the outcome of a proposal (search samplers need it; others may ignore it)."""
        ...


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
    repeats = _repeats_in_a_row(lab, agent) if last is not None and last.status == "repeat" else 0
    if repeats:
        last_error = f"your proposal #{last.id} ({last.description}) was not trained: {last.reason}"
        if repeats >= lab.config.run.max_repeats:
            last_error += (f"\nYour last {repeats} proposals all repeated experiments already measured or in "
                           "flight. Stop varying this idea: read the history and try a different direction.")
    elif last is not None and last.status in FAILED:
        what = "an agent failure" if last.status == "agent_failed" else last.status
        last_error = f"experiment #{last.id} ({last.description}) was {what}: {last.reason}"
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
        history=history.digest(lab.store, lab.run.tag, noise, max_chars=history_chars,
                               diff_of=lambda e: diff(lab, e)),
        notes=_notes(lab.dir / "notes"),
        last_error=last_error,
        best_val_bpb=best.val_bpb if best else None,
        noise=noise,
        allowed_files=lab.config.lab.allowed_files,
        claim=claim,
        repeats=repeats,
    )


def diff(lab: Lab, exp: Experiment) -> str:
    """``exp``'s change to the allowed files against its parent, as a unified diff (one line of context)."""
    if not exp.commit_sha or not exp.parent_commit:
        return ""
    return _diff(lab.git, lab.dir, exp.parent_commit, exp.commit_sha, lab.config.lab.allowed_files)


@functools.lru_cache(maxsize=1024)  # commits never change: a kept diff is computed once a night
def _diff(git: Any, repo: Path, parent: str, commit: str, files: tuple[str, ...]) -> str:
    out: list[str] = []
    for name in files:
        old, new = git.read_file(repo, parent, name) or "", git.read_file(repo, commit, name) or ""
        out += difflib.unified_diff(old.splitlines(), new.splitlines(), f"a/{name}", f"b/{name}", n=1, lineterm="")
    return "\n".join(out)


def _repeats_in_a_row(lab: Lab, agent: str | None) -> int:
    """How many of ``agent``'s newest finished proposals in a row were refused as repeats."""
    count = 0
    for exp in lab.store.select(lab.run.tag, statuses=FINISHED, agent=agent, limit=64, newest_first=True):
        if exp.status != "repeat":
            break
        count += 1
    return count


def commit_message(description: str, rationale: str, tag: str) -> str:
    """An experiment's commit message: what, why (if said), and the run it belongs to."""
    return f"{description}\n\n{rationale}\n\nnightlab-run: {tag}\n".replace("\n\n\n", "\n\n")


def admit(lab: Lab, work: Path, parent: str, proposal: Proposal, agent: str, kind: str = "experiment",
          allowed: tuple[str, ...] | None = None, **extra: Any) -> Experiment:
    """Check the edit in ``work`` (a checkout of ``parent``), commit it and record the experiment.

    An edit outside the allowed files, or no edit at all, is recorded as ``invalid`` with no
    commit and the worktree is reverted; the reason reaches the next proposer as its last error.
    An agent's edit that repeats a change already measured or in flight (``repeat_of``) is recorded
    as a ``repeat`` naming that experiment, with no commit, and is never trained.
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
    if kind == "experiment" and "origin_id" not in extra:  # a re-application repeats its origin on purpose
        same = repeat_of(lab, work, parent, allowed)
        if same is not None:
            git.worktree_reset(work, parent)
            state = "in flight" if not same.finished else f"measured: {same.status}"
            reason = f"repeats #{same.id} ({same.description}; {state}), so it was not trained; propose something else"
            exp = lab.store.add_experiment(lab.run.tag, **common, status="repeat", stage="done", reason=reason,
                                           finished_at=now())
            lab.say(f"#{exp.id} refused: it repeats #{same.id}")
            return exp
    commit = git.commit_all(work, commit_message(common["description"], proposal.rationale, lab.run.tag))
    stats = git.diff_stats(lab.dir, parent, commit)
    exp = lab.store.add_experiment(
        lab.run.tag, **common, commit_sha=commit, files_changed=len(stats.files), lines_added=stats.added,
        lines_removed=stats.removed, code_lines=lab.code_lines(commit), seed=lab.config.lab.seed,
    )
    git.set_ref(lab.dir, git.experiment_ref(exp.id), commit)
    return exp


def agent_failed(lab: Lab, parent: str, agent: str, reason: str, spent: Proposal | None = None,
                 **extra: Any) -> Experiment:
    """Record an agent that failed to propose (bad reply, timeout, error): ``agent_failed``, with
    what the attempt cost; the loop goes on."""
    spent = spent or Proposal("(agent failed)")
    exp = lab.store.add_experiment(lab.run.tag, kind="experiment", worker=lab.worker, agent=agent,
                                   parent_commit=parent, description=spent.description, status="agent_failed",
                                   stage="done", reason=reason, cost_usd=spent.cost_usd, tokens_in=spent.tokens_in,
                                   tokens_out=spent.tokens_out, finished_at=now(), **extra)
    lab.say(f"#{exp.id} agent failed: {reason}")
    return exp


# -- repeats ----------------------------------------------------------------------------------


def repeat_of(lab: Lab, work: Path, parent: str, files: tuple[str, ...]) -> Experiment | None:
    """The experiment of this run whose change the edit in ``work`` repeats, if any: the same
    normalized content of ``files`` as its commit, or the same normalized diff against its parent.
    Every experiment with a commit counts: measured, queued or training now."""
    content = {name: _read(work / name) if (work / name).exists() else None for name in files}
    base = {name: lab.git.read_file(lab.dir, parent, name) for name in files}
    mine = _signature(_normalize(base), _normalize(content))
    if not mine[1]:
        return None  # only comments or spacing changed: the code is its parent's
    for exp_id, their_parent, commit in lab.store.commits(lab.run.tag):
        theirs = _commit_signature(lab.git, lab.dir, their_parent or commit, commit, files)
        if theirs[0] == mine[0] or theirs[1] == mine[1]:
            return lab.store.get(exp_id)
    return None


def _normalize(files: dict[str, str | None]) -> dict[str, tuple[str, ...] | None]:
    return {name: None if text is None else _code_lines(text) for name, text in files.items()}


@functools.lru_cache(maxsize=1024)  # the parent's text comes back with every proposal on it
def _code_lines(text: str) -> tuple[str, ...]:
    """A file as its code lines: comments and trailing spaces cut, inner runs of spaces made one,
    blank lines dropped; indentation kept (it is Python's syntax). Edits that differ only in what a
    comment says are the same experiment."""
    lines = []
    for raw in text.splitlines():
        code = _uncomment(raw).rstrip()
        if code.strip():
            indent = len(code) - len(code.lstrip())
            lines.append(code[:indent] + " ".join(code.split()))
    return tuple(lines)


def _uncomment(line: str) -> str:
    """``line`` without its trailing comment: from the first '#' with no quote after it. (Not
    tokenize: a changed line alone need not tokenize; a '#' inside a string has a quote after it.)"""
    at = line.find("#")
    while at >= 0:
        rest = line[at:]
        if "'" not in rest and '"' not in rest:
            return line[:at]
        at = line.find("#", at + 1)
    return line


def _signature(before: dict[str, tuple[str, ...] | None], after: dict[str, tuple[str, ...] | None]) -> tuple[str, str]:
    """(hash of the normalized content, hash of the normalized diff; "" when nothing but comments changed)."""
    content = hashlib.sha256(repr(sorted(after.items())).encode()).hexdigest()
    changes = []
    for name in sorted(after):
        old, new = before.get(name) or (), after[name] or ()
        if old == new and (before.get(name) is None) == (after[name] is None):
            continue
        lines = [d for d in difflib.unified_diff(old, new, n=0, lineterm="") if d[:1] in "+-" and d[:3] not in ("+++", "---")]
        changes.append((name, after[name] is None, tuple(lines)))
    return content, hashlib.sha256(repr(changes).encode()).hexdigest() if changes else ""


@functools.lru_cache(maxsize=8192)  # commits never change: each is read once a night
def _commit_signature(git: Any, repo: Path, parent: str, commit: str, files: tuple[str, ...]) -> tuple[str, str]:
    before = {name: git.read_file(repo, parent, name) for name in files}
    after = {name: git.read_file(repo, commit, name) for name in files}
    return _signature(_normalize(before), _normalize(after))


def observe(lab: Lab, proposer: Any, proposal: Proposal, exp: Experiment) -> None:
    """Tell ``proposer`` how its proposal did; a proposer that fails to listen is reported, not fatal."""
    try:
        proposer.observe(proposal, exp.status, exp.val_bpb)
    except Exception as e:  # noqa: BLE001 -- e.g. the search agent's study database is locked
        lab.say(f"agent {getattr(proposer, 'name', '?')}: could not record the outcome of #{exp.id}: {e}")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")  # a stray byte in a note must not end the night
    except OSError:
        return ""


def _notes(folder: Path) -> str:
    if not folder.is_dir():
        return ""
    return "\n\n".join(f"## {p.name}\n{_read(p).strip()}" for p in sorted(folder.glob("*.md")))
