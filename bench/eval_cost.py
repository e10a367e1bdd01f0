"""What the trusted judge costs on this machine: seconds to score the template's model.

    python bench/eval_cost.py [--device auto] [--val-tokens 1200000] [--seq-len 2048] [--repeats 2]
                              [--check-shares 1,0.25] [--old-src PATH]

Writes a synthetic validation split (uniform random tokens, the template's vocabulary) and random
weights for the template's model into a temporary folder, then times ``nightlab.lab.evaluate``
as the runner starts it (``python -I -m nightlab.lab.evaluate``: the scorer, and the model process
it starts): the wall time of the whole command, and the ``eval_s`` it reports (from reading the
split to the score). The GPU benchmark's split is 1.2 M tokens (bench/RESULTS.md).

``--check-shares`` times the judge at each share of checked windows, and ``--old-src`` an older
checkout's evaluator (its ``src`` folder, started with ``python -m`` and ``PYTHONPATH``), the
configurations taking turns in each repeat so that they see the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nightlab.lab.session import resolve_device, resolve_preset

TEMPLATE = Path(__file__).resolve().parents[1] / "src" / "nightlab" / "template" / "train.py"
VOCAB = 8192


def synthetic_split(folder: Path, val_tokens: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(folder / "val.tokens.npy", rng.integers(0, VOCAB - 1, size=val_tokens).astype(np.uint16))
    token_bytes = np.full(VOCAB, 3, dtype=np.int32)
    token_bytes[VOCAB - 1] = 0  # BOS
    np.save(folder / "token_bytes.npy", token_bytes)
    (folder / "manifest.json").write_text(json.dumps({"vocab_size": VOCAB, "bos_id": VOCAB - 1, "corpus_hash": "bench"}))
    return folder


def template_weights(data: Path, device: str, preset: str, out: Path) -> Path:
    """Random weights of the template's model, built in a child with the lab's variables."""
    code = ("import os, sys, torch; sys.path.insert(0, sys.argv[1]); import train; m = train.build_model(); "
            "g = torch.Generator().manual_seed(0); "
            "torch.save({k: (torch.randn(v.shape, generator=g) * 0.02).to(v.dtype) for k, v in m.state_dict().items()}, "
            "sys.argv[2])")
    env = {"NIGHTLAB_DATA": str(data), "NIGHTLAB_DEVICE": "cpu", "NIGHTLAB_PRESET": preset,
           "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code, str(TEMPLATE.parent), str(out)], check=True, env=env)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--val-tokens", type=int, default=1_200_000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sandbox", default="none", choices=("none", "bwrap"))
    p.add_argument("--check-shares", default="",
                   help="comma-separated shares of the windows checked (default: the judge's own default)")
    p.add_argument("--old-src", type=Path, default=None,
                   help="an older checkout's src folder: its evaluator is timed too, started with python -m")
    args = p.parse_args(argv)
    configs: list[tuple[str, list[str], dict[str, str]]] = [
        (f"check_share {share}", ["-I", "-m", "nightlab.lab.evaluate", "--check-share", share], {})
        for share in args.check_shares.split(",") if share
    ] or [("default", ["-I", "-m", "nightlab.lab.evaluate"], {})]
    if args.old_src is not None:
        configs.append((f"old {args.old_src}", ["-m", "nightlab.lab.evaluate"],
                        {"PYTHONPATH": str(args.old_src.resolve())}))
    device = resolve_device(args.device)
    preset = resolve_preset("auto", device)
    with tempfile.TemporaryDirectory(prefix="nightlab-eval-cost-") as tmp:
        data = synthetic_split(Path(tmp) / "data", args.val_tokens)
        weights = template_weights(data, device, preset, Path(tmp) / "model.pt")
        print(f"device {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}), "
              f"preset {preset}, {args.val_tokens} val tokens, seq_len {args.seq_len}, sandbox {args.sandbox}")
        for i in range(args.repeats):
            for name, command, env in configs:
                out = Path(tmp) / f"eval{i}.json"
                out.unlink(missing_ok=True)
                started = time.monotonic()
                done = subprocess.run([sys.executable, *command, "--train-py", str(TEMPLATE),
                                       "--weights", str(weights), "--data", str(data), "--out", str(out),
                                       "--device", device, "--preset", preset, "--seq-len", str(args.seq_len),
                                       *(["--sandbox", args.sandbox] if args.sandbox != "none" else [])],
                                      capture_output=True, text=True, check=False, env={**os.environ, **env})
                wall = time.monotonic() - started
                result = json.loads(out.read_text()) if out.exists() else {}
                print(f"run {i} [{name}]: status {result.get('status')}, eval_s {result.get('eval_s')}, "
                      f"wall {wall:.2f} s, val_bpb {result.get('val_bpb')}, "
                      f"checked {result.get('checked_windows')}/{result.get('windows')}, stages {result.get('stages_s')}",
                      flush=True)
                if result.get("status") != "ok":
                    print((result.get("reason") or done.stderr)[-3000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
