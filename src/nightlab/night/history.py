"""The history a proposer is shown, within a character budget.

Each experiment is a line (val_bpb, its delta against the best, in noise widths too, the
description and why it was judged so) and, where its trial ran, a second line of how it trained:
tokens/s, steps, MFU, peak memory, startup seconds, a few points of its loss curve, or the tail of
its error. In a fixed-time budget these say why a change won or lost. The experiments in flight
(queued, or training on a worker now) are listed so that no one proposes them again, and the kept
diffs show the chain of changes that made the best. Every kept experiment stays in view; the rest
are the newest that fit. What does not fit is counted by status in one line.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from nightlab.night.policy import signed
from nightlab.night.store import FAILED, FINISHED, Experiment, Store, last_judged

MAX_CHARS = 12000  # about 3,000 tokens
DESCRIPTION_CHARS = 100
REASON_CHARS = 90


def line(e: Experiment, best_val: float | None, noise: float | None = None) -> str:
    val = f"{e.val_bpb:.6f}" if e.val_bpb is not None else "-".ljust(8)
    delta = ""
    if e.val_bpb is not None and best_val is not None:
        widths = f", {(e.val_bpb - best_val) / noise:+.1f} noise" if noise else ""
        delta = f" ({signed(e.val_bpb - best_val)}{widths})"
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
    best = last_judged(kept) if kept else None
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
LOSS_POINTS = 5  # points of a loss curve shown
ERROR_CHARS = 300  # of a failed trial's error tail
DIFF_CHARS = 900  # of one kept diff
KEPT_DIFFS_SHARE = 0.4  # of the budget left after the path to the best: the rest is for other outcomes
_LOSS = re.compile(r"step\s+(\d+)\s*\|\s*loss\s+([-+0-9.eE]+|nan|inf)")


def training(e: Experiment, run_dir: Path | None) -> str:
    """How ``e``'s first trial trained, in one line: tokens/s, steps, MFU, memory, startup and a
    few points of its loss curve (from its row, summary.json and train.log); the error tail of a
    failure. "" when there is nothing to say."""
    summary = _summary(run_dir)
    if e.status in FAILED and e.error.strip():
        tail = " | ".join(x.strip() for x in e.error.strip().splitlines()[-4:] if x.strip())
        return "error: " + (tail if len(tail) <= ERROR_CHARS else "..." + tail[-ERROR_CHARS:])
    facts = []
    tok_per_s = summary.get("tok_per_s")
    if not _number(tok_per_s) and _number(e.total_tokens) and _number(e.training_seconds) and e.training_seconds:
        tok_per_s = e.total_tokens / e.training_seconds
    if _number(tok_per_s) and tok_per_s > 0:
        facts.append(f"{_rate(tok_per_s)} tok/s")
    if e.num_steps:
        facts.append(f"{e.num_steps} steps")
    if e.mfu_percent:
        facts.append(f"MFU {e.mfu_percent:.1f}%")
    if e.peak_memory_mb:
        facts.append(f"{e.peak_memory_mb / 1024:.1f} GB")
    if _number(summary.get("startup_seconds")):
        facts.append(f"startup {summary['startup_seconds']:.0f} s")
    curve = _loss_curve(run_dir)
    if curve:
        facts.append("loss " + " ".join(f"{loss}@{step}" for step, loss in curve))
    return ", ".join(facts)


@functools.lru_cache(maxsize=4096)  # a finished row's trial does not change; its history line is read often
def training_of(store: Store, e: Experiment) -> str:
    """``training`` of ``e``'s first trial, found through its measurements."""
    runs = store.measurements(e.id, kinds=("first", "baseline", "confirm"))
    return training(e, Path(runs[0].run_dir) if runs else None)


def _summary(run_dir: Path | None) -> dict:
    try:
        data = json.loads((run_dir / "summary.json").read_text()) if run_dir else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _loss_curve(run_dir: Path | None) -> list[tuple[int, str]]:
    """About ``LOSS_POINTS`` (step, loss) points of train.log's progress lines, first and last included."""
    try:
        text = (run_dir / "train.log").read_text(errors="replace") if run_dir else ""
    except OSError:
        return []
    points = [(int(m.group(1)), m.group(2)) for m in _LOSS.finditer(text)]
    if len(points) <= LOSS_POINTS:
        return points
    picks = sorted({round(i * (len(points) - 1) / (LOSS_POINTS - 1)) for i in range(LOSS_POINTS)})
    return [points[i] for i in picks]


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def digest(store: Store, run_tag: str, noise: float | None = None, max_chars: int = MAX_CHARS,
           diff_of: Callable[[Experiment], str] | None = None) -> str:
    """What every agent of a run is shown, within ``max_chars`` (about 4 characters a token).

    In order of priority: the experiments in flight (queued or training: not to be proposed again),
    the path to the best (every keep, with its gain), the kept diffs (``diff_of``, newest first),
    near misses (discarded but closest to the best), failed ideas (crashes, timeouts, agent
    failures, with why), then the newest experiments that fit; what does not fit is counted by
    status. Proposals refused as repeats are only counted. Reads only what it shows, so it stays
    fast on a night of thousands of experiments.
    """
    counts = store.status_counts(run_tag)
    shown_statuses = [s for s in FINISHED if s != "repeat"]
    total = sum(n for status, n in counts.items() if status in shown_statuses)
    flying = store.select(run_tag, statuses=("queued", "running"))
    if not total and not flying:
        return "No experiments yet."
    kept = store.select(run_tag, statuses=("keep",))
    best = last_judged(kept) if kept else None
    best_val = best.val_bpb if best else None
    header = f"{total} experiments (val_bpb, lower is better; delta against the current best"
    header += ", also in noise widths)" if noise else ")"
    if best is not None and best.val_bpb is not None:
        header += f"; best {best.val_bpb:.6f} at #{best.id}"
    if noise is not None:
        header += f"; run-to-run noise about {noise:.6f}"
    if counts.get("repeat"):
        header += f"; {counts['repeat']} proposal(s) refused as repeats of these"
    budget = max_chars - len(header) - 2
    shown: dict[int, str] = {}  # id -> status
    out = [header + ":"]

    def entry(e: Experiment) -> str:
        how = training_of(store, e)
        return line(e, best_val, noise) + (f"\n    {how}" if how else "")

    def section(title: str, rows: Sequence[Experiment], newest_kept: bool = False,
                render: Callable[[Experiment], str] = entry, mark: bool = True, share: float = 1.0) -> None:
        nonlocal budget
        rows = [e for e in rows if e.id not in shown] if mark else list(rows)
        picked: list[tuple[Experiment, str]] = []
        cost, room = len(title) + 2, int(budget * share)
        for e in (reversed(rows) if newest_kept else rows):
            text = render(e)
            if not text:
                continue
            if cost + len(text) + 1 > room:
                break
            picked.append((e, text))
            cost += len(text) + 1
        if not picked:
            return
        picked.sort(key=lambda p: p[0].id)
        budget -= cost
        if mark:
            shown.update((e.id, e.status) for e, _ in picked)
        out.append(title)
        out.extend(text for _, text in picked)

    section("In flight (queued or training now; do not propose these again):", flying,
            render=_in_flight, mark=False)
    path = "Path to the best (every keep, oldest first)" + (
        "" if len(kept) * 120 < budget else "; the oldest keeps that do not fit are left out") + ":"
    section(path, kept, newest_kept=True)
    if diff_of is not None:
        changes = [e for e in kept if e.kind != "baseline"]
        section("The chain of kept changes (their diffs, oldest first):", changes, newest_kept=True, mark=False,
                render=lambda e: _kept_diff(e, diff_of), share=KEPT_DIFFS_SHARE)
    misses = [e for e in store.select(run_tag, statuses=("discard",), by_val_bpb=True, limit=NEAR_MISSES * 3)
              if e.origin_id is None][:NEAR_MISSES]
    section("Near misses (discarded, closest to the best):", misses)
    failed = store.select(run_tag, statuses=FAILED, limit=FAILED_IDEAS, newest_first=True)
    section("Failed ideas (newest last):", failed[::-1])
    recent = [e for e in store.select(run_tag, statuses=tuple(shown_statuses), limit=RECENT, newest_first=True)][::-1]
    budget -= 80  # room for the line counting what is not shown
    section("Recent experiments (newest last):", recent, newest_kept=True)
    seen = Counter(shown.values())
    hidden = {status: counts.get(status, 0) - seen.get(status, 0) for status in shown_statuses}
    hidden = {s: n for s, n in hidden.items() if n > 0}
    if hidden:
        text = ", ".join(f"{n} {status}" for status, n in sorted(hidden.items()))
        out.insert(1, f"({sum(hidden.values())} experiments not shown: {text})")
    return "\n".join(out)


def _in_flight(e: Experiment) -> str:
    where = {"train": "training", "eval": "being evaluated", "judge": "being judged"}.get(e.stage, e.stage)
    state = f"{where} on {e.worker}" if e.status == "running" else "queued"
    return f"#{e.id} {state}: {_clip(' '.join(e.description.split()), DESCRIPTION_CHARS)}"


def _kept_diff(e: Experiment, diff_of: Callable[[Experiment], str]) -> str:
    try:
        diff = diff_of(e).strip()
    except Exception:  # noqa: BLE001 -- a diff that cannot be read (a pruned commit) is left out, not fatal
        return ""
    return f"#{e.id} {_clip(' '.join(e.description.split()), DESCRIPTION_CHARS)}\n{_clip(diff, DIFF_CHARS)}" if diff else ""
