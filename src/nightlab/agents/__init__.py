"""Proposers: whatever edits train.py for the next experiment. See ``nightlab.night.proposals.Proposer``.

``create(name, config, lab_dir)`` builds one by name. The optional LLM clients (``openai``,
``anthropic``) and Optuna are imported only when an agent that uses them is built.
"""

from __future__ import annotations

from pathlib import Path

from nightlab.agents.api import ApiProposer
from nightlab.agents.cli import CliProposer
from nightlab.agents.scripted import SCRIPT_FILE, ScriptedProposer, load_script
from nightlab.agents.search import TARGET, SearchProposer, search_space
from nightlab.config import AGENTS, Config
from nightlab.night.proposals import Context, Proposal, ProposalError, Proposer

__all__ = ["AGENTS", "Context", "Proposal", "ProposalError", "Proposer", "create"]


def create(name: str, config: Config, lab_dir: Path) -> Proposer:
    """The proposer called ``name`` for the lab at ``lab_dir``."""
    lab_dir = Path(lab_dir)
    if name == "search":
        if (lab_dir / TARGET).exists():  # a bad search.constants fails the run now, not every experiment
            search_space((lab_dir / TARGET).read_text(), config.search.constants)
        return SearchProposer(config.search, storage=lab_dir / ".nightlab" / "optuna.db", seed=config.lab.seed)
    if name == "api":
        return ApiProposer(config.api)
    if name == "cli":
        return CliProposer(config.cli)
    if name == "scripted":
        return ScriptedProposer(load_script(lab_dir / SCRIPT_FILE))
    raise ValueError(f"unknown agent {name!r}; known agents: {', '.join(AGENTS)}")
