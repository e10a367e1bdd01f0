"""The notes board: agenda items, claims that keep two researchers off one idea, findings."""

from __future__ import annotations

from nightlab.night.notes import Board, agenda_items

AGENDA = """# Agenda

Some prose that is not an item.

- MATRIX_LR: try lower
* DEPTH: try higher
1. longer warmdown
- [x] already done
- [ ] untick me
- MATRIX_LR: try lower
"""


def test_agenda_items_are_the_open_list_items():
    assert agenda_items(AGENDA) == ["MATRIX_LR: try lower", "DEPTH: try higher", "longer warmdown", "untick me"]


def test_claims_are_exclusive_until_released(tmp_path):
    board = Board(tmp_path)
    assert board.claim("a") == ""  # no agenda yet
    board.write_agenda(AGENDA)
    assert board.claim("a") == "MATRIX_LR: try lower"
    assert board.claim("b") == "DEPTH: try higher"
    assert board.claim("a") == "MATRIX_LR: try lower"  # a new claim by a gives up its old one first
    board.release("b")
    assert board.claim("c") == "DEPTH: try higher"
    board.claim("d"), board.claim("e")
    assert board.claim("f") == ""  # all four held
    board.hold("DEPTH: try higher", "c")
    board.write_agenda("# Agenda\n\n- something new\n")
    assert board.items() == ["something new"] and board.claim("g") == "something new"


def test_findings_gain_a_line_each_and_files_are_replaced_whole(tmp_path):
    board = Board(tmp_path)
    board.add_finding("#3 deeper: val_bpb 0.990000")
    board.add_finding("#7 lower lr: val_bpb 0.985000")
    text = (tmp_path / "notes" / "findings.md").read_text()
    assert text == "# Findings\n- #3 deeper: val_bpb 0.990000\n- #7 lower lr: val_bpb 0.985000\n"
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["findings.md"]  # no temp file left


def test_a_note_with_stray_bytes_is_shown_not_fatal(tmp_path):
    from nightlab.night.proposals import _notes

    (tmp_path / "agenda.md").write_bytes(b"# Agenda\n- try a \xff\xfe wider MLP\n")
    shown = _notes(tmp_path)
    assert shown.startswith("## agenda.md\n# Agenda") and "wider MLP" in shown
