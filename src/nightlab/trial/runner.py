"""One trial: train ``train.py`` under a hard wall-clock cap, then judge it with the trusted evaluator.

Both stages run as child processes in their own session, so the whole group can be stopped at
once: at the cap, on an error, and at the end of every stage even on success, so no stray process
keeps GPU memory into the next trial. While a stage runs its session and descendants are followed
(``nightlab.lab.reaper``); a process of it still running after the stage voids the trial
(``invalid``) and is killed. Output goes straight to files in the run folder (``train.log``,
``eval.log``), so nothing is lost if the runner itself is killed.

What training may leave behind is its run folder only: files it created in the worktree outside
the allowed files void the trial (and are removed), and so does a write to the shared dataset
cache. The judge gets the allowed files as they were *before* training (a train.py that rewrites
itself is judged as committed) and the SHA-256 of the weights taken when training ended; it runs
as ``python -I -m nightlab.lab.evaluate`` outside the worktree, and runs train.py's model in a
process of its own (``nightlab.lab.evaluate``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from nightlab.config import Config
from nightlab.lab import reaper
from nightlab.lab.session import resolve_device, resolve_preset
from nightlab.trial import processes, pycache, sandbox
from nightlab.trial.processes import launch, stop_group, train_env
from nightlab.trial.standby import START_AT, Standby, files_in

TRIAL_STATUSES = ("ok", "crash", "timeout", "invalid")
LOG_TAIL_LINES = 50
POLL_S = 0.1
STANDBY_FILE = "standby.json"  # in a run folder whose trial was started early by a standby
BWRAP_SIGNALED = 128
SUPERVISOR_GRACE_SHARE = 0.8  # the supervisor kills everything this far into the runner's SIGTERM grace
DISK_FULL_BYTES = 1 << 20  # less free space than this after a crash: say the disk is full


@dataclass(frozen=True)
class TrialResult:
    status: str  # ok | crash | timeout | invalid
    val_bpb: float | None = None
    reason: str = ""  # one line: why the trial is not ok ("NaN", "exit code 1", ...)
    summary: dict[str, Any] = field(default_factory=dict)  # train.py's summary.json
    eval: dict[str, Any] = field(default_factory=dict)  # the evaluator's eval.json
    train_s: float = 0.0
    eval_s: float = 0.0
    total_s: float = 0.0
    log_tail: str = ""  # last lines of train.log
    error: str = ""  # the traceback (of training or evaluation) if the log shows one, else the log's tail
    device: str = ""
    preset: str = ""
    outside_cores: float | None = None  # cores other processes kept busy, on average, while it trained


@dataclass(frozen=True)
class _Stage:
    returncode: int | None  # None: stopped at the cap
    seconds: float
    survivors: list[str] = field(default_factory=list)  # processes of the stage still running after it, killed
    outside_cores: float | None = None  # cores that processes outside the stage kept busy, on average, while it ran


def run_trial(
    workdir: Path,
    run_dir: Path,
    config: Config,
    seed: int,
    *,
    data_dir: Path,
    on_progress: Callable[[str], None] | None = None,
    on_stage: Callable[[str, int], None] | None = None,
    env: dict[str, str] | None = None,
    standby: Standby | None = None,
) -> TrialResult:
    """Train ``workdir/train.py`` into ``run_dir`` and evaluate it.

    ``on_progress`` gets each line train.py prints, as it prints it. ``on_stage(stage, pgid)`` is
    called when the ``train`` and ``eval`` processes start, so a caller can record the process
    group and stop it after its own crash. ``env`` adds variables to both processes (a worker's
    ``CUDA_VISIBLE_DEVICES``). With a ``standby`` (``nightlab.trial.standby``), a process
    already waiting for exactly this trial trains it, and the trial expected next is started
    while this one trains.
    """
    workdir, run_dir, data_dir = Path(workdir).resolve(), Path(run_dir).resolve(), Path(data_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.lab.device)
    preset = resolve_preset(config.lab.preset, device)
    extra_env = dict(env or {})
    mode = sandbox.resolve(config.lab.sandbox)
    view = sandbox.train_view(data_dir, run_dir)  # training never gets val.* or holdout.*
    pycache.fill()  # once per machine and version, in the background
    env = {**train_env(config, run_dir, view, seed, device, preset), **extra_env}
    started = time.monotonic()
    common = dict(device=device, preset=preset)
    allowed = config.lab.allowed_files
    source = files_in(workdir, allowed)  # what the judge imports: the allowed files as committed
    worktree_before = _worktree_files(workdir, run_dir)
    dataset_before = sandbox.fingerprint(data_dir)

    cap = config.lab.budget_s + config.lab.startup_allowance_s
    train_log = run_dir / "train.log"
    command: list[str] | subprocess.Popen = [sys.executable, "train.py"]
    if mode == "bwrap":
        command = sandbox.bwrap(command, cwd=workdir, writable=[workdir, run_dir], data_dir=data_dir)
    waiting = standby.take(workdir, seed, config.lab.allowed_files) if standby is not None else None
    log_path = train_log
    if waiting is not None:  # started while the previous trial trained: its startup is behind it
        waiting.go()
        command, log_path = waiting.proc, waiting.log
        cap = max(cap - waiting.startup_s, 1.0)  # its startup counted against the allowance as always

    def on_tick(elapsed: float) -> None:
        if standby is not None and elapsed >= START_AT * config.lab.budget_s:
            try:
                standby.launch(workdir, config, data_dir, device, preset, extra_env)
            except Exception:  # noqa: BLE001 -- a standby that cannot start must not stop this trial
                standby.upcoming = None

    train = _run_group(
        command, workdir, env, log_path, cap,
        on_line=on_progress, on_start=lambda pid: on_stage and on_stage("train", pid),
        on_tick=on_tick if standby is not None else None,
    )
    if waiting is not None:
        escaped_early = sandbox.escaped(waiting.out_dir)
        _move_into(waiting.out_dir, run_dir)
        shutil.move(waiting.log, train_log)
        shutil.rmtree(waiting.root, ignore_errors=True)
        (run_dir / STANDBY_FILE).write_text(json.dumps({"startup_s": round(waiting.startup_s, 2)}) + "\n")
    else:
        escaped_early = []
    if mode == "bwrap" and train.returncode is not None and train.returncode > BWRAP_SIGNALED:
        train = replace(train, returncode=BWRAP_SIGNALED - train.returncode)  # bwrap exits 128 + N for signal N
    summary = with_epochs(_read_json(run_dir / "summary.json"), data_dir)
    log_tail = _tail(train_log)
    base = dict(summary=summary, train_s=train.seconds, log_tail=log_tail, outside_cores=train.outside_cores,
                **common)

    if escaped := escaped_early + train.survivors + sandbox.escaped(run_dir):
        return _done(started, status="invalid", reason=_escaped_reason("train.py", escaped), error=log_tail, **base)
    if created := _created(workdir, run_dir, worktree_before, allowed):
        return _done(started, status="invalid", error=log_tail, **base,
                     reason=f"training created files in the worktree outside the allowed files (removed): "
                            f"{', '.join(created[:10])}")
    if touched := sandbox.changed(data_dir, dataset_before):
        return _done(started, status="invalid", error=log_tail, **base,
                     reason=f"training wrote the shared dataset cache {data_dir}: {', '.join(touched[:10])}; "
                            "every later trial on it is affected: prepare the dataset again")
    if train.returncode is None:
        return _done(started, status="timeout", reason=f"training passed the hard cap of {cap:g} s and was stopped",
                     error=log_tail, **base)
    if train.returncode != 0:
        return _done(started, status="crash", reason=_exit_reason(train.returncode, log_tail) + _disk_full(run_dir),
                     error=_traceback(log_tail), **base)
    if _is_nan(summary.get("val_bpb")) or _is_nan(summary.get("train_loss")):
        return _done(started, status="crash", reason="NaN: training diverged", error=log_tail, **base)
    weights = run_dir / "model.pt"
    if not weights.exists():
        return _done(started, status="crash", reason="train.py exited without writing model.pt (call lab.finish)",
                     error=log_tail, **base)

    digest = hashlib.sha256(weights.read_bytes()).hexdigest()  # what the judge may load: these weights only
    eval_out, eval_log = run_dir / "eval.json", run_dir / "eval.log"
    eval_out.unlink(missing_ok=True)
    judged = Path(tempfile.mkdtemp(prefix="nightlab-judged-"))  # outside the worktree and the lab
    command = judge_command(source, judged, weights, digest, data_dir, eval_out, config, device, preset, mode)
    if standby is not None:
        standby.pause()  # the next trial's code stays still while this one is scored
    # The scorer writes this into eval.json: an eval.json without it was written by someone else.
    token = secrets.token_hex(16)
    try:
        if touched := sandbox.changed(data_dir, dataset_before):  # written while the standby ran, say
            return _done(started, status="invalid", error=log_tail, **base,
                         reason=f"the shared dataset cache {data_dir} changed before scoring: {', '.join(touched[:10])}")
        evaluation = _run_group(
            command, judged, _eval_env(env), eval_log, config.lab.eval_timeout_s,
            on_start=lambda pid: on_stage and on_stage("eval", pid), stdin_data=f"{token}\n".encode(),
        )
        report = _read_json(eval_out)
    finally:
        shutil.rmtree(judged, ignore_errors=True)
        if standby is not None:
            standby.resume()
    forged = bool(report) and report.pop("token", None) != token
    base.update(eval=report, eval_s=evaluation.seconds)
    if forged:
        return _done(started, status="invalid", error=_tail(eval_log), **{**base, "eval": {}},
                     reason="eval.json was not written by the evaluator (it lacks this evaluation's token): "
                            "the evaluated train.py wrote its own result")
    escaped = evaluation.survivors + sandbox.escaped(run_dir)  # killed by now
    if escaped and report:  # (a scorer that died leaves its model process behind: its crash is the verdict)
        return _done(started, status="invalid", reason=_escaped_reason("the evaluated train.py", escaped),
                     error=_tail(eval_log), **base)
    return _done(started, **base, **_judge(evaluation, report, eval_log, config.lab.eval_timeout_s))


def judge_command(source: dict[str, bytes], folder: Path, weights: Path, weights_sha256: str, data_dir: Path,
                  out: Path, config: Config, device: str, preset: str, sandbox_mode: str) -> list[str]:
    """The trusted evaluator's command line, for the split in ``data_dir`` (its ``val.*``: a folder
    whose ``val.*`` are the holdout's scores the holdout): the allowed files ``source`` (path ->
    content, as they were before training) are written into ``folder``, outside the worktree; the
    scorer reads a token on stdin (``--token-stdin``) and runs as ``python -I`` (run it with ``folder``
    as its working folder)."""
    for name, data in source.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    command = [
        sys.executable, "-I", "-m", "nightlab.lab.evaluate", "--train-py", str(folder / "train.py"),
        "--files", *[n for n in source if n != "train.py"], "--weights", str(weights), "--weights-sha256",
        weights_sha256, "--data", str(data_dir), "--out", str(out), "--device", device, "--preset", preset,
        "--seq-len", str(config.lab.eval_seq_len), "--check-share", str(config.lab.eval_check_share),
        "--sandbox", sandbox_mode, "--token-stdin",
    ]
    if config.lab.eval_max_tokens > 0:
        command += ["--max-tokens", str(config.lab.eval_max_tokens)]
    return command


def _judge(evaluation: _Stage, report: dict[str, Any], eval_log: Path, timeout_s: float) -> dict[str, Any]:
    """Turn the evaluator's exit and eval.json into status, val_bpb, reason and error."""
    eval_tail = _tail(eval_log)
    if evaluation.returncode is None:
        return dict(status="timeout", reason=f"evaluation passed its cap of {timeout_s:g} s", error=eval_tail)
    status = report.get("status")
    if status == "invalid":
        return dict(status="invalid", reason=f"evaluator: {report.get('reason') or 'invalid model'}")
    if status != "ok":
        why = report.get("reason") or _exit_reason(evaluation.returncode, eval_tail)
        return dict(status="crash", reason=f"evaluation failed: {why}", error=_traceback(eval_tail))
    val_bpb = report.get("val_bpb")
    if _is_nan(val_bpb) or not isinstance(val_bpb, (int, float)):
        return dict(status="crash", reason=f"NaN: val_bpb is {val_bpb}", val_bpb=None, error=eval_tail)
    return dict(status="ok", val_bpb=float(val_bpb))


def _move_into(source: Path, run_dir: Path) -> None:
    """Move what a standby process wrote (weights, summary, ...) into the trial's run folder."""
    for entry in source.iterdir():
        if entry.name == sandbox.VIEW_DIR:
            continue
        target = run_dir / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        shutil.move(str(entry), str(target))


def _disk_full(run_dir: Path) -> str:
    """A note for a crash on a full disk, whose own message (torch's, say) may not say so."""
    try:
        free = shutil.disk_usage(run_dir).free
    except OSError:
        return ""
    return f" (the disk holding {run_dir} is full: {free >> 10} KiB free)" if free < DISK_FULL_BYTES else ""


def _escaped_reason(who: str, escaped: list[str]) -> str:
    return f"{who} left processes running after its stage, killed: {'; '.join(escaped)}"


def _eval_env(env: dict[str, str]) -> dict[str, str]:
    """The scorer's environment: the trial's, without the paths it gave training (the scorer is told
    its paths on its command line, and builds the model process's environment from scratch)."""
    return {k: v for k, v in env.items() if k not in ("NIGHTLAB_DATA", "NIGHTLAB_OUT")}


UNWATCHED = (".git", ".nightlab")  # a worktree's git link; the lab's state, when a trial runs in the lab itself


def _worktree_files(workdir: Path, run_dir: Path) -> set[str]:
    """The files in the worktree, but its git link, nightlab's state and the run folder (``nightlab
    train`` trains in the lab itself, with its run folder inside)."""
    found = set()
    for folder, dirs, names in os.walk(workdir):
        here = Path(folder)
        dirs[:] = [d for d in dirs if here / d != run_dir and not (here == workdir and d in UNWATCHED)]
        found |= {(here / n).relative_to(workdir).as_posix() for n in names if not (here == workdir and n in UNWATCHED)}
    return found


def _created(workdir: Path, run_dir: Path, before: set[str], allowed: tuple[str, ...]) -> list[str]:
    """Files in the worktree now that were not there before and are not allowed files; removed."""
    created = sorted(_worktree_files(workdir, run_dir) - before - set(allowed))
    for name in created:
        (workdir / name).unlink(missing_ok=True)
    return created


def _done(started: float, **fields: Any) -> TrialResult:
    return TrialResult(total_s=time.monotonic() - started, **fields)


def _run_group(
    command: list[str] | subprocess.Popen,
    cwd: Path,
    env: dict[str, str],
    log_path: Path,
    cap_s: float,
    on_line: Callable[[str], None] | None = None,
    on_start: Callable[[int], object] | None = None,
    on_tick: Callable[[float], object] | None = None,
    stdin_data: bytes | None = None,
) -> _Stage:
    """Run ``command`` (or wait for a process already started) in its own group; stop the group
    at ``cap_s``. ``on_tick(seconds so far)`` is called while it runs."""
    started = time.monotonic()
    load = _Load()
    report_fd = None
    if isinstance(command, subprocess.Popen):
        proc = command
    else:  # under a supervisor that ends whatever the command leaves (nightlab.trial.supervisor)
        report_fd, write_fd = os.pipe()
        grace = processes.TERM_GRACE_S * SUPERVISOR_GRACE_SHARE
        command = [sys.executable, "-I", "-m", "nightlab.trial.supervisor", "--report-fd", str(write_fd),
                   "--grace", f"{grace:g}", "--", *command]
        try:
            proc = launch(command, cwd, env, log_path, stdin_data, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
    follower = _LogFollower(log_path, on_line)
    tracker = reaper.Tracker(proc.pid)
    returncode: int | None = None
    try:
        if on_start:
            on_start(proc.pid)
        while True:
            returncode = load.reap(proc)
            if returncode is not None:
                break
            time.sleep(POLL_S)
            tracker.poll()
            follower.poll()
            elapsed = time.monotonic() - started
            if elapsed > cap_s:
                break
            if on_tick:
                on_tick(elapsed)
    finally:
        tracker.poll()
        stop_group(proc.pid)
        proc.wait()
        follower.poll(final=True)
    survivors = reaper.kill(tracker.survivors(exclude=(proc.pid,)))
    if report_fd is not None:
        report = _supervisor_report(report_fd)
        if returncode is not None:  # at the cap everything is stopped, and the trial is a timeout anyway
            survivors = report.get("survivors", []) + survivors
            if isinstance(report.get("returncode"), int):
                returncode = report["returncode"]  # the command's own (a signal as a negative number)
    return _Stage(returncode=returncode, seconds=time.monotonic() - started, survivors=survivors,
                  outside_cores=load.outside_cores())


class _Load:
    """How busy the machine was outside one stage while it ran: the CPU time of every core (psutil's
    system-wide counters, steal included) less the stage's own processes (the rusage of its root and
    of the children it waited for, taken when it is reaped) and this process's (the orchestrator, the
    log it follows), per second. A trial that ran slowly while nothing else ran slowed itself."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.busy0, self.own0 = _busy_cpu_s(), _own_cpu_s()
        self.stage_cpu_s: float | None = None
        self.ended = self.started
        self.busy1 = self.own1 = 0.0

    def reap(self, proc: subprocess.Popen) -> int | None:
        """``proc``'s exit code if it has exited (reaped here, with its CPU time), else None."""
        if proc.returncode is not None:
            return proc.returncode
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: its status and CPU time are gone
            return proc.poll()
        if pid == 0:
            return None
        self.ended, self.busy1, self.own1 = time.monotonic(), _busy_cpu_s(), _own_cpu_s()
        self.stage_cpu_s = usage.ru_utime + usage.ru_stime
        proc.returncode = os.waitstatus_to_exitcode(status)
        return proc.returncode

    def outside_cores(self) -> float | None:
        """Cores busy outside the stage on average (None: the stage did not end by itself, or unknown)."""
        seconds = self.ended - self.started
        if self.stage_cpu_s is None or seconds <= 0 or not self.busy0 or not self.busy1:
            return None
        outside = (self.busy1 - self.busy0) - self.stage_cpu_s - (self.own1 - self.own0)
        return round(max(0.0, outside) / seconds, 3)


def _busy_cpu_s() -> float:
    """CPU seconds every core has spent busy since boot (0.0 where the system does not say)."""
    try:
        times = psutil.cpu_times()
    except (OSError, RuntimeError, psutil.Error):
        return 0.0
    idle = times.idle + getattr(times, "iowait", 0.0)
    guest = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)  # already in user and nice
    return sum(times) - idle - guest


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def _supervisor_report(fd: int) -> dict[str, Any]:
    """The supervisor's one JSON line (empty if it was killed before it could write it)."""
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    try:
        report = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        return {}
    return report if isinstance(report, dict) else {}


class _LogFollower:
    """Hands each complete new line of a growing log file to a callback."""

    def __init__(self, path: Path, on_line: Callable[[str], None] | None):
        self.path, self.on_line, self.offset, self.partial = path, on_line, 0, b""

    def poll(self, final: bool = False) -> None:
        if self.on_line is None:
            return
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return
        self.offset += len(chunk)
        data = self.partial + chunk
        lines = data.split(b"\n")
        self.partial = lines.pop()
        if final and self.partial:
            lines.append(self.partial)
            self.partial = b""
        for line in lines:
            self.on_line(line.decode("utf-8", errors="replace").rstrip("\r"))


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64_000))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _traceback(log_tail: str) -> str:
    """From the last ``Traceback`` on, if the log shows one; else the whole tail."""
    at = log_tail.rfind("Traceback (most recent call last)")
    return log_tail[at:] if at >= 0 else log_tail


def _exit_reason(returncode: int, log_tail: str) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    last = [line for line in log_tail.splitlines() if line.strip()]
    what = last[-1].strip() if last else "no output"
    return f"exit code {returncode}: {what[:200]}"


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def with_epochs(summary: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    """``summary`` with ``epochs``: the passes over the train split its tokens make, as a fraction.

    On a dataset that a run reads several times over, where in an epoch a run ends moves its
    val_bpb (by about 0.01 on pycode at 300 s: bench/RESULTS.md), so the record says where.
    The count is the tokens train.py reports over the split's tokens; the loader's own epoch
    boundary can fall up to about 1 % of an epoch earlier (the extra tokens of each row, the
    warm-up step's batch, each epoch's dropped last batch). train.py's own ``epochs``, if any, is
    replaced: the record holds the lab's figure or none.
    """
    without = {k: v for k, v in summary.items() if k != "epochs"}
    tokens = summary.get("total_tokens")
    train_tokens = _read_json(data_dir / "manifest.json").get("train_tokens")
    if not (_is_count(tokens) and _is_count(train_tokens) and train_tokens > 0):
        return without
    try:
        epochs = tokens / train_tokens
    except OverflowError:  # a count too large for a float is no count
        return without
    return {**without, "epochs": round(epochs, 3)} if math.isfinite(epochs) else without


def _is_count(value: Any) -> bool:
    """A number of tokens: a finite, non-negative int or float, not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value >= 0 and (isinstance(value, int) or math.isfinite(value))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


Trainer = Callable[..., TrialResult]  # ``run_trial``'s signature: the runner, a Ray task, the simulator


def runs_processes(trainer: Trainer) -> bool:
    """Whether ``trainer`` runs train.py as real processes on this machine (not a simulation): the
    runner itself, or the runner wrapped in partials (a local worker's device binding)."""
    while isinstance(trainer, functools.partial):
        if run_trial in (trainer.func, *trainer.args):
            return True
        trainer = trainer.func
    return trainer is run_trial
