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

Several variants, each `NAME=FILE` (`template` for the template), run one after another, or with
`--side-by-side` all at once, one GPU for each variant and seed: on a machine with two GPUs, two
300 s runs cost the time of one. Each run's output then goes to `NAME.log` beside `--out`
(`NAME-seedS.log` where there are several seeds), and each run compiles into an empty cache of its
own, so every side-by-side run is a cold start that no other run slows down:

    python3 bench/gpu_bench.py --side-by-side --variant template=template --variant v10=/tmp/v10.py
    python3 bench/gpu_bench.py --side-by-side --seeds 0,1 --budget 300
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gpu_names() -> list[str]:
    """The machine's GPUs by name, in nvidia-smi's order; empty where there are none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _minus(a: float | None, b: float | None) -> float | None:
    return round(a - b, 2) if a is not None and b is not None else None


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None, log=None) -> subprocess.CompletedProcess:
    """Run a command; its output goes to the terminal, or wholly to ``log`` where one is given."""
    return subprocess.run(command, cwd=cwd, text=True, env={**os.environ, **(env or {})},
                          stdout=log, stderr=subprocess.STDOUT if log else None)


def nightlab(*args: str, cwd: Path, env: dict[str, str] | None = None, log=None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "nightlab", *args], cwd, env, log)


def set_flags(args: argparse.Namespace) -> list[str]:
    """The --set overrides, as nightlab prepare and train take them."""
    return [flag for setting in args.set for flag in ("--set", setting)]


def gpu_pool(count: int, visible: str | None) -> list[str]:
    """The GPUs side-by-side runs may take, as CUDA_VISIBLE_DEVICES entries: those already visible
    where the variable is set, else all `count` of the machine."""
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip()]
    return [str(i) for i in range(count)]


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise SystemExit(f"gpu_bench: --seeds {text!r} is not a comma-separated list of integers, e.g. 0,1") from None
    if len(set(seeds)) < len(seeds):
        raise SystemExit(f"gpu_bench: --seeds {text!r} names a seed twice")
    return seeds


def parse_variants(args: argparse.Namespace) -> list[tuple[str, Path | None]]:
    """(name, train.py or None for the template) for each variant the command line asks for."""
    if not args.variant:
        return [(args.change, args.train_py)]
    if args.train_py:
        raise SystemExit("gpu_bench: give either --train-py or --variant, not both")
    variants = []
    for spec in args.variant:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise SystemExit(f"gpu_bench: --variant {spec!r} is not NAME=FILE (FILE may be 'template')")
        path = None if file == "template" else Path(file)
        if path is not None and not path.is_file():
            raise SystemExit(f"gpu_bench: --variant {name}: no such file {file}")
        variants.append((name, path))
    names = [n for n, _ in variants]
    if len(set(names)) < len(names):
        raise SystemExit(f"gpu_bench: variant names must differ: {', '.join(names)}")
    return variants


def make_lab(train_py: Path | None, args: argparse.Namespace) -> Path | None:
    """A new lab for one variant, prepared; None if init or prepare failed."""
    lab = Path(tempfile.mkdtemp(prefix="nightlab-bench-")) / "lab"
    if nightlab("init", str(lab), "--dataset", args.dataset, "--budget", str(args.budget), cwd=ROOT).returncode:
        return None
    if train_py:
        (lab / "train.py").write_text(train_py.read_text())
    if nightlab("prepare", *set_flags(args), cwd=lab).returncode:
        return None
    return lab


def run_seeds(lab: Path, change: str, card: str, args: argparse.Namespace, seeds: list[int],
              gpu: str | None = None, log=None) -> list[dict]:
    """Train and evaluate the lab's train.py once per seed; one row each, appended to --out."""
    rows = []
    env = {}
    # Runs side by side always get their own cache: two processes compiling the same graphs into
    # one cache at the same moment started 12-14 s slower on an H200 than runs of different graphs.
    own_cache = args.fresh_compile_cache or args.side_by_side
    if own_cache:
        cache = lab.parent / "compile-cache"
        env = {"TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    for seed in seeds:
        start = _now()
        proc = nightlab("train", "--seed", str(seed), *set_flags(args), cwd=lab, env=env, log=log)
        record = json.loads((lab / ".nightlab/train_runs.jsonl").read_text().splitlines()[-1])
        ev_path = Path(record["run_dir"]) / "eval.json"
        ev = json.loads(ev_path.read_text()) if ev_path.exists() else {}
        row = {
            "date": dt.date.today().isoformat(), "card": card, "budget_s": args.budget, "seed": seed,
            "corpus_hash": record.get("corpus_hash"), "change": change,
            "compile_cache": ("cold" if not rows else "warm") if own_cache else None,
            "val_bpb": record.get("val_bpb"), "tok_per_s": record.get("tok_per_s"), "mfu": record.get("mfu_percent"),
            "steps": record.get("num_steps"), "tokens": record.get("total_tokens"), "epochs": record.get("epochs"),
            "startup_s": record.get("startup_seconds"), "eval_s": ev.get("eval_s"),
            # all the trial's wall time that was not training: both processes' launch, imports, startup, evaluation
            "overhead_s": _minus(record.get("wall_s"), record.get("training_seconds")),
            "peak_mem_gb": round(record.get("peak_memory_mb", 0) / 1024, 2), "status": record.get("status"),
            "train_loss": record.get("train_loss"), "val_loss_nats": ev.get("val_loss_nats"), "kept": None,
            "start": start, "end": _now(),
        }
        if gpu is not None:
            row["gpu"] = gpu
        weights = Path(record["run_dir"]) / "model.pt"
        if args.eval_modes and weights.exists():
            data = (Path(record["run_dir"]) / "data/manifest.json").resolve().parent
            modes = Path(record["run_dir"]) / "eval_modes.json"
            run([sys.executable, str(ROOT / "bench/eval_modes.py"), "--train-py", str(lab / "train.py"),
                 "--weights", str(weights), "--data", str(data), "--out", str(modes)], lab, log=log)
            if modes.exists():
                row["eval_modes"] = json.loads(modes.read_text())
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with _out_lock, open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        if proc.returncode:
            print(f"{change}: run with seed {seed} ended with status {record.get('status')}", flush=True)
    return rows


_out_lock = threading.Lock()  # side-by-side variants append to one --out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=300, help="training seconds per run")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, one run each")
    ap.add_argument("--dataset", default="pycode", help="dataset spec (default pycode)")
    ap.add_argument("--train-py", type=Path, help="a train.py variant to run instead of the template")
    ap.add_argument("--change", default="template", help="what this run measures, for the record")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FILE",
                    help="a train.py to run, recorded as NAME; repeat for several ('template' for the template)")
    ap.add_argument("--side-by-side", action="store_true",
                    help="run every variant and seed at the same time, one GPU each (the machine needs that many)")
    ap.add_argument("--set", action="append", default=[], help="extra nightlab.toml overrides")
    ap.add_argument("--fresh-compile-cache", action="store_true",
                    help="give the runs an empty torch.compile cache: the first seed compiles cold, the rest warm "
                         "(side by side, each run always has its own, so all compile cold)")
    ap.add_argument("--eval-modes", action="store_true",
                    help="also score each trained model as bench/eval_modes.py does (BOS in front, document heads)")
    default_out = Path(os.environ["OUT"]) / "results.jsonl" if os.environ.get("OUT") else ROOT / "bench/new_results.jsonl"
    ap.add_argument("--out", type=Path, default=default_out)
    args = ap.parse_args()
    variants = parse_variants(args)
    gpus = gpu_names()
    card = gpus[0] if gpus else "cpu"
    pool = gpu_pool(len(gpus), os.environ.get("CUDA_VISIBLE_DEVICES")) if gpus else []
    seeds = parse_seeds(args.seeds)
    runs = len(variants) * len(seeds)
    if args.side_by_side and gpus and len(pool) < runs:
        raise SystemExit(f"gpu_bench: {len(variants)} variant(s) x {len(seeds)} seed(s) side by side need {runs} GPUs; "
                         f"{len(pool)} are visible. Give fewer, or drop --side-by-side to run them one after another.")

    t0 = time.time()
    # One lab per variant, or with --side-by-side one per run, so runs at the same time never
    # share a lab's records. Labs are made one after another: they share the dataset cache.
    if args.side_by_side:
        jobs = [(name, train_py, [seed]) for name, train_py in variants for seed in seeds]
    else:
        jobs = [(name, train_py, seeds) for name, train_py in variants]
    labs = []
    for name, train_py, job_seeds in jobs:
        lab = make_lab(train_py, args)
        if lab is None:
            return 1
        labs.append((name, lab, job_seeds))
    prepare_s = time.time() - t0

    rows: list[dict] = []
    if args.side_by_side:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        results: dict[int, list[dict]] = {}

        def bench(index: int, gpu: str | None, name: str, lab: Path, job_seeds: list[int]) -> None:
            log_path = args.out.parent / (f"{name}.log" if len(seeds) == 1 else f"{name}-seed{job_seeds[0]}.log")
            with open(log_path, "w") as log:
                results[index] = run_seeds(lab, name, card, args, job_seeds, gpu=gpu, log=log)
            print(f"{name}, seed {job_seeds[0]}: done ({log_path})", flush=True)

        # one GPU each; where there is none (trying it out on a CPU) they share the CPU
        threads = [threading.Thread(target=bench, args=(i, pool[i] if pool else None, *job))
                   for i, job in enumerate(labs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rows = [r for i in range(len(labs)) for r in results.get(i, [])]
    else:
        for name, lab, job_seeds in labs:
            rows += run_seeds(lab, name, card, args, job_seeds)

    print(f"\nprepare: {prepare_s:.0f}s | card: {card}")
    print(f"{'change':<16} {'seed':>4} {'val_bpb':>9} {'tok/s':>10} {'mfu%':>6} {'steps':>6} {'epochs':>6} "
          f"{'startup':>8} {'eval':>6} {'overhead':>9} {'mem GB':>7}  corpus")
    for r in rows:
        print(f"{r['change'][:16]:<16} {r['seed']:>4} {r['val_bpb'] or float('nan'):>9.5f} {r['tok_per_s'] or 0:>10,} "
              f"{r['mfu'] or 0:>6.1f} {r['steps'] or 0:>6} {r['epochs'] or 0:>6.2f} "
              f"{r['startup_s'] or 0:>8.1f} {r['eval_s'] or 0:>6.1f} "
              f"{r['overhead_s'] or 0:>9.1f} {r['peak_mem_gb']:>7.1f}  {r['corpus_hash']}")
    return 0 if len(rows) == runs else 1


if __name__ == "__main__":
    sys.exit(main())
