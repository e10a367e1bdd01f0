"""The model process: ``train.py``'s model answering windows of tokens with logits, and nothing else.

The trusted scorer (``nightlab.lab.evaluate``) starts this as ``python -I -m
nightlab.lab.model_process --train-py NAME`` in a fresh folder that holds only copies of the
allowed files and a ``data/manifest.json`` (vocabulary size, BOS id, corpus hash: what
``lab.connect()`` reads), with an environment built from scratch: no path to the dataset, the
store, the lab or ``.git`` reaches it. It talks to the scorer over its stdin and stdout only
(train.py's own prints go to stderr, the log):

1. the scorer sends the trained weights' bytes with the SHA-256 the runner took when training
   ended; this process checks them *before* ``train.py`` is imported, so code run at import
   cannot swap the weights it is judged with;
2. it imports ``train.py`` (its ``__main__`` block does not run), calls ``build_model()``, loads the
   weights, and says it is ready;
3. it answers one request at a time: input windows in, logits out. It sees the next windows only
   after it has answered the current ones, and never a target beyond its inputs.

Nothing here is trusted: ``train.py`` runs in this process and may rewrite any of it. The checks
below only make an honest mistake (wrong shape, a tuple, NaN) come back as a clear reason; the
scorer checks again what it receives, computes the loss itself, and bounds the time of every
answer. On CUDA the logits go into a buffer the scorer allocated and shared (CUDA IPC), so they
never cross the pipe; on the CPU they come through it.

Wire format, both ways: 4 bytes big-endian header length, a JSON header, then ``nbytes`` bytes.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import struct
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nightlab.lab import reaper

MAX_HEADER_BYTES = 1 << 20
MANIFEST_KEYS = ("vocab_size", "bos_id", "corpus_hash")  # what the model process may know of the dataset


class InvalidModel(Exception):
    """The model breaks a rule of the evaluation (leaks the future, bad shape, non-finite logits)."""


# ---------------------------------------------------------------------------------------------
# The wire format (blocking side; the scorer reads with deadlines, ``nightlab.lab.model_client``)


def encode(header: dict[str, Any], payload: bytes | memoryview = b"") -> bytes:
    data = json.dumps({**header, "nbytes": len(payload)}).encode()
    return struct.pack(">I", len(data)) + data + bytes(payload)


def send(fd: int, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
    view = memoryview(encode(header, payload))
    while view:
        view = view[os.write(fd, view):]


def receive(fd: int) -> tuple[dict[str, Any], bytes]:
    size = struct.unpack(">I", _read_exactly(fd, 4))[0]
    if size > MAX_HEADER_BYTES:
        raise ValueError(f"header of {size} bytes is larger than {MAX_HEADER_BYTES}")
    header = json.loads(_read_exactly(fd, size))
    return header, _read_exactly(fd, int(header.get("nbytes", 0)))


def _read_exactly(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 22))
        if not chunk:
            raise EOFError("the other side closed the channel")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------
# Loading train.py's model (also used in-process by tools that are not the judge: sampling)


def load_model(train_py: Path, weights: Path | bytes, device: str, *, data_dir: Path, preset: str | None) -> Any:
    """Import ``train_py`` (its ``__main__`` block does not run), build the model, load the weights
    (a path or the bytes of a saved state dict)."""
    import torch  # deferred: heavy

    if not train_py.is_file():
        raise FileNotFoundError(f"train.py not found: {train_py}")
    if isinstance(weights, Path) and not weights.is_file():
        raise FileNotFoundError(f"weights not found: {weights} (train.py saves them with lab.finish(model, summary))")
    env = {"NIGHTLAB_DATA": os.environ.get("NIGHTLAB_DATA") or str(data_dir), "NIGHTLAB_DEVICE": device}
    if preset:
        env["NIGHTLAB_PRESET"] = preset
    with train_py_context(train_py, env):
        module = import_train_py(train_py)
        build_model = getattr(module, "build_model", None)
        if not callable(build_model):
            raise AttributeError(f"{train_py} defines no build_model(); it must, at module level, for the evaluator")
        model = build_model()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{train_py}: build_model() returned {type(model).__name__}, not a torch.nn.Module")
    source = io.BytesIO(weights) if isinstance(weights, bytes) else weights
    state = torch.load(source, map_location=device, weights_only=True)
    model.load_state_dict(_match_compiled_keys(state, model.state_dict()))
    return model.to(device).eval()


@contextlib.contextmanager
def train_py_context(train_py: Path, env: dict[str, str]) -> Iterator[None]:
    """train.py's folder on sys.path and the lab variables set, restored afterwards."""
    folder = str(train_py.resolve().parent)
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def import_train_py(path: Path) -> Any:
    """Import a train.py as a module under a private name; its ``__main__`` block does not run."""
    name = f"_nightlab_evaluated_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up here
    spec.loader.exec_module(module)
    return module


def _match_compiled_keys(state: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    """Drop or add torch.compile's ``_orig_mod.`` prefix so a compiled and a plain model share weights."""
    prefix = "_orig_mod."
    saved_prefixed = all(k.startswith(prefix) for k in state)
    model_prefixed = all(k.startswith(prefix) for k in expected)
    if saved_prefixed and not model_prefixed:
        return {k[len(prefix):]: v for k, v in state.items()}
    if model_prefixed and not saved_prefixed:
        return {prefix + k: v for k, v in state.items()}
    return state


# ---------------------------------------------------------------------------------------------
# Logits


def autocast(device: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (how the template trains), nothing on the CPU."""
    import torch  # deferred: heavy

    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def logits_of(model: Any, idx: Any, vocab_size: int) -> Any:
    """``model(idx)`` as fp32 ``[B, T, V]`` logits; ``InvalidModel`` for a wrong type, shape or dtype."""
    import torch  # deferred: heavy

    out = model(idx)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise InvalidModel(f"model(idx) returned {type(out).__name__}; it must return logits (a tensor [B, T, V])")
    if type(out) is not torch.Tensor:
        raise InvalidModel(f"model(idx) returned a {type(out).__name__}, a subclass of torch.Tensor; "
                           "it must return a plain torch.Tensor of logits")
    batch, length = idx.shape
    if out.dim() != 3 or out.shape[0] != batch or out.shape[1] != length or out.shape[2] < vocab_size:
        raise InvalidModel(
            f"logits have shape {list(out.shape)}; expected [{batch}, {length}, V] with V >= vocab_size {vocab_size}"
        )
    if not out.is_floating_point():
        raise InvalidModel(f"logits have dtype {out.dtype}; they must be floating point (fp32, bf16 or fp16)")
    return out.to(torch.float32)


@contextlib.contextmanager
def in_fp32(model: Any) -> Iterator[None]:
    """The model's floating parameters and buffers in fp32 inside, as they were after.

    A model may keep some weights in bf16 (embedding tables, say) and rely on the autocast that
    scoring runs under; without autocast its bf16 activations would meet fp32 weights. Casting
    bf16 to fp32 and back is exact, so scoring sees the very weights the run saved.
    """
    import torch  # deferred: heavy

    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    dtypes = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.to(torch.float32)
    try:
        yield
    finally:
        for t, dtype in zip(tensors, dtypes):
            t.data = t.data.to(dtype)


# ---------------------------------------------------------------------------------------------
# The process


class _Server:
    """Answers the scorer's requests with ``model``'s logits."""

    def __init__(self, model: Any, device: str, vocab_size: int, channel_in: int, channel_out: int) -> None:
        self.model, self.device, self.vocab_size = model, device, vocab_size
        self.inp, self.out = channel_in, channel_out
        self.buffer = None  # the scorer's shared CUDA buffer, once it sent one

    def answer(self, request: dict[str, Any], payload: bytes) -> None:
        import torch  # deferred: heavy
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if request.get("op") == "buffer":
            self.buffer = _open_shared(request["handle"])
            return
        inputs = torch.frombuffer(bytearray(payload), dtype=torch.int64).view(request["shape"]).to(self.device)
        # PyTorch's prebuilt attention kernels: cuDNN builds its own for each new shape (seconds).
        kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        try:
            with torch.inference_mode(), sdpa_kernel(kernels):
                if request.get("mode") == "probe":  # fp32 throughout, so the probe's tolerance can be tight
                    with in_fp32(self.model):
                        logits = logits_of(self.model, inputs, self.vocab_size)
                else:
                    with autocast(self.device):
                        logits = logits_of(self.model, inputs, self.vocab_size)
        except InvalidModel as e:
            send(self.out, {"invalid": str(e)})
            return
        except Exception:  # noqa: BLE001 -- the scorer turns it into the evaluation's error
            send(self.out, {"error": traceback.format_exc()})
            return
        shape = list(logits.shape)
        if request.get("transport") == "cuda":
            if self.buffer is None or self.buffer.numel() < logits.numel():
                send(self.out, {"need": logits.numel(), "shape": shape})
                request, _ = receive_or_exit(self.inp)
                self.buffer = _open_shared(request["handle"])
            self.buffer[: logits.numel()].view(shape).copy_(logits.detach())
            torch.cuda.synchronize()
            send(self.out, {"shape": shape})
        else:
            send(self.out, {"shape": shape}, memoryview(logits.detach().contiguous().cpu().numpy()).cast("B"))


def _open_shared(handle: dict[str, Any]) -> Any:
    """The scorer's CUDA buffer, opened through its IPC handle (the fields of torch's own reduction)."""
    import torch  # deferred: heavy
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    raw = {k: base64.b64decode(v) if k in ("handle", "ref_counter_handle", "event_handle") and v is not None else v
           for k, v in handle.items()}
    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size([raw["numel"]]), (1,), 0, torch.storage.TypedStorage, torch.float32,
        raw["device"], raw["handle"], raw["size_bytes"], raw["offset_bytes"], False,
        raw["ref_counter_handle"], raw["ref_counter_offset"], raw["event_handle"], raw["event_sync_required"],
    )


def receive_or_exit(fd: int) -> tuple[dict[str, Any], bytes]:
    try:
        return receive(fd)
    except EOFError:
        os._exit(0)  # the scorer is gone: nothing to answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -I -m nightlab.lab.model_process",
                                     description="train.py's model, answering windows with logits (the scorer starts this)")
    parser.add_argument("--train-py", required=True, help="the train.py in this folder")
    parser.add_argument("--device", default="cpu", help="where the model runs (torch starts there while the scorer reads)")
    args = parser.parse_args(argv)
    reaper.die_with_parent()  # a scorer that dies takes this process with it (if train.py undoes that, the
    # runner's supervisor ends it and voids the trial)
    import torch  # deferred: heavy; imported now, before the weights arrive, so it overlaps the scorer's start

    if args.device.startswith("cuda"):
        torch.cuda.init()
    # The channel is the stdin and stdout we were given; train.py's prints go to stderr (the log).
    channel_in, channel_out = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    hello, weights = receive_or_exit(channel_in)
    digest = hashlib.sha256(weights).hexdigest()
    if digest != hello["sha256"]:
        send(channel_out, {"invalid": f"the weights changed after training ended (sha256 {digest[:12]}..., "
                                      f"the runner took {hello['sha256'][:12]}...)"})
        return 0
    device, vocab_size = hello["device"], int(hello["vocab_size"])
    try:
        model = load_model(Path.cwd() / args.train_py, weights, device, data_dir=Path.cwd() / "data",
                           preset=hello.get("preset"))
    except Exception:  # noqa: BLE001 -- the scorer turns it into the evaluation's error
        send(channel_out, {"error": traceback.format_exc()})
        return 0
    del weights
    server = _Server(model, device, vocab_size, channel_in, channel_out)
    send(channel_out, {"ready": True})
    while True:
        request, payload = receive_or_exit(channel_in)
        if request.get("op") == "stop":
            return 0
        server.answer(request, payload)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
