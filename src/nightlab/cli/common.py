"""What every subcommand shares: the one error a user can fix, and help text drawn from the config."""

from __future__ import annotations

from nightlab import config as cfg


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


def default_of(key: str) -> str:
    """The built-in default of the setting ``section.field`` (``lab.budget_s`` -> ``300``), as help shows it.

    Help text takes its defaults from here so that it follows the config dataclasses, never drifts."""
    section, _, name = key.partition(".")
    value = getattr(getattr(cfg.Config(), section), name)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value) if value != "" else "none"


def lab_default(key: str) -> str:
    """For a flag that overrides a lab setting: ``default: lab.budget_s in nightlab.toml, 300 unless set``."""
    return f"default: {key} in nightlab.toml, {default_of(key)} unless set"
