"""``nightlab report``: write the morning report's files into one folder.

``LAB/.nightlab/report/`` by default: ``report.html`` (self-contained), ``report.md``,
``progress.png``, ``timeline.png`` and ``results.tsv``. Each file is written to a temporary name
and renamed, so a reader never sees half a report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nightlab.paths import state_dir
from nightlab.report import plots
from nightlab.report.data import Night, load_night
from nightlab.report.html import render_html
from nightlab.report.markdown import render_markdown
from nightlab.night.store import Store

REPORT_DIR = "report"


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    markdown: Path
    progress_png: Path
    timeline_png: Path
    results_tsv: Path


def default_dir(lab_dir: Path | str) -> Path:
    return state_dir(lab_dir) / REPORT_DIR


def write_report(lab_dir: Path | str, out_dir: Path | str | None = None, run_tag: str | None = None) -> ReportFiles:
    """Read the run ``run_tag`` (default: the latest) and write every report file; returns their paths."""
    lab_dir = Path(lab_dir)
    out = Path(out_dir) if out_dir is not None else default_dir(lab_dir)
    out.mkdir(parents=True, exist_ok=True)
    with Store.open(lab_dir) as store:
        night = load_night(lab_dir, run_tag, store=store)
        tsv = store.export_tsv(out / "results.tsv", night.run.tag)
    return write_night(night, out, tsv)


def write_night(night: Night, out: Path, results_tsv: Path) -> ReportFiles:
    charts = {"progress": plots.progress_png(night), "timeline": plots.timeline_png(night),
              "holdout": plots.holdout_png(night)}
    files = ReportFiles(html=out / "report.html", markdown=out / "report.md", progress_png=out / "progress.png",
                        timeline_png=out / "timeline.png", results_tsv=results_tsv)
    _write(files.progress_png, charts["progress"])
    _write(files.timeline_png, charts["timeline"])
    _write(out / "holdout.png", charts["holdout"])  # val and holdout along the kept chain
    _write(files.html, render_html(night, charts).encode("utf-8"))
    _write(files.markdown, render_markdown(night, files.html.name).encode("utf-8"))
    return files


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
