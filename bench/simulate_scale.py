"""The scheduler at scale, in simulation: many workers, many researchers, thousands of experiments.

Runs ``nightlab.sim.simulate.run`` (real store, policy, scheduler, notes board, lead and
reviewer; simulated trainer, in-memory git, simulated researchers) and checks that nothing is
lost or run twice:

- every proposal became exactly one experiment row, and every re-applied stale win one more;
- every row has a verdict; every trial the trainer ran is exactly one measurement row, and no
  (experiment, seed, kind) was measured twice;
- every keep sits on the keep before it (the branch is one chain).

It reports the orchestrator's time per experiment (the one thread that owns the store, git and
the agents' bookkeeping, measured as wall time minus its waits for events) and the throughput.

Usage: python bench/simulate_scale.py [--workers 64] [--experiments 10000] [--researchers 64]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from collections import Counter
from pathlib import Path

from nightlab.sim import simulate

ROLES = {
    "researcher.md": "---\nname: r\nkind: researcher\nbackend: simulated\ncount: {n}\n---\n",
    "reviewer.md": "---\nname: reviewer\nkind: reviewer\nbackend: rules\n---\n",
    "lead.md": "---\nname: lead\nkind: lead\nbackend: stats\nevery: {every}\n---\n",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--experiments", type=int, default=10_000)
    parser.add_argument("--researchers", type=int, default=64)
    parser.add_argument("--lead-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="append the result as a JSON line here")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="nightlab-scale-"))
    org = root / "org"
    org.mkdir()
    for name, text in ROLES.items():
        (org / name).write_text(text.format(n=args.researchers, every=args.lead_every))
    started = time.monotonic()
    result = simulate.run("scale", root / "lab", org_dir=org, experiments=args.experiments, workers=args.workers,
                          seed=args.seed, surface_seed=args.seed)
    wall = time.monotonic() - started
    checks = check(result, root / "lab" / ".nightlab" / "store.db")
    tally = result.tally
    rows = [e for e in result.rows if e.kind == "experiment"]
    record = {
        "bench": "simulate_scale", "workers": args.workers, "researchers": args.researchers,
        "experiments": len(rows), "trials": result.trainer_calls, "wall_s": round(wall, 1),
        "scheduler_wall_s": round(tally.wall_s, 1), "orchestrator_s": round(tally.orchestrator_s, 1),
        "orchestrator_ms_per_experiment": round(1000 * tally.orchestrator_s / max(1, len(rows)), 2),
        "experiments_per_minute": round(60 * len(rows) / tally.wall_s),
        "statuses": dict(Counter(e.status for e in rows)), "reapplied": tally.reapplied, "conflicts": tally.conflicts,
        "workers_used": len({e.worker for e in rows if e.commit_sha}),
        "baseline_true": round(result.baseline_true, 5), "best_true": round(result.best_true, 5),
        "optimum": result.optimum, "checks": checks,
    }
    print(json.dumps(record, indent=1))
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
    if not all(checks.values()):
        raise SystemExit("a check failed: " + ", ".join(k for k, ok in checks.items() if not ok))


def check(result: simulate.SimResult, store_path: Path) -> dict[str, bool]:
    rows = [e for e in result.rows if e.kind == "experiment"]
    tally = result.tally
    with sqlite3.connect(store_path) as db:
        measured = db.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]
        twice = db.execute("SELECT COUNT(*) FROM (SELECT experiment_id, seed, kind FROM measurements "
                           "GROUP BY experiment_id, seed, kind HAVING COUNT(*) > 1)").fetchone()[0]
        orphans = db.execute("SELECT COUNT(*) FROM measurements m LEFT JOIN experiments e ON e.id = m.experiment_id "
                             "WHERE e.id IS NULL").fetchone()[0]
    kept = [e for e in result.rows if e.status == "keep"]
    return {
        "every_proposal_one_row": tally.proposals + tally.reapplied == len(rows) == tally.rows,
        "every_row_has_a_verdict": all(e.finished for e in result.rows),
        "every_trial_one_measurement": measured == result.trainer_calls and orphans == 0,
        "nothing_measured_twice": twice == 0,
        "keeps_form_one_chain": all(b.parent_commit == a.commit_sha for a, b in zip(kept, kept[1:])),
        "reapplied_rows_point_to_their_origin": all(
            any(o.id == e.origin_id and o.reason.startswith("superseded") for o in rows)
            for e in rows if e.origin_id is not None),
    }


if __name__ == "__main__":
    main()
