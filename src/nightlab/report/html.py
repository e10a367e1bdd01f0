"""The morning report as one self-contained HTML page: inline CSS and JavaScript, charts as data URIs.

Nothing is fetched when the page opens (the machine may be offline): every style, script and
image is in the file, so it can be mailed, attached or copied off a cluster as it is. Every piece
of text that comes from the night (descriptions, diffs, errors) is escaped.
"""

from __future__ import annotations

import base64
from datetime import datetime
from html import escape

from nightlab import __version__
from nightlab.report.data import (
    Night,
    Row,
    busy_share,
    costs,
    failure_groups,
    fmt_delta,
    fmt_seconds,
    fmt_val,
    timeline,
)

CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #222;
       margin: 0 auto; max-width: 1320px; padding: 16px 24px 64px; }
h1 { font-size: 24px; margin: 8px 0 4px; } h2 { font-size: 19px; margin: 32px 0 8px; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-bottom: 12px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 140px; }
.card b { display: block; font-size: 20px; } .card span { color: #666; font-size: 12px; }
img.chart { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; width: 100%; margin: 6px 0; }
th, td { border-bottom: 1px solid #eee; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f6f6f6; position: sticky; top: 0; }
table.sortable th { cursor: pointer; user-select: none; } table.sortable th:hover { background: #e8eef7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.status { font-weight: 600; } .keep { color: #2e7d32; } .discard { color: #757575; } .crash { color: #c62828; }
.timeout { color: #ef6c00; } .invalid { color: #6a1b9a; } .running, .queued { color: #1565c0; }
.better { color: #2e7d32; } .worse { color: #c62828; }
details > summary { cursor: pointer; color: #1565c0; } details[open] > summary { margin-bottom: 4px; }
pre { background: #fafafa; border: 1px solid #eee; padding: 8px; overflow-x: auto; font-size: 12px; margin: 4px 0; }
pre .add { color: #1b5e20; background: #e8f5e9; } pre .del { color: #b71c1c; background: #ffebee; }
pre .hunk { color: #6a1b9a; }
.story li { margin-bottom: 14px; } .filters label { margin-right: 12px; } .muted { color: #888; }
"""

SCRIPT = """
(function () {
  function key(cell) { return cell ? cell.getAttribute('data-v') || '' : ''; }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    table.querySelectorAll('th').forEach(function (th, col) {
      th.addEventListener('click', function () {
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        var asc = th.getAttribute('data-dir') !== 'asc';
        th.setAttribute('data-dir', asc ? 'asc' : 'desc');
        rows.sort(function (a, b) {
          var x = key(a.cells[col]), y = key(b.cells[col]);
          var nx = parseFloat(x), ny = parseFloat(y);
          if (x === '' || y === '') { return x === y ? 0 : (x === '' ? 1 : -1); }
          var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
          return asc ? c : -c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  var boxes = document.querySelectorAll('.filters input[type=checkbox]');
  function applyFilter() {
    var shown = {};
    boxes.forEach(function (b) { shown[b.value] = b.checked; });
    document.querySelectorAll('#experiments tbody tr').forEach(function (tr) {
      tr.style.display = shown[tr.getAttribute('data-status')] === false ? 'none' : '';
    });
  }
  boxes.forEach(function (b) { b.addEventListener('change', applyFilter); });
  applyFilter();
  document.body.setAttribute('data-ready', 'yes');
})();
"""


def render_html(night: Night, charts: dict[str, bytes]) -> str:
    """The whole page. ``charts`` maps ``progress`` and ``timeline`` to PNG bytes."""
    sections = [
        _header(night),
        _chart(charts.get("progress"), "Progress: val_bpb of every experiment, running best in blue"),
        _story(night),
        _experiments(night),
        _failures(night),
        _timeline(night, charts.get("timeline")),
        _costs(night),
        _noise(night),
    ]
    title = f"nightlab report: {night.run.tag}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{escape(title)}</title>\n"
        f"<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(sections)
        + f"\n<p class=\"muted\">made by nightlab {escape(__version__)} at {datetime.now():%Y-%m-%d %H:%M}</p>\n"
        f"<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )


# -- sections ---------------------------------------------------------------------------------


def _header(night: Night) -> str:
    best, base = night.best, night.baseline
    counts = night.counts()
    span = night.span()
    c = costs(night.rows)
    cards = [
        ("best val_bpb", fmt_val(best.exp.val_bpb) if best else "-", f"#{best.id}" if best else "no keep yet"),
        ("baseline", fmt_val(base.exp.val_bpb) if base else "-", "start of the run"),
        ("change", fmt_delta(-night.improvement()) if night.improvement() is not None else "-",
         "best minus baseline"),
        ("experiments", str(len(night.finished)),
         ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))),
        ("kept", str(len(night.kept) - (1 if base else 0)), "changes that beat the best"),
        ("noise", fmt_val(night.noise.width), f"policy {night.noise.policy}"),
        ("agent cost", f"${c.usd:.2f}", f"{c.tokens_in + c.tokens_out:,} tokens"),
        ("duration", fmt_seconds((span[1] - span[0]).total_seconds()) if span else "-",
         f"{span[0]:%Y-%m-%d %H:%M} to {span[1]:%H:%M} UTC" if span else ""),
    ]
    card_html = "".join(f"<div class=\"card\"><span>{escape(label)}</span><b>{escape(value)}</b>"
                        f"<span>{escape(note)}</span></div>" for label, value, note in cards)
    run = night.run
    return (f"<h1>nightlab report: run {escape(run.tag)}</h1>\n"
            f"<div class=\"sub\">branch <code>{escape(run.branch)}</code> "
            f"from <code>{escape(run.base_commit[:10])}</code>"
            f", agent {escape(run.agent)}, lab <code>{escape(str(night.lab_dir))}</code></div>\n"
            f"<div class=\"cards\">{card_html}</div>")


def _chart(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return f"<img class=\"chart\" alt=\"{escape(alt)}\" src=\"data:image/png;base64,{data}\">"


def _story(night: Night) -> str:
    changes = [r for r in night.kept if r.exp.kind != "baseline"]
    if not changes:
        return "<h2 id=\"story\">The story of the night</h2>\n<p>No change beat the baseline yet.</p>"
    base = night.baseline
    items = []
    for r in changes:
        items.append(
            f"<li id=\"story-{r.id}\"><b>#{r.id} {escape(r.exp.description)}</b>: val_bpb {fmt_val(r.exp.val_bpb)} "
            f"<span class=\"better\">({fmt_delta(r.delta)})</span>, {len(r.values)} seed(s)"
            + (f"<br><span class=\"muted\">why: {escape(r.exp.rationale)}</span>" if r.exp.rationale else "")
            + (f"<br><span class=\"muted\">verdict: {escape(r.exp.reason)}</span>" if r.exp.reason else "")
            + _diff_details(night, r, "diff") + "</li>"
        )
    start = f"from the baseline's {fmt_val(base.exp.val_bpb)}" if base else ""
    return (f"<h2 id=\"story\">The story of the night</h2>\n<p>{len(changes)} kept change(s) {start}, in order; "
            f"each was measured on top of the one before.</p>\n<ol class=\"story\">\n" + "\n".join(items) + "\n</ol>")


def _experiments(night: Night) -> str:
    statuses = sorted({r.status for r in night.rows})
    filters = "".join(f"<label><input type=\"checkbox\" value=\"{escape(s)}\" checked> {escape(s)}</label>"
                      for s in statuses)
    rows = "\n".join(_experiment_row(night, r) for r in night.rows)
    head = "".join(f"<th>{h}</th>" for h in ("#", "status", "val_bpb", "Δ parent", "train time", "total time",
                                             "epochs", "memory GB", "worker", "description"))
    return (f"<h2 id=\"all\">Every experiment</h2>\n<div class=\"filters\">show: {filters}</div>\n"
            f"<table id=\"experiments\" class=\"sortable\"><thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n"
            "</tbody></table>")


def _experiment_row(night: Night, r: Row) -> str:
    e = r.exp
    delta = r.delta
    tone = "" if delta is None else (" better" if delta < 0 else " worse")
    details = []
    if e.reason:
        details.append(f"<div><b>reason:</b> {escape(e.reason)}</div>")
    if e.rationale:
        details.append(f"<div><b>rationale:</b> {escape(e.rationale)}</div>")
    if len(r.values) > 1:
        details.append(f"<div><b>seeds:</b> {', '.join(fmt_val(v) for v in r.values)}</div>")
    if e.commit_sha:
        details.append(f"<div><b>commit:</b> <code>{escape(e.commit_sha[:10])}</code> "
                       f"(<code>refs/nightlab/exp/{e.id}</code>), {e.files_changed} file(s), "
                       f"+{e.lines_added} −{e.lines_removed}</div>")
    if e.error:
        details.append(f"<pre>{escape(e.error[-4000:])}</pre>")
    diff = night.diff(r)
    if diff:
        details.append(_diff_pre(diff))
    more = (f"<details><summary>{escape(e.description)}</summary>{''.join(details)}</details>" if details
            else escape(e.description))
    return (f"<tr id=\"exp-{e.id}\" data-status=\"{escape(e.status)}\">"
            f"<td class=\"num\" data-v=\"{e.id}\">{e.id}</td>"
            f"<td class=\"status {escape(e.status)}\" data-v=\"{escape(e.status)}\">{escape(e.status)}</td>"
            f"<td class=\"num\" data-v=\"{_v(e.val_bpb)}\">{fmt_val(e.val_bpb)}</td>"
            f"<td class=\"num{tone}\" data-v=\"{_v(delta)}\">{fmt_delta(delta)}</td>"
            f"<td class=\"num\" data-v=\"{_v(e.training_seconds)}\">{fmt_seconds(e.training_seconds)}</td>"
            f"<td class=\"num\" data-v=\"{_v(e.total_seconds)}\">{fmt_seconds(e.total_seconds)}</td>"
            f"<td class=\"num\" data-v=\"{_v(e.epochs)}\">{fmt_val(e.epochs, 2)}</td>"
            f"<td class=\"num\" data-v=\"{_v(r.memory_gb)}\">{fmt_val(r.memory_gb, 1)}</td>"
            f"<td data-v=\"{escape(e.worker)}\">{escape(e.worker)}</td>"
            f"<td data-v=\"{escape(e.description)}\">{more}</td></tr>")


def _failures(night: Night) -> str:
    groups = failure_groups(night.rows)
    if not groups:
        return "<h2 id=\"failures\">Failures</h2>\n<p>None: every experiment trained and was judged.</p>"
    rows = []
    for g in groups:
        links = ", ".join(f"<a href=\"#exp-{i}\">#{i}</a>" for i in g.ids)
        rows.append(f"<tr><td class=\"status {escape(g.status)}\">{escape(g.status)}</td>"
                    f"<td class=\"num\">{len(g.ids)}</td>"
                    f"<td><details><summary>{escape(g.cause)}</summary><pre>{escape(g.example[-3000:])}</pre>"
                    f"</details></td><td>{links}</td></tr>")
    total = sum(len(g.ids) for g in groups)
    return (f"<h2 id=\"failures\">Failures by cause</h2>\n<p>{total} experiment(s) crashed, timed out or were "
            f"invalid, from {len(groups)} cause(s).</p>\n<table><thead><tr><th>status</th><th>count</th>"
            f"<th>cause</th><th>experiments</th></tr></thead><tbody>\n" + "\n".join(rows) + "\n</tbody></table>")


def _timeline(night: Night, png: bytes | None) -> str:
    lanes = timeline(night.rows)
    rows = []
    for worker, lane in lanes.items():
        s = busy_share(lane)
        total = sum(s.values()) or 1.0
        rows.append(f"<tr><td>{escape(worker)}</td><td class=\"num\">{fmt_seconds(s.get('train'))}</td>"
                    f"<td class=\"num\">{fmt_seconds(s.get('eval'))}</td>"
                    f"<td class=\"num\">{fmt_seconds(s.get('idle', 0.0))}</td>"
                    f"<td class=\"num\">{100 * s.get('train', 0.0) / total:.0f} %</td></tr>")
    table = ("<table><thead><tr><th>worker</th><th>training</th><th>evaluating</th><th>idle</th>"
             "<th>training share</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>") if rows else ""
    return (f"<h2 id=\"timeline\">Timeline per worker</h2>\n{_chart(png, 'Timeline: training, evaluating, idle')}\n"
            f"{table}")


def _costs(night: Night) -> str:
    c = costs(night.rows)
    rows = "".join(f"<tr><td>{escape(agent)}</td><td class=\"num\">{n}</td><td class=\"num\">${usd:.2f}</td>"
                   f"<td class=\"num\">{t_in:,}</td><td class=\"num\">{t_out:,}</td></tr>"
                   for agent, (usd, t_in, t_out, n) in sorted(c.by_agent.items()))
    per_keep = f"${c.usd_per_keep:.2f} per kept change" if c.usd_per_keep is not None else "no kept change yet"
    return (f"<h2 id=\"costs\">What the agents cost</h2>\n<p>${c.usd:.2f} in all, {per_keep}.</p>\n"
            "<table><thead><tr><th>agent</th><th>proposals</th><th>cost</th><th>tokens in</th><th>tokens out</th>"
            f"</tr></thead><tbody>{rows}</tbody></table>")


def _noise(night: Night) -> str:
    n = night.noise
    measured = (f"measured {fmt_val(n.measured)} (pooled standard deviation over {n.reruns} rerun(s) of the same code)"
                if n.measured is not None else "not measured yet (no reruns)")
    baseline = ", ".join(fmt_val(v) for v in n.baseline) or "-"
    rule = ("a change is kept only when it beats the best by more than the noise allows; close calls are "
            "re-run with new seeds" if n.policy == "noise" else "greedy: a change is kept when it is lower at all")
    return (f"<h2 id=\"noise\">Noise</h2>\n<p>Policy <b>{escape(n.policy)}</b>: {escape(rule)}.</p>\n<ul>"
            f"<li>noise width used: <b>{fmt_val(n.width)}</b> (floor {fmt_val(n.floor)})</li>"
            f"<li>{escape(measured)}</li><li>baseline seeds: {escape(baseline)}</li></ul>")


# -- helpers ----------------------------------------------------------------------------------


def _diff_details(night: Night, r: Row, label: str) -> str:
    diff = night.diff(r)
    if not diff:
        return ""
    return f"<details><summary>{escape(label)}</summary>{_diff_pre(diff)}</details>"


def _diff_pre(diff: str) -> str:
    lines = []
    for line in diff.splitlines():
        kind = ""
        if line.startswith("+") and not line.startswith("+++"):
            kind = "add"
        elif line.startswith("-") and not line.startswith("---"):
            kind = "del"
        elif line.startswith("@@"):
            kind = "hunk"
        lines.append(f"<span class=\"{kind}\">{escape(line)}</span>" if kind else escape(line))
    return "<pre class=\"diff\">" + "\n".join(lines) + "</pre>"


def _v(value: float | None) -> str:
    return "" if value is None else repr(float(value))
