"""The GPU benchmark: build the pycode corpus on this machine, prepare it, train, evaluate, report.

One command for the GPU machine (from the repository root):

    python3 bench/gpu_bench.py --budget 300 --change "template baseline"

It builds the `pycode` corpus from this machine's own Python installation, prepares it (tokenizer
and token cache, reused when already there), runs `nightlab train` on the template (or on
`--train-py FILE`) once per seed, and prints, for each run, `val_bpb`, tokens per second, MFU,
steps, peak memory, startup-to-first-step time, evaluation time, the trial's whole wall time that
was not training (`overhead_s`: process launches and imports included) and the corpus hash. Each run is
one JSON line in `--out` (default `$OUT/results.jsonl`, else `bench/new_results.jsonl`) in the
format of `bench/results.jsonl`; copy the lines you keep into that file.

Startup depends on what the machine has compiled before. `--fresh-compile-cache` gives the runs an
empty torch.compile cache of their own, so the first seed measures a cold compile and the later
seeds a warm one, on any machine:

    python3 bench/gpu_bench.py --budget 30 --seeds 0,1 --fresh-compile-cache --change "startup"
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def card_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, check=True).stdout
        return out.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "cpu"


def _minus(a: float | None, b: float | None) -> float | None:
    return round(a - b, 2) if a is not None and b is not None else None


def nightlab(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nightlab", *args], cwd=cwd, text=True,
                          env={**os.environ, **(env or {})})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=300, help="training seconds per run")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, one run each")
    ap.add_argument("--dataset", default="pycode", help="dataset spec (default pycode)")
    ap.add_argument("--train-py", type=Path, help="a train.py variant to run instead of the template")
    ap.add_argument("--change", default="template", help="what this run measures, for the record")
    ap.add_argument("--set", action="append", default=[], help="extra nightlab.toml overrides")
    ap.add_argument("--fresh-compile-cache", action="store_true",
                    help="give the runs an empty torch.compile cache: the first seed compiles cold, the rest warm")
    ap.add_argument("--eval-modes", action="store_true",
                    help="also score each trained model as bench/eval_modes.py does (BOS in front, document heads)")
    default_out = Path(os.environ["OUT"]) / "results.jsonl" if os.environ.get("OUT") else ROOT / "bench/new_results.jsonl"
    ap.add_argument("--out", type=Path, default=default_out)
    args = ap.parse_args()

    t0 = time.time()
    lab = Path(tempfile.mkdtemp(prefix="nightlab-bench-")) / "lab"
    if nightlab("init", str(lab), "--dataset", args.dataset, "--budget", str(args.budget), cwd=ROOT).returncode:
        return 1
    if args.train_py:
        (lab / "train.py").write_text(args.train_py.read_text())
    if nightlab("prepare", *sum((["--set", s] for s in args.set), []), cwd=lab).returncode:
        return 1
    prepare_s = time.time() - t0
    card = card_name()
    rows = []
    env = {}
    if args.fresh_compile_cache:
        cache = lab.parent / "compile-cache"
        env = {"TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}
    for seed in [int(s) for s in args.seeds.split(",")]:
        proc = nightlab("train", "--seed", str(seed), *sum((["--set", s] for s in args.set), []), cwd=lab, env=env)
        record = json.loads((lab / ".nightlab/train_runs.jsonl").read_text().splitlines()[-1])
        ev_path = Path(record["run_dir"]) / "eval.json"
        ev = json.loads(ev_path.read_text()) if ev_path.exists() else {}
        row = {
            "date": dt.date.today().isoformat(), "card": card, "budget_s": args.budget, "seed": seed,
            "corpus_hash": record.get("corpus_hash"), "change": args.change,
            "compile_cache": ("cold" if not rows else "warm") if args.fresh_compile_cache else None,
            "val_bpb": record.get("val_bpb"), "tok_per_s": record.get("tok_per_s"), "mfu": record.get("mfu_percent"),
            "steps": record.get("num_steps"), "tokens": record.get("total_tokens"),
            "startup_s": record.get("startup_seconds"), "eval_s": ev.get("eval_s"),
            # all the trial's wall time that was not training: both processes' launch, imports, startup, evaluation
            "overhead_s": _minus(record.get("wall_s"), record.get("training_seconds")),
            "peak_mem_gb": round(record.get("peak_memory_mb", 0) / 1024, 2), "status": record.get("status"),
            "train_loss": record.get("train_loss"), "val_loss_nats": ev.get("val_loss_nats"), "kept": None,
        }
        weights = Path(record["run_dir"]) / "model.pt"
        if args.eval_modes and weights.exists():
            data = (Path(record["run_dir"]) / "data/manifest.json").resolve().parent
            modes = Path(record["run_dir"]) / "eval_modes.json"
            subprocess.run([sys.executable, str(ROOT / "bench/eval_modes.py"), "--train-py", str(lab / "train.py"),
                            "--weights", str(weights), "--data", str(data), "--out", str(modes)], cwd=lab)
            if modes.exists():
                row["eval_modes"] = json.loads(modes.read_text())
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        if proc.returncode:
            print(f"run with seed {seed} ended with status {record.get('status')}", flush=True)
    print(f"\nprepare: {prepare_s:.0f}s | card: {card}")
    print(f"{'seed':>4} {'val_bpb':>9} {'tok/s':>10} {'mfu%':>6} {'steps':>6} {'startup':>8} {'eval':>6} {'overhead':>9} "
          f"{'mem GB':>7}  corpus")
    for r in rows:
        print(f"{r['seed']:>4} {r['val_bpb'] or float('nan'):>9.5f} {r['tok_per_s'] or 0:>10,} {r['mfu'] or 0:>6.1f} "
              f"{r['steps'] or 0:>6} {r['startup_s'] or 0:>8.1f} {r['eval_s'] or 0:>6.1f} {r['overhead_s'] or 0:>9.1f} "
              f"{r['peak_mem_gb']:>7.1f}  "
              f"{r['corpus_hash']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
