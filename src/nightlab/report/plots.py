"""The report's charts as PNG bytes, drawn with matplotlib's Agg renderer.

Figures are built from ``matplotlib.figure.Figure`` directly, never through ``pyplot``, so drawing
touches no global state and needs no display (reports are made over ssh and in CI).
"""

from __future__ import annotations

import io
from datetime import datetime

from nightlab.report.data import Night, Segment, running_best, timeline

COLORS = {
    "keep": "#2e7d32",
    "discard": "#9e9e9e",
    "crash": "#c62828",
    "timeout": "#ef6c00",
    "invalid": "#6a1b9a",
    "best": "#1565c0",
    "train": "#1976d2",
    "eval": "#f9a825",
    "idle": "#cfd8dc",
    "holdout": "#d81b60",
}
LABEL_CHARS = 42  # kept changes are labelled with their description, cut to this length
DPI = 110


def progress_png(night: Night) -> bytes:
    """val_bpb of every experiment by its number, the running best as a staircase, kept changes labelled."""
    from matplotlib.figure import Figure  # deferred: matplotlib is heavy (1 s)
    from matplotlib.ticker import MaxNLocator
    from matplotlib.transforms import blended_transform_factory

    fig = Figure(figsize=(12, 6), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    measured = [r for r in night.rows if r.exp.val_bpb is not None and r.status in ("keep", "discard")]
    failed = [r for r in night.rows if r.failed]
    steps = running_best(night.rows)
    last = max((r.id for r in night.rows), default=0)
    if not measured:
        ax.text(0.5, 0.5, "no measured experiments yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _png(fig)

    values = sorted(r.exp.val_bpb for r in measured)  # type: ignore[type-var]
    top = max(steps[0][1] if steps else values[-1], values[int(0.9 * (len(values) - 1))])
    bottom = values[0]
    pad = max((top - bottom) * 0.08, 1e-4)
    ylim = (bottom - pad, top + 3 * pad)
    ax.set_ylim(*ylim)

    for status in ("discard", "keep"):
        rows = [r for r in measured if r.status == status]
        inside = [r for r in rows if r.exp.val_bpb <= ylim[1]]  # type: ignore[operator]
        above = [r for r in rows if r.exp.val_bpb > ylim[1]]  # type: ignore[operator]
        ax.scatter([r.id for r in inside], [r.exp.val_bpb for r in inside], s=36 if status == "keep" else 18,
                   color=COLORS[status], zorder=3, label=f"{status} ({len(rows)})")
        if above:  # off the top: drawn at the edge pointing up
            ax.scatter([r.id for r in above], [ylim[1] - pad * 0.4] * len(above), marker="^", s=22,
                       color=COLORS[status], zorder=3)
    if steps:
        xs = [x for x, _ in steps] + [last]
        ys = [y for _, y in steps] + [steps[-1][1]]
        ax.step(xs, ys, where="post", color=COLORS["best"], linewidth=2, zorder=2, label="running best")
        by_id = {r.id: r for r in night.rows}
        for k, (x, y) in enumerate(steps):
            text = _cut(by_id[x].exp.description, LABEL_CHARS)
            ax.annotate(text, (x, y), xytext=(6, 10 if k % 2 == 0 else -14), textcoords="offset points",
                        fontsize=7.5, color=COLORS["best"], rotation=12, zorder=4)
    if failed:
        edge = blended_transform_factory(ax.transData, ax.transAxes)
        for status in ("crash", "timeout", "invalid"):
            rows = [r for r in failed if r.status == status]
            if rows:
                ax.scatter([r.id for r in rows], [0.97] * len(rows), transform=edge, marker="x", s=30,
                           color=COLORS[status], zorder=3, label=f"{status} ({len(rows)})", clip_on=False)
    ax.set_xlabel("experiment #")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # experiments are whole numbers
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_title(f"run {night.run.tag}: {len(night.finished)} experiments, {len(night.kept)} kept")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    return _png(fig)


def holdout_png(night: Night) -> bytes:
    """Along the kept chain, each keep's gain over the baseline on val and on the sealed holdout.

    Gains, not raw values: the two splits differ in difficulty, so only their changes compare. A
    chain whose val line falls away from its holdout line was fitted to val; the band is the noise.
    """
    from matplotlib.figure import Figure  # deferred: matplotlib is heavy (1 s)

    fig = Figure(figsize=(12, 4.5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    chain = night.holdout_chain()
    baseline = chain[0] if chain and chain[0].exp.kind == "baseline" else None
    if baseline is None or len(chain) < 2:
        ax.text(0.5, 0.5, "no keep with a holdout score yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _png(fig)
    xs = list(range(len(chain)))
    val = [baseline.exp.val_bpb - r.exp.val_bpb for r in chain]  # type: ignore[operator]
    held = [baseline.exp.holdout_bpb - r.exp.holdout_bpb for r in chain]  # type: ignore[operator]
    noise = night.noise.width
    ax.axhspan(-noise, noise, color=COLORS["idle"], alpha=0.5, label=f"noise (±{noise:.4f})")
    ax.plot(xs, val, marker="o", color=COLORS["best"], label="val gain")
    ax.plot(xs, held, marker="s", color=COLORS["holdout"], label="holdout gain")
    ax.set_xticks(xs, [f"#{r.id}" for r in chain], rotation=30, fontsize=8)
    carry = night.carry
    alarm = " (OVERFITTING ALARM: the val gain did not carry to the holdout)" if carry and carry.alarm else ""
    ax.set_title(f"run {night.run.tag}: gain over the baseline along the kept chain{alarm}",
                 color="#c62828" if alarm else "black")
    ax.set_xlabel("kept experiment")
    ax.set_ylabel("bits per byte gained (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    return _png(fig)


def timeline_png(night: Night) -> bytes:
    """One lane per worker: training, evaluating and idle time across the night."""
    from matplotlib.figure import Figure  # deferred: matplotlib is heavy (1 s)
    from matplotlib.patches import Patch

    lanes = timeline(night.rows)
    fig = Figure(figsize=(12, 1.2 + 0.6 * max(len(lanes), 1)), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    if not lanes:
        ax.text(0.5, 0.5, "no finished trials yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _png(fig)
    origin = min(s.start for lane in lanes.values() for s in lane)
    for y, lane in enumerate(lanes.values()):
        for state in ("idle", "train", "eval"):
            spans = [(_hours(s.start, origin), _hours(s.end, origin) - _hours(s.start, origin))
                     for s in lane if s.state == state]
            ax.broken_barh(spans, (y - 0.35, 0.7), facecolors=COLORS[state], edgecolor="none")
    ax.set_yticks(range(len(lanes)), list(lanes))
    ax.invert_yaxis()
    ax.set_xlabel(f"hours since {origin:%Y-%m-%d %H:%M} UTC")
    ax.legend(handles=[Patch(color=COLORS[s], label=label) for s, label in
                       (("train", "training"), ("eval", "evaluating"), ("idle", "idle"))],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def lane_seconds(lane: list[Segment]) -> float:
    return sum((s.end - s.start).total_seconds() for s in lane)


def _hours(t: datetime, origin: datetime) -> float:
    return (t - origin).total_seconds() / 3600


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
