"""The keep/discard rule: a small pure function of measurements, and the noise estimate it uses.

Training is noisy (a new seed alone moves val_bpb by about 0.001), so in ``noise`` mode a change is
kept only when the mean of its measurements beats the best's mean by more than ``KEEP_Z`` standard
errors of the difference. A promising or close first run earns ``confirm_runs`` more seeds before
the verdict. ``greedy`` mode is autoresearch's rule: keep when strictly lower, one run. In both
modes simpler code (fewer lines) at equal val_bpb (within ``simplicity_tolerance``) is a keep.

The noise width is pooled over every group of reruns of one commit. With few groups it is their
pooled standard deviation; from ``ROBUST_GROUPS`` groups on, the median absolute deviation of the
pooled residuals, so that one group with an outlier (a seed slowed by a busy machine that got
past the disturbed-trial check) cannot widen it for the rest of the night. The verdict names it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from nightlab.config import RunConfig

CONFLICT = "conflict:"  # reason of a stale win that no longer applies on the best: back to its author

KEEP_Z = 3.0  # standard errors of the difference a change must win by (one-sided false keep ~0.1 %)
SCREEN_Z = 0.0  # a first run better than the best by this many standard errors earns confirmation runs
ROBUST_GROUPS = 3  # groups of reruns from which the noise is their residuals' median absolute deviation
MAD_SCALE = 1.4826  # median absolute deviation -> standard deviation, for normal noise


@dataclass(frozen=True)
class Verdict:
    decision: str  # keep | discard | confirm (measure again with a fresh seed, then ask again)
    reason: str


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def noise_width(groups: Sequence[Sequence[float]], floor: float) -> float:
    """Run-to-run standard deviation of val_bpb, pooled over groups of reruns of the same code.

    Each group is one experiment's measurements (different seeds, same commit); groups of one
    carry no information about noise. Never below ``floor``.
    """
    meter = NoiseMeter(floor)
    for group in groups:
        meter.add(group)
    return meter.width


@dataclass
class NoiseMeter:
    """``noise_width`` kept up to date one group at a time (a long night has thousands of groups)."""

    floor: float
    squares: float = 0.0
    dof: int = 0
    groups: int = 0
    # Each measurement's distance to its group's mean, scaled by sqrt(n / (n - 1)) so that every
    # one is distributed like the noise itself whatever the group's size.
    residuals: list[float] = field(default_factory=list)

    def add(self, group: Sequence[float]) -> None:
        if len(group) > 1:
            m, n = mean(group), len(group)
            self.squares += sum((v - m) ** 2 for v in group)
            self.dof += n - 1
            self.groups += 1
            self.residuals.extend(abs(v - m) * math.sqrt(n / (n - 1)) for v in group)

    @property
    def robust(self) -> bool:
        return self.groups >= ROBUST_GROUPS

    @property
    def measured(self) -> float:
        if self.robust:
            return MAD_SCALE * statistics.median(self.residuals)
        return math.sqrt(self.squares / self.dof) if self.dof else 0.0

    @property
    def width(self) -> float:
        return max(self.measured, self.floor)

    @property
    def estimator(self) -> str:
        """How ``width`` was found, in words for a verdict."""
        groups = f"{self.groups} group{'s' if self.groups != 1 else ''} of reruns"
        if self.measured < self.floor:
            return f"the floor run.noise_floor (measured {self.measured:.6f} over {groups})"
        if self.robust:
            return f"median absolute deviation over {groups}"
        return f"standard deviation over {groups}"


def signed(value: float, digits: int = 6) -> str:
    """``value`` with its sign, rounded to ``digits``; one that rounds to zero reads +0.0..., never -0.0..."""
    return f"{round(value, digits) + 0.0:+.{digits}f}"


def judge(
    candidate: Sequence[float],
    best: Sequence[float],
    noise: float,
    rules: RunConfig,
    lines_delta: int = 0,
    estimator: str = "",
) -> Verdict:
    """Keep, discard, or measure ``candidate`` again, against the current ``best``.

    ``candidate`` and ``best`` are val_bpb measurements (lower is better) of one commit each, with
    different seeds; ``lines_delta`` is the candidate's code lines minus the best's; ``estimator``
    says how ``noise`` was found (``NoiseMeter.estimator``).
    """
    if not candidate:
        raise ValueError("judge needs at least one measurement of the candidate")
    if not best:
        raise ValueError("judge needs at least one measurement of the best (run the baseline first)")
    c, b = mean(candidate), mean(best)
    gain = b - c  # positive: the candidate is better
    simpler_and_equal = lines_delta < 0 and gain >= -rules.simplicity_tolerance
    lines = f"{-lines_delta} fewer lines" if lines_delta < 0 else f"{lines_delta} more lines"
    where = f"{c:.6f} vs best {b:.6f}"
    if rules.policy == "greedy":
        if gain > 0:
            return Verdict("keep", f"greedy: lower val_bpb ({where})")
        if simpler_and_equal:
            return Verdict("keep", f"greedy: equal within {rules.simplicity_tolerance:g} and {lines} ({where})")
        return Verdict("discard", f"greedy: not lower ({where})")

    stderr = noise * math.sqrt(1 / len(candidate) + 1 / len(best))
    z = gain / stderr
    seeds = f"{len(candidate)} seed{'s' if len(candidate) > 1 else ''}"
    how = f" by {estimator}" if estimator else ""
    summary = f"{where}, gain {signed(gain)} = {signed(z, 1)} standard errors (noise {noise:.6f}{how}, {seeds})"
    worth_confirming = z > SCREEN_Z or (lines_delta < 0 and gain + 2 * stderr >= -rules.simplicity_tolerance)
    if len(candidate) < 1 + rules.confirm_runs and worth_confirming:
        return Verdict("confirm", f"close call, measuring again: {summary}")
    if z > KEEP_Z:
        return Verdict("keep", f"beats the best beyond the noise: {summary}")
    if simpler_and_equal:
        return Verdict("keep", f"equal within {rules.simplicity_tolerance:g} and {lines}: {summary}")
    if gain > 0:
        return Verdict("discard", f"better but within the noise: {summary}")
    return Verdict("discard", f"not better: {summary}")
