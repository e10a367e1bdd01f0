"""A stage's supervisor: runs one command and ends every process it leaves, whatever session it moved to.

``python -I -m nightlab.trial.supervisor --report-fd N --grace S -- COMMAND ...``

The runner starts this as the leader of a new session. It makes itself a child subreaper (Linux
``prctl``), so every process the command starts stays its descendant even after that process's
parent exits and it calls ``setsid`` (a daemon with a clean environment included); then runs the
command as its child, in its own session and process group, reaping the orphans it adopts. When
the command exits, every descendant still running ``SETTLE_S`` later is a survivor: it is killed,
and one JSON line goes to file descriptor N, ``{"returncode": ..., "survivors": ["pid 123 (python -c ...)", ...]}``.

At the hard cap the runner sends the group SIGTERM: the command gets it as before; this process
waits up to ``--grace`` seconds (less than the runner's own grace) for the command to exit, then
kills every descendant itself, reports, and exits, so its report is written before the runner
would SIGKILL the group. Where the subreaper is not available the runner's own tracking
(``nightlab.lab.reaper``) still applies.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import psutil

from nightlab.lab import reaper

POLL_S = 0.05
SETTLE_S = 2.0  # after the command exits, what it started may take this long to exit by itself (compile workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -I -m nightlab.trial.supervisor")
    parser.add_argument("--report-fd", type=int, required=True, help="where the one-line JSON report goes")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and killing everything")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    report = os.fdopen(args.report_fd, "w")
    stop_at: list[float] = []
    signal.signal(signal.SIGTERM, lambda *_: stop_at.append(time.monotonic() + args.grace) if not stop_at else None)
    reaper.become_subreaper()
    child = subprocess.Popen(command)  # our session and group: the runner's signals reach it
    returncode = None
    while returncode is None:
        returncode = child.poll()
        _reap_adopted(child.pid)
        if stop_at and time.monotonic() >= stop_at[0]:
            break
        time.sleep(POLL_S)
    me = psutil.Process()
    settle_until = time.monotonic() + (0.0 if stop_at else SETTLE_S)
    while True:
        _reap_adopted(child.pid)
        survivors = [p for p in me.children(recursive=True) if p.pid != child.pid and _running(p)]
        if not survivors or time.monotonic() >= settle_until:
            break
        time.sleep(POLL_S)
    described = reaper.kill(survivors)
    if child.poll() is None:
        child.kill()
    returncode = child.wait()
    _reap_adopted(child.pid)
    report.write(json.dumps({"returncode": returncode, "survivors": described}) + "\n")
    report.close()
    return returncode if returncode >= 0 else 128 - returncode


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _reap_adopted(child: int) -> None:
    """Collect the exit status of adopted orphans that ended (never the command's own: Popen waits it)."""
    for proc in psutil.Process().children():
        if proc.pid != child and not _running(proc):
            try:
                os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:
                pass


if __name__ == "__main__":
    sys.exit(main())
