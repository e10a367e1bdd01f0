"""Where trials run: the scheduler's workers, each a name and a trainer with ``run_trial``'s signature.

- ``local_workers(devices)``: one worker per GPU of this machine; each trial's processes see only
  their GPU (``CUDA_VISIBLE_DEVICES``) and use ``cuda`` inside it. ``cpu`` workers run tiny
  configs side by side.
- ``ray_workers(address, count, lab_dir)``: the same runner as Ray tasks that ask for one GPU
  each on an existing Ray cluster. The lab's files travel once as the job's ``runtime_env``
  working directory (Ray uploads a job's folder only when it connects), and each task carries
  its experiment's worktree files (train.py at the commit) as an argument; the task lays them
  over the lab's files in a temporary folder, trains and evaluates there, and sends the run
  folder's files back, so the store, the agents and every run folder stay on the head. The
  prepared dataset must be at the same path on every node (``nightlab prepare`` there, or a
  shared file system).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from nightlab.config import Config
from nightlab.trial.runner import TrialResult, run_trial
from nightlab.night.scheduler import Worker

MAX_RETURNED_BYTES = 4 << 30  # a run folder bigger than this is not sent back (the weights stay on the node)


def local_workers(devices: list[str], trainer: Any = run_trial) -> list[Worker]:
    """One worker per entry of ``devices``: a GPU index (``0``, ``1``, ...) or ``cpu``."""
    workers = []
    for k, device in enumerate(devices):
        device = device.strip()
        if device == "cpu":
            workers.append(Worker(f"cpu{k}", functools.partial(_on_device, trainer, "cpu", {}), device="cpu"))
        elif device.isdigit():
            workers.append(Worker(f"gpu{device}", functools.partial(_on_device, trainer, "cuda",
                                                                     {"CUDA_VISIBLE_DEVICES": device}), device="cuda"))
        else:
            raise ValueError(f"device {device!r}: give GPU indices or cpu, e.g. --devices 0,1 or --devices cpu,cpu")
    return workers


def _on_device(trainer: Any, device: str, device_env: dict[str, str], workdir: Path, run_dir: Path, config: Config,
               seed: int, **kw: Any) -> TrialResult:
    """The trial on this worker's device: inside, the one GPU it sees is ``cuda``."""
    config = replace(config, lab=replace(config.lab, device=device))
    return trainer(workdir, run_dir, config, seed, env={**device_env, **(kw.pop("env", None) or {})}, **kw)


# -- Ray ----------------------------------------------------------------------------------------


def ray_workers(address: str, count: int, lab_dir: Path, *, num_gpus: float = 1.0,
                resources: dict[str, float] | None = None, init_kwargs: dict[str, Any] | None = None) -> list[Worker]:
    """``count`` workers that run each trial as a Ray task on the cluster at ``address`` ("" starts
    a local instance). ``num_gpus`` per task: 1 on a GPU cluster, 0 on CPU nodes (as the tests do).
    """
    try:
        import ray  # deferred: optional (nightlab[cluster]) and heavy
    except ImportError:
        raise ImportError("the Ray executor needs Ray: pip install 'nightlab[cluster]'") from None
    if not ray.is_initialized():
        runtime_env = {"working_dir": str(lab_dir), "excludes": [".nightlab/", ".git/", "__pycache__/"]}
        ray.init(address=address or None, runtime_env=runtime_env, **(init_kwargs or {}))
    options = {"num_gpus": num_gpus, "max_retries": 0, **({"resources": resources} if resources else {})}
    task = ray.remote(_remote_trial)
    return [Worker(f"ray{k}", functools.partial(_ray_trial, task, options)) for k in range(count)]


def _ray_trial(task: Any, options: dict[str, Any], workdir: Path, run_dir: Path, config: Config, seed: int, *,
               data_dir: Path,
               on_progress: Any = None, on_stage: Any = None, env: dict[str, str] | None = None) -> TrialResult:
    """Send ``workdir``'s files with the task, run it, write the files it sends back into ``run_dir``."""
    import ray  # deferred: optional (nightlab[cluster]) and heavy

    files = {str(p.relative_to(workdir)): p.read_bytes() for p in Path(workdir).rglob("*")
             if p.is_file() and ".git" not in p.relative_to(workdir).parts and "__pycache__" not in p.parts}
    ref = task.options(**options).remote(files, config, seed, str(data_dir), env or {})
    result, files = ray.get(ref)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (run_dir / name).write_bytes(data)
    if on_progress:
        for line in result.log_tail.splitlines():
            on_progress(line)
    return result


def _remote_trial(files: dict[str, bytes], config: Config, seed: int, data_dir: str,
                  env: dict[str, str]) -> tuple[TrialResult, dict]:
    """On the node: the lab's files (the job's working directory) with the experiment's over them,
    trained and evaluated in a temporary folder. Ray sets ``CUDA_VISIBLE_DEVICES`` to the task's
    GPU, so the runner's ``auto`` device finds it."""
    with tempfile.TemporaryDirectory(prefix="nightlab-trial-") as tmp:
        workdir, run_dir = Path(tmp) / "work", Path(tmp) / "run"
        shutil.copytree(os.getcwd(), workdir, ignore=shutil.ignore_patterns(".nightlab", ".git"))
        for name, data in files.items():
            (workdir / name).parent.mkdir(parents=True, exist_ok=True)
            (workdir / name).write_bytes(data)
        result = run_trial(workdir, run_dir, config, seed, data_dir=Path(data_dir), env=env)
        back, total = {}, 0
        for path in sorted(run_dir.iterdir()):
            if path.is_file() and total + path.stat().st_size <= MAX_RETURNED_BYTES:
                back[path.name] = path.read_bytes()
                total += len(back[path.name])
    return result, back
