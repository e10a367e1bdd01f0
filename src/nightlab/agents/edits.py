"""The reply format of the LLM proposers, and applying its edits to a worktree.

A reply is plain text::

    DESCRIPTION: one line saying what the experiment changes
    RATIONALE: why it should lower val_bpb (may continue on the following lines)

    <<<<<<< SEARCH train.py
    lines copied exactly from the current file
    =======
    the lines that replace them
    >>>>>>> REPLACE

Any number of SEARCH blocks may follow, applied in order; each search text must occur exactly
once in the file as it is at that point. To rewrite a whole file instead::

    <<<<<<< FILE train.py
    the complete new content
    >>>>>>> FILE

Text outside the blocks (code fences, commentary) is ignored. The edits are applied all or
nothing: one bad block leaves the worktree untouched and raises ``ProposalError``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from nightlab.night.proposals import ProposalError

REPLY_FORMAT = """Reply in exactly this format and nothing else matters:

DESCRIPTION: <one line, at most about 80 characters, saying what this experiment changes>
RATIONALE: <why it should lower val_bpb; a few sentences>

Then one or more edit blocks. A search/replace block:

<<<<<<< SEARCH train.py
<lines copied exactly from the current file, enough to be unique>
=======
<the lines that replace them>
>>>>>>> REPLACE

The search text must match the current file exactly (spaces included) and occur once. Blocks
are applied in order. To rewrite a whole file instead, use:

<<<<<<< FILE train.py
<the complete new file>
>>>>>>> FILE
"""

_HEADER = re.compile(r"^<{5,}\s*(SEARCH|FILE)\s+(\S+)\s*$")
_DIVIDER = re.compile(r"^={5,}\s*$")
_END = {"SEARCH": re.compile(r"^>{5,}\s*REPLACE\s*$"), "FILE": re.compile(r"^>{5,}\s*FILE\s*$")}
_FIELD = re.compile(r"^[#*\s]*(DESCRIPTION|RATIONALE)[*\s]*:[*\s]*(.*)$", re.IGNORECASE)


@dataclass(frozen=True)
class Edit:
    file: str
    search: str | None  # None: ``replace`` is the whole new file
    replace: str


@dataclass(frozen=True)
class Reply:
    description: str
    rationale: str
    edits: tuple[Edit, ...]


def parse_reply(text: str) -> Reply:
    """The description, rationale and edits of a reply; ``ProposalError`` says what is malformed."""
    lines = text.splitlines()
    edits: list[Edit] = []
    prose: list[str] = []
    i = 0
    while i < len(lines):
        header = _HEADER.match(lines[i])
        if not header:
            prose.append(lines[i])
            i += 1
            continue
        kind, file = header.groups()
        edit, i = _read_block(lines, i + 1, kind, file)
        edits.append(edit)
    description, rationale = _fields(prose)
    if not description:
        raise ProposalError("malformed reply: no 'DESCRIPTION: ...' line")
    if not edits:
        raise ProposalError("malformed reply: no SEARCH/REPLACE or FILE block, so there is no edit")
    return Reply(description, rationale, tuple(edits))


def _read_block(lines: list[str], i: int, kind: str, file: str) -> tuple[Edit, int]:
    start = i
    end = _END[kind]
    first: list[str] | None = None
    body: list[str] = []
    while i < len(lines):
        line = lines[i]
        if kind == "SEARCH" and first is None and _DIVIDER.match(line):
            first, body = body, []
        elif end.match(line):
            if kind == "SEARCH" and first is None:
                raise ProposalError(f"malformed reply: SEARCH block for {file} at line {start} has no ======= divider")
            text = _join(body)
            if kind == "FILE":
                return Edit(file, None, text), i + 1
            return Edit(file, _join(first or []), text), i + 1
        else:
            body.append(line)
        i += 1
    closing = "REPLACE" if kind == "SEARCH" else "FILE"
    raise ProposalError(
        f"malformed reply: {kind} block for {file} at line {start} is not closed with >>>>>>> {closing}"
    )


def _join(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def _fields(prose: list[str]) -> tuple[str, str]:
    description, rationale, in_rationale = "", [], False
    for line in prose:
        field = _FIELD.match(line)
        if field:
            name, value = field.group(1).upper(), field.group(2).strip().strip("*").strip()
            if name == "DESCRIPTION" and not description:
                description, in_rationale = value, False
            elif name == "RATIONALE":
                rationale, in_rationale = [value] if value else [], True
            continue
        if in_rationale:
            if line.strip().startswith("```"):
                in_rationale = False
            else:
                rationale.append(line)
    return description, "\n".join(rationale).strip()


def apply_edits(worktree: Path, edits: tuple[Edit, ...] | list[Edit], allowed: tuple[str, ...]) -> list[str]:
    """Apply ``edits`` to the files in ``worktree``, all or nothing; returns the files changed."""
    texts: dict[str, str] = {}
    for n, edit in enumerate(edits, 1):
        if edit.file not in allowed:
            raise ProposalError(f"edit {n} targets {edit.file}; only {', '.join(allowed)} may be edited")
        if edit.search is None:
            texts[edit.file] = edit.replace
            continue
        if edit.file not in texts:
            path = Path(worktree) / edit.file
            if not path.exists():
                raise ProposalError(
                    f"edit {n} searches {edit.file}, which does not exist; use a FILE block to create it"
                )
            texts[edit.file] = path.read_text()
        texts[edit.file] = _replace_once(texts[edit.file], edit, n)
    changed = []
    for file, text in texts.items():
        path = Path(worktree) / file
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(file)
    return changed


def _replace_once(text: str, edit: Edit, n: int) -> str:
    assert edit.search is not None
    if not edit.search.strip():
        raise ProposalError(f"edit {n} on {edit.file} has an empty search text")
    count = text.count(edit.search)
    if count == 1:
        return text.replace(edit.search, edit.replace)
    if count == 0:
        # A common slip: trailing spaces differ. Match line by line with them stripped.
        loose = _loose_replace(text, edit.search, edit.replace)
        if loose is not None:
            return loose
        first = next(line for line in edit.search.splitlines() if line.strip())
        raise ProposalError(f"edit {n}: search text starting {first.strip()[:60]!r} does not occur in {edit.file}")
    raise ProposalError(
        f"edit {n}: search text occurs {count} times in {edit.file}; include more lines to make it unique"
    )


def _loose_replace(text: str, search: str, replace: str) -> str | None:
    lines = text.splitlines(keepends=True)
    wanted = [line.rstrip() for line in search.splitlines()]
    hits = [
        i
        for i in range(len(lines) - len(wanted) + 1)
        if [line.rstrip() for line in lines[i : i + len(wanted)]] == wanted
    ]
    if len(hits) != 1:
        return None
    i = hits[0]
    return "".join(lines[:i]) + replace + "".join(lines[i + len(wanted) :])
