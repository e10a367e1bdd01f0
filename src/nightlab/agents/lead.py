"""The lead: every N experiments it reads the results and rewrites the agenda in ``notes/agenda.md``.

Researchers claim the agenda's items (``notes.Board``). Backends:

- ``stats`` (no LLM): for each constant of train.py, what moving it up or down did in recent
  experiments; the agenda lists the most promising untried or winning moves first, and the moves
  that kept failing under "Avoid" (plain lines, which nobody can claim);
- ``api``: an LLM reads the history digest, the findings and the current agenda with the role's
  instructions and writes the new agenda. A failed call keeps the old agenda.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from nightlab.night import history
from nightlab.agents.constants import find_constants
from nightlab.agents.search import dimension_for
from nightlab.night.state import Lab
from nightlab.night.notes import AGENDA, FINDINGS, Board
from nightlab.night.policy import signed
from nightlab.agents.prompt import Prompt
from nightlab.night.store import FINISHED

RECENT = 300  # experiments the stats lead looks back over
ITEMS = 8  # agenda items it writes
GIVE_UP = 3  # failures of a move, with no win, before it is to be avoided
TARGET = "train.py"


@dataclass
class Move:
    tries: int = 0
    wins: int = 0
    best_gain: float = float("-inf")


@dataclass
class StatsLead:
    """Writes the agenda from what each constant's moves did."""

    name: str = "lead"
    every: int = 10
    _constants: dict[str, dict[str, float]] = field(default_factory=dict)  # commit -> its constants

    def __call__(self, lab: Lab, board: Board) -> str:
        moves = self.moves(lab)
        best = lab.best_commit()
        keys = [c.key for c in find_constants(lab.git.read_file(lab.dir, best, TARGET) or "")
                if dimension_for(c) is not None]
        avoid = {(k, d) for (k, d), m in moves.items() if m.tries >= GIVE_UP and not m.wins and m.best_gain <= 0}
        ranked = []
        for key in keys:
            for direction in (1, -1):
                if (key, direction) in avoid:
                    continue
                m = moves.get((key, direction), Move())
                promise = (m.wins * 2 + max(m.best_gain, 0) * 1000) / (1 + m.tries) if m.tries else 0.5
                ranked.append((promise, key, direction, m))
        ranked.sort(key=lambda r: -r[0])
        done = lab.store.status_counts(lab.run.tag, kind="experiment")
        lines = ["# Agenda", "", f"Written by the lead after {sum(done.values())} experiments. "
                 "Claim one item, work on it, report.", ""]
        for promise, key, direction, m in ranked[:ITEMS]:
            said = "untried" if not m.tries else f"{m.tries} tries, {m.wins} kept, best gain {signed(m.best_gain, 4)}"
            lines.append(f"- {key}: try {'higher' if direction > 0 else 'lower'} ({said})")
        if avoid:
            lines += ["", "## Avoid", ""]
            lines += [f"{key} {'higher' if d > 0 else 'lower'}: failed {moves[(key, d)].tries} times"
                      for key, d in sorted(avoid)]
        board.write_agenda("\n".join(lines))
        return f"agenda rewritten: {min(len(ranked), ITEMS)} items, {len(avoid)} moves to avoid"

    def moves(self, lab: Lab) -> dict[tuple[str, int], Move]:
        """(constant, +1 or -1) -> what that move did, over the recent experiments."""
        rows = lab.store.select(lab.run.tag, statuses=FINISHED, kind="experiment", limit=RECENT, newest_first=True)
        kept = {e.commit_sha: e.val_bpb for e in lab.store.select(lab.run.tag, statuses=("keep",))}
        out: dict[tuple[str, int], Move] = defaultdict(Move)
        for e in rows:
            if not e.commit_sha or not e.parent_commit or e.origin_id is not None:
                continue
            before, after = self._values(lab, e.parent_commit), self._values(lab, e.commit_sha)
            changed = [(k, 1 if after[k] > v else -1) for k, v in before.items() if k in after and after[k] != v]
            if len(changed) != 1:
                continue  # only single-constant moves say something about one constant
            m = out[changed[0]]
            m.tries += 1
            m.wins += e.status == "keep" or e.reason.startswith("superseded")
            parent_val = kept.get(e.parent_commit)
            if e.val_bpb is not None and parent_val is not None:
                m.best_gain = max(m.best_gain, parent_val - e.val_bpb)
        return out

    def _values(self, lab: Lab, commit: str) -> dict[str, float]:
        if commit not in self._constants:
            source = lab.git.read_file(lab.dir, commit, TARGET) or ""
            try:
                self._constants[commit] = {c.key: c.value for c in find_constants(source)}
            except SyntaxError:
                self._constants[commit] = {}
        return self._constants[commit]


SYSTEM = (
    "You lead a small research org in nightlab, a lab that trains a small language model for a "
    "fixed time and measures val_bpb (lower is better). Researchers each claim one item of your "
    "agenda and run an experiment on it. From the results so far, write the agenda anew."
)
ANSWER = (
    "Reply with the new agenda as Markdown: a '# Agenda' title, then one list item ('- ...') per idea, "
    "most promising first, each specific enough to be one experiment. Put what should not be tried "
    "again as plain lines under '## Avoid'. Nothing else."
)


@dataclass
class ApiLead:
    client: Any  # agents.api.ApiProposer: its ``complete(prompt)``
    instructions: str = ""
    name: str = "lead"
    every: int = 10

    def __call__(self, lab: Lab, board: Board) -> str:
        notes = {name: (board.dir / name).read_text() if (board.dir / name).exists() else "" for name in
                 (AGENDA, FINDINGS)}
        user = (f"{self.instructions.strip()}\n\n" if self.instructions.strip() else "") + (
            f"## Results\n\n{history.digest(lab.store, lab.run.tag, lab.noise())}\n\n"
            f"## Findings\n\n{notes[FINDINGS].strip()}\n\n## The current agenda\n\n{notes[AGENDA].strip()}\n\n"
            f"{ANSWER}\n")
        try:
            reply = self.client.complete(Prompt(SYSTEM, user)).text
        except Exception as e:  # noqa: BLE001 -- a failed lead keeps the old agenda
            return f"the lead failed ({type(e).__name__}); the agenda stays as it was"
        text = reply.strip()
        if text.startswith("```"):
            text = text.strip("`").partition("\n")[2]
        board.write_agenda(text)
        return f"agenda rewritten by {self.name}"
