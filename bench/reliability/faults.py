"""Faults a long night meets, thrown at a real loop: does every experiment get a truthful status, is
nothing lost, and does the loop go on?

- ``fault_loop``: one ``run_loop`` (scripted agent, the suite's stand-in) whose experiments act out a
  fault each: training killed by SIGKILL, GPU and host out of memory, a full disk while saving the
  checkpoint, NaN, a process that ignores SIGTERM and leaves a child, the evaluator killed by
  SIGKILL, the store locked by another connection; a stale ``.git/index.lock`` lies in the lab the
  whole time. A last, healthy experiment shows the loop still runs.
- ``api_outage``: the api agent against a scripted server answering 429, 500, timeouts and garbage
  for a long stretch (time-compressed), then good replies.
- ``cli_hang``: a coding-agent CLI that hangs (and one that also ignores SIGTERM).
- ``stale_worktree_locks``: ``index.lock`` files left in nightlab's own worktrees by a killed git.

Usage: python bench/reliability/faults.py [--lock-s 5] [--tmpfs]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT / "tests" / "fixtures" / "agents")]

from fixtures.standin.helpers import git, lab_toml, make_lab, open_lab  # noqa: E402
from nightlab.trial import processes  # noqa: E402
from nightlab.agents.scripted import ScriptedProposer  # noqa: E402
from nightlab.night.scheduler import run_single  # noqa: E402
from nightlab.night.store import Store  # noqa: E402
from reliability.audit import Audit, audit  # noqa: E402
from reliability.standins import train_py  # noqa: E402

TAG = "t"
HEALTHY = "after the faults: a healthy change"


@dataclass
class Row:
    fault: str
    status: str
    reason: str


@dataclass
class FaultRun:
    rows: list[Row] = field(default_factory=list)
    audit: Audit | None = None
    continued: bool = False  # the experiment after the faults got its verdict
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# (description, fragments, constants): one experiment per fault, NOISE keeps each one a real change
FAULT_STEPS: list[tuple[str, tuple[str, ...], dict]] = [
    ("a healthy change", (), dict(SHARPNESS=1.0)),
    ("training killed by SIGKILL", ("fault_sigkill",), dict(SHARPNESS=1.0, NOISE=0.01)),
    ("GPU out of memory", ("fault_cuda_oom",), dict(SHARPNESS=1.0, NOISE=0.02)),
    ("host out of memory", ("fault_host_oom",), dict(SHARPNESS=1.0, NOISE=0.03)),
    ("disk full while saving the checkpoint", ("fault_disk_full",), dict(SHARPNESS=1.0, NOISE=0.04)),
    ("NaN loss", (), dict(SHARPNESS=1.0, NOISE=0.05, MODE="nan")),
    ("ignores SIGTERM and leaves a child", (), dict(SHARPNESS=1.0, NOISE=0.06, MODE="stubborn")),
    ("evaluator killed by SIGKILL", ("fault_slow_build",), dict(SHARPNESS=1.0, NOISE=0.07)),
    ("store locked by another connection", (), dict(SHARPNESS=1.0, NOISE=0.08, SLEEP_S=1.0)),
    (HEALTHY, (), dict(SHARPNESS=1.0, NOISE=0.09)),
]


def _step(description: str, fragments: tuple[str, ...], constants: dict):
    text = train_py(*fragments, **constants)

    def apply(worktree: Path) -> str:
        (worktree / "train.py").write_text(text)
        return description

    return apply


class Saboteur(threading.Thread):
    """Watches the store and strikes when an experiment reaches a stage: kills its evaluator, locks
    the store, frees a full disk."""

    def __init__(self, lab_dir: Path, lock_s: float):
        super().__init__(daemon=True, name="saboteur")
        self.lab_dir, self.lock_s = lab_dir, lock_s
        self.done = threading.Event()
        self.log: list[str] = []
        self._struck: set[str] = set()

    def run(self) -> None:
        with Store.open(self.lab_dir) as store:
            while not self.done.is_set():
                for e in store.experiments(TAG):
                    self._strike(e)
                time.sleep(0.05)

    def _strike(self, e) -> None:
        key = e.description
        if key in self._struck:
            return
        if key == "evaluator killed by SIGKILL" and e.stage == "eval" and e.pgid:
            time.sleep(0.5)
            os.kill(e.pgid, signal.SIGKILL)
            self.log.append(f"#{e.id}: sent SIGKILL to the evaluator (pid {e.pgid})")
        elif key == "store locked by another connection" and e.stage == "train":
            conn = sqlite3.connect(self.lab_dir / ".nightlab" / "store.db", timeout=30, isolation_level=None)
            conn.execute("BEGIN EXCLUSIVE")
            self.log.append(f"#{e.id}: holding an exclusive lock on the store for {self.lock_s:g} s")
            time.sleep(self.lock_s)
            conn.execute("COMMIT")
            conn.close()
        elif key == "disk full while saving the checkpoint" and e.finished:
            for filler in (self.lab_dir / ".nightlab" / "runs").glob("*/filler.bin"):
                filler.unlink()
                self.log.append(f"#{e.id}: freed the disk ({filler.name} removed)")
        else:
            return
        self._struck.add(key)


@contextlib.contextmanager
def small_disk(path: Path, size: str = "4m"):
    """A tmpfs of ``size`` mounted at ``path`` (root only); yields whether it could be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                                   capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fault_loop(work: Path, data_dir: Path, lock_s: float = 5.0, tmpfs: bool = False, say=print) -> FaultRun:
    """Every fault of ``FAULT_STEPS`` in one loop, with a stale ``.git/index.lock`` in the lab."""
    started = time.monotonic()
    result = FaultRun()
    lab_dir = make_lab(work / "lab", lab_toml(allowance_s=8.0, baseline_runs=1, confirm_runs=0, policy="greedy"),
                       train_py(SHARPNESS=0.5))
    (lab_dir / ".git" / "index.lock").write_text("")  # a git killed in the lab's own checkout long ago
    saved_grace = processes.TERM_GRACE_S
    processes.TERM_GRACE_S = 1.0  # time-compressed: the SIGTERM-ignoring child is killed after 1 s, not 10
    lab = open_lab(lab_dir, data_dir, tag=TAG, say=lambda line: say(f"    {line}"))
    saboteur = Saboteur(lab_dir, lock_s)
    with small_disk(lab_dir / ".nightlab" / "runs") if tmpfs else contextlib.nullcontext(False) as mounted:
        result.notes.append("disk: a 4 MiB tmpfs holds the run folders" if mounted else
                            "disk: ENOSPC simulated at the checkpoint write (no tmpfs)")
        saboteur.start()
        try:
            run_single(lab, ScriptedProposer([_step(*s) for s in FAULT_STEPS]), max_experiments=len(FAULT_STEPS))
        finally:
            saboteur.done.set()
            saboteur.join()
            processes.TERM_GRACE_S = saved_grace
        rows = {e.description: e for e in lab.experiments()}
        result.rows = [Row(d, rows[d].status if d in rows else "missing", rows[d].reason if d in rows else "")
                       for d, _, _ in FAULT_STEPS]
        result.continued = HEALTHY in rows and rows[HEALTHY].finished and rows[HEALTHY].status != "invalid"
        lab.store.close()
        result.audit = audit(lab_dir, TAG)
    result.notes += saboteur.log
    result.notes.append("stale .git/index.lock in the lab: " + ("still there, untouched" if
                        (lab_dir / ".git" / "index.lock").exists() else "removed"))
    result.seconds = time.monotonic() - started
    return result


CANARY = "sk-canary-3f9d1c7a5e2b4680a1b2"  # a fake API key that must never be written anywhere
KEY_ENV = "NIGHTLAB_RELIABILITY_KEY"
GOOD_REPLY = """DESCRIPTION: sharper unigram
RATIONALE: the unigram should follow the training frequencies.

<<<<<<< SEARCH train.py
SHARPNESS = 0.5  # exponent on the training unigram frequencies
=======
SHARPNESS = 1.0  # exponent on the training unigram frequencies
>>>>>>> REPLACE
"""


def outage_responses(failed_proposals: int, retries: int) -> tuple[list, list[str]]:
    """Scripted answers for ``failed_proposals`` failed proposals in turn: 429s, 500s, timeouts (each
    retried ``retries`` times), garbage and a reply with no edit; then one good reply."""
    from llm_server import Scripted, chat, error

    kinds = [
        ("429 Too Many Requests", [error(429, "rate limited", {"retry-after": "0"})] * (retries + 1)),
        ("500 Internal Server Error", [error(500, "overloaded")] * (retries + 1)),
        ("timeout", [Scripted(body={}, delay=1.0)] * (retries + 1)),
        ("garbage body", [Scripted(status=200, body="<html>502 Bad Gateway</html>")]),
        ("a reply with no edit", [chat("I would try a bigger model. No edit today.")]),
    ]
    responses, labels = [], []
    for i in range(failed_proposals):
        label, answers = kinds[i % len(kinds)]
        responses += answers
        labels.append(label)
    return responses + [chat(GOOD_REPLY)], labels


def real_time_s(failed_proposals: int, retries: int, base_delay: float = 1.0, timeout_s: float = 300.0) -> float:
    """How long the same outage lasts at the loop's and the api agent's real delays (lower bound)."""
    from nightlab.night import scheduler as loop

    backoff = sum(min(loop.MAX_BACKOFF_S, 2.0 ** (k - 1)) for k in range(2, failed_proposals + 1))
    retry_waits = sum(base_delay * 2 ** a * 0.5 for a in range(retries))
    per_kind = [retry_waits, retry_waits, retry_waits + (retries + 1) * timeout_s, 0.0, 0.0]
    return backoff + sum(per_kind[i % 5] for i in range(failed_proposals))


def api_outage(work: Path, data_dir: Path, failed_proposals: int = 15, say=print) -> tuple[FaultRun, Path, str]:
    """The api agent (OpenAI-compatible, canary key) against an outage, time-compressed; returns the
    run, the lab and the log text the api agent wrote."""
    import logging

    from llm_server import ScriptedServer
    from nightlab.config import ApiAgentConfig
    from nightlab.night import scheduler as loop
    from nightlab.agents.api import ApiProposer

    started = time.monotonic()
    retries = 2
    result = FaultRun()
    lab_dir = make_lab(work / "lab", lab_toml(baseline_runs=1, confirm_runs=0, policy="greedy"), train_py(SHARPNESS=0.5))
    responses, labels = outage_responses(failed_proposals, retries)
    lines: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(handler.format(record))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # the SDK's and the HTTP client's debug logs included
    saved_backoff = loop.MAX_BACKOFF_S
    loop.MAX_BACKOFF_S = 0.05  # time-compressed: the loop waits at most 50 ms between failed proposals
    try:
        with ScriptedServer(responses) as server:
            config = ApiAgentConfig(base_url=server.url + "/v1", model="gpt-4o-mini", api_key_env=KEY_ENV,
                                    timeout_s=0.3, max_retries=retries)
            proposer = ApiProposer(config, environ={KEY_ENV: CANARY}, base_delay=0.001, max_delay=0.01)
            lab = open_lab(lab_dir, data_dir, tag=TAG, say=lambda line: (lines.append(line), say(f"    {line}")))
            run_single(lab, proposer, max_experiments=failed_proposals + 1)
            requests = len(server.requests)
            auth = {r.headers.get("authorization", "") for r in server.requests}
    finally:
        loop.MAX_BACKOFF_S = saved_backoff
        root.removeHandler(handler)
        root.setLevel(level)
    rows = [e for e in lab.experiments() if e.kind == "experiment"]
    result.rows = [Row(label, e.status, e.reason) for label, e in zip(labels, rows)]
    result.rows += [Row("after the outage: a good reply", e.status, e.reason) for e in rows[len(labels):]]
    result.continued = bool(rows) and rows[-1].status == "keep"
    lab.store.close()
    result.audit = audit(lab_dir, TAG)
    result.notes.append(f"{requests} requests answered, the key reached the server: {auth == {f'Bearer {CANARY}'}}")
    result.notes.append(f"the same outage at the real delays: at least {real_time_s(failed_proposals, retries) / 60:.0f} "
                        f"minutes (loop back-off up to {saved_backoff:g} s, retries 1-2-4 s, 300 s timeouts)")
    result.seconds = time.monotonic() - started
    return result, lab_dir, "\n".join(lines)


def cli_hang(work: Path, data_dir: Path, timeout_s: float = 1.5, say=print) -> FaultRun:
    """A coding-agent CLI that hangs with a child, then one that also ignores SIGTERM."""
    from nightlab.config import CliAgentConfig
    from nightlab.agents.cli import CliProposer

    started = time.monotonic()
    result = FaultRun()
    agent = ROOT / "tests" / "fixtures" / "agents" / "standin_agent.py"
    lab_dir = make_lab(work / "lab", lab_toml(baseline_runs=1, confirm_runs=0, policy="greedy"), train_py(SHARPNESS=0.5))
    lab = open_lab(lab_dir, data_dir, tag=TAG, say=lambda line: say(f"    {line}"))
    children = []
    for n, mode in enumerate(("hang", "stubborn"), start=1):
        evidence = work / f"{mode}.json"
        config = CliAgentConfig(preset="custom", command=f"{sys.executable} {agent} {mode} {evidence} {{prompt_file}}",
                                timeout_s=timeout_s)
        run_single(lab, CliProposer(config, kill_grace_s=0.5), max_experiments=n)
        seen = json.loads(evidence.read_text()) if evidence.exists() else {}
        children += [seen.get("pid"), seen.get("child")]
    rows = [e for e in lab.experiments() if e.kind == "experiment"]
    result.rows = [Row(f"agent CLI that {label}", e.status, e.reason) for label, e in
                   zip(("hangs (and leaves a child)", "hangs and ignores SIGTERM"), rows)]
    alive = [pid for pid in children if pid and _alive(pid)]
    result.notes.append(f"agent processes still alive afterwards: {alive or 'none'}")
    result.continued = len(rows) == 2
    lab.store.close()
    result.audit = audit(lab_dir, TAG)
    result.seconds = time.monotonic() - started
    return result


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def table(result: FaultRun) -> str:
    lines = ["| fault | status | reason |", "| --- | --- | --- |"]
    lines += [f"| {r.fault} | {r.status} | {r.reason[:110].replace('|', '/')} |" for r in result.rows]
    a = result.audit or Audit()
    lines.append("")
    lines.append(f"lost {len(a.lost)}, duplicated {len(a.duplicated)}, wrong commit {len(a.wrong_commit)}, "
                 f"stray processes {len(a.stray)}; loop still running afterwards: {result.continued}; "
                 f"{result.seconds:.0f} s")
    lines += [f"- {n}" for n in result.notes] + [f"- BREACH {b}" for b in a.breaches()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock-s", type=float, default=5.0, help="how long another connection locks the store")
    parser.add_argument("--tmpfs", action="store_true", help="a real full disk: a 4 MiB tmpfs for the run folders")
    args = parser.parse_args()
    from fixtures.standin.helpers import make_dataset

    from reliability.canary import scan

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "data")
        results.append(fault_loop(Path(tmp) / "faults", data, lock_s=args.lock_s, tmpfs=args.tmpfs))
        outage, lab_dir, logs = api_outage(Path(tmp) / "api", data)
        outage.notes.append(f"canary key found in: {scan(lab_dir, CANARY, {'logs': logs}) or 'nowhere'}")
        results.append(outage)
        results.append(cli_hang(Path(tmp) / "cli", data))
    for result in results:
        print(table(result) + "\n")
    return 0 if all(r.audit and r.audit.clean and r.continued for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
