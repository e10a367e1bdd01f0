"""The report, the live view and notifications on a real run of the loop (scripted proposer, stand-in train.py)."""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rich.console import Console

from fixtures.standin.helpers import STANDIN, constant_step, lab_toml, make_dataset, make_lab, open_lab, set_constant
from nightlab.config import NotifyConfig
from nightlab.report import data, live
from nightlab.report.notify import Notifier
from nightlab.report.write import write_report
from nightlab.agents.scripted import ScriptedProposer
from nightlab.night.scheduler import run_single


@pytest.mark.slow
def test_a_real_run_reports_watches_and_notifies(tmp_path: Path) -> None:
    posts: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 -- the http.server API
            posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    data_dir = make_dataset(tmp_path / "data")
    lab_dir = make_lab(tmp_path / "lab", lab_toml(confirm_runs=0), set_constant(STANDIN.read_text(), "SHARPNESS", 0.5))
    lab = open_lab(lab_dir, data_dir)
    out = io.StringIO()
    proposer = ScriptedProposer([constant_step("sharper unigram", "SHARPNESS", 1.0),
                                 constant_step("noisy logits", "NOISE", 0.5),
                                 constant_step("crashing", "MODE", "crash")])
    notifier = Notifier(NotifyConfig(webhook_url=f"http://127.0.0.1:{httpd.server_address[1]}/hook"), lab.store,
                        lab_dir, lab.run.tag)
    try:
        with live.LiveView(lab.store, lab_dir, lab.run.tag, console=Console(file=out)) as view:
            lab.say, lab.on_progress = view.say, view.progress
            for exp in run_single(lab, proposer, max_experiments=3):
                notifier.on_finished(exp)
            notifier.on_end()
            snap = view.snapshot()
    finally:
        httpd.shutdown()
        httpd.server_close()

    statuses = {e.description: e.status for e in lab.experiments()}
    assert statuses == {"baseline": "keep", "sharper unigram": "keep", "noisy logits": "discard", "crashing": "crash"}
    # The live view printed the loop's events as plain lines and kept them for its snapshot.
    printed = out.getvalue().splitlines()
    assert any(line.endswith("keep: " + lab.experiments()[1].reason) for line in printed)
    assert [e.split(" ", 1)[1] for e in snap.events] == [line.split(" ", 1)[1] for line in printed][-live.EVENTS:]
    assert all(lane.exp_id is None for lane in snap.lanes)  # nothing running after the loop
    # Notifications: the one new best, then the end.
    assert [p["text"].split("\n")[0] for p in posts] == [
        f"*nightlab t: new best {lab.experiments()[1].val_bpb:.6f}*", "*nightlab t: run ended*"]

    files = write_report(lab_dir)
    page = files.html.read_text()
    night = data.load_night(lab_dir)
    assert all(f'<tr id="exp-{r.id}" data-status="{r.status}">' in page for r in night.rows)
    assert "RuntimeError: stand-in crash" in page
    lanes = data.timeline(night.rows)
    seconds = data.busy_share(lanes["local"])
    assert seconds["train"] > 0 and seconds["eval"] > 0  # eval.json's eval_s of real trials
    assert night.noise.reruns == 1 and night.noise.measured is not None  # the baseline's two seeds
