"""The trusted evaluator: validation bits per byte of a trained ``train.py``; agent code never runs here.

``python -I -m nightlab.lab.evaluate --train-py PATH --weights model.pt --weights-sha256 HEX
--data DIR --out eval.json`` is the scorer: nightlab's code only. It reads the pinned validation
split of ``DIR`` (``val.tokens.npy``, ``token_bytes.npy``, ``manifest.json``), plans every window
it will score and every check before the model exists, and starts a separate *model process*
(``nightlab.lab.model_process``, through ``nightlab.lab.model_client``) in a fresh folder holding
only a copy of the allowed files, which imports ``train.py``, builds the model, loads the
weights (checked against the SHA-256 the runner took when training ended) and answers input
windows with logits, one request at a time. The scorer holds the targets, computes the
cross-entropy itself, probes causality, and writes the verdict; nothing ``train.py`` does at
import or in ``forward`` runs in this process, so it cannot change how the score is computed.

Causality, twice:

- a probe first (fp32): a few random val windows, alone and with copies whose tokens after a
  position t (the first, the last but one, random ones between) differ; log-probabilities at
  positions <= t must not change, nor depend on the other windows of a batch;
- then the scoring pass is verified: a random share of the windows (``check_share``, at least
  ``MIN_CHECKS``; 1.0 = every window) is sent twice, as it is (its nats are the score) and with
  the tokens after a random position t replaced by val text from elsewhere (a check), the two in
  random order and mixed into the same batches as the other windows, so no call, shape or batch
  tells a check, or a checked window, from any other. The nats of the original targets at
  positions <= t must agree; a model that leaks in a checked window is ``invalid``. A model that
  leaks in a share f of its rows escapes with probability about (1 - f) ** (2 * checks): for a
  leak in one batch in eight, below 1e-7 at the 64-check minimum. The checks add ``check_share``
  to the scoring pass's forward calls.

A model that fails is ``error``; one whose logits have the wrong shape, dtype or vocabulary, are
not finite or are huge, that answers too slowly, or that leaves processes behind, is ``invalid``.

The val stream is cut into windows of ``seq_len + 1`` tokens with stride ``seq_len``, so every
target is predicted exactly once; the last, shorter window counts too. Targets whose token has no
bytes (BOS and other special tokens) are not scored:

    val_bpb = sum of nats over scored targets / (ln 2 * sum of their UTF-8 bytes)

Exit codes: 0 ok, 3 invalid, 1 error (the traceback is in ``reason`` and on stderr).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import secrets
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nightlab.config import LabConfig
from nightlab.lab import reaper
from nightlab.lab.model_client import ModelProcess, ModelProcessError
from nightlab.lab.model_process import (
    InvalidModel,
    import_train_py,
    load_model,
    logits_of,
)
from nightlab.lab.model_process import autocast as _autocast
from nightlab.lab.session import resolve_device

if TYPE_CHECKING:
    import torch

__all__ = [
    "InvalidModel",
    "ValSplit",
    "_autocast",
    "evaluate",
    "import_train_py",
    "load_model",
    "logits_of",
    "read_val_split",
    "target_nats",
    "windows",
]

LN2 = math.log(2)
EXIT_OK, EXIT_ERROR, EXIT_INVALID = 0, 1, 3
DEFAULT_SEQ_LEN = 2048
PROBE_WINDOWS = 2  # random val windows the causality probe checks
PROBE_CUTS = 3  # random positions t per window, besides the first and the last but one
PROBE_TOLERANCE = 1e-3  # |Δ log-prob| allowed: this much absolute plus this much relative (fp32)
CHECK_SHARE = LabConfig.eval_check_share  # windows of the scoring pass sent again as a check
MIN_CHECKS = 64  # ... and at least this many (or every window, if there are fewer)
VERIFY_TOLERANCE = 1e-2  # |Δ nats| allowed between a window and its check (same kernels and shapes)
LOGITS_BUDGET_BYTES = {"cpu": 16 << 20, "cuda": 4 << 30}  # fp32 logits per batch, for the default batch size
# (on the CPU, tensors of 32 MB or more are fresh mmaps that fault in page by page on every batch: keep them small)


@dataclass(frozen=True)
class ValSplit:
    """The pinned validation split."""

    tokens: np.ndarray  # int64[N]: the val stream (documents, each preceded by BOS)
    token_bytes: np.ndarray  # int64[vocab]: UTF-8 bytes of each token, 0 for special tokens
    vocab_size: int
    corpus_hash: str
    manifest: dict[str, Any]


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
    return ValSplit(tokens, token_bytes, vocab_size, str(manifest.get("corpus_hash", "")),
                    {**manifest, "vocab_size": vocab_size})


def evaluate(
    train_py: Path,
    weights: Path,
    data_dir: Path,
    *,
    device: str = "cpu",
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int | None = None,
    max_tokens: int = 0,
    check_share: float = CHECK_SHARE,
    preset: str | None = None,
    weights_sha256: str | None = None,
    files: tuple[str, ...] = (),
    sandbox: str = "none",
    subreaper: bool = False,
) -> dict[str, Any]:
    """Score ``train.py``'s model with ``weights`` on the val split; never raises, returns eval.json's dict.

    ``max_tokens`` > 0 scores only the first that many targets (quick CPU labs); ``check_share``
    of the windows (at least ``MIN_CHECKS``) are checked for a leak of later tokens; ``preset`` is
    handed to ``build_model()`` as ``NIGHTLAB_PRESET``; ``weights_sha256`` is the hash the runner
    took when training ended (the weights are refused if they changed since); ``files`` are
    other allowed files beside ``train_py`` that the model process gets a copy of; ``sandbox`` =
    ``bwrap`` runs the model process under bubblewrap.
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
        "windows": 0,
        "checked_windows": 0,
        "reason": "",
        "eval_s": 0.0,
        "corpus_hash": "",
        "device": device,
        "probe_seed": secrets.randbits(63),  # new every run, recorded so an invalid verdict can be replayed
    }
    model: ModelProcess | None = None
    stages: dict[str, float] = {}
    try:
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        if not 0 < check_share <= 1:
            raise ValueError(f"check_share must be above 0 and at most 1, got {check_share}")
        val = read_val_split(Path(data_dir))
        result["corpus_hash"] = val.corpus_hash
        if not Path(train_py).is_file():
            raise FileNotFoundError(f"train.py not found: {train_py}")
        if not Path(weights).is_file():
            raise FileNotFoundError(f"weights not found: {weights} (train.py saves them with lab.finish(model, summary))")
        # Started first: it imports torch and starts its device while this process does the same and plans.
        model = ModelProcess(Path(train_py), device=device, preset=preset, manifest=val.manifest, files=files,
                             sandbox=sandbox, subreaper=subreaper)
        data = Path(weights).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if weights_sha256 and digest != weights_sha256:
            raise InvalidModel(f"the weights changed after training ended (sha256 {digest[:12]}..., the runner took "
                               f"{weights_sha256[:12]}...)")
        model.send_weights(data, digest)  # it builds the model while this process imports torch and plans
        del data
        import torch  # deferred: heavy; imported while the model process starts

        if device.startswith("cuda"):
            torch.cuda.init()
        rng = np.random.default_rng(result["probe_seed"])
        probes = plan_probes(val, seq_len, rng)
        plan = plan_scoring(val, seq_len, batch_size or default_batch_size(device, seq_len, val.vocab_size),
                            max_tokens, rng, check_share)
        result.update(windows=len(plan.spans), checked_windows=int((plan.cuts >= 0).sum()))
        stages["plan"] = time.perf_counter() - start
        model.start()
        stages["model_start"] = time.perf_counter() - start
        model.warm_up(max((b.inputs.shape for b in plan.batches), key=lambda s: s[0] * s[1]))
        stages["warm_up"] = time.perf_counter() - start
        check_causality(model, probes, val.vocab_size)
        stages["probe"] = time.perf_counter() - start
        nats = score(model, plan)
        stages["score"] = time.perf_counter() - start
        verify_scoring(plan, nats)
        result["causal"] = True
        total = sum(float(n[m].sum()) for n, m in zip(nats.scored, plan.masks))
        result.update(
            status="ok",
            val_bpb=total / (LN2 * plan.bytes),
            val_loss_nats=total / plan.tokens,
            tokens=plan.tokens,
            bytes=plan.bytes,
        )
    except InvalidModel as e:
        result.update(status="invalid", reason=str(e))
    except ModelProcessError as e:
        result.update(status="error", reason=f"the model process failed: {e}")
    except Exception:  # noqa: BLE001 -- every other failure is the evaluation's error, with its traceback
        result.update(status="error", reason=traceback.format_exc())
    finally:
        survivors = model.close() if model is not None else []
    if survivors:
        result.update(status="invalid", val_bpb=None, val_loss_nats=None,
                      reason=f"the model process left processes running, killed: {'; '.join(survivors)}")
    result["eval_s"] = round(time.perf_counter() - start, 3)
    result["stages_s"] = {k: round(v, 3) for k, v in stages.items()}  # seconds since the start at each stage's end
    return result


# ---------------------------------------------------------------------------------------------
# The loss


def target_nats(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target, fp32 ``[B, T]``. ``logits`` is shifted in place by
    each row's maximum first, so that adding a large constant to a row cannot round its loss down."""
    logits.sub_(logits.amax(-1, keepdim=True))
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logits.logsumexp(-1) - picked


# ---------------------------------------------------------------------------------------------
# Causality probe


@dataclass(frozen=True)
class Probe:
    """One val window, alone, and in a batch with copies whose tokens after ``cuts[i]`` differ."""

    window: np.ndarray  # int64[1, T]
    batch: np.ndarray  # int64[2 + len(cuts), T]: the window, a wholly different row, the changed copies
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
        window = val.tokens[begin: begin + length]
        variants = [window]
        for t in (-1, *cuts):  # t = -1: a batch-mate that differs everywhere
            changed = window.copy()
            shift = rng.integers(1, val.vocab_size, size=length - t - 1)
            changed[t + 1:] = (changed[t + 1:] + shift) % val.vocab_size  # every later token differs
            variants.append(changed)
        probes.append(Probe(window[None], np.stack(variants), cuts))
    return probes


def check_causality(model: ModelProcess, probes: list[Probe], vocab_size: int) -> None:
    """Raise ``InvalidModel`` if the past's log-probabilities depend on the future or on batch-mates.

    The model process runs these in fp32 (no autocast), so the tolerance can be tight. Positions
    <= t of each changed copy, and every position of the unchanged window in the batch, must
    match the lone forward.
    """
    for probe in probes:
        length = probe.window.shape[1]
        alone = model.logits(probe.window, mode="probe").log_softmax(-1)[0]
        together = model.logits(probe.batch, mode="probe").log_softmax(-1)
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
    allowed = a.abs() * tolerance + tolerance
    rows = ((a - b).abs() > allowed).any(-1).nonzero()
    return int(rows[0, 0]) if len(rows) else None


# ---------------------------------------------------------------------------------------------
# Scoring the whole split, every window checked


@dataclass(frozen=True)
class Batch:
    inputs: np.ndarray  # int64[B, T]
    targets: np.ndarray  # int64[B, T]: the original window's targets, for a check too
    windows: np.ndarray  # int[B]: the window each row is
    checks: np.ndarray  # bool[B]: the row is its window's check (tokens after its cut replaced)


@dataclass(frozen=True)
class ScoringPlan:
    batches: list[Batch]
    spans: list[tuple[int, int]]  # (start, length) of each window
    cuts: np.ndarray  # int[windows]: the check's cut t (positions <= t must agree), -1 for no check
    masks: list[np.ndarray]  # bool[length] per window: the target has bytes (not BOS or another special token)
    tokens: int  # scored targets
    bytes: int  # their UTF-8 bytes


@dataclass(frozen=True)
class Nats:
    scored: list[np.ndarray]  # float64[length] per window
    checked: list[np.ndarray | None]  # the same from its check, None where it has none


def windows(n_targets: int, seq_len: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each window: inputs ``tokens[start:start+length]``, targets shifted by one."""
    return [(s, min(seq_len, n_targets - s)) for s in range(0, n_targets, seq_len)]


def default_batch_size(device: str, seq_len: int, vocab_size: int) -> int:
    budget = LOGITS_BUDGET_BYTES["cuda" if device.startswith("cuda") else "cpu"]
    return max(1, budget // (4 * seq_len * vocab_size))


def plan_scoring(val: ValSplit, seq_len: int, batch_size: int, max_tokens: int,
                 rng: np.random.Generator, check_share: float = 1.0) -> ScoringPlan:
    """Every (first ``max_tokens``) val target scored exactly once, and ``check_share`` of the
    windows (at least ``MIN_CHECKS``, drawn at random) checked once: the rows of windows and checks
    shuffled together into batches of one length."""
    n_targets = len(val.tokens) - 1
    if max_tokens > 0:
        n_targets = min(n_targets, max_tokens)
    target_bytes = val.token_bytes[val.tokens[1: n_targets + 1]]
    scored = target_bytes > 0
    if not scored.any():
        raise ValueError("the val split has no scorable targets (every target is a special token)")
    spans = windows(n_targets, seq_len)
    n_checks = min(len(spans), max(MIN_CHECKS, math.ceil(check_share * len(spans))))
    checked = set(rng.choice(len(spans), size=n_checks, replace=False).tolist())
    cuts = np.array([int(rng.integers(0, n - 1)) if n >= 2 and w in checked else -1
                     for w, (_, n) in enumerate(spans)])
    rows: dict[int, list[tuple[int, bool]]] = {}  # length -> (window, is check)
    for w, (_, n) in enumerate(spans):
        rows.setdefault(n, []).append((w, False))
        if cuts[w] >= 0:
            rows[n].append((w, True))
    batches = []
    for n, group in rows.items():
        order = rng.permutation(len(group))
        for at in range(0, len(group), batch_size):
            picked = [group[i] for i in order[at: at + batch_size]]
            inputs, targets = [], []
            for w, check in picked:
                s = spans[w][0]
                row = val.tokens[s: s + n].copy()
                if check:
                    t = int(cuts[w])
                    begin = int(rng.integers(0, len(val.tokens) - (n - t - 1) + 1))
                    row[t + 1:] = val.tokens[begin: begin + n - t - 1]
                inputs.append(row)
                targets.append(val.tokens[s + 1: s + 1 + n])
            batches.append(Batch(np.stack(inputs), np.stack(targets), np.array([w for w, _ in picked]),
                                 np.array([c for _, c in picked])))
    masks = [scored[s: s + n] for s, n in spans]
    return ScoringPlan(batches, spans, cuts, masks, tokens=int(scored.sum()), bytes=int(target_bytes.sum()))


def score(model: ModelProcess, plan: ScoringPlan) -> Nats:
    """The nats of every target of every window and of every check (bf16 autocast on CUDA, fp32 on CPU)."""
    scored: list[np.ndarray | None] = [None] * len(plan.spans)
    checked: list[np.ndarray | None] = [None] * len(plan.spans)
    import torch  # deferred: heavy (see evaluate)

    for batch in plan.batches:
        logits = model.logits(batch.inputs, mode="score")
        targets = torch.from_numpy(batch.targets).to(logits.device)
        nats = target_nats(logits, targets).to("cpu", torch.float64).numpy()
        for row, (w, check) in enumerate(zip(batch.windows, batch.checks)):
            (checked if check else scored)[int(w)] = nats[row]
    return Nats(scored, checked)


def verify_scoring(plan: ScoringPlan, nats: Nats) -> None:
    """Raise ``InvalidModel`` if a window's nats at positions <= its cut differ from its check's:
    the model's answer depended on tokens after its targets."""
    for w, t in enumerate(plan.cuts):
        if t < 0:
            continue
        a, b = nats.scored[w][: t + 1], nats.checked[w][: t + 1]
        bad = np.nonzero(np.abs(a - b) > np.abs(a) * VERIFY_TOLERANCE + VERIFY_TOLERANCE)[0]
        if len(bad):
            raise InvalidModel(
                f"scoring leak: the loss at position {int(bad[0])} of a scored window changed "
                f"when only the tokens after position {int(t)} changed; position p may only see tokens 0..p"
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
        prog="python -I -m nightlab.lab.evaluate",
        description="Trusted evaluation: val bits per byte of train.py's model, scored outside the model's process.",
    )
    p.add_argument("--train-py", type=Path, required=True, help="the train.py that defines build_model()")
    p.add_argument("--files", nargs="*", default=[], help="other allowed files beside train.py the model needs")
    p.add_argument("--weights", type=Path, required=True, help="the saved state dict (model.pt)")
    p.add_argument("--weights-sha256", default=None, help="the weights' SHA-256 when training ended")
    p.add_argument("--data", type=Path, required=True, help="the prepared dataset dir (its val.* are scored)")
    p.add_argument("--out", type=Path, required=True, help="where to write eval.json")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default: cpu)")
    p.add_argument("--preset", default=None, help="NIGHTLAB_PRESET for build_model(): cpu | gpu")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help=f"tokens per window (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward (default: by logits memory)")
    p.add_argument("--max-tokens", type=int, default=0, help="score only the first N targets (0 = all)")
    p.add_argument("--check-share", type=float, default=CHECK_SHARE,
                   help=f"share of the windows checked for a leak of later tokens, at least {MIN_CHECKS} "
                        f"(1.0 = every window; default {CHECK_SHARE})")
    p.add_argument("--sandbox", default="none", choices=("none", "bwrap"), help="run the model process under bubblewrap")
    p.add_argument("--token-stdin", action="store_true",
                   help="read a line from stdin and write it into eval.json as 'token'")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    token = sys.stdin.readline().strip() if args.token_stdin else None
    result = evaluate(
        args.train_py,
        args.weights,
        args.data,
        device=args.device,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        check_share=args.check_share,
        preset=args.preset,
        weights_sha256=args.weights_sha256,
        files=tuple(args.files),
        sandbox=args.sandbox,
        subreaper=reaper.become_subreaper(),  # orphans of the model process come back to us, to be ended
    )
    if token is not None:
        result["token"] = token
    write_json_atomic(args.out, result)
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
    sys.exit(main())
