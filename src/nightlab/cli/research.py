"""``nightlab run``, ``nightlab experiment``, ``nightlab replay`` and ``nightlab finalize``: the research loop's commands."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import filelock

from nightlab import config as cfg
from nightlab.cli.lab import add_lab_args, find_lab
from nightlab.paths import state_dir
from nightlab.cli.common import UserError, lab_default
from nightlab.cli.org import scheduler_for, team_for
from nightlab.lab import datasets
from nightlab.night import finalize, git
from nightlab.night.proposals import Proposal, admit
from nightlab.night.recovery import recover
from nightlab.night.state import Lab, start_run
from nightlab.night.store import Experiment, Store
from nightlab.night.trials import BaselineError, execute, measure_baseline
from nightlab.report.live import LiveView
from nightlab.report.notify import Notifier
from nightlab.trial.runner import run_trial

RESULTS_FILE = "results.tsv"
LOCK_FILE = "lock"  # in the lab's state folder: held by the one command working on the lab


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run experiments until a limit or Ctrl-C: propose, train, judge, keep or discard, repeat",
        description="The research loop. Works on branch nightlab/<tag>: each experiment is a commit, the "
        "branch tip is always the best. The next proposal is prepared while the current experiment trains. "
        "Ctrl-C once finishes the current experiment and stops; twice stops at once. After a crash or kill, "
        "`nightlab run --resume` continues with nothing lost.",
    )
    p.add_argument("--agent", help=f"who proposes: {', '.join(cfg.AGENTS)} ({lab_default('run.agent')})")
    p.add_argument("--max-experiments", type=int, metavar="N",
                   help=f"stop when the run has N experiments; 0 = no limit ({lab_default('run.max_experiments')})")
    p.add_argument("--hours", type=float, metavar="H",
                   help=f"start no new experiment after H hours; 0 = no limit ({lab_default('run.hours')})")
    p.add_argument("--tag", help="run name, branch nightlab/<tag> (default: today's date)")
    p.add_argument("--resume", action="store_true", help="continue the run named by --tag, else the latest")
    p.add_argument("--devices", metavar="LIST", help="one experiment per device at once: GPU indices or cpu, "
                   "e.g. 0,1 (default: one, on lab.device)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local (this machine) or ray (an existing Ray cluster, one GPU per trial; default %(default)s)")
    p.add_argument("--address", default="auto", help="Ray cluster address for --executor ray (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="trials at once with --executor ray (default %(default)s)")
    _add_common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "experiment",
        help="one experiment of the edits in the lab's checkout: commit, train, judge, print the verdict",
        description="For an agent that drives itself: edit train.py in the lab, then run this. The edit is "
        "committed on the current branch, trained and judged by the same runner, store and policy as "
        "`nightlab run`; a discard resets the branch to its parent. Exit code 0 for keep, 1 otherwise.",
    )
    p.add_argument("-m", "--message", required=True, help="one-line description of the change")
    p.add_argument("--rationale", default="", help="why it should help (recorded)")
    p.add_argument("--tag", help="run to record it in (default: from the branch, nightlab/<tag>)")
    _add_common(p)
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser(
        "replay",
        help="train and evaluate any recorded experiment again (kept or not) with a fresh seed",
        description="Checks out refs/nightlab/exp/ID, trains and evaluates it with the settings its run "
        "recorded (budget, dataset, evaluation; --set overrides them), and records the measurement "
        "(kind replay; the policy does not count it).",
    )
    p.add_argument("id", type=int, help="experiment id (see results.tsv or `nightlab report`)")
    p.add_argument("--seed", type=int, help="seed (default: a fresh one)")
    _add_common(p)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "finalize",
        help="end of night: measure the best with each keep left out; flag keeps that no longer contribute",
        description="Leave-one-out ablation of the run's chain of keeps: the best with each keep reverted "
        "alone, trained and judged with the configured seeds (lab.seed and run.confirm_runs more), on val and "
        "on the sealed holdout; each keep's contribution in noise widths. With --prune, branch "
        "nightlab/<tag>-final holds only the contributing keeps, measured again. Stopped or killed, the same "
        "command continues where it was.",
    )
    p.add_argument("--tag", help="the run to finalize (default: the latest)")
    p.add_argument("--prune", action="store_true", help="write nightlab/<tag>-final with the contributing keeps only")
    _add_common(p)
    p.set_defaults(func=cmd_finalize)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, metavar="DIR", help="a prepared dataset folder (default: the lab's dataset)")
    p.add_argument("--verbose", "-v", action="store_true", help="print train.py's output as it runs")
    add_lab_args(p)


def say(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def _setup(args: argparse.Namespace, extra_sets: list[str] | None = None, dataset: bool = True):
    """The lab, its settings and (unless ``dataset`` is False) the prepared dataset they name."""

    lab_dir = find_lab(args.lab)
    config = cfg.load(lab_dir, [*args.set, *(extra_sets or [])])
    data_dir = _dataset(args, config) if dataset else None

    if not git.is_repo(lab_dir):
        raise UserError(f"{lab_dir} is not a git repository; nightlab keeps experiments as commits: `git init`")
    _check_writable(lab_dir)
    return lab_dir, config, data_dir


def _dataset(args: argparse.Namespace, config: cfg.Config) -> Path:
    """The prepared dataset to train on: ``--data``, else the one ``config`` names."""

    data_dir = args.data.resolve() if args.data else _prepared_dir(config)
    if not (data_dir / "val.tokens.npy").exists():
        raise UserError(f"{data_dir} is not a prepared dataset (no val.tokens.npy); run `nightlab prepare`")
    return data_dir


def _check_writable(lab_dir: Path) -> None:
    """The lab's state folder must be a folder we can write in; say so in one line if not."""

    state = state_dir(lab_dir)
    existed = state.exists()
    try:
        state.mkdir(exist_ok=True)
        probe = state / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        if not existed:
            state.rmdir()  # a command that fails later must leave the lab as it was
    except OSError as e:
        raise UserError(f"cannot write nightlab's state in {state} ({e.strerror or e}): make the lab writable, "
                        f"or remove {state} if it is not a folder") from None


@contextlib.contextmanager
def _holding(lab_dir: Path) -> Iterator[None]:
    """Work on the lab alone: an exclusive lock on ``.nightlab/lock`` for as long as the command runs.
    A second command on the same lab would stop the first one's trials as a killed run's (``recover``).
    The holder writes its pid into the lock file so that the refused command can name it."""

    state = state_dir(lab_dir)
    state.mkdir(exist_ok=True)
    path = state / LOCK_FILE
    lock = filelock.FileLock(path)
    try:
        lock.acquire(blocking=False)
    except filelock.Timeout:
        holder = path.read_text().strip() if path.exists() else ""
        raise UserError(f"another nightlab run is working on the lab {lab_dir}"
                        f"{f' (pid {holder})' if holder else ''}: wait for it to end, or stop it first") from None
    try:
        path.write_text(f"{os.getpid()}\n")
        yield  # the lock goes with the process too: the kernel frees it when the process dies
    finally:
        lock.release()


def _check_committed(lab_dir: Path, config: cfg.Config) -> None:
    """A new run starts from HEAD: uncommitted edits of the files it experiments on would be ignored."""

    dirty = [p for p in git.changed_files(lab_dir) if p in (*config.lab.allowed_files, cfg.CONFIG_FILE)]
    if dirty:
        raise UserError(f"{', '.join(dirty)} in {lab_dir} has uncommitted changes, which a run (starting from the "
                        f"last commit) would ignore: commit them (git commit -am '...') or discard them "
                        f"(git checkout -- {' '.join(dirty)})")


def _prepared_dir(config: cfg.Config) -> Path:
    try:
        return Path(datasets.open_prepared(config.lab.dataset, config.lab.vocab_size, config.lab.num_shards).dir)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None


def _lab(lab_dir, config, data_dir, store, run, verbose):
    progress = (lambda line: print(f"    {line}", flush=True)) if verbose else None
    return Lab(lab_dir, config, data_dir, store, run, say=say, on_progress=progress)


def cmd_run(args: argparse.Namespace) -> int:
    lab_dir, config, data_dir = _setup(args, [f'run.agent="{args.agent}"'] if args.agent else [])
    if not args.resume:
        _check_committed(lab_dir, config)

    researchers, reviewer, lead = team_for(lab_dir, config, args)

    stop = threading.Event()
    # Workers first: a bad --devices or an unreachable --executor leaves no run behind (nor its branch).
    lab = _lab(lab_dir, config, data_dir, None, None, args.verbose)  # its store and run follow

    scheduler = scheduler_for(lab, (researchers, reviewer, lead), args)
    with _holding(lab_dir), Store.open(lab_dir) as store:
        try:
            run = start_run(lab_dir, store, config, config.run.agent, args.tag or config.run.tag, args.resume)
        except LookupError as e:
            raise UserError(str(e)) from None
        lab.store, lab.run = store, run
        previous = _on_signals(stop)
        with LiveView(store, lab_dir, run.tag, budget_s=config.lab.budget_s) as view:
            notifier = Notifier(config.notify, store, lab_dir, run.tag, view.say)
            lab.say, lab.on_finished = view.say, notifier.on_finished
            shown = lab.on_progress  # --verbose: train.py's lines as well
            lab.on_progress = (lambda line: (shown(line), view.progress(line))) if shown else view.progress
            agents = ", ".join(sorted({r.proposer.name for r in researchers}))
            view.say(f"run {run.tag} on branch {run.branch} with agent {agents}; Ctrl-C to stop")
            limits = dict(max_experiments=args.max_experiments if args.max_experiments is not None
                          else config.run.max_experiments,
                          hours=args.hours if args.hours is not None else config.run.hours)
            try:
                scheduler.run(stop=stop, **limits)
            except BaselineError as e:
                raise UserError(str(e)) from None
            except KeyboardInterrupt:
                view.say(f"stopped at once; continue with `nightlab run --resume --tag {run.tag}`")
                return 130
            finally:
                _restore_signals(previous)
                results = store.export_tsv(state_dir(lab_dir) / RESULTS_FILE, run.tag)
                notifier.on_end()
        _print_summary(lab, results)
    return 0


def _print_summary(lab, results: Path) -> None:
    best = lab.best()
    counts: dict[str, int] = {}
    for e in lab.experiments():
        counts[e.status] = counts.get(e.status, 0) + 1
    tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    if best is not None and best.val_bpb is not None:
        say(f"best val_bpb {best.val_bpb:.6f} (#{best.id}, {best.commit_sha[:10] if best.commit_sha else '?'}) "
            f"on branch {lab.run.branch}; {tally}")
    say(f"results: {results}; runs: {lab.runs_dir}; report: `nightlab report`")


def _on_signals(stop: threading.Event):
    """First SIGINT/SIGTERM: finish the current experiment, then stop. Second: stop at once."""

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        say("stopping after the current experiment (Ctrl-C again to stop now)")

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def cmd_experiment(args: argparse.Namespace) -> int:
    lab_dir, config, data_dir = _setup(args)
    with _holding(lab_dir):  # before looking at the lab: a run in progress may be editing it
        exp = _experiment(args, lab_dir, config, data_dir)
    shown = f"{exp.val_bpb:.6f}" if exp.val_bpb is not None else "-"
    print("---")
    print(f"experiment: {exp.id}\nstatus: {exp.status}\nval_bpb: {shown}\nreason: {exp.reason}")
    if exp.error and exp.status in ("crash", "timeout"):
        print(exp.error.rstrip())
    return 0 if exp.status == "keep" else 1


def _experiment(args: argparse.Namespace, lab_dir: Path, config: cfg.Config, data_dir: Path) -> Experiment:
    branch = git.current_branch(lab_dir)
    if not branch:
        raise UserError(f"{lab_dir} is on a detached HEAD; check out a branch (e.g. git switch -c nightlab/mytag)")
    if not git.changed_files(lab_dir):
        raise UserError(f"no edits to test in {lab_dir}: change {', '.join(config.lab.allowed_files)} first")
    tag = args.tag or (branch.removeprefix("nightlab/") if branch.startswith("nightlab/") else branch)
    parent = git.resolve(lab_dir, "HEAD") or ""
    with Store.open(lab_dir) as store:
        run = store.run(tag)
        if run is None:
            run = store.add_run(tag, branch, parent, "manual", cfg.dumps(config))
        elif run.branch != branch:
            raise UserError(f"run {tag!r} works on branch {run.branch}, but {lab_dir} is on {branch}; "
                            f"switch branch or pass another --tag")
        lab = _lab(lab_dir, config, data_dir, store, run, args.verbose)
        try:
            for exp in recover(lab):
                execute(lab, exp)
            measure_baseline(lab)
        except BaselineError as e:
            raise UserError(str(e)) from None
        if parent != lab.best_commit():
            raise UserError(f"{lab_dir} is at {parent[:10]}, but the best of run {tag!r} is {lab.best_commit()[:10]}: "
                            f"`git reset --soft {lab.best_commit()[:10]}` to test your edits on the best, or use a new --tag")
        exp = admit(lab, lab_dir, parent, Proposal(args.message, args.rationale), "manual", kind="manual")
        if exp.commit_sha:
            exp = execute(lab, exp)
            if exp.status != "keep" and git.resolve(lab_dir, "HEAD") == exp.commit_sha:
                git.git(lab_dir, "reset", "--quiet", "--hard", parent)
        store.export_tsv(state_dir(lab_dir) / RESULTS_FILE, run.tag)
    return exp


def cmd_replay(args: argparse.Namespace) -> int:
    lab_dir, config, _ = _setup(args, dataset=False)  # the dataset is the experiment's run's, found below
    with _holding(lab_dir), Store.open(lab_dir) as store:
        try:
            exp = store.get(args.id)
        except KeyError as e:
            raise UserError(str(e.args[0])) from None
        commit = git.resolve(lab_dir, git.experiment_ref(exp.id))
        if commit is None or exp.commit_sha is None:
            raise UserError(f"experiment {exp.id} has no commit to replay (it was {exp.status}: {exp.reason})")
        run = store.run(exp.run_tag)
        if run is not None and run.config:
            # Measured as it was: the budget, dataset and evaluation the experiment's run recorded,
            # not today's nightlab.toml (--set still applies on top).
            recorded = cfg.loads(run.config, args.set, source=f"the settings of run {exp.run_tag!r}")
            changed = cfg.differences(recorded, config)
            if changed:
                say(f"#{exp.id} replays with run {exp.run_tag!r}'s settings; today's nightlab.toml differs in "
                    f"{', '.join(changed)}")
            config = recorded
        data_dir = _dataset(args, config)
        previous = store.measurements(exp.id, kinds=("first", "baseline", "confirm", "replay"))
        seed = args.seed if args.seed is not None else max([m.seed for m in previous] + [config.lab.seed]) + 1
        run_dir = state_dir(lab_dir) / "runs" / str(exp.id) / f"replay-{seed}"
        work = git.worktree(lab_dir, "replay", commit)
        say(f"#{exp.id} replay with seed {seed}: {exp.description} ({commit[:10]})")
        progress = (lambda line: print(f"    {line}", flush=True)) if args.verbose else None
        result = run_trial(work, run_dir, config, seed, data_dir=data_dir, on_progress=progress)
        store.add_measurement(exp.id, seed, "replay", result.status, result.val_bpb, run_dir, result.reason)
    print("---")
    print(f"experiment: {exp.id}\nstatus: {result.status}")
    recorded = f"{exp.val_bpb:.6f}" if exp.val_bpb is not None else "-"
    print(f"val_bpb: {result.val_bpb:.6f}" if result.val_bpb is not None else f"reason: {result.reason}")
    print(f"recorded_val_bpb: {recorded}\nseed: {seed}\nrun_dir: {run_dir}")
    return 0 if result.status == "ok" else 1


def cmd_finalize(args: argparse.Namespace) -> int:
    lab_dir, config, data_dir = _setup(args)
    with _holding(lab_dir), Store.open(lab_dir) as store:
        runs = [r for r in store.runs() if not args.tag or r.tag == args.tag]
        if not runs:
            known = ", ".join(r.tag for r in store.runs()) or "none yet"
            raise UserError(f"no run {args.tag!r} in {lab_dir} (runs: {known}); give one of them with --tag"
                            if args.tag else f"no run in {lab_dir} to finalize; start one with `nightlab run`")
        lab = _lab(lab_dir, config, data_dir, store, runs[-1], args.verbose)
        recover(lab)  # a killed run's trial still running is stopped, its refs are put back
        try:
            finale = finalize.finalize(lab, prune=args.prune)
        except finalize.FinalizeError as e:
            raise UserError(str(e)) from None
    print("---")
    print(finalize.render(finale))
    return 0
