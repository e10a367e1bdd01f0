"""torch.compile time of the GPU-size model's first forward and backward, on this machine's CPU.

A proxy for the compile part of a trial's startup where no GPU is at hand: the same model (the
`gpu` preset: depth 8, width 512), the same compiler front end (Dynamo, AOTAutograd) and Inductor,
which writes C++ here instead of Triton. One row of 256 tokens, in fp32, so running the graph
costs next to nothing and the first call's time is compile time.

    python bench/compile_cpu.py whole
    python bench/compile_cpu.py regions --train-py /tmp/train_regions.py

`whole` compiles the model as the template does. `regions` compiles each of `model.blocks` and
`model.output` on its own, for a train.py built as `bench/leads/regional_compile.patch` makes it,
and `model.inputs` too where the train.py has it (`regional_compile_inputs.patch`).
Each run starts with an empty compile cache unless `--cache DIR` names one: run twice with the
same folder for the warm figure.

FlexAttention has no backward pass on the CPU, so a template with short attention windows breaks
the graph there and falls back to eager for those layers: its forward-and-backward figures are not
its compile time. `--forward-only` compiles the forward pass alone (under no_grad), which traces
and compiles every layer, the windowed ones through FlexAttention:

    python bench/compile_cpu.py whole --forward-only --cache /tmp/cc   # twice: cold, then warm

A train.py with `make_block_masks(T, device)` (`bench/leads/block_masks_once.patch`) gets its
masks made before compiling, as its own `main()` does on CUDA.
"""

import argparse
import tempfile
import time
from pathlib import Path

from template_speed import load_train, print_compile_times  # this folder is on the path when run

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 8192
ROWS_T = 256  # tokens in the one row: twice the template's short window, so the windows are used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("whole", "regions"))
    ap.add_argument("--train-py", default=str(ROOT / "src/nightlab/template/train.py"))
    ap.add_argument("--cache", type=Path, help="torch.compile cache folder (default: a new empty one)")
    ap.add_argument("--forward-only", action="store_true",
                    help="compile and time the forward pass alone, without gradients (FlexAttention on the CPU)")
    args = ap.parse_args()
    cache = args.cache or Path(tempfile.mkdtemp()) / "compile-cache"
    train = load_train(args.train_py, VOCAB, NIGHTLAB_DEVICE="cpu", NIGHTLAB_PRESET="gpu",
                       TORCHINDUCTOR_CACHE_DIR=str(cache))
    import torch
    from torch._dynamo.utils import counters

    model = train.build_model()
    if hasattr(train, "make_block_masks"):  # block_masks_once.patch
        train.make_block_masks(ROWS_T, "cpu")
    if args.mode == "whole":
        step = torch.compile(model)
    else:
        for block in model.blocks:
            block.compile()
        if hasattr(model, "inputs"):  # regional_compile_inputs.patch
            model.inputs = torch.compile(model.inputs)
        model.output = torch.compile(model.output)
        step = model
    x = torch.randint(0, VOCAB, (1, ROWS_T))
    print(f"depth {train.DEPTH}, width {train.MODEL_DIM}, {args.mode}" + (", forward only" if args.forward_only else ""))
    for call in ("first", "second"):
        t0 = time.time()
        if args.forward_only:
            with torch.no_grad():
                step(x, x)
            print(f"{call} call: forward {time.time() - t0:.1f} s", flush=True)
            continue
        loss = step(x, x)
        forward_s = time.time() - t0
        loss.backward()
        print(f"{call} call: forward {forward_s:.1f} s, forward and backward {time.time() - t0:.1f} s", flush=True)
    print(f"graphs compiled: {counters['stats']['unique_graphs']}")
    print_compile_times(torch)


if __name__ == "__main__":
    main()
