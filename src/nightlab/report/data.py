"""What a night was, read from the store, the run folders and git, as plain records for the views.

Everything the report, the Markdown summary and the plots show is computed here once: each
experiment with its change against its parent, the running best, failures grouped by cause, what
each worker did when, what the agents cost and the noise the policy measured. Nothing here writes.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from nightlab.config import RunConfig
from nightlab.paths import state_dir
from nightlab.night import git, holdout, policy
from nightlab.night.store import FAILED, FINISHED, Check, Experiment, Measurement, Run, Store

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_DIFF_CHARS = 60_000  # a diff longer than this is cut in the report (the commit has it whole)


@dataclass(frozen=True)
class Row:
    """One experiment as the views show it."""

    exp: Experiment
    number: int  # 1-based position within its run
    parent_id: int | None  # the experiment whose commit this one was measured against
    parent_val: float | None
    values: tuple[float, ...]  # the judged val_bpb measurements (one per seed)
    trials: int  # trials run (ok or not), replays excluded
    eval_s: float | None  # the first trial's evaluation seconds (eval.json)

    @property
    def id(self) -> int:
        return self.exp.id

    @property
    def status(self) -> str:
        return self.exp.status

    @property
    def delta(self) -> float | None:
        """val_bpb minus the parent's (negative is better)."""
        if self.exp.val_bpb is None or self.parent_val is None or self.exp.kind == "baseline":
            return None
        return self.exp.val_bpb - self.parent_val

    @property
    def memory_gb(self) -> float | None:
        return None if self.exp.peak_memory_mb is None else self.exp.peak_memory_mb / 1024

    @property
    def failed(self) -> bool:
        return self.exp.status in FAILED


@dataclass(frozen=True)
class FailureGroup:
    status: str
    cause: str  # the normalised last line of the error (or the reason)
    ids: tuple[int, ...]
    example: str  # the full error tail of the first one


@dataclass(frozen=True)
class Segment:
    worker: str
    state: str  # train | eval | idle
    start: datetime
    end: datetime
    exp_id: int | None


@dataclass(frozen=True)
class Costs:
    """What the agents cost: sums of what they reported; proposals whose agent does not say are
    counted in ``unknown``, never as 0."""

    usd: float
    tokens_in: int
    tokens_out: int
    by_agent: dict[str, tuple[float, int, int, int]]  # agent -> (usd, tokens in, tokens out, proposals)
    keeps: int
    unknown: int = 0  # proposals with no reported cost
    gain: float | None = None  # val_bpb the kept changes won: the baseline's minus the best's

    @property
    def usd_per_keep(self) -> float | None:
        return self.usd / self.keeps if self.keeps else None

    @property
    def usd_per_milli_bpb(self) -> float | None:
        """Dollars per 0.001 val_bpb of kept gain: the night's cost per kept gain."""
        return self.usd / (self.gain * 1000) if self.gain and self.gain > 0 else None


@dataclass(frozen=True)
class Noise:
    policy: str  # noise | greedy
    width: float  # what the policy uses: the measured width, never below the floor
    measured: float | None  # pooled standard deviation of reruns; None without reruns
    floor: float
    reruns: int  # degrees of freedom behind the measurement
    baseline: tuple[float, ...]  # the baseline's val_bpb per seed


@dataclass
class Night:
    """One run of the loop, ready to show."""

    lab_dir: Path
    run: Run
    rows: list[Row]
    noise: Noise
    checks: list[Check] = field(default_factory=list)  # trials after the verdicts: finalize's ablations, scale
    _diffs: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def finished(self) -> list[Row]:
        return [r for r in self.rows if r.exp.finished]

    @property
    def kept(self) -> list[Row]:
        return [r for r in self.rows if r.status == "keep" and r.exp.val_bpb is not None]

    @property
    def best(self) -> Row | None:
        kept = self.kept
        return kept[-1] if kept else None

    @property
    def baseline(self) -> Row | None:
        return next((r for r in self.kept if r.exp.kind == "baseline"), None)

    @property
    def carry(self) -> holdout.Carry | None:
        """The night's val gain against its holdout gain, with the overfitting alarm; None until both are scored."""
        baseline, best = self.baseline, self.best
        return holdout.carry(baseline.exp if baseline else None, best.exp if best else None)

    def ablations(self) -> list[tuple[Row, float | None, float | None]]:
        """``nightlab finalize``'s latest measurement of each keep: (keep, val_bpb and holdout cost of
        reverting it from the best, mean over seeds; positive: the keep helps). Empty before it ran."""
        best = max((c.best_id for c in self.checks if c.kind == "ablation"), default=None)
        mine = [c for c in self.checks if c.kind == "ablation" and c.best_id == best and c.status == "ok"]

        def mean(keep_id: int, name: str) -> float | None:
            values = [getattr(c, name) for c in mine if c.keep_id == keep_id and getattr(c, name) is not None]
            return sum(values) / len(values) if values else None

        out = []
        for row in self.kept:
            if row.exp.kind == "baseline" or not any(c.keep_id == row.id for c in mine):
                continue
            costs = []
            for name in ("val_bpb", "holdout_bpb"):
                without, kept = mean(row.id, name), mean(0, name)
                costs.append(without - kept if without is not None and kept is not None else None)
            out.append((row, costs[0], costs[1]))
        return out

    def holdout_chain(self) -> list[Row]:
        """The kept chain (the baseline, then each keep) with its holdout scored, in order."""
        return [r for r in self.kept if r.exp.holdout_bpb is not None]

    @property
    def running(self) -> list[Row]:
        return [r for r in self.rows if r.status == "running"]

    def counts(self) -> dict[str, int]:
        return dict(Counter(r.status for r in self.rows))

    def improvement(self) -> float | None:
        """Baseline val_bpb minus best val_bpb (positive is progress)."""
        base, best = self.baseline, self.best
        if base is None or best is None:
            return None
        return base.exp.val_bpb - best.exp.val_bpb  # type: ignore[operator]

    def span(self) -> tuple[datetime, datetime] | None:
        times = [t for r in self.rows for t in (parse_time(r.exp.started_at), parse_time(r.exp.finished_at)) if t]
        return (min(times), max(times)) if times else None

    def diff(self, row: Row) -> str:
        """The experiment's change as a unified diff against its parent ('' when there is none)."""
        if row.id not in self._diffs:
            self._diffs[row.id] = experiment_diff(self.lab_dir, row.exp)
        return self._diffs[row.id]

    def run_dir(self, row: Row) -> Path:
        return state_dir(self.lab_dir) / "runs" / str(row.id)


# -- loading ----------------------------------------------------------------------------------


def load_night(lab_dir: Path | str, run_tag: str | None = None, store: Store | None = None) -> Night:
    """The run named ``run_tag`` (default: the latest) of the lab at ``lab_dir``."""
    lab_dir = Path(lab_dir)
    own = store is None
    store = store or Store.open(lab_dir)
    try:
        run = pick_run(store, run_tag, lab_dir)
        experiments = store.experiments(run.tag)
        measurements = {e.id: store.measurements(e.id) for e in experiments}
        checks = store.checks(run.tag)
        rules = run_rules(run)
    finally:
        if own:
            store.close()
    rows = build_rows(lab_dir, experiments, measurements)
    return Night(lab_dir, run, rows, measure_noise(rows, measurements, rules), checks)


def pick_run(store: Store, run_tag: str | None, lab_dir: Path) -> Run:
    runs = store.runs()
    if not runs:
        raise LookupError(f"no runs recorded in {lab_dir}; start one with `nightlab run`")
    if run_tag is None:
        return max(runs, key=lambda r: r.created_at)
    for run in runs:
        if run.tag == run_tag:
            return run
    raise LookupError(f"no run {run_tag!r} in {lab_dir}; runs: {', '.join(r.tag for r in runs)}")


def run_rules(run: Run) -> RunConfig:
    """The policy settings the run started with (recorded as TOML in the run's row)."""
    try:
        section = tomllib.loads(run.config).get("run", {})
    except tomllib.TOMLDecodeError:
        section = {}
    defaults = RunConfig()
    return RunConfig(policy=str(section.get("policy", defaults.policy)),
                     noise_floor=float(section.get("noise_floor", defaults.noise_floor)))


def build_rows(lab_dir: Path, experiments: list[Experiment], measurements: dict[int, list[Measurement]]) -> list[Row]:
    by_commit: dict[str, Experiment] = {}
    rows = []
    for number, e in enumerate(experiments, start=1):
        parent = by_commit.get(e.parent_commit or "")
        ms = measurements.get(e.id, [])
        rows.append(Row(
            exp=e, number=number, parent_id=parent.id if parent else None,
            parent_val=parent.val_bpb if parent else None,
            values=tuple(m.val_bpb for m in ms if m.status == "ok" and m.val_bpb is not None),
            trials=len(ms), eval_s=_eval_seconds(state_dir(lab_dir) / "runs" / str(e.id)),
        ))
        if e.status == "keep" and e.commit_sha:
            by_commit[e.commit_sha] = e
    return rows


def _eval_seconds(run_dir: Path) -> float | None:
    try:
        value = json.loads((run_dir / "eval.json").read_text()).get("eval_s")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def experiment_diff(lab_dir: Path, exp: Experiment) -> str:
    if not exp.commit_sha or not exp.parent_commit or exp.commit_sha == exp.parent_commit:
        return ""
    try:
        text = git.diff(lab_dir, exp.parent_commit, exp.commit_sha)
    except (git.GitError, OSError) as e:
        return f"(diff unavailable: {e})"
    if len(text) > MAX_DIFF_CHARS:
        text = text[:MAX_DIFF_CHARS] + f"\n... cut at {MAX_DIFF_CHARS} characters; `git show {exp.commit_sha[:10]}`"
    return text


# -- what the views derive ---------------------------------------------------------------------


def running_best(rows: list[Row]) -> list[tuple[int, float]]:
    """(experiment id, best val_bpb so far) at every kept experiment, in order."""
    return [(r.id, r.exp.val_bpb) for r in rows if r.status == "keep" and r.exp.val_bpb is not None]


_NUMBER = re.compile(r"(?:(?<![A-Za-z_])|(?<=\dx))(0x[0-9a-fA-F]+|\d+(\.\d+)?)")  # 64x300 too, not fc1
_PATH = re.compile(r"(/[^\s:'\"]+)+/")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b")


def failure_cause(exp: Experiment) -> str:
    """Why it failed, in one line that similar failures share.

    A crash's cause is the exception line that ends its traceback; otherwise (a NaN, a timeout,
    a refused edit) it is the recorded reason. Numbers, paths and quoted names are generalised,
    so ``CUDA out of memory. Tried to allocate 2.00 GiB`` and ``... 3.50 GiB`` share one cause.
    """
    lines = [line.strip() for line in (exp.error or "").splitlines() if line.strip()]
    if lines and _EXCEPTION_LINE.match(lines[-1]):
        line = lines[-1]
    else:
        line = (exp.reason.strip().splitlines() or [lines[-1] if lines else "(no reason recorded)"])[0]
    line = _PATH.sub("…/", line)
    line = _QUOTED.sub("'…'", line)
    line = _NUMBER.sub("N", line)
    return line[:200]


def failure_groups(rows: list[Row]) -> list[FailureGroup]:
    """Crashes, timeouts and invalid experiments grouped by status and cause, largest group first."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if r.failed:
            groups.setdefault((r.status, failure_cause(r.exp)), []).append(r)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1][0].id))
    return [FailureGroup(status, cause, tuple(r.id for r in members), (members[0].exp.error or members[0].exp.reason))
            for (status, cause), members in ordered]


def timeline(rows: list[Row]) -> dict[str, list[Segment]]:
    """What each worker did when: training, evaluating, and idle in between.

    An experiment occupies its worker from ``started_at`` to ``finished_at``. Its first trial
    lasted ``total_seconds``, of which the last ``eval_s`` (from eval.json) were the evaluation;
    any confirmation trials fill the rest of the span in equal parts, split in the same proportion.
    """
    lanes: dict[str, list[Segment]] = {}
    for r in rows:
        start, end = parse_time(r.exp.started_at), parse_time(r.exp.finished_at)
        if start is None or end is None or end <= start or r.trials == 0:
            continue  # never trained (a refused edit, an agent failure) or still running
        span = (end - start).total_seconds()
        first = min(r.exp.total_seconds or span, span)
        trials = max(r.trials, 1)
        rest = (span - first) / (trials - 1) if trials > 1 else 0.0
        eval_share = min((r.eval_s or 0.0) / first, 1.0) if first > 0 else 0.0
        lane = lanes.setdefault(r.exp.worker, [])
        t = 0.0
        for k in range(trials):
            length = first if k == 0 else rest
            if length <= 0:
                continue
            split = t + length * (1 - eval_share)
            lane.append(Segment(r.exp.worker, "train", _at(start, t), _at(start, split), r.id))
            if eval_share > 0:
                lane.append(Segment(r.exp.worker, "eval", _at(start, split), _at(start, t + length), r.id))
            t += length
    for worker, lane in lanes.items():
        lane.sort(key=lambda s: s.start)
        lanes[worker] = _with_idle(lane)
    return dict(sorted(lanes.items()))


def _with_idle(lane: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for segment in lane:
        if out and segment.start > out[-1].end:
            out.append(Segment(segment.worker, "idle", out[-1].end, segment.start, None))
        out.append(segment)
    return out


def busy_share(lane: list[Segment]) -> dict[str, float]:
    """Seconds per state of one worker's lane."""
    totals: Counter[str] = Counter()
    for s in lane:
        totals[s.state] += (s.end - s.start).total_seconds()
    return dict(totals)


def costs(rows: list[Row]) -> Costs:
    by_agent: dict[str, tuple[float, int, int, int]] = {}
    for r in rows:
        if r.exp.kind == "baseline":
            continue
        usd, t_in, t_out, n = by_agent.get(r.exp.agent or "(none)", (0.0, 0, 0, 0))
        by_agent[r.exp.agent or "(none)"] = (usd + (r.exp.cost_usd or 0.0), t_in + (r.exp.tokens_in or 0),
                                              t_out + (r.exp.tokens_out or 0), n + 1)
    baseline = next((r.exp.val_bpb for r in rows if r.exp.kind == "baseline" and r.exp.val_bpb is not None), None)
    kept = [r.exp.val_bpb for r in rows if r.status == "keep" and r.exp.kind != "baseline" and r.exp.val_bpb is not None]
    return Costs(
        usd=sum(v[0] for v in by_agent.values()), tokens_in=sum(v[1] for v in by_agent.values()),
        tokens_out=sum(v[2] for v in by_agent.values()), by_agent=by_agent,
        keeps=sum(1 for r in rows if r.status == "keep" and r.exp.kind != "baseline"),
        unknown=sum(1 for r in rows if r.exp.kind != "baseline" and r.exp.cost_usd is None),
        gain=baseline - min(kept) if baseline is not None and kept else None,
    )


def measure_noise(rows: list[Row], measurements: dict[int, list[Measurement]], rules: RunConfig) -> Noise:
    """The run-to-run noise as the policy computes it: pooled over every finished experiment's reruns."""
    groups = [[m.val_bpb for m in measurements.get(r.id, []) if m.status == "ok" and m.val_bpb is not None]
              for r in rows if r.exp.status in FINISHED]
    reruns = sum(len(g) - 1 for g in groups if len(g) > 1)
    measured = policy.noise_width(groups, 0.0) if reruns else None
    baseline = next((r for r in rows if r.exp.kind == "baseline"), None)
    return Noise(policy=rules.policy, width=max(measured or 0.0, rules.noise_floor), measured=measured,
                 floor=rules.noise_floor, reruns=reruns, baseline=baseline.values if baseline else ())


# -- small helpers ----------------------------------------------------------------------------


def parse_time(text: str | None) -> datetime | None:
    """A store timestamp (ISO 8601) as a datetime, or None."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _at(start: datetime, seconds: float) -> datetime:
    return start + timedelta(seconds=seconds)


def fmt_val(value: float | None, digits: int = 6) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_epochs(value: float | None) -> str:
    """Passes over the train split: two decimals, or two significant digits below 0.1 (a short CPU night)."""
    if value is None:
        return "-"
    return f"{value:.2f}" if value >= 0.1 or value == 0 else f"{value:.2g}"


def fmt_delta(value: float | None) -> str:
    return "" if value is None else policy.signed(value)


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
