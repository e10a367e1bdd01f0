"""Two GPUs against one: experiments an hour and each GPU's share of training time.

For a machine with two GPUs (kind ``nvidia-h100-x2``). It makes a lab from the template, prepares
its dataset if needed, then runs the search agent twice for the same wall-clock window with the
noise policy off (greedy, one trial per experiment, so both runs do the same work per experiment):

1. one worker (``--devices 0``),
2. two workers (``--devices 0,1``), through the scheduler.

From the store it reports experiments finished per hour for each, their ratio (target: at least
1.9), and for each GPU the share of the window its trials were training (target: at least 90 %),
measured from each experiment's recorded start and finish.

Usage: python bench/two_gpu.py [--budget 120] [--minutes 30] [--dataset climbmix] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path


def nightlab(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "nightlab", *args], check=True)


def one_run(root: Path, name: str, devices: str, args: argparse.Namespace) -> dict:
    lab = root / name
    nightlab("init", str(lab), "--dataset", args.dataset, "--budget", str(args.budget),
             "--set", "run.policy=greedy", "--set", "run.baseline_runs=1")
    for role in ("reviewer.md", "lead.md"):  # only the workers differ between the two runs
        (lab / "org" / role).unlink(missing_ok=True)
    subprocess.run(["git", "commit", "-qam", "bench: researchers only"], cwd=lab, check=False)
    nightlab("prepare", "--lab", str(lab))
    started = time.time()
    nightlab("run", "--lab", str(lab), "--tag", "bench", "--devices", devices, "--hours", str(args.minutes / 60))
    wall = time.time() - started
    from nightlab.research.store import Store

    with Store.open(lab) as store:
        rows = [e for e in store.experiments("bench") if e.kind == "experiment" and e.started_at and e.finished_at]
    busy: dict[str, float] = defaultdict(float)
    for e in rows:
        busy[e.worker] += (datetime.fromisoformat(e.finished_at) - datetime.fromisoformat(e.started_at)).total_seconds()
    return {"devices": devices, "experiments": len(rows), "wall_s": round(wall), "per_hour": len(rows) / wall * 3600,
            "busy_share": {w: round(s / wall, 3) for w, s in busy.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds per experiment")
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-clock window of each run")
    parser.add_argument("--dataset", default="climbmix")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="nightlab-two-gpu-"))
    one = one_run(root, "one", "0", args)
    two = one_run(root, "two", "0,1", args)
    record = {"bench": "two_gpu", "budget_s": args.budget, "one": one, "two": two,
              "ratio": round(two["per_hour"] / one["per_hour"], 2),
              "min_busy_share": min(two["busy_share"].values(), default=0.0)}
    print(json.dumps(record, indent=1))
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
