"""The scripted proposer and the agent factory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nightlab.config import Config
from nightlab import agents
from nightlab.night.proposals import Context, ProposalError
from nightlab.agents.scripted import SCRIPT_FILE, ScriptedProposer, replace_step

TRAIN = "DEPTH = 4  # layers\nLR = 0.01  # learning rate\n"


def _context() -> Context:
    return Context(program="p", best_source={"train.py": TRAIN}, history="")


def test_steps_apply_in_order_and_outcomes_are_recorded(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(TRAIN)
    proposer = ScriptedProposer(
        [
            replace_step("deeper", "train.py", "DEPTH = 4", "DEPTH = 6"),
            ("rewrite", {"train.py": "DEPTH = 2\n"}),
        ]
    )
    first = proposer.propose(_context(), tmp_path)
    assert first.description == "deeper"
    assert (tmp_path / "train.py").read_text() == TRAIN.replace("DEPTH = 4", "DEPTH = 6")
    proposer.observe(first, "keep", 1.5)
    assert proposer.propose(_context(), tmp_path).description == "rewrite"
    assert (tmp_path / "train.py").read_text() == "DEPTH = 2\n"
    assert [(o.description, o.status, o.val_bpb) for o in proposer.observations] == [("deeper", "keep", 1.5)]
    assert len(proposer.contexts) == 2
    with pytest.raises(ProposalError, match="no step left"):
        proposer.propose(_context(), tmp_path)


def test_cycle_restarts_and_missing_search_text_is_a_proposal_error(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(TRAIN)
    proposer = ScriptedProposer([replace_step("faster", "train.py", "LR = 0.01", "LR = 0.02")], cycle=True)
    proposer.propose(_context(), tmp_path)
    with pytest.raises(ProposalError, match="occurs 0 times"):
        proposer.propose(_context(), tmp_path)


def test_factory_builds_scripted_from_the_lab_script(tmp_path: Path) -> None:
    (tmp_path / ".nightlab").mkdir()
    (tmp_path / SCRIPT_FILE).write_text(
        json.dumps(
            [
                {"description": "lr up", "replace": [{"file": "train.py", "old": "LR = 0.01", "new": "LR = 0.03"}]},
                {"description": "new file", "files": {"train.py": "X = 1\n"}},
            ]
        )
    )
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text(TRAIN)
    proposer = agents.create("scripted", Config(), tmp_path)
    assert proposer.propose(_context(), work).description == "lr up"
    assert "LR = 0.03" in (work / "train.py").read_text()
    assert proposer.propose(_context(), work).description == "new file"
    assert (work / "train.py").read_text() == "X = 1\n"


def test_factory_rejects_unknown_names_listing_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'gpt'.*search, api, cli, scripted"):
        agents.create("gpt", Config(), tmp_path)


def test_factory_scripted_without_script_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="scripted.json"):
        agents.create("scripted", Config(), tmp_path)
