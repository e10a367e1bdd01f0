"""The live view: progress lines, snapshots of a night in progress, plain text without a TTY, JSON, LiveView."""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from rich.console import Console

from nightlab.report import live
from nightlab.night.store import Store
from test_report import SimulatedNight, simulated_night

ANSI = re.compile(r"\x1b\[")


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> SimulatedNight:
    return simulated_night(tmp_path_factory.mktemp("live"))


def test_parse_progress_reads_the_template_line() -> None:
    p = live.parse_progress("step 00123 | loss 3.2100 | lr x1.00 | 1.62M tok/s | mfu 45.1% | epoch 0 | 123/300s")
    assert p == live.Progress(step=123, loss=3.21, tok_per_s=1.62e6, mfu_percent=45.1, elapsed_s=123.0, budget_s=300.0)
    assert p.fraction == pytest.approx(0.41) and p.left_s == pytest.approx(177.0)
    other = live.parse_progress("step 0 | budget 0.5 s | device cpu")  # a train.py with its own format
    assert other == live.Progress(step=0)
    assert live.parse_progress("model: 50.3M params, depth 8") is None
    assert math.isnan(live.parse_progress("step 00042 | loss nan | training diverged").loss)


def test_parse_progress_reads_a_line_with_its_worker_in_front() -> None:
    line = "[gpu0] step 00123 | loss 3.2100 | lr x1.00 | 1.62M tok/s | mfu 45.1% | epoch 0 | 123/300s"
    assert live.parse_progress(line) == live.parse_progress(line.split("] ", 1)[1])
    assert live.parse_progress(line).step == 123
    assert live.split_worker(line) == ("gpu0", line.split("] ", 1)[1])
    assert live.split_worker("step 1") == (None, "step 1")
    assert live.parse_progress("[local] model: 50.3M params") is None


def test_last_progress_is_the_newest_line_of_the_log(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_text("model: 1M params\nstep 00001 | loss 5.0 | 1.00K tok/s | 1/60s\nstep 00002 | loss 4.5 | "
                   "2.50K tok/s | 2/60s\n---\nnum_steps: 2\n")
    assert live.last_progress(log) == live.Progress(step=2, loss=4.5, tok_per_s=2500.0, elapsed_s=2.0, budget_s=60.0)
    assert live.last_progress(tmp_path / "missing.log") is None


def test_snapshot_has_a_lane_per_worker_the_leaderboard_and_events(night: SimulatedNight) -> None:
    with Store.open(night.lab) as store:
        snap = live.take_snapshot(store, night.lab, budget_s=300)
        experiments = store.experiments(night.tag)
    assert snap.run_tag == night.tag
    busy, idle = snap.lanes
    assert (busy.worker, busy.exp_id, busy.stage, busy.trial) == ("gpu0", night.running_id, "train", 1)
    assert busy.progress == live.Progress(step=160, loss=3.6, tok_per_s=1.62e6, mfu_percent=45.1, elapsed_s=120.0,
                                          budget_s=300.0)
    assert (idle.worker, idle.exp_id, idle.stage) == ("gpu1", None, "idle")
    measured = sorted((e for e in experiments if e.val_bpb is not None and e.status in ("keep", "discard")),
                      key=lambda e: e.val_bpb)
    assert [e.id for e in snap.leaderboard] == [e.id for e in measured[:live.LEADERBOARD]]
    assert snap.best.val_bpb == pytest.approx(night.best_val)
    assert snap.counts["running"] == 1 and sum(snap.counts.values()) == len(experiments)
    last = max((e for e in experiments if e.finished), key=lambda e: e.finished_at)
    assert snap.events[-1].split(" ", 1)[1].startswith(f"#{last.id} {last.status}")


def test_plain_text_without_a_tty_has_no_escapes(night: SimulatedNight) -> None:
    with Store.open(night.lab) as store:
        snap = live.take_snapshot(store, night.lab)
    out = io.StringIO()
    live.print_snapshot(snap, Console(file=out))  # a StringIO is not a terminal
    text = out.getvalue()
    assert not ANSI.search(text)
    lane = next(line for line in text.splitlines() if line.startswith("gpu0"))
    assert f"#{night.running_id} train" in lane and "40%" in lane and "step 160" in lane and "3.0 min left" in lane
    assert "gpu1     idle" in text and "leaderboard:" in text and "latest:" in text


def test_status_command_plain_and_json(night: SimulatedNight) -> None:
    plain = subprocess.run([sys.executable, "-m", "nightlab", "status", "--lab", str(night.lab)],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0, plain.stderr
    assert not ANSI.search(plain.stdout)
    assert plain.stdout.startswith(f"run {night.tag} (nightlab/{night.tag}) | best {night.best_val:.6f}")
    done = subprocess.run([sys.executable, "-m", "nightlab", "status", "--lab", str(night.lab), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["run_tag"] == night.tag and data["best"]["val_bpb"] == pytest.approx(night.best_val)
    lane = data["lanes"][0]
    assert lane["exp_id"] == night.running_id and lane["progress"]["fraction"] == pytest.approx(0.4)
    assert lane["progress"]["left_s"] == pytest.approx(180.0)


def test_status_names_the_fix_when_nothing_ran(tmp_path: Path) -> None:
    from fixtures.standin.helpers import make_lab

    lab = make_lab(tmp_path / "lab")
    done = subprocess.run([sys.executable, "-m", "nightlab", "status", "--lab", str(lab)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "start one with `nightlab run`" in done.stderr


def test_status_watch_into_a_closed_pipe_stops_quietly(night: SimulatedNight) -> None:
    watching = subprocess.Popen([sys.executable, "-m", "nightlab", "status", "--lab", str(night.lab), "--watch", "0.2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = watching.stdout.readline()  # as `| head -1` does
    watching.stdout.close()
    _, err = watching.communicate(timeout=60)
    assert first.startswith(f"run {night.tag}")
    assert watching.returncode == 0 and err == ""


def test_watch_rereads_the_store_each_time(night: SimulatedNight) -> None:
    out = io.StringIO()
    with Store.open(night.lab) as store:
        calls = []

        def snapshot() -> live.Snapshot:
            calls.append(1)
            if len(calls) == 2:  # the experiment finishes between two refreshes
                store.update(night.running_id, stage="eval")
            return live.take_snapshot(store, night.lab)

        live.watch(snapshot, interval_s=0.01, console=Console(file=out), updates=2)
        store.update(night.running_id, stage="train")
    first, second = out.getvalue().split("\n\n")
    assert f"#{night.running_id} train" in first and f"#{night.running_id} eval" in second


def test_live_view_prints_events_as_lines_without_a_tty(night: SimulatedNight) -> None:
    out = io.StringIO()
    with Store.open(night.lab) as store, live.LiveView(store, night.lab, night.tag, console=Console(file=out)) as view:
        view.say("#31 training: wider MLP")
        view.progress("step 00200 | loss 3.5 | lr x1.00 | 1.62M tok/s | mfu 45.1% | epoch 0 | 150/300s")
        view.say("#31 keep: beats the best")
        snap = view.snapshot()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(" #31 training: wider MLP") and lines[1].endswith(" #31 keep: beats the best")
    assert [e.split(" ", 1)[1] for e in snap.events] == ["#31 training: wider MLP", "#31 keep: beats the best"]


def test_live_view_redraws_in_place_on_a_terminal(night: SimulatedNight) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=140)
    with Store.open(night.lab) as store, live.LiveView(store, night.lab, night.tag, console=console,
                                                        refresh_s=0) as view:
        view.say("#31 training: wider MLP")
        view.progress("step 00200 | loss 3.5 | lr x1.00 | 1.62M tok/s | mfu 45.1% | epoch 0 | 150/300s")
    text = out.getvalue()
    assert "\x1b[" in text  # cursor movement and colour: the layout is redrawn in place
    assert "leaderboard" in text and "wider MLP, still training" in text and "#31 training: wider MLP" in text


def test_live_view_shows_progress_lines_from_worker_threads(night: SimulatedNight) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    with Store.open(night.lab) as store, live.LiveView(store, night.lab, night.tag, console=console,
                                                        refresh_s=0.05) as view:
        with ThreadPoolExecutor(1) as trials:  # trials report from the scheduler's pool, as "[worker] line"
            trials.submit(view.progress, "[gpu0] step 04321 | loss 2.7182 | lr x1.00 | 1.62M tok/s | mfu 45.1% | "
                          "epoch 0 | 150/300s").result()
        deadline = time.monotonic() + 10
        while "4321" not in out.getvalue() and time.monotonic() < deadline:  # no event: the view redraws itself
            time.sleep(0.05)
        drawn = out.getvalue()
    row = next(line for line in drawn.splitlines() if "4321" in line)
    assert "gpu0" in row and f"#{night.running_id}" in row and "2.7182" in row and "2.5 min" in row
