"""The research loop on GPUs: how much of the night each GPU spends training, and experiments an hour.

    python3 bench/gpu_loop.py --budget 120 --experiments 3              # one GPU, the plain loop
    python3 bench/gpu_loop.py --budget 120 --minutes 8 --devices 0,1    # two GPUs, the scheduler

Builds and prepares `pycode` on this machine (`nightlab init` + `nightlab prepare`), then times
`nightlab run --agent search` (one baseline run, no confirmations, so every experiment is one
trial) and reads the store and every trial's `summary.json`:

- training share: the trials' timed training seconds over the loop's wall time, per GPU (goal: at
  least 90 %), with the rest split into startup (compilation) and evaluation; also the share after
  the first trial's startup (a night pays the cold compilation once, a three-experiment benchmark
  pays it on a quarter of its trials);
- experiments an hour, counting every trial (the baseline is one), and after the baseline (a night
  measures its baseline once; with several GPUs the others wait for it meanwhile);
- how many trials started from a standby (`lab.standby`: the next trial compiles while this one
  trains), and the GPU's mean utilisation by `nvidia-smi`, sampled every half second.

One JSON line goes to `--out` (default `$OUT/gpu_loop.jsonl`). Stopped by SIGTERM (as `timeout`
does), it stops the run's trials and still writes the line from the trials that finished, with
`"interrupted": true`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path


def nightlab(*args: str, cwd: Path) -> int:
    return subprocess.run([sys.executable, "-m", "nightlab", *args], cwd=cwd).returncode


def sample_gpus(path: Path) -> subprocess.Popen | None:
    """``nvidia-smi`` writing each GPU's utilisation to ``path`` every 500 ms (None without it)."""
    try:
        return subprocess.Popen(["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits",
                                 "-lms", "500"], stdout=open(path, "w"), stderr=subprocess.DEVNULL)
    except OSError:
        return None


def mean_utilisation(path: Path) -> dict[str, float]:
    seen: dict[str, list[float]] = defaultdict(list)
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            index, util = (x.strip() for x in line.split(","))
            seen[index].append(float(util))
        except ValueError:
            continue
    return {k: round(sum(v) / len(v), 1) for k, v in seen.items() if v}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=120, help="training seconds per trial")
    ap.add_argument("--experiments", type=int, default=0, help="stop after this many experiments")
    ap.add_argument("--minutes", type=float, default=0, help="stop starting experiments after this long")
    ap.add_argument("--devices", default="", help="GPU indices for several workers, e.g. 0,1 (default: the plain loop)")
    ap.add_argument("--dataset", default="pycode")
    ap.add_argument("--standby", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--constants", default="", help="comma-separated constants the search may change "
                    "(default: every numeric one; optimizer constants keep each trial's compiled graphs)")
    default_out = Path(os.environ["OUT"]) / "gpu_loop.jsonl" if os.environ.get("OUT") else Path("gpu_loop.jsonl")
    ap.add_argument("--out", type=Path, default=default_out)
    args = ap.parse_args()
    if not args.experiments and not args.minutes:
        args.experiments = 3

    lab = Path(tempfile.mkdtemp(prefix="nightlab-loop-")) / "lab"
    sets = [f"lab.budget_s={args.budget}", "run.baseline_runs=1", "run.confirm_runs=0", f'lab.standby="{args.standby}"']
    if args.constants:
        names = ",".join(f'"{c.strip()}"' for c in args.constants.split(","))
        sets.append(f"search.constants=[{names}]")
    if nightlab("init", str(lab), "--dataset", args.dataset, *(a for s in sets for a in ("--set", s)), cwd=Path.cwd()):
        return 1
    for role in ("reviewer.md", "lead.md"):  # workers only: the org's reviewer and lead need an LLM
        (lab / "org" / role).unlink(missing_ok=True)
    subprocess.run(["git", "commit", "-qam", "bench: researchers only"], cwd=lab, check=False)
    if nightlab("prepare", cwd=lab):
        return 1
    run = ["run", "--agent", "search", "--tag", "bench"]
    run += ["--max-experiments", str(args.experiments)] if args.experiments else []
    run += ["--hours", str(args.minutes / 60)] if args.minutes else []
    run += ["--devices", args.devices] if args.devices else []
    samples = Path(tempfile.mkdtemp()) / "gpu.csv"
    sampler = sample_gpus(samples)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "nightlab", *run], cwd=lab)
    interrupted = []

    def stop_run(signum, frame):  # Ctrl-C twice: the run stops its trials now and records the rest
        interrupted.append(signum)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, stop_run)
    proc.wait()
    wall = time.time() - t0
    if sampler is not None:
        sampler.terminate()
        sampler.wait()

    from nightlab.night.store import Store

    with Store.open(lab) as store:
        rows = [e for e in store.experiments("bench") if e.finished_at]
    per_worker: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    first_startup = 0.0
    stamp = lambda text: datetime.fromisoformat(text).timestamp()  # noqa: E731
    baseline_end = max((stamp(e.finished_at) for e in rows if e.kind == "baseline"), default=t0)
    steady: dict[str, float] = defaultdict(float)  # training seconds of experiments started after the baseline
    steady_trials = 0
    for e in rows:
        run_dir = lab / ".nightlab" / "runs" / str(e.id)
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
        report = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").exists() else {}
        if not summary:
            continue  # refused before training (an invalid proposal): no trial
        w = per_worker[e.worker or "local"]
        w["trials"] += 1
        w["train_s"] += summary.get("training_seconds", 0.0)
        w["startup_s"] += summary.get("startup_seconds", 0.0)
        w["eval_s"] += report.get("eval_s", 0.0)
        if e.kind == "baseline":
            first_startup = summary.get("startup_seconds", 0.0)
        elif e.started_at and stamp(e.started_at) >= baseline_end - 1.0:
            steady[e.worker or "local"] += summary.get("training_seconds", 0.0)
            steady_trials += 1
    trials = sum(int(w["trials"]) for w in per_worker.values())
    train = sum(w["train_s"] for w in per_worker.values())
    gpus = max(1, len(per_worker))
    row = {
        "bench": "gpu_loop", "interrupted": bool(interrupted), "budget_s": args.budget, "devices": args.devices or "plain loop", "standby": args.standby,
        "constants": args.constants or "all",
        "trials": trials, "wall_s": round(wall, 1), "experiments_per_hour": round(trials / wall * 3600, 2),
        "train_share": round(train / (gpus * wall), 4),
        "train_share_after_first_startup": round(train / (gpus * wall - first_startup), 4),
        "per_worker": {k: {"trials": int(v["trials"]), "train_share": round(v["train_s"] / wall, 4),
                           "startup_s": round(v["startup_s"], 1), "eval_s": round(v["eval_s"], 1)}
                       for k, v in sorted(per_worker.items())},
        "after_baseline": {"wall_s": round(t0 + wall - baseline_end, 1), "trials": steady_trials,
                           "experiments_per_hour": round(steady_trials / (t0 + wall - baseline_end) * 3600, 2),
                           "train_share": {k: round(v / (t0 + wall - baseline_end), 4) for k, v in sorted(steady.items())}},
        "gpu_util_mean": mean_utilisation(samples),
        "standby_trials": sum(1 for _ in (lab / ".nightlab" / "runs").rglob("standby.json")),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
