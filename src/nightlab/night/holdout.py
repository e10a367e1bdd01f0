"""The sealed holdout: a third split that no choice of the night is made on.

After a hundred experiments chosen on the same validation split, the best's val_bpb is biased low.
The holdout (``holdout.*`` beside ``val.*`` in the prepared dataset, ``nightlab.lab.datasets``) is
scored by the same trusted judge, for the baseline and for every kept experiment, after its verdict
and never as part of it: the policy, the agents and ``train.py`` never read it. Each trial's model
is scored (``measurements.holdout_bpb``) and the experiment records their mean
(``experiments.holdout_bpb``), so a kill loses at most the one score under way, and ``catch_up``
scores what a killed night left unscored.

The judge reads ``val.tokens.npy``, ``val.docs.npy``, ``token_bytes.npy`` and ``manifest.json``
from the folder it is given; it is given a small folder of links in which the holdout's files
stand in as ``val.*`` (``view``). The model process never sees that folder: the scorer holds the
tokens and hands it windows, as for val.

``alarm`` compares the night's gain on val with the gain on the holdout: a gain that is not at least
half carried to the holdout, beyond the noise, is the mark of a night that fitted its val split.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nightlab.config import Config
from nightlab.lab.session import resolve_device, resolve_preset
from nightlab.night import policy
from nightlab.night.state import HoldoutScorer, Lab
from nightlab.night.store import Experiment
from nightlab.paths import state_dir
from nightlab.trial import sandbox
from nightlab.trial.processes import launch, stop_group, train_env
from nightlab.trial.runner import judge_command, runs_processes
from nightlab.trial.standby import files_in

VIEW_DIR = "holdout"  # in .nightlab/: the folder through which the judge reads the holdout
WORKTREE = "holdout"  # the worktree a kept commit's allowed files are copied from for the judge
SCORE_DIR = "holdout"  # in a trial's run folder: the holdout's eval.json and eval.log
SPLIT_FILES = ("tokens", "docs")


def view(data_dir: Path, folder: Path) -> Path | None:
    """``folder`` made into a dataset whose ``val.*`` are ``data_dir``'s ``holdout.*``; None when the
    dataset has no holdout (prepared before it existed: ``nightlab prepare`` adds it) or an empty one."""
    data_dir = Path(data_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    if not manifest.get("holdout_tokens"):
        return None
    links = {f"val.{kind}.npy": data_dir / f"holdout.{kind}.npy" for kind in SPLIT_FILES}
    links.update({name: data_dir / name for name in ("token_bytes.npy", "manifest.json")})
    if folder.is_dir() and all((folder / n).is_symlink() and (folder / n).resolve() == t.resolve()
                               for n, t in links.items()):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, target in links.items():
        (folder / name).symlink_to(target.resolve())
    return folder


def scorer(lab: Lab) -> HoldoutScorer | None:
    """How ``lab`` scores the holdout: its own ``Lab.holdout`` (the simulator's), else the trusted
    judge where trials run as processes here; None where there is no holdout to score."""
    if lab.holdout is not None:
        return lab.holdout
    if not runs_processes(lab.trainer):
        return None
    folder = view(lab.data_dir, state_dir(lab.dir) / VIEW_DIR)
    return functools.partial(judge, holdout_dir=folder, data_dir=lab.data_dir) if folder is not None else None


def judge(workdir: Path, run_dir: Path, config: Config, seed: int, *, holdout_dir: Path, data_dir: Path
          ) -> float | None:
    """The trusted judge's score of the model in ``run_dir`` (its code: the allowed files in
    ``workdir``) on the holdout (``holdout_dir``: ``view``'s folder); None when the judge gives no score.

    The judge is started as the runner starts it for val (``nightlab.trial.runner.run_trial``): the
    same command line (isolated, from a copy of the allowed files outside the worktree, the weights
    pinned by their hash), a token on stdin that its eval.json must carry, a hard cap of
    ``lab.eval_timeout_s``, its process group stopped at the end.
    """
    run_dir = Path(run_dir).resolve()
    out_dir = run_dir / SCORE_DIR
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    device = resolve_device(config.lab.device)
    preset = resolve_preset(config.lab.preset, device)
    weights = run_dir / "model.pt"
    if not weights.is_file():
        return None
    source = files_in(Path(workdir), config.lab.allowed_files)
    judged = Path(tempfile.mkdtemp(prefix="nightlab-holdout-"))  # outside the worktree and the lab
    eval_out = out_dir / "eval.json"
    command = judge_command(source, judged, weights, hashlib.sha256(weights.read_bytes()).hexdigest(),
                            Path(holdout_dir), eval_out, config, device, preset, sandbox.resolve(config.lab.sandbox))
    env = {k: v for k, v in train_env(config, out_dir, Path(data_dir), seed, device, preset).items()
           if k not in ("NIGHTLAB_DATA", "NIGHTLAB_OUT")}  # the scorer is told its paths on its command line
    token = secrets.token_hex(16)
    try:
        proc = launch(command, judged, env, out_dir / "eval.log", f"{token}\n".encode())
        try:
            proc.wait(timeout=config.lab.eval_timeout_s)
        except subprocess.TimeoutExpired:
            pass
        finally:
            stop_group(proc.pid)
            proc.wait()
    finally:
        shutil.rmtree(judged, ignore_errors=True)
    try:
        report = json.loads(eval_out.read_text())
    except (OSError, ValueError):
        return None
    value = report.get("val_bpb")
    if report.get("token") != token or report.get("status") != "ok" or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def score(lab: Lab, exp: Experiment) -> Experiment:
    """Score the holdout for each ok trial of the kept ``exp`` not yet scored, and record their mean."""
    scores = scorer(lab)
    if scores is None or exp.status != "keep" or not exp.commit_sha:
        return exp
    measured = [m for m in lab.store.measurements(exp.id) if m.status == "ok"]
    todo = [m for m in measured if m.holdout_bpb is None]
    if todo:
        work = lab.git.worktree(lab.dir, WORKTREE, exp.commit_sha)
        for m in todo:
            # This model was judged on val already; a judge that gives no score here is asked once more.
            value = scores(work, Path(m.run_dir), lab.config, m.seed)
            if value is None:
                value = scores(work, Path(m.run_dir), lab.config, m.seed)
            if value is not None:
                lab.store.set_holdout(m.id, value)
    values = [m.holdout_bpb for m in lab.store.measurements(exp.id) if m.status == "ok" and m.holdout_bpb is not None]
    if not values:
        lab.say(f"#{exp.id}: the holdout could not be scored (see {SCORE_DIR}/eval.log in its run folder)")
        return exp
    exp = lab.store.update(exp.id, holdout_bpb=policy.mean(values))
    lab.say(f"#{exp.id} holdout_bpb {exp.holdout_bpb:.6f} (val_bpb {exp.val_bpb:.6f})")
    return exp


def catch_up(lab: Lab) -> None:
    """Score the holdout of the run's keeps that a killed night left unscored (and say so once when
    the dataset has no holdout to score)."""
    if scorer(lab) is None:
        if lab.holdout is None and runs_processes(lab.trainer):
            lab.say(f"the dataset {lab.data_dir} has no holdout split: keeps are not scored on one; "
                    "`nightlab prepare` adds it")
        return
    for exp in lab.store.select(lab.run.tag, statuses=("keep",)):
        if exp.holdout_bpb is None:
            score(lab, exp)


@dataclass(frozen=True)
class Carry:
    """How much of the night's val gain (baseline minus best; positive is better) the holdout kept."""

    val_gain: float
    holdout_gain: float
    noise: float
    alarm: bool

    def text(self) -> str:
        share = f"{self.holdout_gain / self.val_gain:.0%} of it" if self.val_gain > 0 else "n/a"
        line = (f"val gain {policy.signed(self.val_gain)}, holdout gain {policy.signed(self.holdout_gain)} "
                f"({share}; noise {self.noise:.4f})")
        if self.alarm:
            return ("overfitting alarm: the night's val gain is not at least half carried to the holdout "
                    f"beyond the noise: {line}")
        return line


def carry(baseline: Experiment | None, best: Experiment | None) -> Carry | None:
    """The night's gain on val and on the holdout; ``alarm`` when the val gain is beyond the noise but
    the holdout keeps less than half of it, by more than the noise. None until both are scored."""
    if baseline is None or best is None:
        return None
    numbers = (baseline.val_bpb, best.val_bpb, baseline.holdout_bpb, best.holdout_bpb)
    if any(n is None for n in numbers):
        return None
    noise = best.noise or baseline.noise or 0.0
    val_gain = baseline.val_bpb - best.val_bpb  # type: ignore[operator]
    holdout_gain = baseline.holdout_bpb - best.holdout_bpb  # type: ignore[operator]
    alarm = val_gain > noise and holdout_gain < val_gain / 2 - noise
    return Carry(val_gain, holdout_gain, noise, alarm)
