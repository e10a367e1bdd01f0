"""The ``nightlab`` command. Thin: parses arguments and calls the library.

Subcommands are grouped by what they act on; each group registers itself from its own module.
"""

from __future__ import annotations

import argparse
import sys

from nightlab import __version__
from nightlab.cli import lab, org, report, research
from nightlab.cli.common import UserError
from nightlab.config import ConfigError
from nightlab.night.git import GitError
from nightlab.trial.sandbox import SandboxError

GROUPS = (lab, research, report, org)  # each registers its subcommands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nightlab",
        description=(
            "Autonomous overnight LLM research. Agents edit train.py, the lab trains it for a fixed "
            "wall-clock budget, a trusted evaluator measures val_bpb (lower is better), and the loop "
            "keeps a change only when it really improved."
        ),
        epilog=(
            "Typical night:  nightlab init mylab && cd mylab && nightlab prepare && nightlab run --hours 8\n"
            "Morning:        nightlab report --open"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nightlab {__version__}")
    parser.set_defaults(main=main)  # for a command made of other commands (nightlab demo)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, ConfigError, GitError, SandboxError) as e:  # one line the user can act on, no traceback
        print(f"nightlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nightlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
