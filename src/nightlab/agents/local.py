"""The local researcher (``search.mode = "local"``, the default): one small move from the best at a time.

A tuned train.py sits near a good point, so a search that redraws every constant at once mostly
proposes far worse code. This one changes one constant of the current best (sometimes a group of
two or three known to interact, ``constants.INTERACTIONS``) by a step relative to its value:

- each constant has its own step (a factor, starting at ``FIRST_STEP``): it grows after a win
  and shrinks after a loss, as in a (1+1) evolution strategy;
- each direction of each constant keeps its wins and losses; the next move is drawn by Thompson
  sampling over them, so the directions that pay off are tried again and untried ones get a turn;
- a constant that changes a compiled shape (``constants.is_shape``: speed, memory, compilation)
  moves alone, in about one proposal of ``1 / SHAPE_SHARE``;
- ints move by at least 1, powers of two by one power, shares in (0, 1) on their odds;
- a point already proposed (measured or under way) is never proposed again.

The statistics live in a JSON file beside the Optuna study (``.nightlab/search-local.json``),
rewritten after every proposal and outcome, so ``nightlab run --resume`` keeps them. Written here,
not as an Optuna sampler: Optuna samples whole points from a distribution, while this is a move of
one coordinate whose size follows its own record, a few lines of arithmetic on a small JSON file.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightlab.agents.constants import (
    INTERACTIONS, Constant, find_constants, format_value, is_bounded, is_shape, write_constants,
)
from nightlab.night.proposals import Proposal, ProposalError

FIRST_STEP = 1.5  # a constant's first move: x1.5 or /1.5
GROW, SHRINK = 1.5, 0.8  # the step's log after a win, after a loss
MIN_STEP, MAX_STEP = 1.05, 4.0
SHAPE_SHARE = 0.2  # share of proposals that move a shape-changing constant (when one is searched)
GROUP_CHANCE = 0.15  # share of moves that change a group of interacting constants together
WIN, HALF, LOSS = 1.0, 0.5, 0.0  # a keep; better than the best but not kept; worse or failed
UP, DOWN = "up", "down"


@dataclass(frozen=True)
class Move:
    key: str
    direction: str  # up | down
    old: int | float
    new: int | float
    step: float  # the factor the value moved by (for ints and powers of two, the one it rounds to)


class LocalSearch:
    """Proposes one move from the best; ``state`` is plain JSON, saved to ``path`` after each change."""

    def __init__(self, keys: tuple[str, ...], path: Path | None, seed: int) -> None:
        self.keys = keys  # the constants it may change (search.constants, or every numeric one)
        self.path = path
        self.seed = seed
        self.state: dict[str, Any] = {"arms": {}, "measured": [], "pending": [], "proposals": 0}
        if path is not None and path.exists():
            self.state.update(json.loads(path.read_text()))

    # -- proposing ---------------------------------------------------------------------------

    def propose(self, source: str, best_val_bpb: float | None) -> tuple[str, Proposal]:
        """The edited source and its proposal: one move (or one group's) from ``source``, never a point seen."""
        constants = {c.key: c for c in find_constants(source) if self._searchable(c)}
        if not constants:
            raise ProposalError("none of the searched constants is left in train.py with a value that can move")
        rng = random.Random(self.seed * 1_000_003 + self.state["proposals"])
        self.state["proposals"] += 1
        seen = set(self.state["measured"])
        seen.add(_point(source, self.keys))  # the best itself
        for widen in (1.0, 2.0, 4.0):  # every near point seen: look further
            for moves in self._candidates(constants, rng, widen):
                edited = write_constants(source, {m.key: m.new for m in moves})
                point = _point(edited, self.keys)
                if point in seen:
                    continue
                self.state["measured"].append(point)
                params = {m.key: float(m.new) for m in moves}
                self.state["pending"].append({"params": params, "best": best_val_bpb,
                                              "moves": [[m.key, m.direction] for m in moves]})
                self._save()
                text = ", ".join(f"{m.key} {constants[m.key].text}→{format_value(constants[m.key], m.new)}"
                                 for m in moves)
                why = self._why(moves)
                proposal = Proposal(description=f"search: {text}: {why}",
                                    rationale=f"local search from the best: {why}", params=params)
                return edited, proposal
        self._save()
        raise ProposalError("every nearby value of the searched constants was measured already; "
                            "widen search.constants or use search.mode = \"global\"")

    def _candidates(self, constants: dict[str, Constant], rng: random.Random, widen: float) -> list[list[Move]]:
        """Moves in the order to try them, by a Thompson draw from each direction's record: in about
        ``SHAPE_SHARE`` of the turns the shape-changing constants come first, else the others (and,
        ``GROUP_CHANCE`` of the time, a group of interacting ones moved together before them)."""
        shapes_first = rng.random() < SHAPE_SHARE
        scored = []
        for key, c in constants.items():
            for direction in (UP, DOWN):
                move = _move(c, direction, self._arm(key)["step"] ** widen)
                if move is not None:  # this turn's kind (shape or not) first, the other kind after it
                    scored.append((self._draw(rng, key, direction) + (is_shape(key) == shapes_first), [move]))
        if not shapes_first and rng.random() < GROUP_CHANCE:
            for group in INTERACTIONS:
                if not all(k in constants and not is_shape(k) for k in group):
                    continue
                for direction in (UP, DOWN):
                    moves = [_move(constants[k], direction, self._arm(k)["step"] ** widen) for k in group]
                    if all(moves):
                        draw = sum(self._draw(rng, k, direction) for k in group) / len(group)
                        scored.append((2.0 + draw, moves))  # ahead of every single move this turn
        scored.sort(key=lambda item: -item[0])
        return [moves for _, moves in scored]

    def _draw(self, rng: random.Random, key: str, direction: str) -> float:
        """A draw from the Beta posterior of how often moving ``key`` that way wins."""
        record = self._arm(key)[direction]
        return rng.betavariate(1 + sum(record), 1 + len(record) - sum(record))

    def _why(self, moves: list[Move]) -> str:
        if len(moves) > 1:
            verb = "raised" if moves[0].direction == UP else "lowered"
            steps = ", ".join(f"x{m.step:.3g}" for m in moves)
            return f"{verb} together (they interact), steps {steps}"
        m = moves[0]
        arm = self._arm(m.key)
        record, other = arm[m.direction], arm[DOWN if m.direction == UP else UP]
        noun, other_noun = ("raise", "lowering") if m.direction == UP else ("lowering", "raise")
        streak = 0
        for outcome in reversed(record):
            if outcome != WIN:
                break
            streak += 1
        if streak:
            count = {1: "", 2: "two "}.get(streak, f"{streak} ")
            said = f"the last {count}{noun}{'s' if streak > 1 else ''} won"
        elif not record and other and other[-1] == LOSS:
            said = f"the last {other_noun} lost"
        elif not record:
            said = f"no {noun} tried yet"
        else:
            said = f"{noun}s won {sum(record):g} of {len(record)}"
        shape = "; it changes a shape" if is_shape(m.key) else ""
        return f"step x{m.step:.3g}, {said}{shape}"

    # -- learning ----------------------------------------------------------------------------

    def observe(self, params: dict[str, float], status: str, val_bpb: float | None) -> bool:
        """Learn the outcome of the proposal with ``params``; False when it was not one of this search's."""
        pending = self.state["pending"]
        found = next((i for i, p in enumerate(pending) if p["params"] == params), None)
        if found is None:
            return False
        entry = pending.pop(found)
        best = entry["best"]
        if status == "keep":
            outcome = WIN
        elif status == "discard" and val_bpb is not None and best is not None and val_bpb < best:
            outcome = HALF
        else:
            outcome = LOSS
        for key, direction in entry["moves"]:
            arm = self._arm(key)
            arm[direction].append(outcome)
            if outcome == WIN:
                arm["step"] = min(MAX_STEP, math.exp(math.log(arm["step"]) * GROW))
            elif outcome == LOSS:
                arm["step"] = max(MIN_STEP, math.exp(math.log(arm["step"]) * SHRINK))
        self._save()
        return True

    def step(self, key: str) -> float:
        """The factor the next move of ``key`` will use."""
        return self._arm(key)["step"]

    def _arm(self, key: str) -> dict[str, Any]:
        return self.state["arms"].setdefault(key, {"step": FIRST_STEP, UP: [], DOWN: []})

    def _searchable(self, c: Constant) -> bool:
        return (not self.keys or c.key in self.keys) and not isinstance(c.value, bool) and c.value != 0 and (
            isinstance(c.value, float) or c.value > 0)

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)


def _move(c: Constant, direction: str, step: float) -> Move | None:
    """``c`` moved by ``step`` (a factor > 1) up or down; None when it cannot move that way."""
    v, up = c.value, direction == UP
    if isinstance(v, int):
        if v > 16 and (v & (v - 1) == 0 or c.is_pow2_form):
            new: int | float = v * 2 if up else v // 2  # a power of two moves by one power
        else:
            delta = max(1, round(v * (step - 1)))
            new = v + delta if up else v - delta
        if new < 1:
            return None
        return Move(c.key, direction, v, new, new / v if up else v / new)
    if is_bounded(c.key, v):
        odds = v / (1 - v) * (step if up else 1 / step)
        new = _round(odds / (1 + odds), v)
    else:
        new = _round(v * step if up else v / step, v)
    if new == v:
        return None
    return Move(c.key, direction, v, new, step)


def _round(value: float, old: float) -> float:
    """``value`` to 3 significant digits (more if that would round it back to ``old``)."""
    for digits in (3, 4, 6):
        rounded = float(f"{value:.{digits}g}")
        if rounded != old:
            return rounded
    return value


def _point(source: str, keys: tuple[str, ...]) -> str:
    """The searched constants' values of ``source``, as one comparable string."""
    values = {c.key: c.value for c in find_constants(source) if not keys or c.key in keys}
    return json.dumps(values, sort_keys=True)
