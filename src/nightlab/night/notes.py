"""The notes board in ``LAB/notes/``: the agenda a lead writes, findings, and claims on agenda items.

``notes/agenda.md`` is Markdown; each list item (``- ...``, ``* ...``, ``1. ...``; a checked
``- [x]`` item is done) is one idea to work on. A researcher claims an item before it proposes,
and holds it until its experiment has a verdict, so two researchers never run the same idea at
once. Claims live in the orchestrator (every agent runs there) and are recorded in each
experiment's ``claim`` column. ``notes/findings.md`` gains a line for each new best.
Files are replaced by rename, so a reader never sees half an agenda.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

AGENDA = "agenda.md"
FINDINGS = "findings.md"
_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+(?:\[( |x|X)\]\s+)?(?P<text>\S.*?)\s*$")


def agenda_items(text: str) -> list[str]:
    """The open items of an agenda (list items not checked off), in order, without duplicates."""
    items: list[str] = []
    for line in text.splitlines():
        match = _ITEM.match(line)
        if match and (match.group(1) or " ") == " " and match.group("text") not in items:
            items.append(match.group("text"))
    return items


class Board:
    """The lab's notes folder, with the claims held on agenda items."""

    def __init__(self, lab_dir: Path) -> None:
        self.dir = Path(lab_dir) / "notes"
        self.claims: dict[str, str] = {}  # agenda item -> the agent holding it
        self._cache: tuple[float, list[str]] = (-1.0, [])

    def items(self) -> list[str]:
        path = self.dir / AGENDA
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return []
        if mtime != self._cache[0]:
            self._cache = (mtime, agenda_items(path.read_text()))
        return self._cache[1]

    def claim(self, agent: str) -> str:
        """Claim the first open agenda item nobody holds for ``agent``; "" when none is free."""
        self.release(agent)
        for item in self.items():
            if item not in self.claims:
                self.claims[item] = agent
                return item
        return ""

    def hold(self, item: str, agent: str) -> None:
        """Record a claim made before a restart (from an unfinished experiment's ``claim``)."""
        if item:
            self.claims[item] = agent

    def release(self, agent: str) -> None:
        for item in [i for i, a in self.claims.items() if a == agent]:
            del self.claims[item]

    def write_agenda(self, text: str) -> None:
        _write(self.dir / AGENDA, text if text.endswith("\n") else text + "\n")

    def add_finding(self, line: str) -> None:
        path = self.dir / FINDINGS
        old = path.read_text() if path.exists() else "# Findings\n"
        _write(path, old.rstrip("\n") + f"\n- {line.strip()}\n")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
