"""The next trial starts while the current one trains, so that its startup costs the night nothing.

A trial's process spends its first seconds importing, compiling and taking a warm-up step (about
15 s with a warm compile cache, a minute cold) while the GPU waits. A worker's ``Standby`` starts
the trial it expects next in the background, a quarter of the way into the current one. That
process runs ``train.py`` up to ``lab.ready()`` and waits there (``NIGHTLAB_GATE``). When the
expected trial is asked for (the same allowed files, byte for byte, and the same seed) the runner
opens the gate and that process trains; anything else stops it, and the trial starts afresh. A
guess that turns out wrong (a keep moved the best, a close call asked for a confirmation) costs
nothing but the background work.

What it changes for the trial that is running: the waiting process holds the GPU memory of its own
warm-up, and its one warm-up step shares the GPU with the running trial for a moment (under 1 % of
a 120 s budget). So a standby starts only while the GPU has room (``MAX_USED_SHARE`` of its memory
in use or less, by ``nvidia-smi``), never under the bubblewrap sandbox (``lab.sandbox`` = ``bwrap``,
or ``auto`` where bubblewrap is installed), and by default only on
CUDA (``lab.standby = "auto"``; on the CPU the two processes would share the cores).

Fairness stays as it was: the time a standby spends before ``lab.ready()`` counts against the
startup allowance like any startup, and only the wait for the gate is free. While the trusted
evaluator scores the current trial the standby is stopped (SIGSTOP), so no agent code runs beside
an evaluation. A standby whose parent (this runner) dies leaves by itself (``Session.ready``
checks); one left stopped is killed by the next run (``reap``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nightlab.config import Config
from nightlab.lab.session import ENV_GATE, ENV_RUNNER, GATE_GO, GATE_READY
from nightlab.trial import sandbox
from nightlab.trial.processes import launch, stop_group, train_env

MAX_USED_SHARE = 0.45  # start a standby only while at most this share of the GPU's memory is in use
START_AT = 0.25  # share of the current trial's budget after which the standby starts
RETRY_S = 1.0  # between two attempts to start one (asking the loop, nvidia-smi)
WORK, OUT, GATE, LOG = "work", "out", "gate", "train.log"


@dataclass(frozen=True)
class Expected:
    """The trial a worker expects next: its allowed files (path -> content) and seed."""

    files: dict[str, bytes]
    seed: int
    key: tuple = ()  # what the scheduler knows it by: (experiment id, seed)


@dataclass
class Waiting:
    """A standby process handed to the runner: it trains once the gate opens."""

    proc: subprocess.Popen
    root: Path
    startup_s: float  # time it spent before it was ready (or until now, if it is not yet)

    @property
    def out_dir(self) -> Path:
        return self.root / OUT

    @property
    def log(self) -> Path:
        return self.root / LOG

    def go(self) -> None:
        (self.root / GATE / GATE_GO).write_text("go\n")


def enabled(config: Config, device: str) -> bool:
    """Whether trials on ``device`` use a standby under ``config`` (``lab.standby``)."""
    mode = config.lab.standby
    if mode == "off" or sandbox.resolve(config.lab.sandbox) == "bwrap":
        return False
    return mode == "on" or device.startswith("cuda")


class Standby:
    """At most one waiting process for one worker (one device)."""

    def __init__(self, root: Path, upcoming: Callable[[], Expected | None] | None = None) -> None:
        self.root = Path(root)
        self.upcoming = upcoming  # set by the loop: what it will ask for next, if it knows
        self.expected: Expected | None = None
        self._proc: subprocess.Popen | None = None
        self._slot = self.root
        self._launched = 0.0
        self._next_try = 0.0  # nothing expected, or no room: ask again after RETRY_S
        self._lock = threading.Lock()
        self.started = self.adopted = 0  # for the log and the benchmark

    @property
    def key(self) -> tuple:
        return self.expected.key if self.expected is not None and self._proc is not None else ()

    def launch(self, workdir: Path, config: Config, data_dir: Path, device: str, preset: str,
               extra_env: dict[str, str]) -> bool:
        """Start the expected trial in the background (``workdir`` gives the files that cannot
        change between trials); False when nothing is expected, one is waiting, or the GPU is full."""
        with self._lock:
            if self._proc is not None or self.upcoming is None or time.monotonic() < self._next_try:
                return False
            self._next_try = time.monotonic() + RETRY_S
            try:
                expected = self.upcoming()
            except Exception:  # noqa: BLE001 -- a guess that fails to form is no guess
                return False
            if expected is None or not has_room(device, extra_env):
                return False
            slot = self.root / str(self.started + 1)  # its own folder: the adopted one may still run
            shutil.rmtree(slot, ignore_errors=True)
            work, out, gate = slot / WORK, slot / OUT, slot / GATE
            shutil.copytree(workdir, work, ignore=shutil.ignore_patterns(".git"), symlinks=True)
            for name, data in expected.files.items():
                target = work / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            out.mkdir(parents=True)
            gate.mkdir(parents=True)
            view = sandbox.train_view(data_dir, out)
            env = {**train_env(config, out, view, expected.seed, device, preset), **extra_env,
                   ENV_GATE: str(gate), ENV_RUNNER: str(os.getpid())}
            self._proc = launch([sys.executable, "train.py"], work, env, slot / LOG)
            self._slot, self._launched = slot, time.monotonic()
            self.expected = expected
            self.started += 1
            return True

    def take(self, workdir: Path, seed: int, names: tuple[str, ...]) -> Waiting | None:
        """The waiting process if it runs exactly this trial (``names``: the allowed files) and
        is alive; otherwise stop it and return None."""
        with self._lock:
            proc, expected = self._proc, self.expected
            if proc is None or expected is None:
                return None
            self._proc, self.expected = None, None
            matches = (expected.seed == seed and proc.poll() is None
                       and all(_read(workdir / n) == expected.files.get(n) for n in names))  # absent on both sides: equal
            if not matches:
                _stop(proc)
                shutil.rmtree(self._slot, ignore_errors=True)
                return None
            ready = self._slot / GATE / GATE_READY
            waited_from = ready.stat().st_mtime if ready.exists() else None
            startup = (time.monotonic() - self._launched) - (time.time() - waited_from if waited_from else 0.0)
            self.adopted += 1
            return Waiting(proc, self._slot, startup_s=max(0.0, startup))

    def pause(self) -> None:
        """Stop the waiting process where it is (SIGSTOP): no agent code runs while the trusted
        evaluator scores the current trial."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                try:
                    os.killpg(self._proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def close(self) -> None:
        """Stop the waiting process, if any (the loop is over)."""
        with self._lock:
            if self._proc is not None:
                _stop(self._proc)
                shutil.rmtree(self._slot, ignore_errors=True)
            self._proc, self.expected = None, None


def reap(root: Path) -> list[str]:
    """Kill standby processes a killed run left under ``root`` (``.nightlab/standby``): waiting,
    or stopped while an evaluation ran (a stopped process cannot notice that its runner is gone)."""
    killed = sandbox.kill_marked(f"\0{ENV_GATE}={Path(root).resolve()}/".encode())
    shutil.rmtree(root, ignore_errors=True)
    return killed


def has_room(device: str, env: dict[str, str]) -> bool:
    """Whether ``device`` can hold a second training process: always on the CPU; on a GPU while at
    most ``MAX_USED_SHARE`` of its memory is in use (False when ``nvidia-smi`` cannot tell)."""
    if not device.startswith("cuda"):
        return True
    index = (env.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip() or "0"
    try:
        out = subprocess.run(
            ["nvidia-smi", "-i", index, "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        used, total = (float(x) for x in out.strip().splitlines()[0].split(","))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return False
    return total > 0 and used / total <= MAX_USED_SHARE


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _stop(proc: subprocess.Popen) -> None:
    stop_group(proc.pid, grace_s=2.0)
    proc.wait()


def files_in(folder: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """The allowed files ``names`` as they are in ``folder`` (absent ones left out)."""
    return {name: data for name in names if (data := _read(Path(folder) / name)) is not None}
