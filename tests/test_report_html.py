"""The HTML report: self-contained, escaped, every experiment and diff in it, and rendered by headless Chromium."""

from __future__ import annotations

import base64
from html import escape
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nightlab.report import data
from nightlab.report.write import ReportFiles, write_report
from test_report import PLAN, SimulatedNight, simulated_night

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> SimulatedNight:
    return simulated_night(tmp_path_factory.mktemp("html"))


@pytest.fixture(scope="module")
def report(night: SimulatedNight) -> ReportFiles:
    return write_report(night.lab)


def test_files_land_in_the_lab_report_folder(night: SimulatedNight, report: ReportFiles) -> None:
    folder = night.lab / ".nightlab" / "report"
    assert {p.name for p in folder.iterdir()} == {"report.html", "report.md", "progress.png", "timeline.png",
                                                 "holdout.png", "results.tsv"}
    assert report.html.parent == folder
    for png in (report.progress_png, report.timeline_png):
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_page_is_self_contained(report: ReportFiles) -> None:
    page = report.html.read_text()
    references = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", page)
    assert references and all(r.startswith(("data:", "#")) for r in references), references
    assert "@import" not in page and "url(" not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2
    assert base64.b64decode(images[0]) == report.progress_png.read_bytes()
    assert base64.b64decode(images[1]) == report.timeline_png.read_bytes()


def test_every_experiment_has_a_row_and_its_diff(night: SimulatedNight, report: ReportFiles) -> None:
    page = report.html.read_text()
    n = data.load_night(night.lab)
    for r in n.rows:
        row = re.search(rf'<tr id="exp-{r.id}" data-status="{r.status}">(.*?)</tr>', page, re.S)
        assert row, f"no row for #{r.id}"
        if r.exp.epochs is not None:  # where in the train split the run ended, to two places
            assert f'data-v="{r.exp.epochs}">{r.exp.epochs:.2f}</td>' in row.group(1)
        diff = n.diff(r)
        if diff:  # the diff, escaped, one click away inside the row
            assert "<details>" in row.group(1)
            added = [line for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
            assert added and all(f'<span class="add">{escape(line)}</span>' in row.group(1) for line in added)
    assert page.count("<tr id=\"exp-") == len(n.rows) == 1 + len(PLAN) + 1


def test_text_from_the_night_is_escaped(report: ReportFiles) -> None:
    page = report.html.read_text()
    assert "&lt;&amp; escaped&gt;" in page
    assert "<& escaped>" not in page


def test_story_lists_the_kept_changes_in_order(night: SimulatedNight, report: ReportFiles) -> None:
    page = report.html.read_text()
    story = page[page.index('id="story"'):page.index('id="all"')]
    ids = [int(i) for i in re.findall(r'<li id="story-(\d+)"', story)]
    n = data.load_night(night.lab)
    assert ids == [r.id for r in n.kept if r.exp.kind != "baseline"]
    assert story.count("<summary>diff</summary>") == len(ids)


def test_failures_costs_and_noise_sections(night: SimulatedNight, report: ReportFiles) -> None:
    page = report.html.read_text()
    failures = page[page.index('id="failures"'):page.index('id="timeline"')]
    assert "CUDA out of memory. Tried to allocate N GiB" in failures
    assert '<a href="#exp-' in failures
    n = data.load_night(night.lab)
    assert f"${data.costs(n.rows).usd:.2f} in all" in page
    assert f"noise width used: <b>{n.noise.width:.6f}</b>" in page


def test_markdown_summary_and_cli(night: SimulatedNight, report: ReportFiles) -> None:
    md = report.markdown.read_text()
    assert md.startswith(f"# nightlab report: run {night.tag}\n")
    assert f"**best val_bpb {night.best_val:.6f}**" in md
    kept_rows = re.findall(r"^\| (\d+) \| [\d.]+ \| -[\d.]+ \|", md, re.M)
    assert len(kept_rows) == PLAN.count("keep")
    best = data.load_night(night.lab).best.exp  # the leaderboard's first row says where in an epoch it ended
    assert re.search(rf"^\| {best.id} \| keep \| {best.val_bpb:.6f} \| [^|]* \| {best.epochs:.2f} \|", md, re.M)
    done = subprocess.run([sys.executable, "-m", "nightlab", "report", "--markdown", "--lab", str(night.lab)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == report.markdown.read_text()


def test_results_tsv_has_autoresearch_columns(report: ReportFiles) -> None:
    lines = report.results_tsv.read_text().splitlines()
    assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    assert len(lines) == 1 + 1 + len(PLAN)  # the running experiment is not in it yet
    assert {line.split("\t")[3] for line in lines[1:]} == {"keep", "discard", "crash", "timeout", "invalid"}


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--enable-logging=stderr", "--v=0"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=60)


@needs_chromium
def test_chromium_renders_chart_and_table_without_console_errors(report: ReportFiles, tmp_path: Path) -> None:
    from matplotlib.image import imread

    url = report.html.resolve().as_uri()
    shot = tmp_path / "shot.png"
    done = _chromium([f"--screenshot={shot}", "--window-size=1400,2000", url], tmp_path / "profile")
    assert shot.exists(), done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console  # the page logs nothing: no uncaught errors, no warnings

    pixels = imread(shot)[..., :3]  # floats in [0, 1]
    assert pixels.shape[:2] == (2000, 1400)
    assert pixels.std() > 0.05  # not a blank page

    def near(color: str, region: np.ndarray, tolerance: float = 0.12) -> int:
        rgb = np.array([int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        return int((np.abs(region - rgb).max(axis=-1) < tolerance).sum())

    top, bottom = pixels[:1000], pixels[1000:]
    assert near("#1565c0", top) > 2000  # the running-best staircase in the chart (links alone give ~400)
    assert near("#f6f6f6", bottom, 0.01) > 5000  # the experiments table's header row further down

    dom = _chromium(["--dump-dom", url], tmp_path / "profile2")
    assert 'data-ready="yes"' in dom.stdout  # the page's script ran to its end
    assert dom.stdout.count('<tr id="exp-') == 1 + len(PLAN) + 1
