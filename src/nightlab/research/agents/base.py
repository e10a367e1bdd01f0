"""The one interface every proposer implements, and what it is shown."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


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
