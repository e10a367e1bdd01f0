"""The compact history a proposer is shown: one line per experiment, within a character budget.

Every kept experiment stays in view (they are the path to the current best); the rest are the
newest that fit. Older lines that do not fit are counted by status in one line.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from nightlab.research.store import Experiment

MAX_CHARS = 6000  # about 1,500 tokens
DESCRIPTION_CHARS = 100
REASON_CHARS = 90


def line(e: Experiment, best_val: float | None) -> str:
    val = f"{e.val_bpb:.6f}" if e.val_bpb is not None else "-".ljust(8)
    delta = f" ({e.val_bpb - best_val:+.6f})" if e.val_bpb is not None and best_val is not None else ""
    description = _clip(" ".join(e.description.split()), DESCRIPTION_CHARS)
    text = f"#{e.id} {e.status:<7} {val}{delta} {description}"
    if e.status != "keep" and e.reason:
        text += f" -- {_clip(' '.join(e.reason.split()), REASON_CHARS)}"
    return text


def render(experiments: Sequence[Experiment], noise: float | None = None, max_chars: int = MAX_CHARS) -> str:
    """History text of finished ``experiments`` (in id order), newest last."""
    done = [e for e in experiments if e.finished]
    if not done:
        return "No experiments yet."
    kept = [e for e in done if e.status == "keep"]
    best = kept[-1] if kept else None
    header = f"{len(done)} experiments (val_bpb, lower is better; delta against the current best)"
    if best is not None and best.val_bpb is not None:
        header += f"; best {best.val_bpb:.6f} at #{best.id}"
    if noise is not None:
        header += f"; run-to-run noise about {noise:.6f}"
    best_val = best.val_bpb if best else None
    lines = {e.id: line(e, best_val) for e in done}
    shown = {e.id for e in kept}
    budget = max_chars - len(header) - sum(len(lines[i]) + 1 for i in shown) - 80
    for e in reversed(done):
        if e.id in shown:
            continue
        if len(lines[e.id]) + 1 > budget:
            break
        shown.add(e.id)
        budget -= len(lines[e.id]) + 1
    hidden = Counter(e.status for e in done if e.id not in shown)
    out = [header + ":"]
    if hidden:
        counts = ", ".join(f"{n} {status}" for status, n in sorted(hidden.items()))
        out.append(f"({sum(hidden.values())} older experiments not shown: {counts})")
    out += [lines[e.id] for e in done if e.id in shown]
    return "\n".join(out)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
