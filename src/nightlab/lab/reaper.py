"""The processes of one session, found and ended (psutil): by session, process group and descent.

A stage of a trial (training, the model process) starts as the leader of a new session. Its
processes stay in that session and process group unless they call ``setsid`` (a daemon); even
then they are its descendants until their parent exits. ``Tracker`` follows a leader's
descendants while the stage runs, so a daemon seen once is remembered after it left the session;
at the end ``survivors`` are all of them still running, and ``kill`` ends them. Where the caller
is a child subreaper (``become_subreaper``, Linux), orphans are adopted by it instead of init, so
a process that left the session and lost its parent is still found among the caller's children.
"""

from __future__ import annotations

import ctypes
import os
import sys

import psutil

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36  # linux/prctl.h
KILL_WAIT_S = 5.0


class Tracker:
    """The processes of the session ``leader`` started, as far as they can be seen while it runs."""

    def __init__(self, leader: int) -> None:
        self.leader = leader
        self.seen: dict[int, psutil.Process] = {}

    def poll(self) -> None:
        """Remember every live member now: the session, the group, the descendants."""
        for proc in _members(self.leader):
            self.seen.setdefault(proc.pid, proc)

    def survivors(self, *, exclude: tuple[int, ...] = ()) -> list[psutil.Process]:
        """Processes of the session still running (zombies do not count)."""
        self.poll()
        alive = []
        for pid, proc in self.seen.items():
            if pid in exclude or pid == os.getpid():
                continue
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                continue
        return alive


def _members(leader: int) -> list[psutil.Process]:
    found: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(leader)
        found[leader] = root
        for child in root.children(recursive=True):
            found[child.pid] = child
    except psutil.Error:
        pass
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == leader or os.getpgid(proc.pid) == leader:
                found.setdefault(proc.pid, proc)
        except (OSError, psutil.Error):
            continue
    return list(found.values())


def describe(proc: psutil.Process) -> str:
    try:
        command = " ".join(proc.cmdline())[:80]
    except psutil.Error:
        command = "?"
    return f"pid {proc.pid} ({command})"


def kill(procs: list[psutil.Process]) -> list[str]:
    """SIGKILL ``procs`` and wait until they are gone; describe each one."""
    described = [describe(p) for p in procs]
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(procs, timeout=KILL_WAIT_S)
    for proc in alive:  # a zombie child of ours: reap it
        try:
            proc.wait(timeout=0)
        except (psutil.Error, psutil.TimeoutExpired):
            pass
    return described


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (Linux ``prctl``); False where unsupported."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent() -> bool:
    """Have the kernel SIGKILL this process when its parent exits (Linux ``prctl``); False where unsupported."""
    return _prctl(PR_SET_PDEATHSIG, 9)


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
