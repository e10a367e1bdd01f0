"""A night of N minutes on one device with the default agent: does it end with a better model?

    python3 bench/night.py --minutes 25 --budget 60                    # one GPU (the issue's goal)
    python3 bench/night.py --minutes 25 --budget 60 --seed 1           # again, another search seed
    python3 bench/night.py --minutes 2 --budget 5 --device cpu --dataset pycode:stdlib   # the CPU path
    python3 bench/night.py --lab L --minutes 8 && python3 bench/night.py --lab L --minutes 8 --resume
                                     # one night in parts (a machine that runs a command 10 minutes at most)

Creates a lab with `nightlab init` (default settings, the default org and agent: the local search),
prepares its dataset, runs `nightlab run --hours MINUTES/60`, and appends one JSON line to
`--out` (default `bench/night.jsonl`): the card, the corpus, the budget, how many experiments and
keeps, how many trials were set aside as disturbed, the baseline's and the best's val_bpb, the
noise width and the gain in noise widths, and the share of the wall time spent training.
Goal on one H100 or H200 at 60 s and 25 minutes: at least 2 keeps and the best at least 3 noise
widths below the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nightlab.lab import datasets
from nightlab.night.outcome import outcome
from nightlab.night.store import Store

TAG = "night"


def nightlab(*args: str, cwd: Path) -> int:
    return subprocess.run([sys.executable, "-m", "nightlab", *args], cwd=cwd).returncode


def card(device: str) -> str:
    """The GPU's name, or ``cpu``."""
    if device == "cpu":
        return "cpu"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return out or device


def training_seconds(lab: Path) -> float:
    """The timed training seconds of every trial of the night (each writes its own summary.json)."""
    total = 0.0
    for path in (lab / ".nightlab" / "runs").rglob("summary.json"):
        try:
            total += float(json.loads(path.read_text()).get("training_seconds") or 0.0)
        except (OSError, ValueError):
            continue
    return total


def judge_seconds(lab: Path) -> float | None:
    """The median seconds of the trusted evaluation over the night's trials (each run folder's eval.json)."""
    seconds = []
    for path in (lab / ".nightlab" / "runs").rglob("eval.json"):
        try:
            value = json.loads(path.read_text()).get("eval_s")
        except (OSError, ValueError):
            continue
        if isinstance(value, (int, float)):
            seconds.append(float(value))
    return round(statistics.median(seconds), 2) if seconds else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=25, help="no new experiment starts after this long")
    ap.add_argument("--budget", type=float, default=60, help="training seconds per trial")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--dataset", default="pycode")
    ap.add_argument("--seed", type=int, default=0, help="the lab's seed: the search and the trials draw from it")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="any other setting for nightlab init (repeatable)")
    ap.add_argument("--lab", type=Path, help="where to create the lab (default: a new temporary folder)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the night already in --lab for --minutes more (the line sums every part)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("night.jsonl"))
    args = ap.parse_args(argv)

    lab = args.lab or Path(tempfile.mkdtemp(prefix="nightlab-night-")) / "lab"
    if not args.resume:
        sets = [f"lab.budget_s={args.budget}", f"lab.seed={args.seed}", *args.set]
        if nightlab("init", str(lab), "--dataset", args.dataset, "--device", args.device,
                    *(a for s in sets for a in ("--set", s)), cwd=Path.cwd()):
            return 1
        if nightlab("prepare", cwd=lab):
            return 1
    parts = lab / ".nightlab" / "night_parts.json"  # wall seconds and minutes of the parts so far
    before = json.loads(parts.read_text()) if args.resume and parts.exists() else {"wall_s": 0.0, "minutes": 0.0}
    t0 = time.time()
    code = nightlab("run", "--tag", TAG, "--hours", str(args.minutes / 60), *(["--resume"] if args.resume else []),
                    cwd=lab)
    wall = before["wall_s"] + time.time() - t0
    minutes = before["minutes"] + args.minutes
    parts.write_text(json.dumps({"wall_s": wall, "minutes": minutes}))

    from nightlab import config as cfg

    conf = cfg.load(lab).lab
    with Store.open(lab) as store:
        night = outcome(store, TAG)
    row = {
        "bench": "night", "card": card(conf.device), "corpus_hash": datasets.open_prepared(
            conf.dataset, conf.vocab_size, conf.num_shards).corpus_hash,
        "budget_s": conf.budget_s, "budget": night.budget, "minutes": minutes, "agent": "search (local)",
        "seed": conf.seed, "experiments": night.experiments, "keeps": night.keeps, "disturbed": night.disturbed,
        "baseline_val_bpb": night.baseline.val_bpb if night.baseline else None,
        "best_val_bpb": night.best.val_bpb if night.best else None,
        "baseline_holdout_bpb": getattr(night.baseline, "holdout_bpb", None),
        "best_holdout_bpb": getattr(night.best, "holdout_bpb", None), "judge_s_median": judge_seconds(lab),
        "noise": night.noise, "gain_sigmas": round(night.gain_sigmas, 2) if night.gain_sigmas is not None else None,
        "training_share": round(training_seconds(lab) / wall, 4) if wall > 0 else None,
        "wall_s": round(wall, 1), "exit_code": code, "best": night.best.description if night.best else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(night.text())
    print(json.dumps(row, indent=1))
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
