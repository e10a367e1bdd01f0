"""Throughput of the template's training step on random tokens (no dataset needed).

Isolates the model, optimizer and compile from the data pipeline: run on the GPU machine with
`python bench/template_speed.py --budget 40`. Prints startup seconds, tokens/s, MFU and peak memory.
At the end it prints the seconds each torch.compile phase took. With `--profile FILE` it also
writes the table of the GPU kernels that took the most time (give it a short budget: the trace
grows with the run).
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_train(train_py: str | Path, vocab: int, **env: str):
    """Import a train.py as module ``train`` against a dataset that is only a manifest (random
    tokens), with ``env`` added to the lab's variables."""
    tmp = Path(tempfile.mkdtemp())
    (tmp / "manifest.json").write_text(json.dumps({"vocab_size": vocab, "bos_id": vocab - 1, "corpus_hash": "random"}))
    os.environ.update(NIGHTLAB_DATA=str(tmp), NIGHTLAB_OUT=str(tmp / "out"), **env)
    spec = importlib.util.spec_from_file_location("train", train_py)
    train = importlib.util.module_from_spec(spec)
    sys.modules["train"] = train
    spec.loader.exec_module(train)
    return train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budget", type=float, default=40)
    ap.add_argument("--train-py", default=str(ROOT / "src/nightlab/template/train.py"))
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--set", action="append", default=[], help="CONSTANT=value overrides for train.py")
    ap.add_argument("--profile", type=Path, help="profile the run's GPU kernels; write the table of the top ones here")
    args = ap.parse_args()
    train = load_train(args.train_py, args.vocab, NIGHTLAB_BUDGET_S=str(args.budget))
    for item in args.set:
        key, value = item.split("=", 1)
        setattr(train, key, eval(value))
    import torch

    class RandomLoader:
        def __init__(self, batch_size, seq_len):
            self.shape = (batch_size, seq_len)

        def __iter__(self):
            while True:
                x = torch.randint(0, args.vocab, self.shape, device=train.DEVICE)
                yield x, torch.roll(x, -1, dims=1), 0

    lab = train.lab
    train.lab = type("BenchLab", (), {
        **{f.name: getattr(lab, f.name) for f in dataclasses.fields(lab)},
        "train_loader": staticmethod(lambda b, t: RandomLoader(b, t)),
        "finish": lab.finish,
        "ready": lab.ready,
    })()
    if not args.profile:
        train.main()
        print_compile_times(torch)
        return
    from torch.profiler import ProfilerActivity, profile

    on_cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU]) as prof:
        train.main()
    table = prof.key_averages().table(sort_by="cuda_time_total" if on_cuda else "self_cpu_time_total", row_limit=45, max_name_column_width=90)
    args.profile.write_text(table)
    print(table)
    print_compile_times(torch)


def print_compile_times(torch) -> None:
    """Where startup went: seconds of each torch.compile phase, summed over the run's graphs."""
    from torch._dynamo.utils import compile_times

    print("compile times (s):")
    print(compile_times(repr="str", aggregate=True))


if __name__ == "__main__":
    main()
