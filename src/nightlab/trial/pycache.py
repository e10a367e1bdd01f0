"""A bytecode cache for the trial processes, written by the lab alone.

Every trial starts two fresh Python processes (training, evaluation). Each imports torch, and
training also imports torch.compile's machinery: thousands of modules. Where Python may not write
bytecode (``PYTHONDONTWRITEBYTECODE=1``, common in containers, or a read-only install), every
process compiles all of them from source again: 12-14 s a process on the H100 machine of
``bench/RESULTS.md``. On a 2-core CPU machine with the same setting, the same imports took 9.2 s
from source and 3.3 s from this cache.

So where torch's bytecode is not beside its source, the lab gives trial processes
``PYTHONPYCACHEPREFIX=<cache home>/pycache`` and fills that folder itself, once per Python, torch
and nightlab version, from a child process that imports the modules trials need and runs no trial
code: ``nightlab prepare`` fills it alongside the dataset and waits for it, and a trial that finds
it unfilled starts the filling in the background. Trial processes only read it
(``PYTHONDONTWRITEBYTECODE=1``): code under test never writes bytecode that the trusted evaluator
would later load.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from nightlab.paths import cache_home

# What trials import: the evaluator's and training's own modules, torch.compile's front and back end.
MODULES = (
    "numpy",
    "torch",
    "nightlab.lab.evaluate",
    "nightlab.lab.session",
    "nightlab.lab.loader",
    "torch._dynamo",
    "torch._inductor.compile_fx",
    "torch._inductor.codegen.triton",
    "torch._inductor.runtime.triton_heuristics",
    "torch.nn.attention.flex_attention",
    "triton",
)

_started: dict[Path, subprocess.Popen] = {}  # one filling process per folder, per runner


def needed(module: str = "torch") -> bool:
    """True where ``module`` has no bytecode beside its source: each process would compile it again."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return False
    return not Path(importlib.util.cache_from_source(spec.origin)).exists()


def folder() -> Path:
    return cache_home() / "pycache"


def marker(root: Path) -> Path:
    """The file that says ``root`` holds the bytecode of this Python, torch and nightlab."""
    versions = [f"py{sys.version_info.major}{sys.version_info.minor}"]
    for dist in ("torch", "nightlab"):
        try:
            versions.append(f"{dist}{importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist}-none")
    return root / f"filled-{'-'.join(versions)}"


def env(root: Path | None = None) -> dict[str, str]:
    """The variables that point a trial process at the cache and keep it from writing there
    (none where torch's own bytecode is in place)."""
    if root is None and not needed():
        return {}
    return {"PYTHONPYCACHEPREFIX": str(root or folder()), "PYTHONDONTWRITEBYTECODE": "1"}


def fill(root: Path | None = None, modules: tuple[str, ...] = MODULES, *, wait: bool = False) -> subprocess.Popen | None:
    """Start filling ``root`` in the background unless it is filled already; returns the process.

    Trials started meanwhile simply compile from source, as without the cache. A module that is
    not installed (triton on a CPU-only machine) is skipped. ``wait`` blocks until it is done.
    """
    if root is None and not needed():
        return None
    root = Path(root or folder())
    done = marker(root)
    if done.exists():
        return None
    running = _started.get(root)
    if running is None:  # once per runner: a fill that failed is not retried
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError:
            return None  # no writable cache home: trials run as before
        code = (
            "import importlib, sys\n"
            "for name in sys.argv[2:]:\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except Exception:\n"
            "        pass\n"
            "open(sys.argv[1], 'w').close()\n"
        )
        child_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        child_env["PYTHONPYCACHEPREFIX"] = str(root)
        running = subprocess.Popen(
            [sys.executable, "-c", code, str(done), *modules], env=child_env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        _started[root] = running
    if wait:
        running.wait()
    return running
