"""Proposers: whatever edits train.py for the next experiment. See ``base.Proposer``.

``create(name, config, lab_dir)`` builds one by name; each backend is imported only when asked
for, so the optional LLM clients are needed only by the agents that use them.
"""

from __future__ import annotations

from pathlib import Path

from nightlab.config import Config
from nightlab.research.agents.base import Context, Proposal, ProposalError, Proposer

AGENTS = ("search", "api", "cli", "scripted")

__all__ = ["AGENTS", "Context", "Proposal", "ProposalError", "Proposer", "create"]


def create(name: str, config: Config, lab_dir: Path) -> Proposer:
    """The proposer called ``name`` for the lab at ``lab_dir``."""
    lab_dir = Path(lab_dir)
    if name == "search":
        from nightlab.research.agents.search import TARGET, SearchProposer, search_space

        if (lab_dir / TARGET).exists():  # a bad search.constants fails the run now, not every experiment
            search_space((lab_dir / TARGET).read_text(), config.search.constants)
        return SearchProposer(config.search, storage=lab_dir / ".nightlab" / "optuna.db", seed=config.lab.seed)
    if name == "api":
        from nightlab.research.agents.api import ApiProposer

        return ApiProposer(config.api)
    if name == "cli":
        from nightlab.research.agents.cli import CliProposer

        return CliProposer(config.cli)
    if name == "scripted":
        from nightlab.research.agents.scripted import SCRIPT_FILE, ScriptedProposer, load_script

        return ScriptedProposer(load_script(lab_dir / SCRIPT_FILE))
    raise ValueError(f"unknown agent {name!r}; known agents: {', '.join(AGENTS)}")
