"""What the lab is doing now: a snapshot from the store and the running trials' logs, and its views.

``take_snapshot`` reads only the store and ``train.log`` files, so ``nightlab status`` works from
any terminal while ``nightlab run`` works in another. A snapshot renders three ways: a ``rich``
layout for terminals (a lane per worker with a progress bar, the leaderboard, the latest events),
plain text lines where stdout is not a terminal (logs, ssh without a pty, cron), and a JSON object
for scripts. ``LiveView`` is the same view driven by the loop during ``nightlab run``.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nightlab.paths import state_dir
from nightlab.report.data import fmt_delta, fmt_seconds, fmt_val, parse_time, pick_run
from nightlab.night import history, holdout
from nightlab.night.store import Experiment, Store, last_judged

LEADERBOARD = 5
EVENTS = 8
LOG_TAIL_BYTES = 16_000  # how much of train.log is read to find the last progress line

_WORKER = re.compile(r"^\[([^\]\s]+)\]\s*")  # the scheduler's "[gpu0] " before a worker's lines
_STEP = re.compile(r"^step\s+(\d+)\b")
_LOSS = re.compile(r"\bloss\s+([-+\w.]+)")
_TOKS = re.compile(r"([\d.]+)\s*([KMG]?)\s*tok/s")
_MFU = re.compile(r"\bmfu\s+([\d.]+)%")
_CLOCK = re.compile(r"\b(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)s\s*$")
_UNITS = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9}


@dataclass(frozen=True)
class Progress:
    """One progress line of train.py: ``step 00123 | loss 3.2100 | ... | 1.62M tok/s | mfu 45.1% | ... | 123/300s``."""

    step: int
    loss: float | None = None
    tok_per_s: float | None = None
    mfu_percent: float | None = None
    elapsed_s: float | None = None
    budget_s: float | None = None

    @property
    def fraction(self) -> float | None:
        if self.elapsed_s is None or not self.budget_s:
            return None
        return min(max(self.elapsed_s / self.budget_s, 0.0), 1.0)

    @property
    def left_s(self) -> float | None:
        if self.elapsed_s is None or self.budget_s is None:
            return None
        return max(self.budget_s - self.elapsed_s, 0.0)


def split_worker(line: str) -> tuple[str | None, str]:
    """``("gpu0", "step 00123 | ...")`` for ``"[gpu0] step 00123 | ..."``; ``(None, line)`` without the prefix."""
    line = line.strip()
    worker = _WORKER.match(line)
    return (worker.group(1), line[worker.end():]) if worker else (None, line)


def parse_progress(line: str) -> Progress | None:
    """The progress line's numbers, or None when ``line`` is not a progress line (a ``[worker]`` prefix is fine)."""
    line = split_worker(line)[1]
    step = _STEP.match(line)
    if not step:
        return None
    loss = _LOSS.search(line)
    toks = _TOKS.search(line)
    mfu = _MFU.search(line)
    clock = _CLOCK.search(line)
    return Progress(
        step=int(step.group(1)),
        loss=_float(loss.group(1)) if loss else None,
        tok_per_s=float(toks.group(1)) * _UNITS[toks.group(2)] if toks else None,
        mfu_percent=float(mfu.group(1)) if mfu else None,
        elapsed_s=float(clock.group(1)) if clock else None,
        budget_s=float(clock.group(2)) if clock else None,
    )


def last_progress(log: Path) -> Progress | None:
    """The last progress line in the tail of a train.log, if any."""
    try:
        with open(log, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(text.splitlines()):
        progress = parse_progress(line)
        if progress is not None:
            return progress
    return None


# -- the snapshot -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Lane:
    worker: str
    exp_id: int | None = None  # None: the worker is idle
    description: str = ""
    stage: str = "idle"  # train | eval | judge | idle
    trial: int = 0  # 1-based trial of the experiment now running (seeds)
    elapsed_s: float | None = None  # since the experiment started
    progress: Progress | None = None


@dataclass(frozen=True)
class Entry:
    id: int
    status: str
    val_bpb: float | None
    delta: float | None
    description: str
    finished_at: str | None = None
    holdout_bpb: float | None = None  # the sealed holdout's score (keeps only, after the verdict)
    at_scale: str = ""  # holds | fails: the keep trained again at run.promote_budget_s
    training: str = ""  # how its first trial trained (tokens/s, steps, MFU, memory, startup, loss), or its error


@dataclass(frozen=True)
class Snapshot:
    run_tag: str
    branch: str
    taken_at: str
    counts: dict[str, int]
    best: Entry | None
    baseline_val: float | None
    noise: float | None
    lanes: tuple[Lane, ...]
    leaderboard: tuple[Entry, ...]
    events: tuple[str, ...] = field(default_factory=tuple)
    holdout: str = ""  # the night's val gain against its holdout gain (night.holdout.Carry), once both are scored
    overfitting: bool = False  # the val gain is not at least half carried to the holdout, beyond the noise
    in_flight: tuple[Entry, ...] = ()  # experiments queued or training now, with their descriptions
    disturbed: int = 0  # trials set aside because something outside train.py slowed them (re-run)
    budget: str = ""  # what a trial trains for: "300s", or "2000000 tokens" under lab.budget_tokens

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``nightlab status --json``)."""
        out = asdict(self)
        for lane, raw in zip(self.lanes, out["lanes"]):
            if lane.progress is not None:
                raw["progress"].update(fraction=lane.progress.fraction, left_s=lane.progress.left_s)
        return out


def take_snapshot(store: Store, lab_dir: Path | str, run_tag: str | None = None, *,
                  budget_s: float | None = None, now: datetime | None = None) -> Snapshot:
    """The run ``run_tag`` (default: the latest) as it is now.

    ``budget_s`` is the training budget, for the time left of a trial that has printed no
    progress line with its own clock yet.
    """
    lab_dir = Path(lab_dir)
    run = pick_run(store, run_tag, lab_dir)
    now = now or datetime.now(timezone.utc)
    experiments = store.experiments(run.tag)
    kept = {e.commit_sha: e for e in experiments if e.status == "keep" and e.commit_sha}
    counts: dict[str, int] = {}
    for e in experiments:
        counts[e.status] = counts.get(e.status, 0) + 1

    def entry(e: Experiment) -> Entry:
        parent = kept.get(e.parent_commit or "")
        delta = (e.val_bpb - parent.val_bpb if e.val_bpb is not None and parent is not None and parent.val_bpb
                 is not None and e.kind != "baseline" else None)
        return Entry(e.id, e.status, e.val_bpb, delta, " ".join(e.description.split()), e.finished_at,
                     e.holdout_bpb, e.at_scale, training=history.training_of(store, e) if e.finished else "")

    keeps = [e for e in experiments if e.status == "keep" and e.val_bpb is not None]
    baseline = next((e for e in keeps if e.kind == "baseline"), None)
    measured = sorted((e for e in experiments if e.val_bpb is not None and e.status in ("keep", "discard")),
                      key=lambda e: e.val_bpb)  # type: ignore[arg-type, return-value]
    finished = sorted((e for e in experiments if e.finished), key=lambda e: e.finished_at or "")
    noise = next((e.noise for e in reversed(finished) if e.noise is not None), None)
    carried = holdout.carry(baseline, last_judged(keeps) if keeps else None)
    return Snapshot(
        run_tag=run.tag, branch=run.branch, taken_at=now.isoformat(timespec="seconds"), counts=counts,
        best=entry(last_judged(keeps)) if keeps else None, baseline_val=baseline.val_bpb if baseline else None, noise=noise,
        lanes=tuple(_lanes(store, lab_dir, experiments, now, budget_s)),
        leaderboard=tuple(entry(e) for e in measured[:LEADERBOARD]),
        events=tuple(_event(entry(e)) for e in finished[-EVENTS:]),
        holdout=carried.text() if carried else "", overfitting=bool(carried and carried.alarm),
        in_flight=tuple(entry(e) for e in experiments if e.status in ("queued", "running")),
        disturbed=sum(e.disturbed for e in experiments),
        budget=next((e.budget for e in reversed(experiments) if e.budget), ""),
    )


def _lanes(store: Store, lab_dir: Path, experiments: list[Experiment], now: datetime,
           budget_s: float | None) -> list[Lane]:
    workers = sorted({e.worker for e in experiments if e.kind != "manual"} or {"local"})
    running = {e.worker: e for e in experiments if e.status == "running"}
    lanes = []
    for worker in workers:
        e = running.get(worker)
        if e is None:
            lanes.append(Lane(worker))
            continue
        started = parse_time(e.started_at)
        progress = _running_progress(state_dir(lab_dir) / "runs" / str(e.id))
        if progress is not None and progress.budget_s is None and budget_s:
            progress = Progress(progress.step, progress.loss, progress.tok_per_s, progress.mfu_percent,
                                None, budget_s)
        trials = len(store.measurements(e.id, kinds=("first", "baseline", "confirm")))
        lanes.append(Lane(worker, e.id, " ".join(e.description.split()), e.stage, trials + 1,
                          (now - started).total_seconds() if started else None, progress))
    return lanes


def _running_progress(run_dir: Path) -> Progress | None:
    """Progress of the newest train.log of an experiment (its first trial's, or a confirmation's)."""
    logs = [p for p in run_dir.glob("**/train.log") if p.is_file()]
    if not logs:
        return None
    return last_progress(max(logs, key=lambda p: p.stat().st_mtime))


def _event(e: Entry) -> str:
    at = parse_time(e.finished_at)
    clock = f"{at.astimezone():%H:%M:%S} " if at else ""
    value = f" {fmt_val(e.val_bpb)}" if e.val_bpb is not None else ""
    delta = f" ({fmt_delta(e.delta)})" if e.delta is not None else ""
    return f"{clock}#{e.id} {e.status}{value}{delta} {_clip(e.description, 70)}"


# -- plain text ---------------------------------------------------------------------------------


def render_text(snap: Snapshot, width: int = 100) -> str:
    """The snapshot as plain lines: no colours, no cursor movement (logs, pipes, dumb terminals)."""
    lines = [_headline(snap)]
    for lane in snap.lanes:
        lines.append(_lane_text(lane))
    if snap.leaderboard:
        lines.append("leaderboard:")
        lines += [f"  #{e.id:<4} {e.status:<8} {fmt_val(e.val_bpb)} {fmt_delta(e.delta):>10}  "
                  f"{_clip(e.description, 60)}"
                  for e in snap.leaderboard]
    if snap.events:
        lines.append("latest:")
        lines += [f"  {_clip(event, width - 2)}" for event in snap.events]
    return "\n".join(lines)


def _headline(snap: Snapshot) -> str:
    done = sum(n for s, n in snap.counts.items() if s not in ("queued", "running"))
    tally = ", ".join(f"{n} {s}" for s, n in sorted(snap.counts.items()) if s not in ("queued", "running"))
    best = f"best {fmt_val(snap.best.val_bpb)} (#{snap.best.id})" if snap.best else "no best yet"
    if snap.best and snap.baseline_val is not None and snap.best.val_bpb is not None:
        best += f", {fmt_delta(snap.best.val_bpb - snap.baseline_val)} vs baseline"
    if snap.best and snap.best.holdout_bpb is not None:
        best += f", holdout {fmt_val(snap.best.holdout_bpb)}"
    if snap.best and snap.best.at_scale:
        best += ", holds at scale" if snap.best.at_scale == "holds" else ", does not hold at scale"
    noise = f" | noise {fmt_val(snap.noise)}" if snap.noise is not None else ""
    if snap.disturbed:
        noise += f" | {snap.disturbed} disturbed trial(s) re-run"
    if snap.budget:
        noise = f" | budget {snap.budget}{noise}"
    alarm = " | OVERFITTING ALARM: the val gain did not carry to the holdout" if snap.overfitting else ""
    return f"run {snap.run_tag} ({snap.branch}) | {best} | {done} done ({tally or 'none'}){noise}{alarm}"


def _lane_text(lane: Lane) -> str:
    if lane.exp_id is None:
        return f"{lane.worker:<8} idle"
    p = lane.progress
    parts = [f"{lane.worker:<8} #{lane.exp_id} {lane.stage}" + (f" (seed run {lane.trial})" if lane.trial > 1 else "")]
    if p is not None and p.fraction is not None:
        filled = int(round(20 * p.fraction))
        parts.append(f"[{'#' * filled}{'.' * (20 - filled)}] {100 * p.fraction:3.0f}%")
    parts.append(_progress_text(lane))
    parts.append(_clip(lane.description, 50))
    return "  ".join(part for part in parts if part)


def _progress_text(lane: Lane) -> str:
    p = lane.progress
    if p is None:
        return f"started {fmt_seconds(lane.elapsed_s)} ago" if lane.elapsed_s is not None else ""
    bits = [f"step {p.step}"]
    if p.loss is not None:
        bits.append(f"loss {p.loss:.4f}")
    if p.tok_per_s is not None:
        bits.append(f"{_rate(p.tok_per_s)} tok/s")
    if p.left_s is not None:
        bits.append(f"{fmt_seconds(p.left_s)} left")
    return " ".join(bits)


# -- rich -----------------------------------------------------------------------------------------


def render(snap: Snapshot):
    """The snapshot as a ``rich`` renderable: lanes with progress bars, the leaderboard, the latest events."""
    from rich.console import Group  # deferred: rich is heavy; plain and --json output never load it
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    lanes = Table(title="workers", title_justify="left", expand=True, show_edge=False)
    for name, justify in (("worker", "left"), ("experiment", "left"), ("stage", "left"), ("progress", "left"),
                          ("step", "right"), ("loss", "right"), ("tok/s", "right"), ("left", "right"),
                          ("change", "left")):
        lanes.add_column(name, justify=justify, no_wrap=name != "change")
    for lane in snap.lanes:
        if lane.exp_id is None:
            lanes.add_row(lane.worker, "", Text("idle", style="dim"), "", "", "", "", "", "")
            continue
        p = lane.progress
        bar = ProgressBar(total=1.0, completed=p.fraction or 0.0, width=24) if p and p.fraction is not None else ""
        stage = lane.stage + (f" · seed run {lane.trial}" if lane.trial > 1 else "")
        lanes.add_row(
            lane.worker, f"#{lane.exp_id}", stage, bar,
            str(p.step) if p else "", f"{p.loss:.4f}" if p and p.loss is not None else "",
            _rate(p.tok_per_s) if p and p.tok_per_s is not None else "",
            fmt_seconds(p.left_s) if p and p.left_s is not None else "", Text(lane.description),
        )
    board = Table(title="leaderboard", title_justify="left", expand=True, show_edge=False)
    for name, justify in (("#", "right"), ("status", "left"), ("val_bpb", "right"), ("Δ parent", "right"),
                          ("change", "left")):
        board.add_column(name, justify=justify)
    for e in snap.leaderboard:
        board.add_row(str(e.id), Text(e.status, style=_STYLE.get(e.status, "")), fmt_val(e.val_bpb),
                      fmt_delta(e.delta), Text(e.description))
    events = Text("\n".join(snap.events) if snap.events else "no finished experiments yet", style="dim")
    return Group(Text(_headline(snap), style="bold"), lanes, board, Text("latest", style="bold"), events)


_STYLE = {"keep": "green", "discard": "", "crash": "red", "timeout": "dark_orange", "invalid": "magenta",
          "agent_failed": "yellow", "repeat": "dim", "running": "blue"}


def print_snapshot(snap: Snapshot, console=None) -> None:
    """Print once: the rich layout on a terminal, plain lines otherwise."""
    from rich.console import Console  # deferred: rich is heavy; plain and --json output never load it

    console = console or Console()
    if console.is_terminal:
        console.print(render(snap))
    else:
        console.file.write(render_text(snap) + "\n")
        console.file.flush()


def watch(snapshot: Callable[[], Snapshot], interval_s: float = 2.0, console=None,
          updates: int | None = None) -> None:
    """Refresh every ``interval_s`` until Ctrl-C (or ``updates`` times): in place on a terminal,
    else a new plain block each time, separated by a blank line."""
    from rich.console import Console  # deferred: rich is heavy; plain and --json output never load it
    from rich.live import Live

    console = console or Console()
    count = 0
    try:
        if console.is_terminal:
            with Live(render(snapshot()), console=console, auto_refresh=False, screen=False) as live:
                while updates is None or count < updates:
                    count += 1
                    live.update(render(snapshot()), refresh=True)
                    if updates is None or count < updates:
                        time.sleep(interval_s)
        else:
            while updates is None or count < updates:
                count += 1
                print_snapshot(snapshot(), console)
                if updates is None or count < updates:
                    console.file.write("\n")
                    time.sleep(interval_s)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # the reader has gone (`nightlab status --watch | head -1`): stop quietly
        _silence_stdout()


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's last flush at exit does not hit the closed pipe again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


class LiveView:
    """The live view during ``nightlab run``, driven by the loop's callbacks.

    Pass ``view.say`` as the loop's event callback and ``view.progress`` as train.py's output
    callback. On a terminal the layout redraws in place, about every ``refresh_s``; elsewhere each
    event is printed as one time-stamped line and progress lines are not repeated. Use it as a
    context manager around the run.

    Trials report their lines from worker threads (prefixed ``[worker]``), but the store may only
    be read on the thread that made the view. So the store is read there, at each event, and the
    progress lines are kept per worker; rich's refresh thread draws both, reading neither.
    """

    def __init__(self, store: Store, lab_dir: Path | str, run_tag: str, *, budget_s: float | None = None,
                 console=None, refresh_s: float = 1.0, events: int = EVENTS):
        from rich.console import Console  # deferred: rich is heavy; plain and --json output never load it

        self.store, self.lab_dir, self.run_tag, self.budget_s = store, Path(lab_dir), run_tag, budget_s
        self.console = console or Console()
        self.refresh_s = refresh_s
        self.events: deque[str] = deque(maxlen=events)
        self._live = None
        self._owner = threading.get_ident()  # the store's connection may only be used on this thread
        self._lock = threading.Lock()  # guards what follows, shared with the refresh thread
        self._snap: Snapshot | None = None  # the store as last read on the owner thread
        self._taken = 0.0  # when (time.monotonic)
        self._lines: dict[str | None, tuple[float, Progress]] = {}  # worker -> (when, its last progress line)

    @property
    def interactive(self) -> bool:
        return self.console.is_terminal

    def __enter__(self) -> LiveView:
        if self.interactive:
            from rich.live import Live  # deferred: rich is heavy; plain and --json output never load it

            self._take()
            self._live = Live(get_renderable=self._renderable, console=self.console,
                              refresh_per_second=1 / max(self.refresh_s, 0.05), redirect_stdout=True,
                              redirect_stderr=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._refresh()
            self._live.__exit__(None, None, None)
            self._live = None

    def snapshot(self) -> Snapshot:
        snap = take_snapshot(self.store, self.lab_dir, self.run_tag, budget_s=self.budget_s)
        with self._lock:
            events = tuple(self.events)
        return replace(snap, events=events) if events else snap

    def say(self, line: str) -> None:
        """An event of the loop (one line)."""
        self.update(line)

    def progress(self, line: str) -> None:
        """A line of train.py's output, from any thread: shown in its worker's lane on a terminal; ignored
        in plain mode."""
        worker, text = split_worker(line)
        progress = parse_progress(text)
        if self._live is not None and progress is not None:
            with self._lock:
                self._lines[worker] = (time.monotonic(), progress)

    def update(self, event: str | None = None) -> None:
        """Record ``event`` (if any) and redraw."""
        if event:
            stamped = f"{time.strftime('%H:%M:%S')} {event}"
            with self._lock:
                self.events.append(stamped)
            if self._live is None:
                self.console.file.write(stamped + "\n")
                self.console.file.flush()
        self._refresh()

    def _refresh(self) -> None:
        if self._live is None:
            return
        if threading.get_ident() == self._owner:
            self._take()
        self._live.refresh()

    def _take(self) -> None:
        """Read the store (owner thread only)."""
        try:
            snap = self.snapshot()
        except LookupError:
            return  # the run is not in the store yet
        with self._lock:
            self._snap, self._taken = snap, time.monotonic()

    def _renderable(self):
        from rich.text import Text  # deferred: rich is heavy; plain and --json output never load it

        with self._lock:
            snap, taken, lines, events = self._snap, self._taken, dict(self._lines), tuple(self.events)
        if snap is None:
            return Text("starting...", style="dim")
        lanes = []
        for lane in snap.lanes:
            when, progress = lines.get(lane.worker) or (lines.get(None) if len(snap.lanes) == 1 else None) or (0, None)
            if lane.exp_id is not None and progress is not None and when > taken:  # newer than the store's view
                if progress.budget_s is None and self.budget_s:
                    progress = replace(progress, budget_s=self.budget_s)
                lane = replace(lane, progress=progress)
            lanes.append(lane)
        return render(replace(snap, lanes=tuple(lanes), events=events or snap.events))


# -- helpers ------------------------------------------------------------------------------------


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _rate(tok_per_s: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if tok_per_s >= scale:
            return f"{tok_per_s / scale:.2f}{unit}"
    return f"{tok_per_s:.0f}"


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"

