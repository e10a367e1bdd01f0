"""Score one trained model in three ways, to see what a val_bpb figure depends on.

    python3 bench/eval_modes.py --train-py RUN/train.py --weights RUN/model.pt --data DATA_DIR

- `stream`: what nightlab's trusted evaluator scores: the whole val stream cut into windows of
  `--seq-len` tokens. A window starts wherever the cut falls, mostly inside a document, with no
  BOS in front.
- `bos_prefix`: the same targets, each window with BOS put in front of it, as every training row
  has. The difference from `stream` is what the missing BOS at a window's start costs.
- `doc_heads`: only the beginning of each val document (at most `--seq-len` tokens after its
  BOS), packed into rows that start with BOS; a head that does not fit the rest of a row is cut
  there and its remainder dropped. A loader that crops documents to rows trains and scores on
  this part of the data, so this is the figure such a setup reports.

For `stream` and `bos_prefix` it also prints the mean loss by position in the window, which shows
where a difference comes from. Prints one JSON object (also written to `--out` if given).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from nightlab.lab import evaluate as ev

BUCKETS = ((0, 16), (16, 256), (256, 1024), (1024, 1 << 30))


def _score_rows(model, inputs: np.ndarray, targets: np.ndarray, first: int, val: ev.ValSplit, device: str,
                batch_size: int) -> tuple[float, int, np.ndarray]:
    """Nats and bytes over targets[:, first:], and per-position nats [T - first] summed over rows."""
    nats, nbytes = 0.0, 0
    by_pos = np.zeros(inputs.shape[1] - first)
    for i in range(0, len(inputs), batch_size):
        x = torch.tensor(inputs[i : i + batch_size], device=device)
        y = torch.tensor(targets[i : i + batch_size], device=device)
        with ev._autocast(device):
            logits = ev.logits_of(model, x, val.vocab_size)
        per = ev.target_nats(logits, y)[:, first:].double().cpu().numpy()
        b = val.token_bytes[targets[i : i + batch_size, first:]]
        per = np.where(b > 0, per, 0.0)
        nats += per.sum()
        nbytes += int(b.sum())
        by_pos += per.sum(axis=0)
    return nats, nbytes, by_pos


def stream_rows(val: ev.ValSplit, seq_len: int, bos: int, prefix: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Full windows of the val stream (the short last one left out), optionally with BOS in front."""
    starts = [s for s, length in ev.windows(len(val.tokens) - 1, seq_len) if length == seq_len]
    inputs = np.stack([val.tokens[s : s + seq_len] for s in starts])
    targets = np.stack([val.tokens[s + 1 : s + 1 + seq_len] for s in starts])
    n = len(starts)
    if not prefix:
        return inputs, targets, 0
    inputs = np.concatenate([np.full((n, 1), bos), inputs], axis=1)
    targets = np.concatenate([inputs[:, 1:2], targets], axis=1)  # the extra target (the window's first token) is not scored
    return inputs, targets, 1


def head_rows(val: ev.ValSplit, seq_len: int, bos: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of seq_len + 1 tokens packed from document heads, in order, each document starting at BOS."""
    starts = np.flatnonzero(val.tokens == bos).tolist() + [len(val.tokens)]
    rows, row = [], []
    for a, b in zip(starts, starts[1:]):
        head = val.tokens[a : min(b, a + seq_len + 1)].tolist()
        room = seq_len + 1 - len(row)
        row += head[:room]
        if len(row) == seq_len + 1:
            rows.append(row)
            row = []
    rows = np.array(rows)
    return rows[:, :-1], rows[:, 1:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-py", type=Path, required=True)
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="the prepared dataset folder (holds val.tokens.npy)")
    ap.add_argument("--seq-len", type=int, default=ev.DEFAULT_SEQ_LEN)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--preset", default=None)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    device = ev.resolve_device(args.device)
    val = ev.read_val_split(args.data)
    bos = int(val.tokens[0])
    if val.token_bytes[bos] != 0:
        raise SystemExit(f"{args.data}: the val stream does not start with a special token (BOS)")
    model = ev.load_model(args.train_py, args.weights, device, data_dir=args.data, preset=args.preset)
    result: dict = {"seq_len": args.seq_len, "corpus_hash": val.corpus_hash}
    with torch.inference_mode():
        for name, prefix in (("stream", False), ("bos_prefix", True)):
            x, y, first = stream_rows(val, args.seq_len, bos, prefix)
            nats, nbytes, by_pos = _score_rows(model, x, y, first, val, device, args.batch_size)
            result[name] = nats / (math.log(2) * nbytes)
            result[f"{name}_nats_by_position"] = {
                f"{a}-{min(b, args.seq_len) - 1}": round(float(by_pos[a:b].sum() / (len(x) * len(by_pos[a:b]))), 4)
                for a, b in BUCKETS if a < args.seq_len
            }
        x, y = head_rows(val, args.seq_len, bos)
        nats, nbytes, _ = _score_rows(model, x, y, 0, val, device, args.batch_size)
        result["doc_heads"] = nats / (math.log(2) * nbytes)
        result["doc_heads_share_of_val"] = round(int((val.token_bytes[y] > 0).sum()) / int((val.token_bytes[val.tokens] > 0).sum()), 3)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
