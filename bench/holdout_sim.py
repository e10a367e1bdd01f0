"""Nights of pure-noise changes, simulated: how much of the best's val gain the sealed holdout keeps.

Each night runs ``nightlab.sim.simulate.run`` on a flat surface (``Surface.flat``: no constant and
no edit moves the true val_bpb; a trial's val_bpb is the true value plus seed noise of 0.001, its
holdout score the true value plus noise of its own), with the real store, policy and scheduler.
Whatever a night keeps it kept by luck, so the best's true gain is 0: its val gain measures the
selection bias of choosing on val, its holdout gain must be about 0.

Writes one JSON line per night to ``--out`` (default ``bench/holdout_sim.jsonl``), prints a summary
per policy, and with ``--png`` draws each night's val gain against its holdout gain.

Usage: python bench/holdout_sim.py [--nights 200] [--experiments 20] [--policies greedy,noise]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from nightlab.night import holdout
from nightlab.sim import simulate

HERE = Path(__file__).resolve().parent


def night(policy: str, seed: int, experiments: int) -> dict:
    """One simulated night of pure-noise changes: the best's gains over the baseline on val and holdout."""
    with tempfile.TemporaryDirectory(prefix="holdout_sim_") as tmp:
        result = simulate.run(f"{policy}-{seed}", Path(tmp) / "lab", experiments=experiments, seed=seed, flat=True,
                              overrides=[f'run.policy="{policy}"'])
    keeps = [e for e in result.rows if e.status == "keep"]
    baseline, best = keeps[0], keeps[-1]
    carried = holdout.carry(baseline, best)
    assert carried is not None
    return {"policy": policy, "seed": seed, "experiments": experiments, "keeps": len(keeps) - 1,
            "val_gain": carried.val_gain, "holdout_gain": carried.holdout_gain, "noise": carried.noise,
            "alarm": carried.alarm}


def summary(rows: list[dict]) -> str:
    def ci(values: list[float]) -> str:
        m = statistics.fmean(values)
        half = 1.96 * statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
        return f"{m:+.5f} ± {half:.5f}"

    lines = ["| policy | nights | experiments/night | nights with a keep | best's val gain | best's holdout gain "
             "| alarm (nights with a keep) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == policy]
        kept = [r for r in mine if r["keeps"]]
        alarms = sum(r["alarm"] for r in kept)
        lines.append(f"| {policy} | {len(mine)} | {mine[0]['experiments']} | {len(kept)} | "
                     f"{ci([r['val_gain'] for r in mine])} | {ci([r['holdout_gain'] for r in mine])} | "
                     f"{alarms}/{len(kept)} |")
    return "\n".join(lines)


def draw(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure  # deferred: matplotlib is heavy (1 s)

    fig = Figure(figsize=(7, 6), dpi=110, layout="constrained")
    ax = fig.subplots()
    for policy, color in zip(dict.fromkeys(r["policy"] for r in rows), ("#c62828", "#1565c0", "#2e7d32")):
        mine = [r for r in rows if r["policy"] == policy]
        ax.scatter([r["val_gain"] for r in mine], [r["holdout_gain"] for r in mine], s=14, alpha=0.6, color=color,
                   label=f"{policy} ({len(mine)} nights)")
    top = max(max(r["val_gain"] for r in rows), 1e-3)
    ax.plot([0, top], [0, top], color="#9e9e9e", linewidth=1, linestyle="--", label="holdout = val")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("best's val gain over the baseline (bpb)")
    ax.set_ylabel("best's holdout gain over the baseline (bpb)")
    ax.set_title("pure-noise changes: what choosing on val buys on the holdout")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, format="png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nights", type=int, default=200)
    parser.add_argument("--experiments", type=int, default=20, help="experiments per night")
    parser.add_argument("--policies", default="greedy,noise")
    parser.add_argument("--out", type=Path, default=HERE / "holdout_sim.jsonl")
    parser.add_argument("--png", type=Path, default=None, help="draw the scatter here")
    args = parser.parse_args()
    rows = []
    started = time.monotonic()
    with open(args.out, "w") as out:
        for policy in args.policies.split(","):
            for seed in range(args.nights):
                row = night(policy, seed, args.experiments)
                rows.append(row)
                out.write(json.dumps(row) + "\n")
                out.flush()
    print(summary(rows))
    print(f"{len(rows)} nights in {time.monotonic() - started:.0f} s")
    if args.png:
        draw(rows, args.png)


if __name__ == "__main__":
    main()
