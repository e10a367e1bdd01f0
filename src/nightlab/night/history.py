"""The compact history a proposer is shown: one line per experiment, within a character budget.

Every kept experiment stays in view (they are the path to the current best); the rest are the
newest that fit. Older lines that do not fit are counted by status in one line.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from nightlab.night.policy import signed
from nightlab.night.store import FINISHED, Experiment, Store

MAX_CHARS = 6000  # about 1,500 tokens
DESCRIPTION_CHARS = 100
REASON_CHARS = 90


def line(e: Experiment, best_val: float | None) -> str:
    val = f"{e.val_bpb:.6f}" if e.val_bpb is not None else "-".ljust(8)
    delta = f" ({signed(e.val_bpb - best_val)})" if e.val_bpb is not None and best_val is not None else ""
    # Past one pass over the train split, where in an epoch a run ended moves its val_bpb too.
    epochs = f" [{e.epochs:.2f} epochs]" if e.epochs is not None and e.epochs >= 1 else ""
    description = _clip(" ".join(e.description.split()), DESCRIPTION_CHARS)
    text = f"#{e.id} {e.status:<7} {val}{delta}{epochs} {description}"
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


RECENT = 80  # newest experiments read for the recent list (older ones are only counted)
NEAR_MISSES = 5
FAILED_IDEAS = 6


def digest(store: Store, run_tag: str, noise: float | None = None, max_chars: int = MAX_CHARS) -> str:
    """What every agent of a run is shown, within ``max_chars`` (about 4 characters a token).

    In order of priority: the path to the best (every keep, with its gain), near misses (discarded
    but closest to the best), failed ideas (crashes, timeouts, refusals, with why), then the newest
    experiments that fit; what does not fit is counted by status. Reads only what it shows, so it
    stays fast on a night of thousands of experiments.
    """
    counts = store.status_counts(run_tag)
    total = sum(n for status, n in counts.items() if status in FINISHED)
    if not total:
        return "No experiments yet."
    kept = store.select(run_tag, statuses=("keep",))
    best = kept[-1] if kept else None
    best_val = best.val_bpb if best else None
    header = f"{total} experiments (val_bpb, lower is better; delta against the current best)"
    if best is not None and best.val_bpb is not None:
        header += f"; best {best.val_bpb:.6f} at #{best.id}"
    if noise is not None:
        header += f"; run-to-run noise about {noise:.6f}"
    budget = max_chars - len(header) - 2
    shown: dict[int, str] = {}  # id -> status
    out = [header + ":"]

    def section(title: str, rows: Sequence[Experiment], newest_kept: bool = False) -> None:
        nonlocal budget
        rows = [e for e in rows if e.id not in shown]
        picked: list[Experiment] = []
        cost = len(title) + 2
        for e in (reversed(rows) if newest_kept else rows):
            size = len(line(e, best_val)) + 1
            if cost + size > budget:
                break
            picked.append(e)
            cost += size
        if not picked:
            return
        picked.sort(key=lambda e: e.id)
        budget -= cost
        shown.update((e.id, e.status) for e in picked)
        out.append(title)
        out.extend(line(e, best_val) for e in picked)

    path = "Path to the best (every keep, oldest first)" + (
        "" if len(kept) * 60 < budget else "; the oldest keeps that do not fit are left out") + ":"
    section(path, kept, newest_kept=True)
    misses = [e for e in store.select(run_tag, statuses=("discard",), by_val_bpb=True, limit=NEAR_MISSES * 3)
              if e.origin_id is None][:NEAR_MISSES]
    section("Near misses (discarded, closest to the best):", misses)
    failed = store.select(run_tag, statuses=("crash", "timeout", "invalid"), limit=FAILED_IDEAS, newest_first=True)
    section("Failed ideas (newest last):", failed[::-1])
    recent = [e for e in store.select(run_tag, statuses=FINISHED, limit=RECENT, newest_first=True)][::-1]
    budget -= 80  # room for the line counting what is not shown
    section("Recent experiments (newest last):", recent, newest_kept=True)
    seen = Counter(shown.values())
    hidden = {status: counts.get(status, 0) - seen.get(status, 0) for status in FINISHED}
    hidden = {s: n for s, n in hidden.items() if n > 0}
    if hidden:
        text = ", ".join(f"{n} {status}" for status, n in sorted(hidden.items()))
        out.insert(1, f"({sum(hidden.values())} experiments not shown: {text})")
    return "\n".join(out)
