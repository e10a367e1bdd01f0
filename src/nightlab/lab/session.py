"""What a training process gets from the lab: the train split, the budget, and a place to hand in its model.

``train.py`` calls :func:`connect` once. The runner describes the experiment through environment
variables (see ``docs/architecture.md``); without them, as when a person runs ``python train.py``
inside a lab, the lab's ``nightlab.toml`` supplies the same facts and the run goes to
``.nightlab/scratch/``.

The session hands out the training split only. The validation split stays with the evaluator.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightlab import config as cfg
from nightlab.lab.loader import TrainLoader

ENV_DATA = "NIGHTLAB_DATA"
ENV_OUT = "NIGHTLAB_OUT"
ENV_BUDGET = "NIGHTLAB_BUDGET_S"
ENV_BUDGET_TOKENS = "NIGHTLAB_BUDGET_TOKENS"  # 0 or absent: the wall-clock budget decides
ENV_DEVICE = "NIGHTLAB_DEVICE"
ENV_PRESET = "NIGHTLAB_PRESET"
ENV_SEED = "NIGHTLAB_SEED"
ENV_GATE = "NIGHTLAB_GATE"  # set when the runner starts this process before the GPU is free
ENV_RUNNER = "NIGHTLAB_RUNNER_PID"  # the runner that will open the gate (set with NIGHTLAB_GATE)

GATE_READY = "ready"  # written into the gate folder when startup is over
GATE_GO = "go"  # written by the runner when the timed run may begin

WEIGHTS_FILE = "model.pt"
SUMMARY_FILE = "summary.json"


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is visible, else ``cpu``."""
    if device != "auto":
        return device
    import torch  # deferred: heavy; only "auto" asks whether a GPU is there

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_preset(preset: str, device: str) -> str:
    """``auto`` picks the full ``gpu`` model on CUDA and the tiny ``cpu`` model anywhere else."""
    if preset != "auto":
        return preset
    return "gpu" if device.startswith("cuda") else "cpu"


@dataclass(frozen=True)
class Session:
    data_dir: Path
    out_dir: Path
    budget_s: float
    device: str
    preset: str
    seed: int
    vocab_size: int
    bos_id: int
    corpus_hash: str
    budget_tokens: int = 0  # when set, train.py stops at this many training tokens, not at budget_s

    def train_loader(self, batch_size: int, seq_len: int):
        """Batches of the training split: ``(inputs, targets, epoch)`` on this session's device."""
        return TrainLoader(self.data_dir, batch_size, seq_len, self.device, self.seed)

    def ready(self) -> None:
        """Startup (model, compilation, warm-up) is over: return when the timed run may begin.

        The runner may start the next trial while the GPU still trains the current one, so that
        its startup costs the night nothing; it then sets ``NIGHTLAB_GATE`` and this call waits
        for its turn. Without it (the usual case, and ``python train.py``) it returns at once.
        """
        gate = os.environ.get(ENV_GATE)
        if not gate:
            return
        # The runner's pid comes from the runner: read here, os.getppid() would be whoever adopted
        # this process if the runner died during startup, and the wait would never end.
        gate_dir, parent = Path(gate), int(os.environ.get(ENV_RUNNER) or os.getppid())
        write_json(gate_dir / GATE_READY, {"pid": os.getpid(), "at": time.time()})
        while not (gate_dir / GATE_GO).exists():
            if os.getppid() != parent:  # the runner is gone: nobody will open the gate
                raise SystemExit("nightlab: the runner that started this process is gone; exiting")
            time.sleep(0.002)

    def finish(self, model: Any, summary: dict[str, Any]) -> Path:
        """Save the model's weights for the evaluator and the run's own numbers. Returns the weights path."""
        import torch  # deferred: heavy

        model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper saves as its module
        state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        weights = self.out_dir / WEIGHTS_FILE
        tmp = weights.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, weights)
        record = {"corpus_hash": self.corpus_hash, "device": self.device, "preset": self.preset,
                  "seed": self.seed, "budget_s": self.budget_s, "budget_tokens": self.budget_tokens, **summary}
        write_json(self.out_dir / SUMMARY_FILE, record)
        return weights


def connect(start_dir: Path | str | None = None) -> Session:
    """The session for this training process, from the runner's variables or the lab's config."""
    env = os.environ
    if env.get(ENV_DATA):
        data_dir = Path(env[ENV_DATA])
        out_dir = Path(env.get(ENV_OUT) or Path.cwd() / ".nightlab" / "scratch")
        budget = float(env.get(ENV_BUDGET, "300"))
        device = resolve_device(env.get(ENV_DEVICE, "auto"))
        preset = resolve_preset(env.get(ENV_PRESET, "auto"), device)
        seed = int(env.get(ENV_SEED, "0"))
        budget_tokens = int(env.get(ENV_BUDGET_TOKENS) or 0)
    else:
        # deferred: the dataset machinery (0.15 s) serves only `python train.py` run by hand; trials get
        # everything from the environment
        from nightlab.lab import datasets

        # `python train.py` from anywhere inside the lab reads the lab's settings, not the defaults
        here = Path(start_dir or Path.cwd())
        lab_dir = cfg.nearest_lab(here) or here
        conf = cfg.load(lab_dir).lab
        data_dir = datasets.dataset_dir(conf.dataset, conf.vocab_size, conf.num_shards)
        out_dir = Path(env.get(ENV_OUT) or lab_dir / ".nightlab" / "scratch")
        budget = float(env.get(ENV_BUDGET, conf.budget_s))
        device = resolve_device(env.get(ENV_DEVICE, conf.device))
        preset = resolve_preset(env.get(ENV_PRESET, conf.preset), device)
        seed = int(env.get(ENV_SEED, conf.seed))
        budget_tokens = int(env.get(ENV_BUDGET_TOKENS) or conf.budget_tokens)
    manifest = read_manifest(data_dir)
    return Session(data_dir=data_dir, out_dir=out_dir, budget_s=budget, device=device, preset=preset,
                   seed=seed, vocab_size=int(manifest["vocab_size"]), bos_id=int(manifest["bos_id"]),
                   corpus_hash=str(manifest.get("corpus_hash", "")), budget_tokens=budget_tokens)


def read_manifest(data_dir: Path) -> dict[str, Any]:
    path = Path(data_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no prepared dataset at {data_dir} (missing manifest.json): run `nightlab prepare` in the lab first"
        )
    return json.loads(path.read_text())


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write JSON to a temporary name, then rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
