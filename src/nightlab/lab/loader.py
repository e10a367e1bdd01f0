"""Batches of the training split: rows packed best-fit from whole documents, no padding.

Every row holds ``seq_len + 1`` tokens and starts with BOS; inputs are its first ``seq_len``
tokens and targets its last ``seq_len``. Rows are filled from a buffer of documents (in an order
shuffled per epoch by the seed): each step puts in the largest piece that fits the row's remaining
space. When none fits, the longest piece in the buffer is split: its head fills the row exactly,
and its tail goes back into the buffer as a new piece that starts with BOS again. So a document
longer than a row is spread over rows, each piece begins with BOS, and at most one BOS is added
per row. The only tokens never served are those of an epoch's last, incomplete batch (fewer than
``batch_size * (seq_len + 1)``); the next epoch starts from a fresh order.

The loader opens only ``train.tokens.npy`` and ``train.docs.npy`` (memory-mapped); BOS is read from
the first token of the split. Batches are packed in a background thread; on CUDA they come through
pinned memory with non-blocking copies.
"""

from __future__ import annotations

import math
import queue
import threading
from bisect import bisect_right, insort
from pathlib import Path
from typing import Iterator

import numpy as np

BUFFER_DOCS = 512  # pieces the packer chooses from
PREFETCH = 4  # batches packed ahead of the training loop


class EpochPacker:
    """Plans the batches of one epoch as gather indices into the token array."""

    def __init__(self, doc_starts: np.ndarray, order: np.ndarray, batch_size: int, row_len: int,
                 buffer_docs: int = BUFFER_DOCS) -> None:
        self.doc_starts = doc_starts  # int64[D + 1]: the BOS offset of each document, then the total
        self.order = order
        self.batch_size, self.row_len, self.buffer_docs = batch_size, row_len, buffer_docs
        self._next = 0  # position in order of the next document to buffer
        self._seq = 0  # tie-breaker, so equal lengths keep their buffering order
        self._buffer: list[tuple[int, int, int, int]] = []  # sorted (length, seq, bos offset, content offset)

    def batches(self) -> Iterator[np.ndarray]:
        """int64[batch_size, row_len] token offsets, one array per full batch of the epoch."""
        while True:
            sources: list[int] = []
            lengths: list[int] = []
            for _ in range(self.batch_size):
                if not self._fill_row(sources, lengths):
                    return
            src = np.asarray(sources, dtype=np.int64)
            lens = np.asarray(lengths, dtype=np.int64)
            dst = np.cumsum(lens) - lens
            total = self.batch_size * self.row_len
            yield (np.repeat(src - dst, lens) + np.arange(total)).reshape(self.batch_size, self.row_len)

    def _refill(self) -> None:
        while len(self._buffer) < self.buffer_docs and self._next < len(self.order):
            doc = int(self.order[self._next])
            self._next += 1
            start, end = int(self.doc_starts[doc]), int(self.doc_starts[doc + 1])
            insort(self._buffer, (end - start, self._seq, start, start + 1))
            self._seq += 1

    def _fill_row(self, sources: list[int], lengths: list[int]) -> bool:
        """Append one row's runs (offset, length); False when the epoch runs out first."""
        space = self.row_len
        while space > 0:
            self._refill()
            if not self._buffer:
                return False
            i = bisect_right(self._buffer, (space, math.inf)) - 1
            if i >= 0:
                length, _, bos, content = self._buffer.pop(i)
                take = length - 1
            else:  # nothing fits: the longest piece fills the row, its tail goes back
                length, _, bos, content = self._buffer.pop()
                take = space - 1
                insort(self._buffer, (length - take, self._seq, bos, content + take))
                self._seq += 1
            sources += (bos, content)
            lengths += (1, take)
            space -= take + 1
        return True


class TrainLoader:
    """Iterate for ``(inputs, targets, epoch)``: int64 ``[batch_size, seq_len]`` tensors on ``device``."""

    def __init__(self, dataset_dir: Path | str, batch_size: int, seq_len: int, device: str = "cpu",
                 seed: int = 0, *, buffer_docs: int = BUFFER_DOCS, prefetch: int = PREFETCH) -> None:
        directory = Path(dataset_dir)
        tokens_path, docs_path = directory / "train.tokens.npy", directory / "train.docs.npy"
        if not (tokens_path.is_file() and docs_path.is_file()):
            raise FileNotFoundError(f"{directory} has no train.tokens.npy/train.docs.npy: run `nightlab prepare` first")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size = {batch_size}, seq_len = {seq_len}: both must be at least 1")
        self.tokens = np.load(tokens_path, mmap_mode="r")
        self.doc_starts = np.load(docs_path)
        if len(self.doc_starts) < 2:
            raise ValueError(f"{docs_path} lists no documents: prepare the dataset again")
        self.bos_id = int(self.tokens[self.doc_starts[0]])
        self.batch_size, self.seq_len, self.device, self.seed = batch_size, seq_len, str(device), seed
        self.buffer_docs, self.prefetch = buffer_docs, prefetch
        if len(self.tokens) < batch_size * (seq_len + 1):
            raise ValueError(f"the train split has {len(self.tokens):,} tokens, fewer than one batch of "
                             f"{batch_size} x {seq_len + 1}: use a smaller batch_size or seq_len, or more data")

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The document order of an epoch: a permutation fixed by (seed, epoch)."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.doc_starts) - 1)

    def index_batches(self) -> Iterator[tuple[np.ndarray, int]]:
        """Endless (token offsets int64[B, T + 1], epoch), epoch after epoch."""
        epoch = 0
        while True:
            packer = EpochPacker(self.doc_starts, self.epoch_order(epoch), self.batch_size, self.seq_len + 1,
                                 self.buffer_docs)
            for index in packer.batches():
                yield index, epoch
            epoch += 1

    def __iter__(self) -> Iterator[tuple["torch.Tensor", "torch.Tensor", int]]:  # noqa: F821
        import torch  # deferred: heavy; the loader's index work is plain numpy

        cuda = self.device.startswith("cuda")
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for index, epoch in self.index_batches():
                    rows = self.tokens[index]
                    pair = (torch.from_numpy(rows[:, :-1].astype(np.int64)),
                            torch.from_numpy(rows[:, 1:].astype(np.int64)))
                    if cuda:
                        pair = (pair[0].pin_memory(), pair[1].pin_memory())
                    while not stop.is_set():
                        try:
                            ready.put((pair, epoch), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as e:  # handed to the training loop, which raises it
                ready.put((e, -1))

        worker = threading.Thread(target=produce, name="nightlab-train-loader", daemon=True)
        worker.start()
        try:
            while True:
                item, epoch = ready.get()
                if isinstance(item, BaseException):
                    raise item
                inputs, targets = item
                if self.device != "cpu":
                    inputs = inputs.to(self.device, non_blocking=cuda)
                    targets = targets.to(self.device, non_blocking=cuda)
                yield inputs, targets, epoch
        finally:
            # Wait for the packer to stop (it checks every 0.1 s): a thread still inside torch while
            # the interpreter exits can abort the process after train.py has finished its work.
            stop.set()
            worker.join(timeout=10)
