"""``kill -9`` of ``nightlab run`` at random moments, then ``--resume``: is anything lost, duplicated or
recorded against the wrong commit, and does the loop still run afterwards?

One lab, one run: round after round, ``nightlab run --resume`` (scripted agent, the suite's
fingerprinting stand-in, noise policy with baseline reruns and confirmations) is started and
killed with SIGKILL, whatever it was doing: every other round after a random delay, and in the
rounds between the moment the store shows a chosen event (a new row, training or evaluation
starting, a verdict), which aims the kill at the few milliseconds between two writes. After each kill the rows that
were finished before must be unchanged. At the end one more ``nightlab run --resume`` must run
to completion, and the audit (``audit.py``) must find no breach.

Usage: python bench/reliability/kill_campaign.py [--trials 50] [--seed 0] [--max-delay 7]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]

from fixtures.standin.helpers import lab_toml, make_dataset, make_lab  # noqa: E402
from nightlab.night.store import Store  # noqa: E402
from reliability.audit import Audit, audit, snapshot  # noqa: E402
from reliability.standins import train_py  # noqa: E402

TAG = "kill"
BASELINE_RUNS, CONFIRM_RUNS = 2, 1
MAX_TRIALS = max(BASELINE_RUNS, 1 + CONFIRM_RUNS)  # measurements one experiment may ever have


@dataclass
class Campaign:
    kills: int = 0
    moments: Counter = field(default_factory=Counter)  # what the loop was doing when it was killed
    breaches_after_kill: list[str] = field(default_factory=list)
    final_exit: int | None = None
    final_new_experiments: int = 0
    audit: Audit | None = None
    seconds: float = 0.0


def _steps(rng: random.Random, n: int = 6) -> list[dict]:
    """Fresh scripted proposals: the stand-in with a random sharpness and noise."""
    return [{"description": f"sharpness {s} noise {z}", "files": {"train.py": train_py(SHARPNESS=s, NOISE=z)}}
            for s, z in ((round(rng.uniform(0.3, 1.3), 3), round(rng.uniform(0.0, 0.3), 3)) for _ in range(n))]


EVENTS = ("new row", "stage eval", "stage judge", "verdict")


def _state(lab_dir: Path) -> tuple[int, tuple[str, ...], int]:
    """(rows, stages of the open rows, finished rows) of the run, read without locking anything."""
    path = lab_dir / ".nightlab" / "store.db"
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            rows = conn.execute("SELECT stage, status FROM experiments WHERE run_tag = ?", (TAG,)).fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return 0, (), 0
    done = ("keep", "discard", "crash", "timeout", "invalid", "agent_failed", "repeat")  # nightlab.night.store.FINISHED
    return len(rows), tuple(stage for stage, status in rows if status not in done), sum(s in done for _, s in rows)


def _wait_for(event: str, lab_dir: Path, proc: subprocess.Popen, timeout: float) -> bool:
    """Poll the store every few milliseconds until ``event`` happens; False if it did not in time."""
    rows, first_stages, finished = _state(lab_dir)  # a row left in a stage by the last kill does not count
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        now_rows, stages, now_finished = _state(lab_dir)
        moved = stages != first_stages
        if ((event == "new row" and now_rows > rows) or (event == "stage eval" and moved and "eval" in stages)
                or (event == "stage judge" and moved and "judge" in stages)
                or (event == "verdict" and now_finished > finished)):
            return True
        time.sleep(0.003)
    return False


def _command(lab_dir: Path, data_dir: Path, resume: bool, limit: int) -> list[str]:
    return [sys.executable, "-m", "nightlab", "run", "--agent", "scripted", "--lab", str(lab_dir), "--data",
            str(data_dir), "--tag", TAG, "--max-experiments", str(limit), *(["--resume"] if resume else [])]


def _has_run(lab_dir: Path) -> bool:
    if not (lab_dir / ".nightlab" / "store.db").exists():
        return False
    with Store.open(lab_dir) as store:
        return store.run(TAG) is not None


def _moment(lab_dir: Path, before: int) -> str:
    """What the killed loop was doing, as the store tells it."""
    if not _has_run(lab_dir):
        return "starting"
    with Store.open(lab_dir) as store:
        rows = store.experiments(TAG)
    open_rows = [e for e in rows if not e.finished]
    if open_rows:
        e = open_rows[-1]
        return f"{'baseline' if e.kind == 'baseline' else 'experiment'} {e.stage}"
    return "proposing or recording" if len(rows) > before else "starting"


def campaign(work: Path, data_dir: Path, trials: int, seed: int = 0, max_delay: float = 7.0,
             say=print) -> Campaign:
    started = time.monotonic()
    rng = random.Random(seed)
    toml = lab_toml(allowance_s=8.0, baseline_runs=BASELINE_RUNS, confirm_runs=CONFIRM_RUNS)
    lab_dir = make_lab(work / "lab", toml, train_py(SHARPNESS=0.5))
    (lab_dir / ".nightlab").mkdir()
    script = lab_dir / ".nightlab" / "scripted.json"
    result = Campaign()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for trial in range(trials):
        script.write_text(json.dumps(_steps(rng)))
        earlier = snapshot(lab_dir, TAG)
        before = len(earlier)
        log = open(work / f"round-{trial}.log", "w")
        proc = subprocess.Popen(_command(lab_dir, data_dir, _has_run(lab_dir), 10_000), stdout=log,
                                stderr=subprocess.STDOUT, env=env)
        t0 = time.monotonic()
        if trial % 2 == 0:
            when = f"after {rng.uniform(0.1, max_delay):4.1f} s"
            time.sleep(float(when.split()[1]))
        else:
            event = rng.choice(EVENTS)
            when = f"at {event}" if _wait_for(event, lab_dir, proc, 3 * max_delay) else f"({event} not seen)"
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            result.kills += 1
        else:
            result.breaches_after_kill.append(f"round {trial}: nightlab run exited by itself ({proc.returncode}); "
                                              f"see {log.name}")
        proc.wait()
        log.close()
        when += f" ({time.monotonic() - t0:.1f} s)"
        moment = _moment(lab_dir, before)
        result.moments[moment] += 1
        check = audit(lab_dir, TAG, earlier=earlier, max_trials=MAX_TRIALS, finished=False) if _has_run(lab_dir) \
            else Audit()
        check.stray = []  # trials left running by the killed loop are stopped by the next --resume
        result.breaches_after_kill += [f"round {trial} ({moment}): {b}" for b in check.breaches()]
        say(f"kill {trial + 1:3d}/{trials} {when:30s}: {moment:24s} "
            f"{check.experiments} experiments, breaches {len(check.breaches())}")

    script.write_text(json.dumps(_steps(rng)))
    with Store.open(lab_dir) as store:
        counted = sum(1 for e in store.experiments(TAG) if e.kind == "experiment")
    earlier = snapshot(lab_dir, TAG)
    final = subprocess.run(_command(lab_dir, data_dir, _has_run(lab_dir), counted + 2), capture_output=True,
                           text=True, timeout=600, env=env)
    (work / "final.log").write_text(final.stdout + final.stderr)
    result.final_exit = final.returncode
    with Store.open(lab_dir) as store:
        result.final_new_experiments = sum(1 for e in store.experiments(TAG) if e.kind == "experiment") - counted
    result.audit = audit(lab_dir, TAG, earlier=earlier, max_trials=MAX_TRIALS, finished=True)
    result.seconds = time.monotonic() - started
    return result


def report(result: Campaign) -> str:
    a = result.audit or Audit()
    lines = [
        f"kills: {result.kills} (SIGKILL of `nightlab run`, half after a random delay, half at a store event)",
        "killed while: " + ", ".join(f"{k} {v}" for k, v in sorted(result.moments.items())),
        f"breaches seen right after a kill: {len(result.breaches_after_kill)}",
        f"final `nightlab run --resume`: exit {result.final_exit}, {result.final_new_experiments} new experiments",
        f"final audit: {a.experiments} experiments, {a.measurements} measurements, statuses {dict(a.statuses)}",
        f"lost {len(a.lost)}, duplicated {len(a.duplicated)}, wrong commit {len(a.wrong_commit)}, "
        f"stray processes {len(a.stray)}",
        f"wall time {result.seconds:.0f} s",
    ]
    lines += [f"  {b}" for b in result.breaches_after_kill + a.breaches()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=7.0, help="kill after 0.1 .. this many seconds")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = make_dataset(work / "data")
        result = campaign(work, data, args.trials, args.seed, args.max_delay)
    print(report(result))
    clean = result.audit is not None and result.audit.clean and not result.breaches_after_kill
    return 0 if clean and result.final_exit == 0 and result.final_new_experiments > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
