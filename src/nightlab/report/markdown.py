"""The morning report as Markdown: the same facts as the HTML page, short enough for a terminal or a chat."""

from __future__ import annotations

from nightlab.report.data import Night, busy_share, costs, failure_groups, fmt_delta, fmt_epochs, fmt_seconds, fmt_val, timeline

TOP = 10  # experiments in the leaderboard
DESCRIPTION_CHARS = 80


def render_markdown(night: Night, html_name: str = "report.html") -> str:
    lines = [f"# nightlab report: run {night.run.tag}", ""]
    lines += _headline(night)
    lines += _story(night)
    lines += _leaderboard(night)
    lines += _failures(night)
    lines += _workers(night)
    lines += _costs_and_noise(night)
    lines += ["", f"Every experiment with its diff: `{html_name}` (open it with `nightlab report --open`)."]
    return "\n".join(lines).rstrip() + "\n"


def _headline(night: Night) -> list[str]:
    best, base = night.best, night.baseline
    counts = ", ".join(f"{n} {s}" for s, n in sorted(night.counts().items()))
    span = night.span()
    out = [f"- branch `{night.run.branch}`, {len(night.finished)} experiments finished ({counts})"]
    if span:
        out.append(f"- from {span[0]:%Y-%m-%d %H:%M} to {span[1]:%Y-%m-%d %H:%M} UTC "
                   f"({fmt_seconds((span[1] - span[0]).total_seconds())})")
    if best is not None:
        gain = night.improvement()
        out.append(f"- **best val_bpb {fmt_val(best.exp.val_bpb)}** (#{best.id}, "
                   f"`{(best.exp.commit_sha or '')[:10]}`): {_clip(best.exp.description)}")
        if base is not None and gain is not None:
            out.append(f"- baseline {fmt_val(base.exp.val_bpb)} → best {fmt_val(best.exp.val_bpb)}: "
                       f"{fmt_delta(-gain)} "
                       f"({-100 * gain / base.exp.val_bpb:+.2f} %)")
    if (carried := night.carry) is not None:
        line = f"- sealed holdout: {carried.text()}"
        out.append(f"- **{line[2:]}**" if carried.alarm else line)
    for r in night.running:
        out.append(f"- running now: #{r.id} on {r.exp.worker}: {_clip(r.exp.description)}")
    return out + [""]


def _story(night: Night) -> list[str]:
    changes = [r for r in night.kept if r.exp.kind != "baseline"]
    out = ["## Kept changes, in order", ""]
    if not changes:
        return out + ["No change beat the baseline yet.", ""]
    out += ["| # | val_bpb | Δ parent | change |", "| ---: | ---: | ---: | --- |"]
    out += [f"| {r.id} | {fmt_val(r.exp.val_bpb)} | {fmt_delta(r.delta)} | {_cell(r.exp.description)} |"
            for r in changes]
    return out + [""]


def _leaderboard(night: Night) -> list[str]:
    measured = sorted((r for r in night.rows if r.exp.val_bpb is not None and r.status in ("keep", "discard")),
                      key=lambda r: r.exp.val_bpb)  # type: ignore[arg-type, return-value]
    if not measured:
        return []
    out = [f"## Leaderboard (top {min(TOP, len(measured))})", "",
           "| # | status | val_bpb | Δ parent | epochs | change |", "| ---: | --- | ---: | ---: | ---: | --- |"]
    out += [f"| {r.id} | {r.status} | {fmt_val(r.exp.val_bpb)} | {fmt_delta(r.delta)} | {fmt_epochs(r.exp.epochs)} | "
            f"{_cell(r.exp.description)} |" for r in measured[:TOP]]
    return out + [""]


def _failures(night: Night) -> list[str]:
    groups = failure_groups(night.rows)
    if not groups:
        return []
    out = ["## Failures by cause", ""]
    for g in groups:
        ids = ", ".join(f"#{i}" for i in g.ids)
        out.append(f"- {len(g.ids)} {g.status}: `{g.cause}` ({ids})")
    return out + [""]


def _workers(night: Night) -> list[str]:
    lanes = timeline(night.rows)
    if not lanes:
        return []
    out = ["## Workers", ""]
    for worker, lane in lanes.items():
        s = busy_share(lane)
        total = sum(s.values()) or 1.0
        out.append(f"- {worker}: training {fmt_seconds(s.get('train', 0.0))}, evaluating "
                   f"{fmt_seconds(s.get('eval', 0.0))}, idle {fmt_seconds(s.get('idle', 0.0))} "
                   f"({100 * s.get('train', 0.0) / total:.0f} % training)")
    return out + [""]


def _costs_and_noise(night: Night) -> list[str]:
    c = costs(night.rows)
    n = night.noise
    per_keep = f", ${c.usd_per_keep:.2f} per kept change" if c.usd_per_keep is not None else ""
    if c.usd_per_milli_bpb is not None:
        per_keep += f", ${c.usd_per_milli_bpb:.2f} per 0.001 val_bpb gained"
    if c.unknown:
        per_keep += f"; {c.unknown} proposal(s) of agents that do not report their cost are not counted"
    measured = (f"measured {fmt_val(n.measured)} over {n.reruns} rerun(s)" if n.measured is not None
                else "not measured (no reruns)")
    repeats = sum(r.status == "repeat" for r in night.rows)
    if repeats:
        per_keep += f"; {repeats} proposal(s) refused as repeats, never trained"
    return ["## Cost and noise", "",
            f"- agents: ${c.usd:.2f} ({c.tokens_in:,} tokens in, {c.tokens_out:,} out){per_keep}",
            f"- noise: policy {n.policy}, width {fmt_val(n.width)} (floor {fmt_val(n.floor)}), {measured}",
            *_budget_and_disturbed(night)]


def _budget_and_disturbed(night: Night) -> list[str]:
    """Which budget the trials trained under, and how many were set aside as disturbed."""
    budgets = sorted({r.exp.budget for r in night.rows if r.exp.budget})
    disturbed = sum(r.exp.disturbed for r in night.rows)
    lines = [f"- budget: {' and '.join(budgets)}" + (" (verdicts compare only runs under one budget)"
                                                      if len(budgets) > 1 else "")] if budgets else []
    if disturbed:
        lines.append(f"- disturbed: {disturbed} trial(s) ran far slower than the others of their shape; set aside "
                     "and re-run with the same seed, never judged")
    return lines


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DESCRIPTION_CHARS else text[: DESCRIPTION_CHARS - 1] + "…"


def _cell(text: str) -> str:
    return _clip(text).replace("|", "\\|")
