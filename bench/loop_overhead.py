"""Loop overhead per experiment on the CPU, with the stand-in train.py of the tests.

Runs a short ``run_loop`` (scripted proposer, greedy policy, one trial per experiment) and
measures, from hooks around each trial:

- the gap between one trial's end and the next trial's start: the time the accelerator would sit
  idle because of the loop (store writes, verdict, git, worktree checkout);
- the loop's wall time per experiment minus the time inside trials.

Usage: python bench/loop_overhead.py [--experiments 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fixtures.standin.helpers import (  # noqa: E402
    STANDIN, constant_step, lab_toml, make_dataset, make_lab, open_lab, set_constant,
)
from nightlab.night import experiment  # noqa: E402
from nightlab.agents.scripted import ScriptedProposer  # noqa: E402
from nightlab.night.scheduler import run_single  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=20)
    args = parser.parse_args()
    spans: list[tuple[float, float]] = []
    real_trial = experiment.run_trial

    def timed_trial(*a, **k):
        start = time.perf_counter()
        try:
            return real_trial(*a, **k)
        finally:
            spans.append((start, time.perf_counter()))

    experiment.run_trial = timed_trial
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "data")
        lab_dir = make_lab(Path(tmp) / "lab", lab_toml(baseline_runs=1, confirm_runs=0, policy="greedy"),
                           set_constant(STANDIN.read_text(), "SHARPNESS", 0.5))
        lab = open_lab(lab_dir, data)
        steps = [constant_step(f"noise {i}", "NOISE", round(0.01 * (i + 1), 3)) for i in range(2 * args.experiments)]  # spares for re-asks
        start = time.perf_counter()
        run_single(lab, ScriptedProposer(steps), max_experiments=args.experiments)
        wall = time.perf_counter() - start
        statuses = [e.status for e in lab.experiments()]
    gaps = [b[0] - a[1] for a, b in zip(spans, spans[1:])]
    inside = sum(end - begin for begin, end in spans)
    n = len(spans)
    print(f"experiments: {args.experiments} (+ baseline), trials: {n}, statuses: "
          f"{ {s: statuses.count(s) for s in sorted(set(statuses))} }")
    print(f"trial time (train + eval, stand-in): median {statistics.median(e - b for b, e in spans):.2f} s")
    print(f"idle gap between trials: median {1000 * statistics.median(gaps):.0f} ms, "
          f"max {1000 * max(gaps):.0f} ms")
    print(f"loop overhead per experiment (wall - trials) / trials: {1000 * (wall - inside) / n:.0f} ms")


if __name__ == "__main__":
    main()
