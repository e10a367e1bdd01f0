"""Processes of a trial: the environment train.py gets, starting a process group, and stopping it whole."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from nightlab.config import Config
from nightlab.trial import pycache

TERM_GRACE_S = 10.0  # SIGTERM first; SIGKILL the group if it is still there after this


def is_secret(name: str, config: Config) -> bool:
    """An environment variable that holds a key: the configured one, the SDKs' defaults, any *_API_KEY."""
    upper = name.upper()
    return (name == config.api.api_key_env or upper in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")
            or upper.endswith(("_API_KEY", "_TOKEN", "_SECRET")))


def train_env(config: Config, run_dir: Path, data_dir: Path, seed: int, device: str, preset: str) -> dict[str, str]:
    """The environment contract of ``train.py`` (docs/architecture.md), without the agents' API keys."""
    env = {k: v for k, v in os.environ.items() if not is_secret(k, config)}
    env.update(
        NIGHTLAB_DATA=str(data_dir),
        NIGHTLAB_OUT=str(run_dir),
        NIGHTLAB_BUDGET_S=repr(float(config.lab.budget_s)),
        NIGHTLAB_BUDGET_TOKENS=str(int(config.lab.budget_tokens)),
        NIGHTLAB_DEVICE=device,
        NIGHTLAB_PRESET=preset,
        NIGHTLAB_SEED=str(int(seed)),
        PYTHONUNBUFFERED="1",
        **pycache.env(),  # bytecode the lab compiled, read only: imports in seconds, not a dozen
    )
    return env


def launch(command: list[str], cwd: Path, env: dict[str, str], log_path: Path,
           stdin_data: bytes | None = None, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """Start ``command`` in a new session (its own process group), output to ``log_path``.

    Output is written by the child to the file itself (not a pipe), and read back for progress:
    a survivor holding a pipe open cannot block us, and a killed runner loses no log. Its stdin is
    empty, or ``stdin_data`` (a few bytes, written into the pipe before the child starts).
    """
    stdin: int = subprocess.DEVNULL
    if stdin_data is not None:
        stdin, write_end = os.pipe()
        try:
            os.write(write_end, stdin_data)
        finally:
            os.close(write_end)
    try:
        with open(log_path, "wb") as log:
            return subprocess.Popen(
                command, cwd=cwd, env=env, stdin=stdin, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                pass_fds=pass_fds,
            )
    finally:
        if stdin_data is not None:
            os.close(stdin)


def stop_group(pgid: int, grace_s: float | None = None) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace_s`` (default ``TERM_GRACE_S``), and wait
    until no member is left."""
    if not group_alive(pgid):
        return
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + (TERM_GRACE_S if grace_s is None else grace_s)
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in group ``pgid``."""
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
