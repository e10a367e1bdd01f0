"""The scorer's side of the model process: start it isolated, hand it the weights, ask it for logits.

``ModelProcess`` copies the allowed files into a fresh folder (with a ``data/manifest.json`` that
holds only the vocabulary size, the BOS id and the corpus hash), starts ``python -I -m
nightlab.lab.model_process`` there as the leader of a new session with an environment built
from scratch, and, under ``sandbox = "bwrap"``, in a root that holds only what Python needs
(the system folders, the interpreter, the installed packages, nightlab's code: all read-only),
the folder, a private ``/tmp``, no network and a PID namespace of its own. Then:

- the weights go over the pipe with the SHA-256 the runner took when training ended; the model
  process checks them before ``train.py`` is imported;
- each request is answered before the next is sent, within a time bound: ``startup_s`` for
  importing and building, then ``CALL_FLOOR_S`` plus ``CALL_FACTOR`` times what a warm-up call
  of the same size took, per call (a model that trains or searches while it answers runs out of
  time: ``InvalidModel``);
- what comes back is checked here (shape, size, finite and not huge: ``MAX_LOGIT``); the
  process's own checks only give an honest mistake a clear reason;
- ``close`` ends the process and every process it started; survivors are reported.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from nightlab.lab import model_process, reaper
from nightlab.lab.model_process import InvalidModel

CALL_FLOOR_S = 10.0  # every answer may take this long, plus CALL_FACTOR times a warm-up call's time per token
CALL_FACTOR = 5.0
STARTUP_S = 120.0  # importing train.py, building the model, loading the weights
STOP_GRACE_S = 10.0  # for the model process to end after "stop", before it is killed
EXIT_GRACE_S = 5.0  # for what it started to be gone after it; a process still there then survived it
MAX_LOGIT = 1e4  # |logit| above this is no language model's (and makes fp32 loss arithmetic inexact)
MAX_VOCAB_PADDING = 4096  # logits may have this many columns beyond the vocabulary (a padded head)
ENV_KEEP = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
            "CUDA_DEVICE_ORDER", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LD_LIBRARY_PATH")


class ModelProcessError(RuntimeError):
    """The model process failed (its traceback), or went away; the evaluation is an error."""


class ModelProcess:
    """One model process for one evaluation: started, ``start``-ed with the weights, asked, ``close``-d."""

    def __init__(self, train_py: Path, *, device: str, preset: str | None, manifest: dict[str, Any],
                 files: tuple[str, ...] = (), sandbox: str = "none", subreaper: bool = False) -> None:
        """Start the process (it imports torch while the scorer gets ready); ``start`` hands it the weights."""
        self.device, self.vocab_size, self.subreaper = device, int(manifest["vocab_size"]), subreaper
        self.folder = Path(tempfile.mkdtemp(prefix="nightlab-model-"))
        source = Path(train_py).resolve()
        for name in {source.name, *files}:
            if (source.parent / name).is_file():
                shutil.copyfile(source.parent / name, self.folder / name)
        (self.folder / "data").mkdir()
        (self.folder / "data" / "manifest.json").write_text(
            json.dumps({k: manifest[k] for k in model_process.MANIFEST_KEYS if k in manifest}))
        command = [sys.executable, "-I", "-B", "-m", "nightlab.lab.model_process", "--train-py", source.name,
                   "--device", device]
        prefix = os.environ.get("PYTHONPYCACHEPREFIX")
        if prefix:  # the lab's read-only bytecode cache (``-I`` ignores the variable itself)
            command[3:3] = ["-X", f"pycache_prefix={prefix}"]
        if sandbox == "bwrap":
            command = bwrap_model(command, self.folder, [Path(prefix)] if prefix else [])
        env = {k: v for k, v in os.environ.items() if k in ENV_KEEP}
        env.update(HOME=str(self.folder), TMPDIR="/tmp", NIGHTLAB_DATA=str(self.folder / "data"),
                   NIGHTLAB_DEVICE=device)
        if preset:
            env["NIGHTLAB_PRESET"] = preset
        self.preset = preset
        self.proc = subprocess.Popen(command, cwd=self.folder, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, start_new_session=True)
        self.tracker = reaper.Tracker(self.proc.pid)
        self.inp, self.out = self.proc.stdout.fileno(), self.proc.stdin.fileno()
        self.buffer = None  # CUDA: the logits buffer (a torch.Tensor) the model process writes into
        self.per_token_s: float | None = None  # a warm-up call's time per token
        self.seconds = 0.0  # time spent waiting for answers
        self.sender: threading.Thread | None = None  # sends the weights (send_weights), joined by start
        self.send_error: Exception | None = None
        self.start_deadline = 0.0

    def send_weights(self, weights: bytes, weights_sha256: str, startup_s: float = STARTUP_S) -> None:
        """Hand the model process the weights from a thread, which it takes as soon as its torch is
        imported, so that it builds the model while the scorer imports torch and plans; ``start`` waits."""
        header = {"sha256": weights_sha256, "device": self.device, "preset": self.preset,
                  "vocab_size": self.vocab_size}
        self.start_deadline = time.monotonic() + startup_s

        def send() -> None:
            try:
                self._send(header, weights, self.start_deadline)
            except (InvalidModel, ModelProcessError, OSError) as e:
                self.send_error = e

        self.sender = threading.Thread(target=send, name="nightlab-weights", daemon=True)
        self.sender.start()

    def start(self) -> None:
        """Wait until the model process has the weights and the model is built and loaded."""
        assert self.sender is not None, "send_weights() first"
        self.sender.join(max(0.0, self.start_deadline - time.monotonic()))
        if self.sender.is_alive():
            raise InvalidModel(f"the model process did not read its weights in time ({self._state()})")
        if self.send_error is not None:
            raise self.send_error
        reply, _ = self._receive(self.start_deadline, "start (import train.py, build_model(), load the weights)")
        self._raise_for(reply)

    # -- asking for logits ------------------------------------------------------------------------

    def warm_up(self, shape: tuple[int, int], startup_s: float = STARTUP_S) -> None:
        """One call of random tokens of ``shape``: kernels get built, and its time sets the bound of later calls."""
        started = time.monotonic()
        tokens = np.random.default_rng().integers(0, self.vocab_size, size=shape)
        self.logits(tokens, mode="score", limit_s=startup_s)
        self.per_token_s = (time.monotonic() - started) / (shape[0] * shape[1])

    def logits(self, tokens: np.ndarray, *, mode: str, limit_s: float | None = None) -> Any:
        """fp32 logits ``[B, T, V]`` (a torch.Tensor) for ``tokens`` ``[B, T]`` (``mode``: ``probe`` in
        fp32, ``score`` under the device's autocast); ``InvalidModel`` for a broken rule or a late answer."""
        import torch  # deferred: heavy, and the model process is started before the scorer imports it

        batch, length = tokens.shape
        if limit_s is None:
            rate = self.per_token_s if self.per_token_s is not None else STARTUP_S / (batch * length)
            limit_s = CALL_FLOOR_S + CALL_FACTOR * rate * batch * length
        started = time.monotonic()
        deadline = started + limit_s
        transport = "cuda" if self.device.startswith("cuda") else "pipe"
        what = f"answer windows of shape [{batch}, {length}] (bound: {limit_s:.1f} s)"
        self._send({"mode": mode, "shape": [batch, length], "transport": transport},
                   np.ascontiguousarray(tokens, dtype=np.int64).tobytes(), deadline)
        reply, payload = self._receive(deadline, what)
        if "need" in reply:  # CUDA: a buffer this size first
            most = batch * length * (self.vocab_size + MAX_VOCAB_PADDING)
            if not isinstance(reply["need"], int) or not 0 < reply["need"] <= most:
                raise InvalidModel(f"the model process asked for a logits buffer of {reply['need']} values; "
                                   f"windows of shape [{batch}, {length}] need at most {most}")
            self._share_buffer(reply["need"], deadline)
            reply, payload = self._receive(deadline, what)
        self._raise_for(reply)
        shape = reply.get("shape")
        if (not isinstance(shape, list) or len(shape) != 3 or shape[:2] != [batch, length]
                or not isinstance(shape[2], int) or not self.vocab_size <= shape[2] <= self.vocab_size + MAX_VOCAB_PADDING):
            raise InvalidModel(f"logits have shape {shape}; expected [{batch}, {length}, V] with "
                               f"vocab_size {self.vocab_size} <= V <= {self.vocab_size + MAX_VOCAB_PADDING}")
        numel = batch * length * shape[2]
        if transport == "cuda":
            out = self.buffer[:numel].view(shape)
        else:
            if len(payload) != 4 * numel:
                raise InvalidModel(f"the model process sent {len(payload)} bytes of logits for shape {shape}; "
                                   f"expected {4 * numel} (fp32)")
            out = torch.frombuffer(bytearray(payload), dtype=torch.float32).view(shape)
        self.seconds += time.monotonic() - started
        low, high = torch.aminmax(out)  # NaN comes out as NaN, and fails both comparisons
        if not (float(low) >= -MAX_LOGIT and float(high) <= MAX_LOGIT):
            raise InvalidModel(f"logits are not finite (NaN or inf) or larger than {MAX_LOGIT:g} in magnitude, "
                               f"for inputs of shape [{batch}, {length}]")
        return out

    def _share_buffer(self, numel: int, deadline: float) -> None:
        """Allocate the logits buffer on our device and send the model process its CUDA IPC handle."""
        import torch  # deferred: heavy (see logits)
        from torch.multiprocessing.reductions import reduce_tensor

        self.buffer = torch.empty(numel, dtype=torch.float32, device=self.device)
        _, args = reduce_tensor(self.buffer)
        fields = dict(zip(("device", "handle", "size_bytes", "offset_bytes", "requires_grad", "ref_counter_handle",
                           "ref_counter_offset", "event_handle", "event_sync_required"), args[6:]))
        handle = {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v
                  for k, v in fields.items() if k != "requires_grad"}
        self._send({"op": "buffer", "handle": {**handle, "numel": numel}}, b"", deadline)

    # -- the channel ------------------------------------------------------------------------------

    def _send(self, header: dict[str, Any], payload: bytes, deadline: float) -> None:
        view = memoryview(model_process.encode(header, payload))
        while view:
            if not select.select([], [self.out], [], max(0.0, deadline - time.monotonic()))[1]:
                raise InvalidModel(f"the model process did not read its input in time ({self._state()})")
            try:
                view = view[os.write(self.out, view[: 1 << 16]):]
            except BrokenPipeError as e:
                raise ModelProcessError(f"the model process exited ({self._state()})") from e

    def _receive(self, deadline: float, what: str) -> tuple[dict[str, Any], bytes]:
        size = struct.unpack(">I", self._read(4, deadline, what))[0]
        if size > model_process.MAX_HEADER_BYTES:
            raise InvalidModel(f"the model process sent a header of {size} bytes; the channel carries small headers")
        try:
            header = json.loads(self._read(size, deadline, what))
            nbytes = int(header.get("nbytes", 0))
        except (ValueError, AttributeError, TypeError) as e:
            raise InvalidModel(f"the model process sent a malformed header ({e})") from e
        return header, self._read(nbytes, deadline, what)

    def _read(self, n: int, deadline: float, what: str) -> bytes:
        chunks, left = [], n
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.inp], [], [], remaining)[0]:
                raise InvalidModel(f"the model process took too long to {what}")
            chunk = os.read(self.inp, min(left, 1 << 22))
            if not chunk:
                raise ModelProcessError(f"the model process exited before it could {what} ({self._state()})")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _raise_for(self, reply: dict[str, Any]) -> None:
        if "invalid" in reply:
            raise InvalidModel(str(reply["invalid"]))
        if "error" in reply:
            raise ModelProcessError(str(reply["error"]))

    def _state(self) -> str:
        code = self.proc.poll()
        return "still running" if code is None else f"exit code {code}"

    # -- the end ----------------------------------------------------------------------------------

    def close(self) -> list[str]:
        """End the model process and everything it started; describe the processes that were still
        running besides it (they are killed)."""
        try:
            self.tracker.poll()
            try:
                self._send({"op": "stop"}, b"", time.monotonic() + 1.0)
            except (InvalidModel, ModelProcessError, OSError):
                pass
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # the model process itself, not a survivor: what it started is judged below
            # On a busy machine what the process started (bubblewrap's inner process, compile workers)
            # may still be on its way out: only what is still there after EXIT_GRACE_S is a survivor.
            _gone, survivors = psutil.wait_procs(self.tracker.survivors(exclude=(self.proc.pid,)),
                                                 timeout=EXIT_GRACE_S)
            extra = [p for p in _children() if p.pid != self.proc.pid] if self.subreaper else []  # orphans we adopted
            described = reaper.kill(survivors + [p for p in extra if p.pid not in {s.pid for s in survivors}])
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            return described
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.buffer = None


def _children() -> list[psutil.Process]:
    """Our live children (in the scorer, a subreaper: the model process and the orphans it left)."""
    try:
        return [p for p in psutil.Process().children() if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []


SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc", "/opt")


def bwrap_model(command: list[str], folder: Path, extra: list[Path]) -> list[str]:
    """``command`` under bubblewrap in a root of only what Python needs, read-only: the system
    folders, the interpreter and its packages, nightlab's code (``extra`` too); ``folder`` read-only
    as the working folder; a private ``/tmp``; no network; its own PID namespace."""
    if shutil.which("bwrap") is None:
        raise ModelProcessError("lab.sandbox = \"bwrap\" but bubblewrap is not installed: apt-get install bubblewrap")
    roots = {Path(p) for p in SYSTEM_DIRS if Path(p).exists()}
    roots |= {Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).parent, *extra}
    roots |= {Path(p) for p in sys.path if p and Path(p).is_dir()}  # site-packages, an editable install's source
    roots |= {Path(model_process.__file__).resolve().parents[2]}  # the folder nightlab is imported from
    args = ["bwrap", "--dev-bind", "/dev", "/dev", "--proc", "/proc", "--ro-bind-try", "/sys", "/sys",
            "--tmpfs", "/tmp", "--unshare-pid", "--unshare-net", "--die-with-parent", "--new-session"]
    for path in sorted(roots, key=lambda p: len(p.parts)):
        if path == Path("/") or not path.exists():
            continue
        args += ["--ro-bind", str(path), str(path)]
    args += ["--ro-bind", str(folder), str(folder), "--chdir", str(folder)]
    return [*args, "--", *command]
