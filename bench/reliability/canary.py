"""Where a secret (a canary API key) shows up in a lab: its files, every git object, the store, and
any text the caller captured (log records, terminal output)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def scan(lab_dir: Path, secret: str, texts: dict[str, str] | None = None) -> list[str]:
    """Every place ``secret`` appears: file paths under the lab (``.git`` and the SQLite store
    included), ``git log -p --all``, the content of every git object, and the named ``texts``."""
    needle = secret.encode()
    lab_dir = Path(lab_dir)
    found = [str(p.relative_to(lab_dir)) for p in sorted(lab_dir.rglob("*"))
             if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]
    history = subprocess.run(["git", "log", "-p", "--all", "--format=%H%n%B"], cwd=lab_dir, capture_output=True)
    if needle in history.stdout:
        found.append("git log -p --all")
    objects = subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=lab_dir, capture_output=True)
    if needle in objects.stdout:
        found.append("git objects (git cat-file --batch-all-objects)")
    found += [name for name, text in (texts or {}).items() if secret in text]
    return found
