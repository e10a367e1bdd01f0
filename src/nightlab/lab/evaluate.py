"""The trusted evaluator: validation bits per byte of a trained ``train.py``, in its own process.

``python -m nightlab.lab.evaluate --train-py PATH --weights model.pt --data DIR --out eval.json``
imports ``train.py`` without running its ``__main__`` block, calls ``build_model()``, loads the
saved state dict, and scores the whole pinned validation split once, in a fixed order, at a fixed
sequence length. The model only supplies logits; the evaluator computes the cross-entropy itself
with references to torch functions taken when this module was imported, before ``train.py`` was,
so a ``train.py`` that patches ``torch`` (a fused or smoothed ``cross_entropy``, say) cannot change
its own score; the windows, targets and byte counts are all fixed before ``train.py`` is imported.
The command line also checks, after scoring, that every global of this module, and every builtin
and ``math`` function, is still the one it was before train.py was imported (a train.py that
replaces ``score``, ``check_causality`` or a captured torch function makes the run ``invalid``),
and it ends with ``os._exit`` right after writing eval.json, so exit handlers and threads
train.py registered never run after the verdict. With ``--token-stdin`` it reads a token from
stdin before train.py is imported and writes it into eval.json: the runner accepts only an
eval.json carrying the token it sent, so a train.py that writes eval.json itself and exits is
caught. This is not a sandbox: code that sets out to subvert the process in subtler ways (reading
the evaluator's frames, say) is for the reviewer role, the allowed-files check and
``lab.sandbox`` to limit (``bench/RELIABILITY.md`` lists what is open).

Before scoring, a causality probe changes the tokens after a position t (the first, the last but
one, and random ones between, new every run) and checks that the log-probabilities at positions
<= t stay put, and that a window's log-probabilities do not depend on the other windows of its
batch. After scoring, a few scoring batches, drawn at random then, are run again with the tokens
after a random position of each row replaced by other val text, under the same autocast and
shapes as scoring: the nats of the original targets up to that position must be those the
scoring pass recorded. A model cannot tell those calls from scoring calls, so one that leaks only while it is
scored (after its first calls, say, or only under autocast) is caught too. A model that fails, or
whose logits have the wrong shape, are not a plain tensor or are not finite, is ``invalid``.

The val stream is cut into windows of ``seq_len + 1`` tokens with stride ``seq_len``, so every
target is predicted exactly once; the last, shorter window counts too. Targets whose token has no
bytes (BOS and other special tokens) are not scored:

    val_bpb = sum of nats over scored targets / (ln 2 * sum of their UTF-8 bytes)

Attention through ``scaled_dot_product_attention`` runs on PyTorch's prebuilt kernels (flash,
memory-efficient, math), not cuDNN's: cuDNN builds its kernels for each new shape when first
called, which cost about 2 s of a 3 s evaluation on an H100 (``bench/RESULTS.md``).

Exit codes: 0 ok, 3 invalid, 1 error (the traceback is in ``reason`` and on stderr).
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import importlib.util
import json
import math
import os
import secrets
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from nightlab.lab.session import resolve_device

# Taken now, before any train.py runs in this process: the loss is computed only through these.
_log_softmax = torch.log_softmax
_logsumexp = torch.logsumexp
_gather = torch.gather
_unsqueeze = torch.unsqueeze
_squeeze = torch.squeeze
_neg = torch.neg
_sub = torch.sub
_abs = torch.abs
_gt = torch.gt
_mul = torch.mul
_add = torch.add
_any = torch.any
_all = torch.all
_nonzero = torch.nonzero
_where = torch.where
_sum = torch.sum
_isfinite = torch.isfinite
_tensor_to = torch.Tensor.to
_is_floating_point = torch.Tensor.is_floating_point
_tensor_item = torch.Tensor.item
_autocast_cls = torch.autocast
_inference_mode = torch.inference_mode
_sdpa_kernel = sdpa_kernel
_Tensor = torch.Tensor
LN2 = math.log(2)
PREBUILT_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

EXIT_OK, EXIT_ERROR, EXIT_INVALID = 0, 1, 3
DEFAULT_SEQ_LEN = 2048
PROBE_WINDOWS = 2  # random val windows the causality probe checks
PROBE_CUTS = 3  # random positions t per window, besides the first and the last but one
PROBE_TOLERANCE = 1e-3  # |Δ log-prob| allowed: this much absolute plus this much relative (fp32)
VERIFY_BATCHES = 2  # scoring batches run again after scoring, their rows' futures replaced
VERIFY_TOLERANCE = 1e-2  # |Δ nats| allowed there: absolute plus relative (same kernels and shapes)
LOGITS_BUDGET_BYTES = {"cpu": 16 << 20, "cuda": 4 << 30}  # fp32 logits per batch, for the default batch size
# (on the CPU, tensors of 32 MB or more are fresh mmaps that fault in page by page on every batch: keep them small)


class InvalidModel(Exception):
    """The model breaks a rule of the evaluation (leaks the future, bad shape, non-finite logits)."""


@dataclass(frozen=True)
class ValSplit:
    """The pinned validation split, read before any train.py code runs."""

    tokens: np.ndarray  # int64[N]: the val stream (documents, each preceded by BOS)
    token_bytes: np.ndarray  # int64[vocab]: UTF-8 bytes of each token, 0 for special tokens
    vocab_size: int
    corpus_hash: str


def read_val_split(data_dir: Path) -> ValSplit:
    """Read ``val.tokens.npy``, ``token_bytes.npy`` and ``manifest.json`` of a prepared dataset."""
    data_dir = Path(data_dir)
    missing = [n for n in ("manifest.json", "val.tokens.npy", "token_bytes.npy") if not (data_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{data_dir} is not a prepared dataset (missing {', '.join(missing)}); run `nightlab prepare` first"
        )
    manifest = json.loads((data_dir / "manifest.json").read_text())
    tokens = np.load(data_dir / "val.tokens.npy").astype(np.int64)
    token_bytes = np.load(data_dir / "token_bytes.npy").astype(np.int64)
    vocab_size = int(manifest.get("vocab_size", len(token_bytes)))
    if len(token_bytes) != vocab_size:
        raise ValueError(f"{data_dir}: token_bytes.npy has {len(token_bytes)} entries, manifest vocab_size is {vocab_size}")
    if len(tokens) < 2:
        raise ValueError(f"{data_dir}: val.tokens.npy holds {len(tokens)} tokens; at least 2 are needed to score one")
    if tokens.max() >= vocab_size:
        raise ValueError(f"{data_dir}: val.tokens.npy holds token id {tokens.max()} >= vocab_size {vocab_size}")
    return ValSplit(tokens, token_bytes, vocab_size, str(manifest.get("corpus_hash", "")))


def evaluate(
    train_py: Path,
    weights: Path,
    data_dir: Path,
    *,
    device: str = "cpu",
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int | None = None,
    max_tokens: int = 0,
    preset: str | None = None,
) -> dict[str, Any]:
    """Score ``train.py``'s model with ``weights`` on the val split; never raises, returns eval.json's dict.

    ``max_tokens`` > 0 scores only the first that many targets (quick CPU labs); ``preset`` is
    handed to ``build_model()`` as ``NIGHTLAB_PRESET``.
    """
    start = time.perf_counter()
    device = resolve_device(device)
    result: dict[str, Any] = {
        "status": "error",
        "val_bpb": None,
        "val_loss_nats": None,
        "tokens": 0,
        "bytes": 0,
        "seq_len": seq_len,
        "max_tokens": max_tokens,
        "causal": False,
        "reason": "",
        "eval_s": 0.0,
        "corpus_hash": "",
        "device": device,
        "probe_seed": secrets.randbits(63),  # new every run, recorded so an invalid verdict can be replayed
    }
    try:
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        val = read_val_split(Path(data_dir))
        result["corpus_hash"] = val.corpus_hash
        # Everything that decides what is scored is fixed before train.py's code runs.
        rng = np.random.default_rng(result["probe_seed"])
        probes = plan_probes(val, seq_len, rng)
        plan = plan_scoring(val, seq_len, batch_size or default_batch_size(device, seq_len, val.vocab_size), max_tokens)
        model = load_model(Path(train_py), Path(weights), device, data_dir=Path(data_dir), preset=preset)
        with _inference_mode(), _sdpa_kernel(PREBUILT_ATTENTION):
            check_causality(model, probes, val.vocab_size, device)
            scored = score(model, plan, val.vocab_size, device)
            verify_scoring(model, plan, scored, val, device, rng)
            result["causal"] = True
        nats = sum(float(_tensor_item(_sum(_where(b.scored, n, 0.0)))) for b, n in zip(plan.batches, scored))
        result.update(
            status="ok",
            val_bpb=nats / (LN2 * plan.bytes),
            val_loss_nats=nats / plan.tokens,
            tokens=plan.tokens,
            bytes=plan.bytes,
        )
    except InvalidModel as e:
        result.update(status="invalid", reason=str(e))
    except Exception:
        result.update(status="error", reason=traceback.format_exc())
    result["eval_s"] = round(time.perf_counter() - start, 3)
    return result


# ---------------------------------------------------------------------------------------------
# Loading train.py's model


def load_model(train_py: Path, weights: Path, device: str, *, data_dir: Path, preset: str | None) -> torch.nn.Module:
    """Import ``train_py`` (its ``__main__`` block does not run), build the model, load the weights."""
    if not train_py.is_file():
        raise FileNotFoundError(f"train.py not found: {train_py}")
    if not weights.is_file():
        raise FileNotFoundError(f"weights not found: {weights} (train.py saves them with lab.finish(model, summary))")
    # The runner hands train.py a view of the dataset without the validation split; so does build_model().
    env = {"NIGHTLAB_DATA": os.environ.get("NIGHTLAB_DATA") or str(data_dir), "NIGHTLAB_DEVICE": device}
    if preset:
        env["NIGHTLAB_PRESET"] = preset
    with _train_py_context(train_py, env):
        module = import_train_py(train_py)
        build_model = getattr(module, "build_model", None)
        if not callable(build_model):
            raise AttributeError(f"{train_py} defines no build_model(); it must, at module level, for the evaluator")
        model = build_model()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{train_py}: build_model() returned {type(model).__name__}, not a torch.nn.Module")
    state = torch.load(weights, map_location=device, weights_only=True)
    model.load_state_dict(_match_compiled_keys(state, model.state_dict()))
    return model.to(device).eval()


@contextlib.contextmanager
def _train_py_context(train_py: Path, env: dict[str, str]) -> Iterator[None]:
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
        return {k[len(prefix) :]: v for k, v in state.items()}
    if model_prefixed and not saved_prefixed:
        return {prefix + k: v for k, v in state.items()}
    return state


# ---------------------------------------------------------------------------------------------
# Logits and the loss, through the captured functions only


def _autocast(device: str) -> contextlib.AbstractContextManager:
    if device.startswith("cuda"):
        return _autocast_cls("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def logits_of(model: torch.nn.Module, idx: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``model(idx)`` as fp32 ``[B, T, V]`` logits; ``InvalidModel`` for a wrong shape or non-finite values."""
    out = model(idx)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, _Tensor):
        raise InvalidModel(f"model(idx) returned {type(out).__name__}; it must return logits (a tensor [B, T, V])")
    if type(out) is not _Tensor:  # a subclass could answer the loss's torch calls itself
        raise InvalidModel(f"model(idx) returned a {type(out).__name__}, a subclass of torch.Tensor; "
                           "it must return a plain torch.Tensor of logits")
    batch, length = idx.shape
    if out.dim() != 3 or out.shape[0] != batch or out.shape[1] != length or out.shape[2] < vocab_size:
        raise InvalidModel(
            f"logits have shape {list(out.shape)}; expected [{batch}, {length}, V] with V >= vocab_size {vocab_size}"
        )
    out = _tensor_to(out, torch.float32)
    if not _tensor_item(_all(_isfinite(out))):
        raise InvalidModel(f"logits are not finite (NaN or inf) for inputs of shape {list(idx.shape)}")
    return out


def target_nats(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target, fp32 ``[B, T]``."""
    picked = _squeeze(_gather(logits, -1, _unsqueeze(targets, -1)), -1)
    return _sub(_logsumexp(logits, -1), picked)  # -log_softmax at the target, without a [B, T, V] temporary


# ---------------------------------------------------------------------------------------------
# Causality probe


@dataclass(frozen=True)
class Probe:
    """One val window, alone, and in a batch with copies whose tokens after ``cuts[i]`` differ."""

    window: torch.Tensor  # int64[1, T]
    batch: torch.Tensor  # int64[2 + len(cuts), T]: the window, a wholly different row, the changed copies
    cuts: tuple[int, ...]


def plan_probes(val: ValSplit, seq_len: int, rng: np.random.Generator) -> list[Probe]:
    """A few random val windows, each with copies changed after the first, the last but one and
    ``PROBE_CUTS`` random positions t between."""
    length = min(seq_len, len(val.tokens) - 1)
    probes = []
    for _ in range(PROBE_WINDOWS):
        middle = rng.integers(1, length - 2, size=PROBE_CUTS) if length > 3 else []
        cuts = tuple(sorted({t for t in (0, length - 2, *map(int, middle)) if 0 <= t <= length - 2}))
        begin = int(rng.integers(0, len(val.tokens) - length + 1))
        window = val.tokens[begin : begin + length]
        variants = [window]
        for t in (-1, *cuts):  # t = -1: a batch-mate that differs everywhere
            changed = window.copy()
            shift = rng.integers(1, val.vocab_size, size=length - t - 1)
            changed[t + 1 :] = (changed[t + 1 :] + shift) % val.vocab_size  # every later token differs
            variants.append(changed)
        probes.append(Probe(torch.tensor(window[None]), torch.tensor(np.stack(variants)), cuts))
    return probes


def check_causality(model: torch.nn.Module, probes: list[Probe], vocab_size: int, device: str) -> None:
    """Raise ``InvalidModel`` if the past's log-probabilities depend on the future or on batch-mates.

    Runs in fp32 (no autocast, every floating parameter and buffer in fp32 meanwhile), so the
    tolerance can be tight. Positions <= t of each changed copy, and every position of the
    unchanged window in the batch, must match the lone forward.
    """
    with _in_fp32(model):
        for probe in probes:
            _probe(model, probe, vocab_size, device)


@contextlib.contextmanager
def _in_fp32(model: torch.nn.Module) -> Iterator[None]:
    """The model's floating parameters and buffers in fp32 inside, as they were after.

    A model may keep some weights in bf16 (embedding tables, say) and rely on the autocast that
    scoring runs under; without autocast its bf16 activations would meet fp32 weights. Casting
    bf16 to fp32 and back is exact, so scoring sees the very weights the run saved.
    """
    tensors = [t for t in (*model.parameters(), *model.buffers()) if _is_floating_point(t)]
    dtypes = [t.dtype for t in tensors]
    for t in tensors:
        t.data = _tensor_to(t.data, torch.float32)
    try:
        yield
    finally:
        for t, dtype in zip(tensors, dtypes):
            t.data = _tensor_to(t.data, dtype)


def _probe(model: torch.nn.Module, probe: Probe, vocab_size: int, device: str) -> None:
    length = probe.window.shape[1]
    alone = _log_softmax(logits_of(model, _tensor_to(probe.window, device), vocab_size), -1)[0]
    together = _log_softmax(logits_of(model, _tensor_to(probe.batch, device), vocab_size), -1)
    pos = _first_mismatch(alone, together[0])
    if pos is not None:
        raise InvalidModel(
            f"batch leak: log-probabilities at position {pos} of a window changed when the other windows "
            "of its batch changed; each sequence must be scored on its own tokens only"
        )
    for t, row in zip(probe.cuts, together[2:]):
        pos = _first_mismatch(alone[: t + 1], row[: t + 1])
        if pos is not None:
            raise InvalidModel(
                f"causality leak: log-probabilities at position {pos} changed when only the tokens after "
                f"position {t} changed (window of {length} tokens); position p may only see tokens 0..p"
            )


def _first_mismatch(a: torch.Tensor, b: torch.Tensor, tolerance: float = PROBE_TOLERANCE) -> int | None:
    """First position (row of ``[T, V]``) where a and b differ beyond ``tolerance`` (absolute plus relative)."""
    allowed = _add(_mul(_abs(a), tolerance), tolerance)
    bad_rows = _any(_gt(_abs(_sub(a, b)), allowed), -1)
    rows = _nonzero(bad_rows)
    return int(_tensor_item(rows[0, 0])) if len(rows) else None


# ---------------------------------------------------------------------------------------------
# Scoring the whole split


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor  # int32[B, T] (int64 on the device)
    targets: torch.Tensor  # int32[B, T]
    scored: torch.Tensor  # bool[B, T]: the target has bytes (not BOS or another special token)


@dataclass(frozen=True)
class ScoringPlan:
    batches: list[Batch]
    tokens: int  # scored targets
    bytes: int  # their UTF-8 bytes


def windows(n_targets: int, seq_len: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each window: inputs ``tokens[start:start+length]``, targets shifted by one."""
    return [(s, min(seq_len, n_targets - s)) for s in range(0, n_targets, seq_len)]


def default_batch_size(device: str, seq_len: int, vocab_size: int) -> int:
    budget = LOGITS_BUDGET_BYTES["cuda" if device.startswith("cuda") else "cpu"]
    return max(1, budget // (4 * seq_len * vocab_size))


def plan_scoring(val: ValSplit, seq_len: int, batch_size: int, max_tokens: int) -> ScoringPlan:
    """The batches that score the (first ``max_tokens``) val targets, each exactly once."""
    n_targets = len(val.tokens) - 1
    if max_tokens > 0:
        n_targets = min(n_targets, max_tokens)
    target_bytes = val.token_bytes[val.tokens[1 : n_targets + 1]]
    scored = target_bytes > 0
    if not scored.any():
        raise ValueError("the val split has no scorable targets (every target is a special token)")
    batches = []
    for group in _groups(windows(n_targets, seq_len), batch_size):
        length = group[0][1]
        batches.append(
            Batch(
                inputs=torch.tensor(np.stack([val.tokens[s : s + length] for s, _ in group]), dtype=torch.int32),
                targets=torch.tensor(np.stack([val.tokens[s + 1 : s + 1 + length] for s, _ in group]), dtype=torch.int32),
                scored=torch.tensor(np.stack([scored[s : s + length] for s, _ in group])),
            )
        )
    return ScoringPlan(batches, tokens=int(scored.sum()), bytes=int(target_bytes.sum()))


def _groups(spans: list[tuple[int, int]], batch_size: int) -> Iterator[list[tuple[int, int]]]:
    """Groups of at most ``batch_size`` windows of equal length (the short last window goes alone)."""
    group: list[tuple[int, int]] = []
    for span in spans:
        if group and (len(group) == batch_size or span[1] != group[0][1]):
            yield group
            group = []
        group.append(span)
    if group:
        yield group


def score(model: torch.nn.Module, plan: ScoringPlan, vocab_size: int, device: str) -> list[torch.Tensor]:
    """The nats of every target of each of the plan's batches, float64 ``[B, T]`` on the CPU (bf16
    autocast on CUDA, fp32 on CPU); the plan's ``scored`` mask says which count."""
    return [_batch_nats(model, batch.inputs, batch.targets, vocab_size, device) for batch in plan.batches]


def _batch_nats(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                device: str) -> torch.Tensor:
    with _autocast(device):
        logits = logits_of(model, _tensor_to(inputs, device, torch.int64), vocab_size)
    nats = target_nats(logits, _tensor_to(targets, device, torch.int64))
    return _tensor_to(nats, "cpu", torch.float64)


def verify_scoring(model: torch.nn.Module, plan: ScoringPlan, scored: list[torch.Tensor], val: ValSplit,
                   device: str, rng: np.random.Generator) -> None:
    """Raise ``InvalidModel`` if a scoring batch's nats depended on tokens after their targets.

    ``VERIFY_BATCHES`` batches, drawn now, run again as they were scored but with the tokens after
    a random position t of each row replaced by val text from elsewhere. The nats of the original
    targets at positions <= t (whose inputs did not change) must be those the scoring pass gave.
    """
    for i in rng.choice(len(plan.batches), size=min(VERIFY_BATCHES, len(plan.batches)), replace=False):
        batch = plan.batches[int(i)]
        rows, length = batch.inputs.shape
        if length < 2:
            continue
        inputs = batch.inputs.clone()
        cuts = [int(t) for t in rng.integers(0, length - 1, size=rows)]
        for row, t in enumerate(cuts):
            n = length - t - 1
            begin = int(rng.integers(0, len(val.tokens) - n + 1))
            inputs[row, t + 1 :] = torch.from_numpy(val.tokens[begin : begin + n].astype(np.int32))
        again = _batch_nats(model, inputs, batch.targets, val.vocab_size, device)
        for row, t in enumerate(cuts):
            pos = _first_mismatch(_unsqueeze(scored[int(i)][row, : t + 1], -1), _unsqueeze(again[row, : t + 1], -1),
                                  VERIFY_TOLERANCE)
            if pos is not None:
                raise InvalidModel(
                    f"scoring leak: the loss at position {pos} of a scored window changed "
                    f"when only the tokens after position {t} changed; position p may only see tokens 0..p"
                )


# ---------------------------------------------------------------------------------------------
# Command line


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def exit_code(status: str) -> int:
    return {"ok": EXIT_OK, "invalid": EXIT_INVALID}.get(status, EXIT_ERROR)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nightlab.lab.evaluate",
        description="Trusted evaluation: val bits per byte of train.py's model, with a causality probe.",
    )
    p.add_argument("--train-py", type=Path, required=True, help="the train.py that defines build_model()")
    p.add_argument("--weights", type=Path, required=True, help="the saved state dict (model.pt)")
    p.add_argument("--data", type=Path, required=True, help="the prepared dataset dir")
    p.add_argument("--out", type=Path, required=True, help="where to write eval.json")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default: cpu)")
    p.add_argument("--preset", default=None, help="NIGHTLAB_PRESET for build_model(): cpu | gpu")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help=f"tokens per window (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward (default: by logits memory)")
    p.add_argument("--max-tokens", type=int, default=0, help="score only the first N targets (0 = all)")
    p.add_argument("--token-stdin", action="store_true",
                   help="read a line from stdin before train.py is imported and write it into eval.json as 'token'")
    return p


def snapshot() -> dict[str, tuple[Any, Any]]:
    """What scoring relies on, by identity, taken before train.py is imported: this module's globals
    (the captured torch functions among them), the builtins and ``math``; functions with their code."""
    spaces = (("", globals()), ("builtins.", vars(builtins)), ("math.", vars(math)))
    return {prefix + name: (obj, getattr(obj, "__code__", None))
            for prefix, space in spaces for name, obj in list(space.items())}


def changed_since(before: dict[str, tuple[Any, Any]]) -> list[str]:
    """The names of ``before`` now bound to another object, or whose function has other code."""
    now = snapshot()
    return sorted(name for name, (obj, code) in before.items()
                  if name not in now or now[name][0] is not obj or getattr(obj, "__code__", None) is not code)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    token = sys.stdin.readline().strip() if args.token_stdin else None
    own = snapshot()
    result = evaluate(
        args.train_py,
        args.weights,
        args.data,
        device=args.device,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        preset=args.preset,
    )
    replaced = own["changed_since"][0](own)
    if replaced:
        result.update(status="invalid", val_bpb=None, val_loss_nats=None,
                      reason=f"train.py replaced what the evaluator relies on ({', '.join(replaced)})")
    if token is not None:
        result["token"] = token
    own["write_json_atomic"][0](args.out, result)
    if result["status"] == "ok":
        print(f"val_bpb: {result['val_bpb']:.6f}")
        print(f"val_loss_nats: {result['val_loss_nats']:.6f}")
        print(f"tokens: {result['tokens']}")
        print(f"eval_s: {result['eval_s']:.1f}")
    else:
        print(f"status: {result['status']}", file=sys.stderr)
        print(result["reason"], file=sys.stderr)
    return exit_code(result["status"])


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no exit handler or thread of the imported train.py runs after the verdict
