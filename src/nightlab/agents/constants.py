"""The numeric UPPER_CASE constants of a script: found with ``ast``, rewritten in place.

A constant is a module-level assignment (also inside a top-level ``if``/``with``/``try``, never
inside a function or class) of an UPPER_CASE name to a number: a literal or a small arithmetic
expression of literals (``2**19``, ``-1``, ``3 * 1024``). Booleans and strings are not numbers
here. Rewriting replaces only the expression's source span, so comments and layout stay.
A name assigned more than once gets a key per occurrence: ``NAME``, ``NAME#2``, ...
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

_UPPER = re.compile(r"^_?[A-Z][A-Z0-9_]*$")
_POW2_FORM = re.compile(r"^2\s*\*\*\s*\d+$")
_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


@dataclass(frozen=True)
class Constant:
    key: str  # NAME, or NAME#k for its k-th assignment
    name: str
    value: int | float
    start: int  # byte offsets of the value expression in the UTF-8 source
    end: int
    text: str  # the expression as written

    @property
    def is_pow2_form(self) -> bool:
        """Written as ``2**k``: rewritten the same way."""
        return bool(_POW2_FORM.match(self.text))


class NotNumeric(ValueError):
    pass


def evaluate(node: ast.expr) -> int | float:
    """The value of a literal arithmetic expression; anything else raises ``NotNumeric``."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = evaluate(node.left), evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 128 or abs(left) > 2**16):
            raise NotNumeric("power too large to evaluate safely")
        try:
            return _BINARY[type(node.op)](left, right)
        except (ZeroDivisionError, OverflowError) as e:
            raise NotNumeric(str(e)) from None
    raise NotNumeric(ast.dump(node))


def find_constants(source: str) -> list[Constant]:
    """Every numeric UPPER_CASE constant of ``source``, in file order."""
    tree = ast.parse(source)
    offsets = _line_offsets(source)
    raw = source.encode()
    found: list[Constant] = []
    seen: dict[str, int] = {}
    for target, value in _module_assignments(tree.body):
        if not _UPPER.match(target) or not any(c.isalpha() for c in target):
            continue
        try:
            number = evaluate(value)
        except NotNumeric:
            continue
        seen[target] = seen.get(target, 0) + 1
        key = target if seen[target] == 1 else f"{target}#{seen[target]}"
        start = offsets[value.lineno - 1] + value.col_offset
        end = offsets[value.end_lineno - 1] + value.end_col_offset  # type: ignore[operator]
        found.append(Constant(key, target, number, start, end, raw[start:end].decode()))
    return found


def write_constants(source: str, values: Mapping[str, int | float]) -> str:
    """``source`` with the constants named by key set to the given values (unknown keys raise)."""
    constants = {c.key: c for c in find_constants(source)}
    missing = [k for k in values if k not in constants]
    if missing:
        raise KeyError(f"no numeric constant {', '.join(missing)} in the source; found: {', '.join(constants)}")
    raw = source.encode()
    for c in sorted((constants[k] for k in values), key=lambda c: c.start, reverse=True):
        raw = raw[: c.start] + format_value(c, values[c.key]).encode() + raw[c.end :]
    return raw.decode()


def format_value(constant: Constant, value: int | float) -> str:
    """How a new value is written: ``2**k`` kept for powers of two written so, ints as ints."""
    if isinstance(constant.value, int) and not isinstance(constant.value, bool):
        number = int(round(value))
        if constant.is_pow2_form and number > 0 and number & (number - 1) == 0:
            return f"2**{number.bit_length() - 1}"
        return str(number)
    return repr(float(value))


def _module_assignments(body: list[ast.stmt]) -> list[tuple[str, ast.expr]]:
    out: list[tuple[str, ast.expr]] = []
    for stmt in body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            out.append((stmt.targets[0].id, stmt.value))
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            out.append((stmt.target.id, stmt.value))
        elif isinstance(stmt, (ast.If, ast.With, ast.Try)):
            for block in ("body", "orelse", "finalbody"):
                out.extend(_module_assignments(getattr(stmt, block, [])))
            for handler in getattr(stmt, "handlers", []):
                out.extend(_module_assignments(handler.body))
    return out


def _line_offsets(source: str) -> list[int]:
    """Byte offset of each line start (ast columns count UTF-8 bytes)."""
    offsets, total = [], 0
    for line in source.encode().splitlines(keepends=True):
        offsets.append(total)
        total += len(line)
    offsets.append(total)
    return offsets


# -- what the local search needs to know about a constant, by its name -------------------------

# Constants that change a compiled shape (and so the speed and memory of a step): searched one at
# a time and less often. Matched as whole words of the name (``CPU_DEPTH``, ``TOTAL_BATCH_SIZE``).
SHAPE_WORDS = ("DEPTH", "ASPECT_RATIO", "HEAD_DIM", "MODEL_DIM", "WIDTH", "SEQ_LEN", "BATCH_SIZE", "VOCAB",
               "N_HEAD", "N_LAYER", "N_EMBD", "WINDOW")
# Shares and decay rates: values that live in (0, 1), stepped on their odds so they never reach 1.
BOUNDED_WORDS = ("MOMENTUM", "BETA1", "BETA2", "RATIO", "FRAC", "SHARE")
# Constants known to interact: a move sometimes changes a whole group in one direction.
INTERACTIONS: tuple[tuple[str, ...], ...] = (
    ("MATRIX_LR", "WEIGHT_DECAY"),  # Muon's step size and its decay act on the same matrices
    ("EMBEDDING_LR", "UNEMBEDDING_LR"),  # the token tables in and out of the model
    ("MATRIX_LR", "EMBEDDING_LR", "UNEMBEDDING_LR"),  # together: the overall learning rate
    ("WARMDOWN_RATIO", "FINAL_LR_FRAC"),  # how the schedule ends
    ("ADAM_BETA1", "ADAM_BETA2"),  # AdamW's two averaging horizons
)


def _has_word(name: str, words: tuple[str, ...]) -> bool:
    padded = f"_{name.split('#')[0]}_"
    return any(f"_{word}_" in padded for word in words)


def is_shape(name: str) -> bool:
    """Whether constant ``name`` changes the model's or the batch's shape."""
    return _has_word(name, SHAPE_WORDS)


def is_bounded(name: str, value: int | float) -> bool:
    """Whether ``name`` holds a share or a decay rate, a float kept inside (0, 1)."""
    return isinstance(value, float) and 0 < value < 1 and not is_shape(name) and _has_word(name, BOUNDED_WORDS)
