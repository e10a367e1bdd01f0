"""``nightlab init``, ``nightlab prepare`` and ``nightlab train``: set up a lab and run one training."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from importlib import resources
from pathlib import Path

from nightlab import config as cfg
from nightlab.paths import state_dir
from nightlab.cli.common import UserError, default_of, lab_default
from nightlab.lab import datasets
from nightlab.night.outcome import outcome
from nightlab.night.store import Store
from nightlab.trial import pycache
from nightlab.trial.runner import run_trial

TEMPLATE_FILES = ("train.py", "program.md")
GITIGNORE = ".nightlab/\n__pycache__/\n*.pyc\n"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init",
        help="create a new lab: a git repo with train.py, program.md, org/ and nightlab.toml",
        description="Create a lab folder (a git repository) from the template. Agents edit its train.py; "
        "you edit program.md, org/*.md and nightlab.toml.",
    )
    p.add_argument("dir", type=Path, help="folder to create (must not exist, or be empty)")
    p.add_argument("--dataset", help=f"{datasets.SPECS} (default {default_of('lab.dataset')})")
    p.add_argument("--budget", type=float,
                   help=f"training seconds per experiment (default {default_of('lab.budget_s')})")
    p.add_argument("--device", help=f"auto, cpu, cuda or cuda:N (default {default_of('lab.device')})")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any other nightlab.toml setting, e.g. --set run.baseline_runs=5 (repeatable)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "prepare",
        help="download or build the dataset, train the tokenizer, tokenize once into a cache",
        description="Prepare the lab's dataset into the cache ($NIGHTLAB_HOME or ~/.cache/nightlab): text "
        "shards, a BPE tokenizer, and memory-mapped token arrays; where Python may not write bytecode beside torch, "
        "also a bytecode cache the trials import from. Safe to re-run: finished steps are kept.",
    )
    p.add_argument("--dataset", help=f"{datasets.SPECS} ({lab_default('lab.dataset')})")
    p.add_argument("--vocab-size", type=int, help=f"BPE vocabulary size ({lab_default('lab.vocab_size')})")
    p.add_argument("--num-shards", type=int,
                   help=f"climbmix: training shards to download ({lab_default('lab.num_shards')})")
    add_lab_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "train",
        help="one run of train.py under the hard time cap, then the trusted evaluation",
        description="Train the lab's train.py once (its own process group, hard wall-clock cap), evaluate it "
        "in a separate process, print the summary and record the run under .nightlab/runs/.",
    )
    p.add_argument("--budget", type=float, help=f"training seconds ({lab_default('lab.budget_s')})")
    p.add_argument("--device", help=f"auto, cpu, cuda or cuda:N ({lab_default('lab.device')})")
    p.add_argument("--preset", choices=("auto", "gpu", "cpu"),
                   help=f"model size preset; auto picks by device ({lab_default('lab.preset')})")
    p.add_argument("--seed", type=int, help=f"seed ({lab_default('lab.seed')})")
    add_lab_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "demo",
        help="a short night on the CPU: init a lab, prepare pycode:stdlib, run the search agent",
        description="Everything end to end with no network, no API key and no GPU: creates a lab (default "
        "./nightlab-demo), builds the embedded pycode dataset from this Python's standard library, and runs "
        "a few experiments with the search agent on the tiny CPU model. Re-running continues the same lab.",
    )
    p.add_argument("dir", type=Path, nargs="?", default=Path("nightlab-demo"),
                   help="lab folder (default ./%(default)s)")
    p.add_argument("--experiments", type=int, default=4,
                   help="experiments after the baseline runs (default %(default)s); a re-run runs this many more")
    p.add_argument("--budget", type=float, default=20, help="training seconds per experiment (default %(default)s)")
    p.set_defaults(func=cmd_demo)


def add_lab_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lab", type=Path, help="the lab folder (default: the one holding the current directory)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a nightlab.toml setting, e.g. --set lab.budget_s=60 (repeatable)")


SHORTCUTS = {"dataset": "lab.dataset", "budget": "lab.budget_s", "device": "lab.device", "preset": "lab.preset",
             "seed": "lab.seed", "vocab_size": "lab.vocab_size", "num_shards": "lab.num_shards"}


def settings(args: argparse.Namespace) -> list[str]:
    """The ``--set`` items, then each shortcut flag given (``--budget 60``) as the setting it stands for."""
    sets = list(args.set)
    for flag, key in SHORTCUTS.items():
        if getattr(args, flag, None) is not None:  # --budget 0 is given, and refused by the checks
            sets.append(f"{key}={json.dumps(getattr(args, flag))}")
    return sets


def nearest_lab() -> Path | None:
    """The nearest folder at or above the cwd that holds nightlab.toml."""
    return cfg.nearest_lab(Path.cwd())


def find_lab(start: Path | None) -> Path:
    """The lab folder: ``start`` if given, else the nearest folder above the cwd with nightlab.toml."""

    if start is not None:
        if not (start / cfg.CONFIG_FILE).exists():
            raise UserError(f"{start} is not a lab (no {cfg.CONFIG_FILE}); create one with `nightlab init {start}`")
        return start.resolve()
    found = nearest_lab()
    if found is not None:
        return found
    raise UserError(f"no {cfg.CONFIG_FILE} in {Path.cwd().resolve()} or above: run this inside a lab, or create one with "
                    "`nightlab init DIR`")


def searched_constants(device: str | None) -> tuple[str, ...]:
    """The template's constants worth a search by default (sizes only where they are not the CPU preset's)."""
    rates = ("MATRIX_LR", "EMBEDDING_LR", "UNEMBEDDING_LR", "SCALAR_LR", "WEIGHT_DECAY", "WARMDOWN_RATIO",
             "FINAL_LR_FRAC", "MUON_MOMENTUM", "ADAM_BETA1", "X0_INIT", "ROPE_BASE", "LOGIT_CAP")
    return rates if device == "cpu" else (*rates, "DEPTH", "TOTAL_BATCH_SIZE")


def cmd_init(args: argparse.Namespace) -> int:
    lab_dir: Path = args.dir
    if lab_dir.exists() and not lab_dir.is_dir():
        raise UserError(f"{lab_dir} is a file: choose a new folder for the lab")
    if lab_dir.exists() and any(lab_dir.iterdir()):
        raise UserError(f"{lab_dir} already exists and is not empty: choose a new folder for the lab")
    sets = settings(args)
    if args.device == "cpu" and not any(s.startswith("lab.eval_seq_len") for s in sets):
        sets.append("lab.eval_seq_len=512")  # the CPU model trains on 256-token rows
    if not any(s.startswith("search.constants") for s in sets):
        sets.append(f"search.constants={json.dumps(list(searched_constants(args.device)))}")
    conf = cfg.Config().with_overrides(sets)
    if shutil.which("git") is None:
        raise UserError("git is not installed: nightlab keeps every experiment as a git commit; install git")
    try:
        lab_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the lab folder {lab_dir}: {e.strerror}; choose a folder you can write to"
                        ) from None
    template = resources.files("nightlab.template")
    for name in TEMPLATE_FILES:
        (lab_dir / name).write_text(template.joinpath(name).read_text())
    org = template.joinpath("org")
    if org.is_dir():
        (lab_dir / "org").mkdir(exist_ok=True)
        for role in org.iterdir():
            if role.name.endswith(".md"):
                (lab_dir / "org" / role.name).write_text(role.read_text())
    (lab_dir / "notes").mkdir(exist_ok=True)
    (lab_dir / "notes" / "agenda.md").write_text("# Agenda\n\nNothing yet: the lead writes the agenda here.\n")
    (lab_dir / "notes" / "findings.md").write_text("# Findings\n\nWhat the night has taught so far.\n")
    (lab_dir / cfg.CONFIG_FILE).write_text(
        "# nightlab lab settings. Every key, its type, default and meaning: docs/configuration.md in\n"
        "# nightlab's repository (`python -m nightlab.config_docs` prints it). An unknown key is an\n"
        "# error. Override any of them once with --set section.key=value.\n\n"
        + cfg.dumps(conf)
    )
    (lab_dir / ".gitignore").write_text(GITIGNORE)
    git = ["git", "-C", str(lab_dir)]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "-c", "user.name=nightlab", "-c", "user.email=nightlab@localhost", "commit", "-q",
                    "-m", "nightlab init: baseline train.py"], check=True)
    print(f"created lab {lab_dir} (dataset {conf.lab.dataset}, budget {conf.lab.budget_s:.0f}s)")
    print(f"next: cd {lab_dir} && nightlab prepare && nightlab train")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    sets = settings(args)  # --dataset, --vocab-size and --num-shards are checked like the lab's settings
    lab_dir = None
    if args.lab is None and args.dataset and nearest_lab() is None:
        conf = cfg.Config().with_overrides(sets).lab
    else:
        lab_dir = find_lab(args.lab)
        conf = cfg.load(lab_dir, sets).lab
    spec, vocab, shards = conf.dataset, conf.vocab_size, conf.num_shards
    t0 = time.time()
    filling = pycache.fill()  # alongside the dataset, so the first trial already imports from it
    try:
        data_dir = datasets.prepare(spec, vocab_size=vocab, num_shards=shards)
    except datasets.DatasetError as e:
        raise UserError(str(e)) from None
    prepared = datasets.open_prepared(spec, vocab, shards)
    m = prepared.manifest
    print(f"dataset {spec}: corpus {prepared.corpus_hash}, vocab {vocab}, "
          f"{m.get('train_tokens', '?'):,} train / {m.get('val_tokens', '?'):,} val tokens, "
          f"ready in {time.time() - t0:.0f}s at {data_dir}")
    if filling is not None:
        print("compiling torch's Python to bytecode for the trials (once per Python and torch version)...",
              flush=True)
        filling.wait()
        print(f"bytecode cache ready in {time.time() - t0:.0f}s at {pycache.folder()}")
    if lab_dir is not None:
        lab_conf = cfg.load(lab_dir).lab
        if datasets.dataset_dir(lab_conf.dataset, lab_conf.vocab_size, lab_conf.num_shards) != data_dir:
            keys = [f'dataset = "{spec}"', f"vocab_size = {vocab}"]
            if datasets.parse_spec(spec).kind == "climbmix":
                keys.append(f"num_shards = {shards}")
            print(f"note: the lab at {lab_dir} still trains on {lab_conf.dataset} (vocab {lab_conf.vocab_size}); to "
                  f"train on this one, set {', '.join(keys[:-1])} and {keys[-1]} under [lab] in "
                  f"{lab_dir / cfg.CONFIG_FILE}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    lab_dir = find_lab(args.lab)
    conf = cfg.load(lab_dir, settings(args))
    try:
        prepared = datasets.open_prepared(conf.lab.dataset, conf.lab.vocab_size, conf.lab.num_shards)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    seed = conf.lab.seed  # --seed is one of the settings, checked with the others
    run_dir = state_dir(lab_dir) / "runs" / time.strftime("train-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"training {lab_dir / 'train.py'} for {conf.lab.budget_s:.0f}s with seed {seed} on corpus {prepared.corpus_hash} "
          f"(log: {run_dir / 'train.log'})", flush=True)
    result = run_trial(lab_dir, run_dir, conf, seed, data_dir=prepared.dir, on_progress=lambda line: print(line, flush=True))
    record = {"run_dir": str(run_dir), "status": result.status, "val_bpb": result.val_bpb, "seed": seed,
              "corpus_hash": prepared.corpus_hash, "budget_s": conf.lab.budget_s, **(result.summary or {}),
              "wall_s": round(result.total_s, 2), "train_wall_s": round(result.train_s, 2),
              "eval_wall_s": round(result.eval_s, 2)}
    with open(state_dir(lab_dir) / "train_runs.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print("---")
    if result.status != "ok":
        print(f"status: {result.status}")
        if result.error:
            print(result.error.rstrip())
        return 1
    ev = result.eval or {}
    print(f"val_bpb: {result.val_bpb:.6f}")
    for key in ("training_seconds", "startup_seconds", "num_steps", "total_tokens", "epochs", "tok_per_s",
                "mfu_percent", "peak_memory_mb", "num_params"):
        if key in (result.summary or {}):
            print(f"{key}: {result.summary[key]}")
    print(f"eval_seconds: {ev.get('eval_s', 0):.1f}")
    print(f"corpus_hash: {prepared.corpus_hash}")
    return 0


DEMO_TAG = "demo"
DEMO_SETTINGS = (
    'lab.dataset="pycode:stdlib"',
    'lab.device="cpu"',
    "lab.eval_seq_len=512",
    "lab.eval_max_tokens=32768",  # half the validation split: a quicker judge, the same for every trial
    "lab.startup_allowance_s=600",  # the hard cap: a busy machine takes longer over the same tokens
    # Eight steps of training leave seeds 0.03 bpb apart: three seeds a side (baseline, close calls).
    "run.baseline_runs=3",
    "run.confirm_runs=2",
    # The rates, and the batch size that sets how many steps a budget of tokens buys.
    'search.constants=["MATRIX_LR", "EMBEDDING_LR", "UNEMBEDDING_LR", "WARMDOWN_RATIO", "WEIGHT_DECAY", '
    '"CPU_TOTAL_BATCH_SIZE"]',
)
# The demo trains each experiment on a fixed number of tokens, about --budget seconds of training on
# two idle cores, so that whatever else the machine runs cannot move its verdicts (lab.budget_tokens).
DEMO_TOKENS_PER_S = 1600


def cmd_demo(args: argparse.Namespace) -> int:
    """init (once) -> prepare -> run, each through the same commands a user would type."""
    main = args.main  # the whole command line: the demo types what a user would
    if args.experiments < 1:
        raise UserError(f"--experiments {args.experiments}: run at least 1 experiment")
    lab_dir: Path = args.dir
    if not (lab_dir / cfg.CONFIG_FILE).exists():
        settings = [f"lab.budget_s={args.budget}", f"lab.budget_tokens={int(args.budget * DEMO_TOKENS_PER_S)}",
                    *DEMO_SETTINGS]
        if main(["init", str(lab_dir), *(a for s in settings for a in ("--set", s))]):
            return 1
    if main(["prepare", "--lab", str(lab_dir)]):
        return 1
    before = _demo_experiments(lab_dir)  # a re-run runs --experiments more
    status = main(["run", "--lab", str(lab_dir), "--max-experiments", str((before or 0) + args.experiments),
                   "--tag", DEMO_TAG, *(["--resume"] if before is not None else [])])
    state = state_dir(lab_dir)
    with Store.open(lab_dir) as store:
        print(f"\n{outcome(store, DEMO_TAG).text()}")
    print(f"results: {state / 'results.tsv'} | store: {state / 'store.db'} | runs: {state / 'runs'}")
    print(f"report:  cd {lab_dir} && nightlab report --open")
    return status


def _demo_experiments(lab_dir: Path) -> int | None:
    """How many experiments the demo run has so far; None before the first demo."""

    if not (state_dir(lab_dir) / "store.db").exists():
        return None
    with Store.open(lab_dir) as store:
        if store.run(DEMO_TAG) is None:
            return None
        return sum(store.status_counts(DEMO_TAG, kind="experiment").values())
