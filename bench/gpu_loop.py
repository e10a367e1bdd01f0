"""The research loop on a GPU: how much of the night the GPU spends training.

    python3 bench/gpu_loop.py --budget 120 --experiments 3

Builds and prepares `pycode` on this machine, runs `nightlab run --agent search` for the baseline
(one run) and N experiments at the given budget, then reads every trial's `summary.json` and
prints the share of the loop's wall time that was training (the goal: at least 90 %), with the
rest split into startup (process start and compilation), evaluation and loop overhead. One JSON
line goes to `--out` (default `$OUT/gpu_loop.jsonl`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def nightlab(*args: str, cwd: Path) -> int:
    return subprocess.run([sys.executable, "-m", "nightlab", *args], cwd=cwd).returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=120)
    ap.add_argument("--experiments", type=int, default=3)
    ap.add_argument("--dataset", default="pycode")
    default_out = Path(os.environ["OUT"]) / "gpu_loop.jsonl" if os.environ.get("OUT") else Path("gpu_loop.jsonl")
    ap.add_argument("--out", type=Path, default=default_out)
    args = ap.parse_args()

    lab = Path(tempfile.mkdtemp(prefix="nightlab-loop-")) / "lab"
    sets = [f"lab.budget_s={args.budget}", "run.baseline_runs=1", "run.confirm_runs=0"]
    if nightlab("init", str(lab), "--dataset", args.dataset, *(a for s in sets for a in ("--set", s)), cwd=Path.cwd()):
        return 1
    if nightlab("prepare", cwd=lab):
        return 1
    t0 = time.time()
    nightlab("run", "--agent", "search", "--max-experiments", str(args.experiments), "--tag", "bench", cwd=lab)
    wall = time.time() - t0
    train = startup = evaluation = 0.0
    trials = 0
    for summary in sorted((lab / ".nightlab/runs").rglob("summary.json")):
        s = json.loads(summary.read_text())
        ev = summary.with_name("eval.json")
        train += s.get("training_seconds", 0.0)
        startup += s.get("startup_seconds", 0.0)
        evaluation += json.loads(ev.read_text()).get("eval_s", 0.0) if ev.exists() else 0.0
        trials += 1
    row = {"budget_s": args.budget, "trials": trials, "wall_s": round(wall, 1), "train_s": round(train, 1),
           "startup_s": round(startup, 1), "eval_s": round(evaluation, 1),
           "train_share": round(train / wall, 4) if wall else 0.0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"\n{trials} trials in {wall:.0f}s: training {100 * row['train_share']:.1f}% of the wall time "
          f"(startup {startup:.0f}s, scoring {evaluation:.0f}s, the rest process start and loop)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
