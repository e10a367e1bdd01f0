"""``nightlab org check`` and ``nightlab simulate``: the org in Markdown, and trying orgs in simulation."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from nightlab import config as cfg
from nightlab.cli.lab import add_lab_args, find_lab
from nightlab.agents import org as org_roles
from nightlab.cli.common import UserError
from nightlab.lab.session import resolve_device
from nightlab.night import executors
from nightlab.night.notes import Board
from nightlab.night.scheduler import Scheduler
from nightlab.sim import simulate

CHECKPOINTS = (0.1, 0.25, 0.5, 0.75, 1.0)


def register(sub: argparse._SubParsersAction) -> None:
    org_parser = sub.add_parser("org", help="the research org: role files in org/*.md",
                                description="Roles are Markdown files in LAB/org/ with a front matter (name, kind, "
                                "backend, model, count, edits, every) and the role's instructions as the body.")
    org_sub = org_parser.add_subparsers(dest="org_command", metavar="ORG_COMMAND")
    check = org_sub.add_parser("check", help="validate org/*.md and show the org nightlab run would use",
                               description="Every problem is listed with the file, the field and the fix. "
                               "Exit code 0 when the org is usable, 2 otherwise.")
    add_lab_args(check)
    check.set_defaults(func=cmd_org_check)
    org_parser.set_defaults(func=lambda args: (org_parser.print_help(), 2)[1])

    p = sub.add_parser(
        "simulate",
        help="compare two orgs or policies on a simulated lab: best-so-far curves, no GPU",
        description="Runs the real loop (store, policy, scheduler, org) on a stand-in trainer with a known "
        "response surface over train.py's constants and seed noise of about 0.001 val_bpb; LLM researchers are "
        "played by a simulated researcher. Thousands of experiments a minute on a CPU.",
    )
    p.add_argument("--org", action="append", type=Path, default=[], metavar="DIR",
                   help="a folder of role files (repeat to compare; default: program.md alone)")
    p.add_argument("--policy", action="append", default=[], choices=("noise", "greedy"),
                   help="keep/discard policy (repeat to compare)")
    p.add_argument("--experiments", type=int, default=300, metavar="N",
                   help="experiments per simulated night (default %(default)s)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="simulated GPUs (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the surface and the agents (default %(default)s)")
    p.add_argument("--png", type=Path, metavar="FILE", help="also plot the curves to this PNG")
    p.add_argument("--dir", type=Path, metavar="DIR", help="keep the simulated labs here (default: a temp folder)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a setting of the simulated labs (e.g. run.confirm_runs=1)")
    p.set_defaults(func=cmd_simulate)


def cmd_org_check(args: argparse.Namespace) -> int:
    lab_dir = find_lab(args.lab)
    config = cfg.load(lab_dir, args.set)
    found, errors = org_roles.check(lab_dir, config)
    for error in errors:
        print(f"error: {error}")
    if found is None:
        return 2
    source = "program.md alone" if not list((lab_dir / org_roles.ORG_DIR).glob("*.md")) else f"{org_roles.ORG_DIR}/*.md"
    print(f"org ({source}): {found.describe()}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    variants = _variants(args)
    root = args.dir or Path(tempfile.mkdtemp(prefix="nightlab-simulate-"))
    results = []
    for label, org_dir, overrides in variants:
        lab_dir = root / label
        if lab_dir.exists():
            raise UserError(f"{lab_dir} exists; choose another --dir or remove it")
        started = time.monotonic()
        try:
            result = simulate.run(label, lab_dir, org_dir=org_dir, overrides=[*args.set, *overrides],
                                  experiments=args.experiments, workers=args.workers, seed=args.seed,
                                  surface_seed=args.seed)
        except (org_roles.OrgError, cfg.ConfigError) as e:
            raise UserError(str(e)) from None
        seconds = time.monotonic() - started
        print(f"{label}: {len(result.curve)} experiments in {seconds:.1f} s "
              f"({60 * len(result.curve) / max(seconds, 1e-9):.0f} a minute), lab in {lab_dir}")
        results.append(result)
    _print_table(results)
    if args.png:
        _plot(results, args.png)
        print(f"curves: {args.png}")
    return 0


def _variants(args: argparse.Namespace) -> list[tuple[str, Path | None, list[str]]]:
    orgs: list[Path | None] = list(args.org) or [None]
    policies: list[str | None] = list(args.policy) or [None]
    if len(orgs) > 1 and len(policies) > 1:
        raise UserError("compare orgs or policies, not both: give several --org or several --policy")
    for org in orgs:
        if org is not None and not org.is_dir():
            raise UserError(f"--org {org}: not a folder of role files (*.md)")
    out = []
    for org in orgs:
        for policy in policies:
            label = "-".join(x for x in ((org.name if org else "program"), policy) if x)
            while label in {v[0] for v in out}:
                label += "'"
            out.append((label, org, [f'run.policy="{policy}"'] if policy else []))
    return out


def _print_table(results: list) -> None:
    from rich.console import Console  # deferred: rich is heavy, and only this table needs it
    from rich.table import Table

    table = Table(title="best val_bpb so far (measured / true value of that train.py)")
    table.add_column("experiments", justify="right")
    for r in results:
        table.add_column(r.label, justify="right")
    longest = max(len(r.curve) for r in results)
    for share in CHECKPOINTS:
        n = max(1, round(share * longest))
        cells = []
        for r in results:
            point = r.curve[min(n, len(r.curve)) - 1] if r.curve else None
            cells.append(f"{point[1]:.4f} / {point[2]:.4f}" if point else "-")
        table.add_row(str(n), *cells)
    table.add_row("baseline (true)", *[f"{r.baseline_true:.4f}" for r in results])
    table.add_row("optimum (true)", *[f"{r.optimum:.4f}" for r in results])
    for name, value in (("keeps", lambda r: sum(e.status == "keep" for e in r.rows) - 1),
                        ("crashes", lambda r: sum(e.status == "crash" for e in r.rows)),
                        ("re-applied", lambda r: r.tally.reapplied), ("trials", lambda r: r.trainer_calls)):
        table.add_row(name, *[str(value(r)) for r in results])
    Console().print(table)


def _plot(results: list, path: Path) -> None:
    import matplotlib  # deferred: heavy (1 s), only for --png

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        xs = [p[0] for p in r.curve]
        line, = ax.step(xs, [p[2] for p in r.curve], where="post", label=f"{r.label} (true)")
        ax.step(xs, [p[1] for p in r.curve], where="post", linestyle=":", color=line.get_color(),
                label=f"{r.label} (measured)")
    ax.axhline(results[0].optimum, color="grey", linewidth=0.8, label="optimum")
    ax.set_xlabel("experiments")
    ax.set_ylabel("best val_bpb so far")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def team_for(lab_dir: Path, config: cfg.Config, args: argparse.Namespace):
    """The org's agents for ``nightlab run``: (researchers, reviewer, lead). With no role files,
    program.md alone programs one researcher with ``run.agent``."""

    try:
        return org_roles.staff(org_roles.load(lab_dir, config), config, lab_dir)
    except org_roles.OrgError as e:
        raise UserError(f"{e} (check with `nightlab org check`)") from None
    except (ValueError, ImportError) as e:
        raise UserError(f"agent {config.run.agent!r}: {e}") from None


def scheduler_for(lab, team, args: argparse.Namespace):
    """A scheduler for the org's agents on the workers ``--devices`` / ``--executor`` name."""

    researchers, reviewer, lead = team
    lab.reviewer = reviewer
    try:
        if args.executor == "ray":
            workers = executors.ray_workers(args.address, args.workers, lab.dir)
        elif args.devices:
            workers = executors.local_workers(args.devices.split(","))
        else:
            workers = [executors.Worker("local", lab.trainer, device=resolve_device(lab.config.lab.device))]
    except (ValueError, ImportError, ConnectionError) as e:
        raise UserError(str(e)) from None
    lab.say(f"org: {len(researchers)} researcher(s){', a reviewer' if reviewer else ''}"
            f"{', a lead' if lead else ''}; workers: {', '.join(w.name for w in workers)}")
    return Scheduler(lab, researchers, workers, board=Board(lab.dir), lead=lead)
