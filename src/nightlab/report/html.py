"""The morning report as one self-contained HTML page, rendered from the package's Jinja templates.

``templates/report.html.j2`` is the page; ``report.css`` and ``report.js`` are inlined into it and
charts are data URIs, so nothing is fetched when the page opens (the machine may be offline) and
the file can be mailed, attached or copied off a cluster as it is. Autoescape is on: every piece
of text that comes from the night (descriptions, diffs, errors) is escaped.
"""

from __future__ import annotations

import base64
import functools
from datetime import datetime

import jinja2

from nightlab import __version__
from nightlab.report.data import (
    Costs,
    Night,
    busy_share,
    costs,
    failure_groups,
    fmt_delta,
    fmt_epochs,
    fmt_seconds,
    fmt_val,
    timeline,
)

TEMPLATE = "report.html.j2"


def render_html(night: Night, charts: dict[str, bytes]) -> str:
    """The whole page. ``charts`` maps ``progress``, ``timeline`` and ``holdout`` to PNG bytes."""
    spent = costs(night.rows)
    return _environment().get_template(TEMPLATE).render(
        night=night,
        charts=charts,
        cards=_cards(night, spent),
        changes=[r for r in night.kept if r.exp.kind != "baseline"],
        failures=failure_groups(night.rows),
        lanes={worker: busy_share(lane) for worker, lane in timeline(night.rows).items()},
        costs=spent,
        version=__version__,
        made_at=f"{datetime.now():%Y-%m-%d %H:%M}",
    )


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("nightlab.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(
        val=fmt_val,
        epochs=fmt_epochs,
        delta=fmt_delta,
        seconds=fmt_seconds,
        usd=lambda value: f"${value:.2f}",
        thousands=lambda value: f"{value:,}",
        sort_key=_sort_key,
        base64=lambda data: base64.b64encode(data).decode("ascii"),
        diff_lines=_diff_lines,
    )
    return env


def _cards(night: Night, c: Costs) -> list[tuple[str, str, str]]:
    """The header's cards: (label, value, note)."""
    best, base = night.best, night.baseline
    span = night.span()
    improvement = night.improvement()
    return [
        ("best val_bpb", fmt_val(best.exp.val_bpb) if best else "-", f"#{best.id}" if best else "no keep yet"),
        ("baseline", fmt_val(base.exp.val_bpb) if base else "-", "start of the run"),
        ("change", fmt_delta(-improvement) if improvement is not None else "-", "best minus baseline"),
        ("experiments", str(len(night.finished)),
         ", ".join(f"{n} {s}" for s, n in sorted(night.counts().items()))),
        ("kept", str(len(night.kept) - (1 if base else 0)), "changes that beat the best"),
        ("noise", fmt_val(night.noise.width), f"policy {night.noise.policy}"),
        ("agent cost", f"${c.usd:.2f}", f"{c.tokens_in + c.tokens_out:,} tokens"),
        ("duration", fmt_seconds((span[1] - span[0]).total_seconds()) if span else "-",
         f"{span[0]:%Y-%m-%d %H:%M} to {span[1]:%H:%M} UTC" if span else ""),
    ]


def _diff_lines(diff: str) -> list[tuple[str, str]]:
    """Each line of a unified diff with its class: ``add``, ``del``, ``hunk`` or "" (context)."""
    lines = []
    for line in diff.splitlines():
        kind = ""
        if line.startswith("+") and not line.startswith("+++"):
            kind = "add"
        elif line.startswith("-") and not line.startswith("---"):
            kind = "del"
        elif line.startswith("@@"):
            kind = "hunk"
        lines.append((kind, line))
    return lines


def _sort_key(value: float | None) -> str:
    """The table's ``data-v``: the exact number the page's script sorts by, empty when there is none."""
    return "" if value is None else repr(float(value))
