"""A proposer that replays pre-scripted edits: the stand-in for an LLM in tests and demos.

Each step is either a callable that edits the worktree and returns the description, or a
``(description, {file: new text})`` pair whose files are written as given. ``replace_step``
builds a search/replace step. From the command line (``--agent scripted``) the steps come from
``LAB/.nightlab/scripted.json``: a list of ``{"description": ..., "files": {name: text}}`` or
``{"description": ..., "replace": [{"file": ..., "old": ..., "new": ...}]}`` objects.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from nightlab.night.proposals import Context, Proposal, ProposalError

Step = Union[Callable[[Path], str], tuple[str, dict[str, str]]]

SCRIPT_FILE = Path(".nightlab") / "scripted.json"


@dataclass(frozen=True)
class Observation:
    """One outcome the loop reported back to the proposer."""

    description: str
    status: str
    val_bpb: float | None


def replace_step(description: str, file: str, old: str, new: str) -> Callable[[Path], str]:
    """A step that replaces the one occurrence of ``old`` by ``new`` in ``file``."""

    def apply(worktree: Path) -> str:
        path = worktree / file
        text = path.read_text()
        count = text.count(old)
        if count != 1:
            raise ProposalError(f"scripted step {description!r}: {old!r} occurs {count} times in {file}, expected once")
        path.write_text(text.replace(old, new))
        return description

    return apply


def _write_files(description: str, files: dict[str, str]) -> Callable[[Path], str]:
    def apply(worktree: Path) -> str:
        for name, text in files.items():
            path = worktree / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return description

    return apply


@dataclass
class ScriptedProposer:
    """Applies its steps in order, one per ``propose``; ``cycle`` restarts them when exhausted."""

    steps: Sequence[Step]
    cycle: bool = False
    name: str = "scripted"
    contexts: list[Context] = field(default_factory=list)  # every context it was shown
    observations: list[Observation] = field(default_factory=list)  # every outcome it was told
    _next: int = 0

    def propose(self, context: Context, worktree: Path) -> Proposal:
        self.contexts.append(context)
        if self._next >= len(self.steps):
            if not self.cycle or not self.steps:
                raise ProposalError(f"scripted proposer has no step left (it had {len(self.steps)})")
            self._next = 0
        step = self.steps[self._next]
        self._next += 1
        apply = _write_files(*step) if isinstance(step, tuple) else step
        return Proposal(description=apply(Path(worktree)), rationale="scripted step")

    def observe(self, proposal: Proposal, status: str, val_bpb: float | None) -> None:
        self.observations.append(Observation(proposal.description, status, val_bpb))


def load_script(path: Path) -> list[Step]:
    """Steps from a JSON script (see the module docstring)."""
    try:
        items = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"the scripted agent needs its steps in {path}; write a JSON list of steps there") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of steps, got {type(items).__name__}")
    steps: list[Step] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "description" not in item or not ("files" in item or "replace" in item):
            raise ValueError(f"{path}: step {i} needs 'description' and 'files' or 'replace'")
        if "files" in item:
            steps.append((str(item["description"]), {str(k): str(v) for k, v in item["files"].items()}))
        else:
            steps.append(_replace_all(str(item["description"]), item["replace"]))
    return steps


def _replace_all(description: str, edits: list[dict[str, str]]) -> Callable[[Path], str]:
    def apply(worktree: Path) -> str:
        for edit in edits:
            replace_step(description, edit["file"], edit["old"], edit["new"])(worktree)
        return description

    return apply
