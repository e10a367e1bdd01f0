"""Webhook notifications: a POST when a run finds a new best or ends (``[notify]`` in nightlab.toml).

Two body formats cover the common endpoints: JSON ``{"text": ...}``, which Slack incoming
webhooks, Mattermost, Rocket.Chat and most chat bridges accept, and plain text with a ``Title``
header for ntfy topics. ``format = "auto"`` picks ntfy for ``ntfy.sh`` and ``ntfy.*`` hosts.

A notification never stops the loop: a failure comes back as one line for the log. The URL of a
webhook is often its secret, so messages about it name only the host.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from nightlab.config import NotifyConfig
from nightlab.report.data import fmt_delta, fmt_val, load_night
from nightlab.night.store import Experiment, Store

TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Message:
    title: str
    text: str
    tags: tuple[str, ...] = ()  # ntfy tags (emoji short codes)


def resolve_format(url: str, setting: str = "auto") -> str:
    """``json`` or ``ntfy`` for ``url`` under the ``notify.format`` setting."""
    if setting != "auto":
        return setting
    host = (urlsplit(url).hostname or "").lower()
    return "ntfy" if host == "ntfy.sh" or host.startswith("ntfy.") else "json"


def request_for(url: str, message: Message, setting: str = "auto") -> urllib.request.Request:
    """The POST request carrying ``message`` in the format ``url`` expects."""
    if resolve_format(url, setting) == "ntfy":
        headers = {"Content-Type": "text/plain; charset=utf-8", "Title": _header_safe(message.title)}
        if message.tags:
            headers["Tags"] = ",".join(message.tags)
        body = message.text.encode("utf-8")
    else:
        headers = {"Content-Type": "application/json"}
        body = json.dumps({"text": f"*{message.title}*\n{message.text}"}).encode("utf-8")
    return urllib.request.Request(url, data=body, headers=headers, method="POST")


def send(url: str, message: Message, setting: str = "auto", timeout_s: float = TIMEOUT_S) -> str | None:
    """POST ``message``; None on success, else why it failed (naming the host only, never the full URL).

    The standard library's urllib is enough for one POST and adds no dependency to the loop.
    """
    host = urlsplit(url).hostname or "?"
    try:
        with urllib.request.urlopen(request_for(url, message, setting), timeout=timeout_s) as response:
            response.read()
    except urllib.error.HTTPError as e:
        return f"notification to {host} failed: HTTP {e.code} {e.reason}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return f"notification to {host} failed: {reason}"
    return None


class Notifier:
    """Sends the run's notifications as the settings ask; a no-op when ``webhook_url`` is empty.

    The loop calls ``on_finished(exp)`` after each experiment and ``on_end()`` once at the end;
    failures go to ``say`` as one line.
    """

    def __init__(self, settings: NotifyConfig, store: Store, lab_dir: Path | str, run_tag: str,
                 say: Callable[[str], None] = print):
        self.settings, self.store, self.lab_dir, self.run_tag, self.say = settings, store, Path(lab_dir), run_tag, say

    @property
    def enabled(self) -> bool:
        return bool(self.settings.webhook_url)

    def on_finished(self, exp: Experiment) -> bool:
        """Notify a new best (a kept experiment other than the baseline). Returns whether it sent."""
        if not self.enabled or "best" not in self.settings.on or exp.status != "keep" or exp.kind == "baseline":
            return False
        kept = [e for e in self.store.experiments(self.run_tag) if e.status == "keep" and e.id < exp.id]
        return self._send(best_message(self.run_tag, exp, kept[-1] if kept else None, kept[0] if kept else None))

    def on_end(self) -> bool:
        """Notify the end of the run with its summary. Returns whether it sent."""
        if not self.enabled or "end" not in self.settings.on:
            return False
        return self._send(end_message(self.lab_dir, self.store, self.run_tag))

    def _send(self, message: Message) -> bool:
        error = send(self.settings.webhook_url, message, self.settings.format)
        if error:
            self.say(error)
        return error is None


def best_message(run_tag: str, exp: Experiment, previous: Experiment | None, baseline: Experiment | None) -> Message:
    lines = [f"#{exp.id} {' '.join(exp.description.split())}"]
    if exp.val_bpb is not None:
        against = []
        if previous is not None and previous.val_bpb is not None:
            against.append(f"{fmt_delta(exp.val_bpb - previous.val_bpb)} vs the previous best #{previous.id}")
        if baseline is not None and baseline.val_bpb is not None and baseline is not previous:
            against.append(f"{fmt_delta(exp.val_bpb - baseline.val_bpb)} vs the baseline")
        lines.append(f"val_bpb {fmt_val(exp.val_bpb)}" + (f" ({', '.join(against)})" if against else ""))
    if exp.commit_sha:
        lines.append(f"commit {exp.commit_sha[:10]}")
    return Message(f"nightlab {run_tag}: new best {fmt_val(exp.val_bpb)}", "\n".join(lines), ("tada",))


def end_message(lab_dir: Path, store: Store, run_tag: str) -> Message:
    night = load_night(lab_dir, run_tag, store=store)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(night.counts().items()))
    lines = [f"{len(night.finished)} experiments ({counts})"]
    best, gain = night.best, night.improvement()
    if best is not None:
        change = f", {fmt_delta(-gain)} vs the baseline" if gain is not None else ""
        lines.append(f"best val_bpb {fmt_val(best.exp.val_bpb)} (#{best.id}: {' '.join(best.exp.description.split())})"
                     f"{change}")
    cost = sum(r.exp.cost_usd for r in night.rows)
    if cost:
        lines.append(f"agents cost ${cost:.2f}")
    lines.append("the report: nightlab report --open")
    return Message(f"nightlab {run_tag}: run ended", "\n".join(lines), ("checkered_flag",))


def _header_safe(text: str) -> str:
    """HTTP header values are Latin-1: replace anything else."""
    return text.encode("latin-1", errors="replace").decode("latin-1").replace("\n", " ")
