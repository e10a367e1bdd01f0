"""An experiment's trials: which one it needs next, starting one, recording one, and the baseline's.

Every step is recorded before and after it runs, and each function here continues from what the
store already holds: ``execute`` on a half-measured experiment runs only the missing trials, so
the same code serves a fresh experiment and one resumed after ``kill -9``.

Order of writes (what a kill between two of them leaves, and how ``recovery.recover`` mends it):
commit → row with the commit → ref ``refs/nightlab/exp/<id>`` (missing ref: re-created) →
stage and process group before each trial (live group: stopped, trial re-run) → the trial's
numbers in the row, then its measurement (no measurement: trial re-run, numbers written again) →
verdict in the row, with its val_bpb and noise in the same write → branch tip (behind the last
keep: moved there).

A trial whose throughput falls far below the run's other trials of the same model shape (under
``SLOW`` of their median tokens/s) while other processes kept at least ``OUTSIDE`` cores busy (the
runner's count, from the system's CPU time less the trial's own: nothing train.py reports) was
slowed from outside. Under a wall-clock budget it trained on fewer tokens and its val_bpb says so,
so it is set aside as ``disturbed`` (never judged, never in the noise) and its seed runs again. A
trial that was slow while the machine was otherwise idle slowed itself, and is believed: else a
train.py could slow down on a run whose training loss disappoints and have its seed drawn again.
The check also looks back at the experiment's earlier trials, since the first trial of a run has
nothing to compare with until the second is in.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightlab.night import policy
from nightlab.night.state import Lab
from nightlab.night.store import Experiment, now
from nightlab.night.verdict import conclude, judge, noise_with, reference_of, save_best
from nightlab.trial import sandbox
from nightlab.trial.runner import TrialResult, runs_processes

TRAIN_WORKTREE = "train"
SLOW = 0.8  # a trial under this share of the median tokens/s of its shape's other trials is disturbed...
OUTSIDE = 0.25  # ... if other processes kept at least this many cores busy on average while it trained
MAX_DISTURBED = 3  # disturbed trials re-run per experiment; a slower one after that is believed


@dataclass(frozen=True)
class Trial:
    """One training and evaluation of an experiment's commit with one seed."""

    exp_id: int
    commit: str
    seed: int
    kind: str  # first | confirm | baseline
    k: int  # the experiment's k-th trial: 0 runs in its run folder, later ones in <kind>-<seed>/


class BaselineError(RuntimeError):
    """The run's starting train.py does not train: there is nothing to compare experiments against."""


def execute(lab: Lab, exp: Experiment) -> Experiment:
    """Measure ``exp`` and judge it, running only trials not yet recorded."""
    while (trial := next_trial(lab, exp)) is not None:
        run(lab, exp, trial)
    return conclude(lab, exp)


def next_trial(lab: Lab, exp: Experiment) -> Trial | None:
    """The trial ``exp`` needs next, or None when it is measured (or failed) and ready for ``conclude``."""
    assert exp.commit_sha, "a refused edit is never executed"
    reference = reference_of(lab, exp)
    seeds = [lab.config.lab.seed + k for k in range(1 + lab.config.run.confirm_runs)]
    recorded = lab.store.measurements(exp.id)
    if any(m.status != "ok" for m in recorded) or len(recorded) >= len(seeds):
        return None
    if recorded and judge(lab, exp, reference).decision != "confirm":
        return None
    done = {m.seed for m in recorded}
    k = next(k for k, seed in enumerate(seeds) if seed not in done)  # a disturbed seed runs again
    return Trial(exp.id, exp.commit_sha, seeds[k], "first" if k == 0 else "confirm", k)


def run(lab: Lab, exp: Experiment, trial: Trial) -> TrialResult:
    """Run one trial with ``lab.trainer`` in the ``train`` worktree and record it."""
    work, run_dir = start_trial(lab, exp, trial)
    guard = sandbox.Guard.take(lab.dir, lab.store.path, exp.id) if runs_processes(lab.trainer) else None
    result = lab.trainer(work, run_dir, lab.config, trial.seed, data_dir=lab.data_dir, on_progress=lab.on_progress,
                         on_stage=lambda stage, pgid: lab.store.update(exp.id, stage=stage, pgid=pgid))
    if guard is not None and (touched := guard.check()):
        result = dataclasses.replace(result, status="invalid", val_bpb=None,
                                     reason=f"the trial changed the lab outside its run folder: {'; '.join(touched)}")
    record_trial(lab, exp, trial, result)
    return result


def trial_dir(lab: Lab, trial: Trial) -> Path:
    run_dir = lab.runs_dir / str(trial.exp_id)
    return run_dir / f"{trial.kind}-{trial.seed}" if trial.k else run_dir


def start_trial(lab: Lab, exp: Experiment, trial: Trial, worker: str | None = None) -> tuple[Path, Path]:
    """Record that ``trial`` starts (on ``worker``, default ``lab.worker``), clear its run folder and
    check its commit out in the worker's worktree (``train``, or ``train-<worker>``)."""
    run_dir = trial_dir(lab, trial)
    if run_dir.exists():  # a trial interrupted by a kill: start it over in a clean folder
        shutil.rmtree(run_dir) if trial.k else _clear_files(run_dir)
    lab.store.update(exp.id, status="running", stage="train", started_at=exp.started_at or now(),
                     worker=worker or lab.worker)
    work = lab.git.worktree(lab.dir, f"{TRAIN_WORKTREE}-{worker}" if worker else TRAIN_WORKTREE, trial.commit)
    label = f"#{exp.id}" + (f" seed {trial.seed}" if trial.k else "")
    lab.say(f"{label} training: {exp.description}")
    return work, run_dir


def record_trial(lab: Lab, exp: Experiment, trial: Trial, result: TrialResult) -> None:
    """Store the outcome of ``trial`` (and, for the first, the run's numbers): the row first, the
    measurement last, so that a trial is recorded only with everything the verdict reads from it."""
    if trial.k == 0:
        s = result.summary
        lab.store.update(exp.id, stage="judge", pgid=None, training_seconds=s.get("training_seconds", result.train_s),
                         total_seconds=result.total_s, total_tokens=s.get("total_tokens"), num_steps=s.get("num_steps"),
                         num_params=s.get("num_params"), peak_memory_mb=s.get("peak_memory_mb"),
                         mfu_percent=s.get("mfu_percent"), epochs=s.get("epochs"), budget=budget_label(lab),
                         error=result.error if result.status != "ok" else "",
                         reason=result.reason)
    elif result.status != "ok":
        lab.store.update(exp.id, stage="judge", pgid=None, error=result.error,
                         reason=f"seed {trial.seed}: {result.reason}")
    else:
        lab.store.update(exp.id, stage="judge", pgid=None)
    lab.store.add_measurement(exp.id, trial.seed, trial.kind, result.status, result.val_bpb, trial_dir(lab, trial),
                              result.reason, tok_per_s=throughput(result.summary), shape=shape_of(result.summary),
                              outside_cores=result.outside_cores)
    if result.status == "ok":  # a failure is told once, with the experiment's verdict
        label = f"#{exp.id}" + (f" seed {trial.seed}" if trial.k else "")
        lab.say(f"{label} ok: val_bpb {result.val_bpb:.6f} ({result.total_s:.1f} s)")
        set_aside_disturbed(lab, exp)


def budget_label(lab: Lab) -> str:
    """The budget a trial trains under, as records and verdicts show it: ``300s`` or ``2000000 tokens``."""
    tokens = lab.config.lab.budget_tokens
    return f"{tokens} tokens" if tokens else f"{lab.config.lab.budget_s:g}s"


def throughput(summary: dict[str, Any]) -> float | None:
    """Training tokens/s from a trial's summary (train.py's own figure, else tokens over seconds)."""
    speed = summary.get("tok_per_s")
    if not isinstance(speed, (int, float)) or isinstance(speed, bool):
        tokens, seconds = summary.get("total_tokens"), summary.get("training_seconds")
        ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (tokens, seconds))
        speed = tokens / seconds if ok and seconds > 0 else None  # type: ignore[operator]
    return float(speed) if speed is not None and speed > 0 else None


def shape_of(summary: dict[str, Any]) -> str:
    """The model's shape as far as speed goes: its parameters and the tokens of one optimizer step."""
    params, tokens, steps = summary.get("num_params"), summary.get("total_tokens"), summary.get("num_steps")
    per_step = tokens // steps if isinstance(tokens, int) and isinstance(steps, int) and steps > 0 else ""
    return f"{params}:{per_step}" if params is not None else ""


def set_aside_disturbed(lab: Lab, exp: Experiment) -> list[int]:
    """Mark the ok trials of ``exp`` that ran far slower than the run's other trials of their shape as
    disturbed (their seeds run again); returns their seeds. Not under a token budget: there a slow
    trial trains on as many tokens as a fast one."""
    if lab.config.lab.budget_tokens:
        return []
    speeds = lab.store.speeds(lab.run.tag)
    seeds = []
    for m in lab.store.measurements(exp.id):
        if m.status != "ok" or not m.tok_per_s or lab.store.get(exp.id).disturbed >= MAX_DISTURBED:
            continue
        peers = [speed for other, shape, speed in speeds if shape == m.shape and other != m.id]
        if not peers or m.tok_per_s >= SLOW * statistics.median(peers):
            continue
        if m.outside_cores is None or m.outside_cores < OUTSIDE:
            continue  # slow with the machine to itself: train.py's own doing, believed
        typical = statistics.median(peers)
        why = (f"disturbed: {m.tok_per_s:,.0f} tokens/s, {m.tok_per_s / typical:.2f}x the median {typical:,.0f} "
               f"of {len(peers)} other trial(s) of its shape, while other processes kept {m.outside_cores:.1f} "
               f"cores busy; seed {m.seed} runs again")
        lab.store.mark_disturbed(m.id, why)
        speeds = [s for s in speeds if s[0] != m.id]
        seeds.append(m.seed)
        lab.say(f"#{exp.id} seed {m.seed} {why}")
    return seeds


def measure_baseline(lab: Lab) -> Experiment:
    """The run's first best: the base commit measured with ``baseline_runs`` seeds (once per run)."""
    exp = baseline_row(lab)
    if exp.finished:
        return exp
    while trials := baseline_trials(lab, exp):  # a disturbed seed comes back here to run again
        run(lab, exp, trials[0])
    return finish_baseline(lab, exp)


def baseline_row(lab: Lab) -> Experiment:
    """The run's baseline experiment (the base commit), created with its ref the first time."""
    rows = lab.store.select(lab.run.tag, kind="baseline", limit=1)
    exp = rows[0] if rows else lab.store.add_experiment(
        lab.run.tag, kind="baseline", worker=lab.worker, agent="", parent_commit=lab.run.base_commit,
        commit_sha=lab.run.base_commit, description="baseline", code_lines=lab.code_lines(lab.run.base_commit),
        seed=lab.config.lab.seed,
    )
    if not exp.finished:
        lab.git.set_ref(lab.dir, lab.git.experiment_ref(exp.id), lab.run.base_commit)
    return exp


def baseline_trials(lab: Lab, exp: Experiment) -> list[Trial]:
    """The baseline's trials not yet recorded: one per seed, ``baseline_runs`` of them (1 when greedy)."""
    runs = 1 if lab.config.run.policy == "greedy" else lab.config.run.baseline_runs
    done = {m.seed for m in lab.store.measurements(exp.id)}
    seeds = [lab.config.lab.seed + k for k in range(runs)]
    return [Trial(exp.id, lab.run.base_commit, seed, "baseline", k) for k, seed in enumerate(seeds) if seed not in done]


def finish_baseline(lab: Lab, exp: Experiment) -> Experiment:
    """Judge the measured baseline: kept with the mean of its seeds, or ``BaselineError`` when none trained."""
    values = lab.store.values(exp.id)
    if not values:
        failed = [m for m in lab.store.measurements(exp.id) if m.status != "ok"]
        why = failed[-1].reason if failed else "no result"
        lab.store.update(exp.id, status="crash", stage="done", reason=f"baseline failed: {why}", finished_at=now())
        raise BaselineError(f"the baseline train.py failed ({why}); fix train.py at "
                            f"{lab.run.base_commit[:10]} and run again (log: {lab.runs_dir / str(exp.id)})")
    exp = lab.store.update(exp.id, status="keep", stage="done", val_bpb=policy.mean(values),
                           noise=noise_with(lab, exp), reason=f"baseline over {len(values)} seed(s)", finished_at=now())
    save_best(lab, exp)  # a night with no keep still leaves its best model in best/
    lab.say(f"#{exp.id} baseline: val_bpb {exp.val_bpb:.6f} over {len(values)} seed(s), noise {lab.noise():.6f}")
    return exp


def _clear_files(run_dir: Path) -> None:
    for path in run_dir.iterdir():
        if path.is_file():
            path.unlink()
