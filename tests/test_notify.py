"""Notifications: JSON and ntfy bodies posted to a real HTTP server on 127.0.0.1, failures as one line."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nightlab.config import Config, NotifyConfig
from nightlab.report import notify
from nightlab.night.store import Store
from test_report import SimulatedNight, simulated_night


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Server:
    url: str
    requests: list[Received] = field(default_factory=list)
    status: int = 200


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 -- the http.server API
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state.requests.append(Received(self.path, dict(self.headers), body))
            self.send_response(state.status)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> SimulatedNight:
    return simulated_night(tmp_path_factory.mktemp("notify"), running=False)


def test_json_body_has_a_text_field(server: Server) -> None:
    message = notify.Message("nightlab t: new best 0.990000", "#5 wider MLP\nval_bpb 0.990000")
    assert notify.send(f"{server.url}/services/T000/B000/secret", message) is None
    (got,) = server.requests
    assert got.path == "/services/T000/B000/secret" and got.headers["Content-Type"] == "application/json"
    assert json.loads(got.body) == {"text": "*nightlab t: new best 0.990000*\n#5 wider MLP\nval_bpb 0.990000"}


def test_ntfy_body_is_plain_text_with_a_title(server: Server) -> None:
    message = notify.Message("nightlab t: run ended — 0.99", "12 experiments\nbest 0.990000", ("checkered_flag",))
    assert notify.send(f"{server.url}/nightlab-topic", message, "ntfy") is None
    (got,) = server.requests
    assert got.body.decode("utf-8") == "12 experiments\nbest 0.990000"
    assert got.headers["Content-Type"].startswith("text/plain")
    assert got.headers["Title"] == "nightlab t: run ended ? 0.99" and got.headers["Tags"] == "checkered_flag"


def test_auto_format_knows_ntfy_hosts() -> None:
    assert notify.resolve_format("https://ntfy.sh/my-topic") == "ntfy"
    assert notify.resolve_format("https://ntfy.example.org/lab") == "ntfy"
    assert notify.resolve_format("https://hooks.slack.com/services/T/B/x") == "json"
    assert notify.resolve_format("https://ntfy.sh/my-topic", "json") == "json"


def test_failures_come_back_as_a_line_without_the_secret(server: Server) -> None:
    server.status = 500
    error = notify.send(f"{server.url}/hooks/SECRET-TOKEN", notify.Message("t", "x"))
    assert error == "notification to 127.0.0.1 failed: HTTP 500 Internal Server Error"
    server.status = 200
    unreachable = notify.send("http://127.0.0.1:9/hooks/SECRET-TOKEN", notify.Message("t", "x"), timeout_s=2)
    assert unreachable.startswith("notification to 127.0.0.1 failed:") and "SECRET" not in unreachable


def test_notifier_sends_new_bests_and_the_end(server: Server, night: SimulatedNight) -> None:
    settings = NotifyConfig(webhook_url=f"{server.url}/hook")
    lines: list[str] = []
    with Store.open(night.lab) as store:
        experiments = store.experiments(night.tag)
        notifier = notify.Notifier(settings, store, night.lab, night.tag, say=lines.append)
        sent = [e.id for e in experiments if notifier.on_finished(e)]
        assert notifier.on_end()
    kept = [e for e in experiments if e.status == "keep"]
    assert sent == [e.id for e in kept[1:]]  # every keep but the baseline
    texts = [json.loads(r.body)["text"] for r in server.requests]
    last = kept[-1]
    assert texts[len(sent) - 1].startswith(f"*nightlab {night.tag}: new best {last.val_bpb:.6f}*\n#{last.id} ")
    assert f"{last.val_bpb - kept[-2].val_bpb:+.6f} vs the previous best #{kept[-2].id}" in texts[len(sent) - 1]
    end = texts[-1]
    assert end.startswith(f"*nightlab {night.tag}: run ended*\n{len(experiments)} experiments (")
    assert f"best val_bpb {night.best_val:.6f} (#{last.id}" in end
    assert lines == []


def test_notifier_respects_the_settings(server: Server, night: SimulatedNight) -> None:
    with Store.open(night.lab) as store:
        keep = next(e for e in store.experiments(night.tag) if e.status == "keep" and e.kind != "baseline")
        only_end = notify.Notifier(NotifyConfig(webhook_url=server.url, on=("end",)), store, night.lab, night.tag)
        assert not only_end.on_finished(keep)
        off = notify.Notifier(NotifyConfig(), store, night.lab, night.tag)
        assert not off.on_finished(keep) and not off.on_end()
    assert server.requests == []


def test_config_section_is_checked() -> None:
    config = Config().with_overrides(['notify.webhook_url="https://ntfy.sh/x"', 'notify.on=["end"]'])
    assert config.notify == NotifyConfig("https://ntfy.sh/x", ("end",), "auto")
    from nightlab.config import ConfigError

    with pytest.raises(ConfigError, match="notify.on must be a list of best, end, got \\[.weekly.\\]"):
        Config().with_overrides(['notify.on=["weekly"]'])
