"""The trusted evaluator: its score against a hand computation, the causality probe, failures, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import template_env

from nightlab.lab import evaluate as ev
from nightlab.lab import model_client
from nightlab.lab import model_process as mp

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TEMPLATE_TRAIN = Path(__file__).resolve().parents[1] / "src" / "nightlab" / "template" / "train.py"
VOCAB = 12
BOS = 11  # special: 0 bytes, so never scored
SEQ_LEN = 8


def run(train_py: Path, weights: Path, data: Path, **kwargs) -> dict:
    """``ev.evaluate`` of a fixture: its model process gets a copy of it and of the toy model it builds on."""
    return ev.evaluate(train_py, weights, data, files=("toy_train.py",), **kwargs)


def write_dataset(folder: Path, seed: int = 0, docs: int = 29) -> Path:
    """A prepared-dataset folder with only what the evaluator reads, written by hand."""
    rng = np.random.default_rng(seed)
    pieces, offsets = [], [0]
    for _ in range(docs):
        doc = rng.integers(0, BOS, size=int(rng.integers(1, 12)))
        pieces.append(np.concatenate([[BOS], doc]))
        offsets.append(offsets[-1] + len(pieces[-1]))
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "val.tokens.npy", np.concatenate(pieces).astype(np.uint16))
    np.save(folder / "val.docs.npy", np.array(offsets, dtype=np.int64))
    token_bytes = rng.integers(1, 5, size=VOCAB).astype(np.int32)
    token_bytes[BOS] = 0
    np.save(folder / "token_bytes.npy", token_bytes)
    manifest = {"corpus_hash": "0123456789abcdef", "bos_id": BOS, "vocab_size": VOCAB}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def toy_weights(path: Path, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Random weights for tests/fixtures/toy_train.py's model, saved as its state dict."""
    rng = np.random.default_rng(seed)
    table = rng.normal(0, 2, size=(VOCAB, VOCAB)).astype(np.float32)
    pos = rng.normal(0, 1, size=(16, VOCAB)).astype(np.float32)
    torch.save({"table.weight": torch.from_numpy(table), "pos": torch.from_numpy(pos)}, path)
    return table.astype(np.float64), pos.astype(np.float64)


def hand_bpb(data: Path, table: np.ndarray, pos: np.ndarray, seq_len: int, max_tokens: int = 0) -> tuple[float, int, int]:
    """val_bpb of the toy model, one target at a time in float64: (bpb, scored targets, bytes)."""
    stream = np.load(data / "val.tokens.npy").astype(np.int64)
    token_bytes = np.load(data / "token_bytes.npy")
    n_targets = len(stream) - 1 if max_tokens == 0 else min(max_tokens, len(stream) - 1)
    nats, tokens, nbytes = 0.0, 0, 0
    for j in range(n_targets):
        target = stream[j + 1]
        if token_bytes[target] == 0:
            continue
        logits = table[stream[j]] + pos[j % seq_len]  # position within its window
        top = logits.max()
        log_z = top + math.log(sum(math.exp(v - top) for v in logits))
        nats += log_z - logits[target]
        tokens += 1
        nbytes += int(token_bytes[target])
    return nats / (math.log(2) * nbytes), tokens, nbytes


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data")


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    return tmp_path / "model.pt"


# --- the score ------------------------------------------------------------------------------


def test_score_matches_hand_computation(data: Path, weights: Path) -> None:
    table, pos = toy_weights(weights)
    stream_len = len(np.load(data / "val.tokens.npy"))
    assert (stream_len - 1) % SEQ_LEN != 0, "the dataset must end in a partial window for this test"

    result = run(FIXTURES / "toy_train.py", weights, data, seq_len=SEQ_LEN, batch_size=3)

    expected, tokens, nbytes = hand_bpb(data, table, pos, SEQ_LEN)
    assert result["status"] == "ok", result["reason"]
    assert result["causal"] is True
    assert result["val_bpb"] == pytest.approx(expected, rel=1e-6)
    assert (result["tokens"], result["bytes"]) == (tokens, nbytes)
    assert result["val_loss_nats"] == pytest.approx(expected * math.log(2) * nbytes / tokens, rel=1e-6)
    assert result["corpus_hash"] == "0123456789abcdef"
    assert result["seq_len"] == SEQ_LEN and result["device"] == "cpu"


def test_batch_size_does_not_change_the_score(data: Path, weights: Path) -> None:
    toy_weights(weights)
    scores = [
        run(FIXTURES / "toy_train.py", weights, data, seq_len=SEQ_LEN, batch_size=b)["val_bpb"]
        for b in (1, 5, None)
    ]
    assert scores[0] == pytest.approx(scores[1], rel=1e-9) and scores[0] == pytest.approx(scores[2], rel=1e-9)


def test_max_tokens_scores_only_the_first_targets(data: Path, weights: Path) -> None:
    table, pos = toy_weights(weights)
    result = run(FIXTURES / "toy_train.py", weights, data, seq_len=SEQ_LEN, max_tokens=21)
    expected, tokens, nbytes = hand_bpb(data, table, pos, SEQ_LEN, max_tokens=21)
    assert result["status"] == "ok", result["reason"]
    assert result["val_bpb"] == pytest.approx(expected, rel=1e-6)
    assert (result["tokens"], result["bytes"], result["max_tokens"]) == (tokens, nbytes, 21)


def test_windows_cover_every_target_once() -> None:
    spans = ev.windows(n_targets=19, seq_len=8)
    assert spans == [(0, 8), (8, 8), (16, 3)]
    covered = [s + i for s, n in spans for i in range(n)]
    assert covered == list(range(19))


# --- the causality probe ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("train_py", "reason"),
    [
        ("lookahead_train.py", "causality leak: log-probabilities at position 0 changed when only the tokens after position 0"),
        ("lastpeek_train.py", f"causality leak: log-probabilities at position {SEQ_LEN - 2} changed"),
        ("batchleak_train.py", "batch leak"),
        ("nan_train.py", "not finite"),
        ("narrow_train.py", f", {SEQ_LEN}, V] with V >= vocab_size {VOCAB}"),
    ],
)
def test_models_that_break_the_rules_are_invalid(data: Path, weights: Path, train_py: str, reason: str) -> None:
    toy_weights(weights)
    result = run(FIXTURES / train_py, weights, data, seq_len=SEQ_LEN)
    assert result["status"] == "invalid"
    assert reason in result["reason"]
    assert result["val_bpb"] is None


def test_probe_cuts_are_random_so_a_model_cannot_dodge_them(data: Path, weights: Path) -> None:
    toy_weights(weights)
    result = run(FIXTURES / "dodgecuts_train.py", weights, data, seq_len=SEQ_LEN)
    assert result["status"] == "invalid" and "leak" in result["reason"]
    val = ev.read_val_split(data)
    cuts = {c for seed in range(20) for p in ev.plan_probes(val, SEQ_LEN, np.random.default_rng(seed)) for c in p.cuts}
    assert cuts == set(range(SEQ_LEN - 1))  # every position gets cut at, not a fixed few
    runs = {run(FIXTURES / "toy_train.py", weights, data, seq_len=SEQ_LEN)["probe_seed"] for _ in range(2)}
    assert len(runs) == 2  # new draws each run, recorded


def test_logits_that_are_a_tensor_subclass_are_invalid(data: Path, weights: Path) -> None:
    toy_weights(weights)
    result = run(FIXTURES / "subclass_train.py", weights, data, seq_len=SEQ_LEN)
    assert result["status"] == "invalid" and "a subclass of torch.Tensor" in result["reason"]


def test_probe_tolerance_allows_rounding_but_not_a_real_change() -> None:
    a = torch.log_softmax(torch.randn(SEQ_LEN, VOCAB), -1)
    assert ev._first_mismatch(a, a * (1 + 1e-6)) is None
    b = a.clone()
    b[3, 5] += 0.01
    assert ev._first_mismatch(a, b) == 3


class HalfEmbedding(torch.nn.Module):
    """A causal toy whose embedding table is bf16: without autocast its activations meet fp32 weights."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16).to(torch.bfloat16)
        self.head = torch.nn.Linear(16, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(idx))


def test_probe_runs_a_model_with_bf16_weights_in_fp32_and_gives_them_back(data: Path) -> None:
    model = HalfEmbedding()
    table = model.embed.weight.detach().clone()
    with pytest.raises(RuntimeError):
        model(torch.zeros(1, 4, dtype=torch.long))  # bf16 activations into an fp32 layer, as such
    with mp.in_fp32(model):
        mp.logits_of(model, torch.zeros(1, 4, dtype=torch.long), VOCAB)  # no error: fp32 throughout
    assert model.embed.weight.dtype == torch.bfloat16
    assert torch.equal(model.embed.weight, table)
    assert model.head.weight.dtype == torch.float32


def template_weights(train_py: Path, data: Path, weights: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Random weights for the template's CPU-preset model.

    Not its fresh initialisation: that zeroes each block's output projection, which hides any
    leak in attention from the probe.
    """
    template_env(monkeypatch, data)
    monkeypatch.syspath_prepend(str(train_py.parent))
    model = ev.import_train_py(train_py).build_model()
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) * 0.3 for k, v in model.state_dict().items()}
    torch.save(state, weights)
    return weights


needs_template = pytest.mark.skipif(not TEMPLATE_TRAIN.exists(), reason="the template train.py is not written yet")


@needs_template
def test_template_model_passes_at_the_default_seq_len(
    tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_dataset(tmp_path / "long", docs=800)  # longer than one 2048-token window
    template_weights(TEMPLATE_TRAIN, data, weights, monkeypatch)

    result = ev.evaluate(TEMPLATE_TRAIN, weights, data, preset="cpu")  # the runner's call: default seq_len

    assert result["status"] == "ok", result["reason"]
    assert result["causal"] is True and result["seq_len"] == ev.DEFAULT_SEQ_LEN
    assert math.isfinite(result["val_bpb"]) and result["val_bpb"] > 0


@needs_template
def test_template_without_the_causal_mask_is_invalid(
    tmp_path: Path, data: Path, weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = TEMPLATE_TRAIN.read_text()
    assert source.count("is_causal=True") >= 1  # the full-window layer, and short windows longer than a row
    leaky = tmp_path / "lab" / "train.py"
    leaky.parent.mkdir()
    leaky.write_text(source.replace("is_causal=True", "is_causal=False"))
    template_weights(leaky, data, weights, monkeypatch)

    result = ev.evaluate(leaky, weights, data, seq_len=SEQ_LEN, preset="cpu")

    assert result["status"] == "invalid"
    assert "causality leak: log-probabilities at position 0 changed" in result["reason"]


# --- failures and the command line --------------------------------------------------------------


def test_missing_build_model_and_missing_data_are_errors(tmp_path: Path, data: Path, weights: Path) -> None:
    toy_weights(weights)
    plain = tmp_path / "plain.py"
    plain.write_text("X = 1\n")
    result = run(plain, weights, data, seq_len=SEQ_LEN)
    assert result["status"] == "error" and "defines no build_model()" in result["reason"]
    result = run(FIXTURES / "toy_train.py", weights, tmp_path / "nowhere", seq_len=SEQ_LEN)
    assert result["status"] == "error" and "nightlab prepare" in result["reason"]


def test_cli_writes_eval_json_and_exit_codes(tmp_path: Path, data: Path, weights: Path) -> None:
    toy_weights(weights)
    expected = run(FIXTURES / "toy_train.py", weights, data, seq_len=SEQ_LEN)["val_bpb"]
    cases = {"toy_train.py": 0, "cheating_train.py": 0, "nan_train.py": 3, "broken_train.py": 1}
    procs = {}
    for name in cases:  # in parallel: each process pays for importing torch
        cmd = [sys.executable, "-I", "-m", "nightlab.lab.evaluate", "--train-py", str(FIXTURES / name), "--files", "toy_train.py"]
        cmd += ["--weights", str(weights), "--data", str(data), "--out", str(tmp_path / name / "eval.json")]
        cmd += ["--seq-len", str(SEQ_LEN)]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = {name: (p.wait(timeout=120), *p.communicate()) for name, p in procs.items()}

    for name, code in cases.items():
        returncode, stdout, stderr = outputs[name]
        assert returncode == code, f"{name}: {stderr}"
        written = json.loads((tmp_path / name / "eval.json").read_text())
        assert written["status"] == {0: "ok", 3: "invalid", 1: "error"}[code]
        assert not list((tmp_path / name).glob("*.tmp")), "the temporary file must be renamed away"
    ok = json.loads((tmp_path / "toy_train.py" / "eval.json").read_text())
    assert ok["val_bpb"] == pytest.approx(expected, rel=1e-9)
    assert f"val_bpb: {expected:.6f}" in outputs["toy_train.py"][1]
    # patching torch's loss functions at import time does not change the score
    cheat = json.loads((tmp_path / "cheating_train.py" / "eval.json").read_text())
    assert cheat["val_bpb"] == pytest.approx(expected, rel=1e-9)
    broken = json.loads((tmp_path / "broken_train.py" / "eval.json").read_text())
    assert "this model cannot be built" in broken["reason"] and "Traceback" in outputs["broken_train.py"][2]


def evaluator_cli(train_py: Path, weights: Path, data: Path, out: Path, stdin: str | None = None):
    cmd = [sys.executable, "-I", "-m", "nightlab.lab.evaluate", "--train-py", str(train_py), "--files", "toy_train.py",
           "--weights", str(weights),
           "--data", str(data), "--out", str(out), "--seq-len", str(SEQ_LEN)]
    if stdin is not None:
        cmd.append("--token-stdin")
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)


def test_what_train_py_does_at_import_never_reaches_the_scorer(tmp_path: Path, data: Path, weights: Path) -> None:
    """Rebinding torch's and math's functions, or writing eval.json and exiting, happens in the model
    process: the score is the honest one, and the scorer's eval.json carries its token."""
    toy_weights(weights)
    honest = evaluator_cli(FIXTURES / "toy_train.py", weights, data, tmp_path / "ok" / "eval.json", stdin="c0ffee\n")
    assert honest.returncode == 0, honest.stderr
    expected = json.loads((tmp_path / "ok" / "eval.json").read_text())
    assert expected["token"] == "c0ffee"
    for name in ("rebinding_train.py", "forging_train.py"):
        evaluator_cli(FIXTURES / name, weights, data, tmp_path / name / "eval.json", stdin="c0ffee\n")
        written = json.loads((tmp_path / name / "eval.json").read_text())
        assert written["token"] == "c0ffee", name
        assert written["status"] == "ok" and written["val_bpb"] == pytest.approx(expected["val_bpb"], rel=1e-9), name


def test_scoring_uses_prebuilt_attention_kernels_not_cudnn(tmp_path: Path, data: Path, weights: Path) -> None:
    """cuDNN builds its attention kernels per shape at first call (seconds); the evaluator turns it off
    while it probes and scores, and puts the setting back afterwards."""
    toy_weights(weights)
    seen = tmp_path / "backends.txt"
    spy = tmp_path / "spy_train.py"
    spy.write_text((FIXTURES / "toy_train.py").read_text().replace(
        "        return self.table(idx) + self.pos[: idx.shape[1]]",
        "        flags = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),\n"
        "                 torch.backends.cuda.mem_efficient_sdp_enabled())\n"
        f"        with open({str(seen)!r}, 'a') as f:\n"
        "            f.write(' '.join(map(str, flags)) + '\\n')\n"
        "        return self.table(idx) + self.pos[: idx.shape[1]]",
    ))
    assert torch.backends.cuda.cudnn_sdp_enabled()

    result = run(spy, weights, data, seq_len=SEQ_LEN)

    assert result["status"] == "ok", result["reason"]
    calls = seen.read_text().splitlines()
    assert len(calls) > ev.PROBE_WINDOWS  # the probes and the scoring batches
    assert set(calls) == {"False True True"}
    assert torch.backends.cuda.cudnn_sdp_enabled()  # as it was before


# --- the model process ----------------------------------------------------------------------------


def variant(tmp_path: Path, name: str, body: str) -> Path:
    """A train.py beside a copy of the toy model: ``body`` after ``from toy_train import ...``."""
    folder = tmp_path / "variants"
    folder.mkdir(exist_ok=True)
    (folder / "toy_train.py").write_text((FIXTURES / "toy_train.py").read_text())
    path = folder / name
    path.write_text("import os, sys, time, json\nimport torch\nfrom toy_train import Bigram, vocab_size\n" + body)
    return path


def test_the_model_process_gets_no_path_to_the_data_or_the_lab(tmp_path: Path, data: Path, weights: Path) -> None:
    toy_weights(weights)
    seen = tmp_path / "seen.json"
    spy = variant(tmp_path, "spy_train.py", f"""
json.dump({{"env": dict(os.environ), "argv": sys.argv, "cwd": os.getcwd(), "files": sorted(os.listdir("."))}},
          open({str(seen)!r}, "w"))
def build_model():
    return Bigram(vocab_size())
""")
    result = run(spy, weights, data, seq_len=SEQ_LEN)
    assert result["status"] == "ok", result["reason"]
    told = seen.read_text()
    for secret in (str(data), str(weights), str(tmp_path / "variants")):
        assert secret not in told, secret
    files = json.loads(told)["files"]
    assert sorted(files) == ["data", "spy_train.py", "toy_train.py"]  # copies of the allowed files only
    assert "_nightlab_evaluated_spy_train" not in sys.modules  # the scorer (this process) never imported it


def test_weights_that_changed_after_training_are_refused(data: Path, weights: Path) -> None:
    toy_weights(weights)
    result = run(FIXTURES / "toy_train.py", weights, data, seq_len=SEQ_LEN, weights_sha256="0" * 64)
    assert result["status"] == "invalid" and "the weights changed after training ended" in result["reason"]


@pytest.mark.parametrize(("forward", "reason"), [
    ("return super().forward(idx) + 1e6", "larger than 10000 in magnitude"),
    ("return super().forward(idx) * float('inf')", "not finite"),
    ("return super().forward(idx).long()", "dtype torch.int64"),
    ("return torch.cat([super().forward(idx)] * 800, -1)", "expected [1, 8, V] with vocab_size 12 <= V"),
    ("return super().forward(idx).sum(-1)", "logits have shape [1, 8]"),
])
def test_logits_out_of_bounds_are_invalid_with_a_reason(tmp_path: Path, data: Path, weights: Path, forward: str,
                                                       reason: str) -> None:
    toy_weights(weights)
    bad = variant(tmp_path, "bad_train.py", f"""
class Bad(Bigram):
    def forward(self, idx):
        {forward}
def build_model():
    return Bad(vocab_size())
""")
    result = run(bad, weights, data, seq_len=SEQ_LEN, batch_size=1)
    assert result["status"] == "invalid" and reason in result["reason"], result["reason"]


def test_a_share_of_the_windows_is_checked_and_every_batch_holds_checked_rows() -> None:
    """On a split of 600 windows the default share checks 150, drawn anew each run, each once;
    every target is still scored once; and the checked windows' rows are spread so that every
    batch holds some, whichever batch a model leaks in (the judge's bound: a leak in one batch of
    eight caught with probability at least 0.99)."""
    seq_len, n_windows, batch = 16, 600, 64
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, size=seq_len * n_windows + 1).astype(np.int64)
    val = ev.ValSplit(tokens, np.ones(64, dtype=np.int64), 64, "t", {"vocab_size": 64})
    chosen = []
    for seed in range(40):
        plan = ev.plan_scoring(val, seq_len, batch, 0, np.random.default_rng(seed), ev.CHECK_SHARE)
        checked = np.flatnonzero(plan.cuts >= 0)
        assert len(checked) == 150 and len(plan.spans) == n_windows
        rows = np.concatenate([b.windows[b.checks] for b in plan.batches])
        assert sorted(rows.tolist()) == checked.tolist()  # each checked window has one check row
        scored = np.concatenate([b.windows[~b.checks] for b in plan.batches])
        assert sorted(scored.tolist()) == list(range(n_windows))  # every window scored once
        for b in plan.batches:
            assert np.isin(b.windows, checked).any(), seed  # a leak in this batch would be seen
        chosen.append(frozenset(checked.tolist()))
    assert len(set(chosen)) == 40  # a model cannot learn which windows are checked
    few = ev.plan_scoring(val, seq_len, batch, 40 * seq_len, np.random.default_rng(0), ev.CHECK_SHARE)
    assert (few.cuts >= 0).all()  # fewer windows than MIN_CHECKS: every one is checked
    small = ev.plan_scoring(val, seq_len, batch, 0, np.random.default_rng(0), 0.01)
    assert (small.cuts >= 0).sum() == ev.MIN_CHECKS


def test_a_leak_in_one_scoring_batch_of_eight_is_always_caught(tmp_path: Path, data: Path, weights: Path) -> None:
    """A split of fewer than MIN_CHECKS windows has every window checked, in batches that mix
    windows and checks: a model that leaks in a single batch of the scoring pass, whichever it
    is, is caught."""
    toy_weights(weights)
    for leaky_call in (1, 8):
        calls = 1 + 2 * ev.PROBE_WINDOWS + leaky_call  # the warm-up, the probe's calls, then scoring calls
        leak = variant(tmp_path, f"leak{leaky_call}_train.py", f"""
class Leak(Bigram):
    calls = 0
    def forward(self, idx):
        Leak.calls += 1
        logits = super().forward(idx)
        if Leak.calls == {calls}:
            peek = torch.zeros_like(logits)
            peek[:, :-1] = self.table(idx[:, 1:])
            return logits + 0.5 * peek
        return logits
def build_model():
    return Leak(vocab_size())
""")
        val = ev.read_val_split(data)
        batch = max(1, -(-2 * len(ev.windows(len(val.tokens) - 1, SEQ_LEN)) // 8))  # eight scoring batches
        result = run(leak, weights, data, seq_len=SEQ_LEN, batch_size=batch)
        assert result["status"] == "invalid" and "scoring leak" in result["reason"], (leaky_call, result["reason"])


def test_a_model_that_answers_far_slower_than_its_warm_up_is_stopped(tmp_path: Path, data: Path, weights: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_client, "CALL_FLOOR_S", 1.0)
    toy_weights(weights)
    slow = variant(tmp_path, "slow_train.py", """
class Slow(Bigram):
    calls = 0
    def forward(self, idx):
        Slow.calls += 1
        if Slow.calls == 4:
            time.sleep(30)  # "trains" on what it was shown
        return super().forward(idx)
def build_model():
    return Slow(vocab_size())
""")
    started = time.monotonic()
    result = run(slow, weights, data, seq_len=SEQ_LEN)
    assert result["status"] == "invalid" and "took too long" in result["reason"], result["reason"]
    assert time.monotonic() - started < 25


def test_a_process_the_model_leaves_running_voids_the_evaluation(tmp_path: Path, data: Path, weights: Path) -> None:
    toy_weights(weights)
    pid_file = tmp_path / "daemon.pid"
    daemon = variant(tmp_path, "daemon_train.py", f"""
import subprocess
subprocess.Popen([sys.executable, "-c", "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                  "time.sleep(60)"], start_new_session=True, env={{}})
def build_model():
    return Bigram(vocab_size())
""")
    result = run(daemon, weights, data, seq_len=SEQ_LEN)
    assert result["status"] == "invalid" and "left processes running" in result["reason"], result["reason"]
    pid = int(pid_file.read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
