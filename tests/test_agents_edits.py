"""The reply format of the LLM proposers, and the prompt they are shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from nightlab.night.proposals import Context, ProposalError
from nightlab.agents.edits import REPLY_FORMAT, Edit, apply_edits, parse_reply
from nightlab.agents.prompt import build_prompt

TRAIN = "A = 1  # a\nB = 2  # b\nfor _ in range(3):\n    pass\nfor _ in range(3):\n    pass\n"


def test_parse_reply_with_markdown_decoration_and_several_blocks() -> None:
    reply = parse_reply(
        "**DESCRIPTION:** raise A, lower B\n"
        "**RATIONALE:** two knobs\nat once.\n\n"
        "```python\n<<<<<<< SEARCH train.py\nA = 1  # a\n=======\nA = 3  # a\n>>>>>>> REPLACE\n```\n"
        "and then\n"
        "<<<<<<< SEARCH train.py\nB = 2  # b\n=======\n>>>>>>> REPLACE\n"
    )
    assert reply.description == "raise A, lower B"
    assert reply.rationale == "two knobs\nat once."
    assert reply.edits == (Edit("train.py", "A = 1  # a\n", "A = 3  # a\n"), Edit("train.py", "B = 2  # b\n", ""))


def test_apply_in_order_whole_file_and_trailing_space_slip(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(TRAIN)
    edits = [
        Edit("train.py", "A = 1  # a\n", "A = 3  # a\n"),
        Edit("train.py", "A = 3  # a   \nB = 2  # b\n", "B = 5\n"),
    ]
    assert apply_edits(tmp_path, edits, ("train.py",)) == ["train.py"]
    assert (tmp_path / "train.py").read_text() == TRAIN.replace("A = 1  # a\nB = 2  # b\n", "B = 5\n")
    apply_edits(tmp_path, [Edit("train.py", None, "X = 1\n")], ("train.py",))
    assert (tmp_path / "train.py").read_text() == "X = 1\n"


def test_ambiguous_or_missing_search_leaves_everything_untouched(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(TRAIN)
    good = Edit("train.py", "A = 1  # a\n", "A = 9\n")
    with pytest.raises(ProposalError, match="occurs 2 times"):
        apply_edits(tmp_path, [good, Edit("train.py", "for _ in range(3):\n", "")], ("train.py",))
    with pytest.raises(ProposalError, match="'C = 3' does not occur"):
        apply_edits(tmp_path, [good, Edit("train.py", "C = 3\n", "")], ("train.py",))
    with pytest.raises(ProposalError, match="only train.py"):
        apply_edits(tmp_path, [Edit("../escape.py", None, "x")], ("train.py",))
    assert (tmp_path / "train.py").read_text() == TRAIN
    assert not (tmp_path.parent / "escape.py").exists()


def test_prompt_sections_follow_the_context() -> None:
    full = Context(
        program="PROGRAM",
        best_source={"train.py": "```nested fence```\nX = 1\n"},
        history="HISTORY",
        notes="NOTES",
        last_error="ERROR",
        best_val_bpb=1.5,
        noise=0.002,
    )
    prompt = build_prompt(full, REPLY_FORMAT)
    titles = [line for line in prompt.user.splitlines() if line.startswith("## ")]
    assert titles == [
        "## Research program",
        "## Where things stand",
        "## History of experiments",
        "## Notes board",
        "## The last experiment failed",
        "## Current best train.py",
        "## Your answer",
    ]
    assert "````python\n```nested fence```" in prompt.user  # a fence inside the file does not end the block
    assert "±0.002000" in prompt.user and "1.500000" in prompt.user
    bare = build_prompt(Context(program="P", best_source={"train.py": "X = 1\n"}, history=""), "INSTR")
    assert "Notes board" not in bare.user and "failed" not in bare.user and "noise" not in bare.user
    assert bare.user.rstrip().endswith("INSTR") and bare.text().startswith(bare.system)
