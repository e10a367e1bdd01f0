"""``nightlab report``, ``nightlab status``, ``nightlab sample`` and ``nightlab export``: looking at a night."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nightlab import config as cfg
from nightlab.cli.lab import add_lab_args, find_lab


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write the morning report: report.html (self-contained), report.md, PNG charts, results.tsv",
        description="Reads the lab's store and writes LAB/.nightlab/report/: report.html (progress chart, every "
        "experiment with its diff, the kept changes in order, failures by cause, a timeline per worker, agent "
        "cost, the measured noise), report.md (the same in Markdown), progress.png, timeline.png and results.tsv.",
    )
    p.add_argument("--out", type=Path, metavar="DIR", help="write the files here (default: LAB/.nightlab/report)")
    p.add_argument("--tag", help="which run (default: the latest)")
    p.add_argument("--open", action="store_true", help="open report.html in the browser afterwards")
    p.add_argument("--markdown", action="store_true", help="print report.md to stdout")
    add_lab_args(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "status",
        help="what the lab is doing now: a lane per worker, the leaderboard, the latest events",
        description="Reads the store and the running experiments' train.log, from any terminal (also over ssh "
        "while `nightlab run` works in another). Plain text when stdout is not a terminal; --json for scripts.",
    )
    p.add_argument("--tag", help="which run (default: the latest)")
    p.add_argument("--json", action="store_true", help="print one JSON object (stable keys) and exit")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C")
    add_lab_args(p)
    p.set_defaults(func=cmd_status)


def cmd_report(args: argparse.Namespace) -> int:
    from nightlab.cli import UserError
    from nightlab.report.write import write_report

    lab_dir = find_lab(args.lab)
    try:
        files = write_report(lab_dir, args.out, args.tag)
    except LookupError as e:
        raise UserError(str(e.args[0])) from None
    if args.markdown:
        sys.stdout.write(files.markdown.read_text())
    else:
        print(f"report: {files.html}")
        print(f"summary: {files.markdown}")
        print(f"charts: {files.progress_png}, {files.timeline_png}")
        print(f"results: {files.results_tsv}")
    if args.open:
        import webbrowser

        if not webbrowser.open(files.html.resolve().as_uri()):
            print(f"no browser found here; copy {files.html} to a machine with one (it is self-contained)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from nightlab.cli import UserError
    from nightlab.report import live
    from nightlab.research.store import Store

    lab_dir = find_lab(args.lab)
    config = cfg.load(lab_dir, args.set)
    with Store.open(lab_dir) as store:
        def snap() -> live.Snapshot:
            try:
                return live.take_snapshot(store, lab_dir, args.tag, budget_s=config.lab.budget_s)
            except LookupError as e:
                raise UserError(str(e.args[0])) from None

        if args.json:
            print(json.dumps(snap().to_dict(), indent=2))
            return 0
        if args.watch is None:
            live.print_snapshot(snap())
            return 0
        live.watch(snap, interval_s=max(args.watch, 0.2))
    return 0


def _sleep(seconds: float) -> None:
    time.sleep(seconds)
