"""Where nightlab keeps things: the dataset cache and a lab's state folder."""

from __future__ import annotations

import os
from pathlib import Path

STATE_DIR = ".nightlab"


def cache_home() -> Path:
    """``$NIGHTLAB_HOME``, else ``~/.cache/nightlab``."""
    home = os.environ.get("NIGHTLAB_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "nightlab"


def datasets_home() -> Path:
    return cache_home() / "datasets"


def state_dir(lab_dir: Path | str) -> Path:
    return Path(lab_dir) / STATE_DIR
