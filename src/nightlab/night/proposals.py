"""Proposals: what a proposer is shown, what it returns, and how its edit becomes an experiment.

``Proposer`` is the one interface every agent implements (``nightlab.agents`` holds them);
``context`` builds what it sees, ``admit`` checks and commits its edit as an experiment row, and
``invalid_proposal`` records an attempt that produced none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from nightlab.night import history
from nightlab.night.policy import CONFLICT
from nightlab.night.state import Lab
from nightlab.night.store import FINISHED, Experiment, now


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


@dataclass(frozen=True)
class Proposal:
    """A proposer's answer: the worktree holds the edit; this says what it is and what it cost."""

    description: str  # one line, shown in logs and results.tsv
    rationale: str = ""
    cost_usd: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    params: dict[str, float] = field(default_factory=dict)  # search agent: the constants it set


class ProposalError(Exception):
    """The agent failed to produce a usable edit (bad reply, timeout). The loop records it and goes on.

    What the failed attempt cost is still recorded: ``cost_usd``, ``tokens_in``, ``tokens_out``.
    """

    def __init__(self, reason: str, *, cost_usd: float = 0.0, tokens_in: int = 0, tokens_out: int = 0) -> None:
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
