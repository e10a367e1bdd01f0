"""The template train.py, run in this process on the CPU preset, seen from the model's side."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import template_env
from nightlab.lab import evaluate as ev

TEMPLATE = Path(__file__).resolve().parents[1] / "src" / "nightlab" / "template" / "train.py"


def test_template_trains_on_rows_that_do_not_all_start_with_bos(
    prepared_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The evaluator cuts the val stream into windows that mostly start inside a document, with no
    # BOS in front. A model that always saw BOS at position 0 in training scores such windows far
    # worse (0.036 val_bpb at 300 s on the GPU benchmark), so the template must not train that way.
    template_env(monkeypatch, prepared_tiny, tmp_path / "out")
    monkeypatch.syspath_prepend(str(TEMPLATE.parent))
    train = ev.import_train_py(TEMPLATE)
    bos = json.loads((prepared_tiny / "manifest.json").read_text())["bos_id"]

    inputs: list[torch.Tensor] = []
    build_model = train.build_model

    def watched_model():
        model = build_model()
        model.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
        return model

    monkeypatch.setattr(train, "build_model", watched_model)
    train.main()

    rows = torch.cat(inputs)
    assert rows.size(1) == train.SEQ_LEN  # training still uses whole rows of the preset's length
    starts_with_bos = (rows[:, 0] == bos).float().mean().item()
    assert starts_with_bos < 0.5, f"{starts_with_bos:.0%} of training rows start with BOS"
    assert (rows == bos).any(), "BOS still marks the documents inside a row"
    assert (tmp_path / "out" / "model.pt").exists()

    # Where the startup went, in one line, adding up to the startup the summary reports.
    line = re.search(r"startup ([\d.]+)s: model and optimizers ([\d.]+)s, compile and one warm-up step ([\d.]+)s",
                     capsys.readouterr().out)
    assert line, "the template prints where its startup went"
    total, built, compiled = map(float, line.groups())
    assert abs(total - built - compiled) <= 0.11
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert abs(summary["startup_seconds"] - total) <= 0.06


def test_residual_stream_runs_in_autocast_dtype_while_the_tables_stay_fp32(
    prepared_tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bf16 stream under autocast gave 6 % more tokens/s and 0.003 lower val_bpb at 300 s on an
    # H200; bf16 tables (optimizer updates rounded to bf16) had cost 0.010 on an H100. Without
    # autocast (the CPU preset, the evaluator's fp32 probe) the model must stay fp32 throughout.
    template_env(monkeypatch, prepared_tiny)
    monkeypatch.syspath_prepend(str(TEMPLATE.parent))
    train = ev.import_train_py(TEMPLATE)
    model = train.build_model()
    seen: list[tuple[torch.dtype, torch.dtype | None]] = []
    for block in model.blocks:
        block.register_forward_pre_hook(
            lambda module, args: seen.append((args[0].dtype, None if args[1] is None else args[1].dtype)))
    idx = torch.randint(0, train.lab.vocab_size, (2, 16))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)
    assert {x for x, _ in seen} == {torch.bfloat16}
    assert {ve for _, ve in seen if ve is not None} == {torch.bfloat16}, "the value embeddings join the stream"
    loss.backward()
    tables = [model.embed.weight, *model.value_embeds.parameters()]
    assert all(t.dtype == torch.float32 and t.grad.dtype == torch.float32 for t in tables)

    seen.clear()
    logits = model(idx)
    assert {x for x, _ in seen} == {torch.float32} and logits.dtype == torch.float32


def load_template(prepared_tiny: Path, monkeypatch: pytest.MonkeyPatch):
    template_env(monkeypatch, prepared_tiny)
    monkeypatch.syspath_prepend(str(TEMPLATE.parent))
    return ev.import_train_py(TEMPLATE)


def test_short_window_layers_attend_only_to_their_band(prepared_tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Windows of 128 tokens on all layers but the last gave 12.6 % more tokens/s on an H200
    # (FlexAttention skips the blocks outside the band when compiled); eager code, as the
    # evaluator and the CPU preset run it, must compute the same band with a mask.
    train = load_template(prepared_tiny, monkeypatch)
    q, k, v = (torch.randn(1, 2, 96, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    i = torch.arange(96)
    for window in (1, 16, 40):
        band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
        scores = (q @ k.mT) / 16**0.5
        expected = scores.masked_fill(~band, float("-inf")).softmax(-1) @ v
        torch.testing.assert_close(train.sliding_window(q, k, v, window), expected)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(train.sliding_window(q, k, v, 96), full)

    assert train.window_of(train.DEPTH - 1) == 0, "the last layer always sees the whole row"
    assert [train.window_of(i) for i in range(train.DEPTH - 1)] == [train.SHORT_WINDOW] * (train.DEPTH - 1)
    model = train.build_model()
    assert [b.attn.window for b in model.blocks] == [train.window_of(i) for i in range(train.DEPTH)]

    # A changed token reaches a short-window layer's output only inside its band (the output
    # projections start at zero, so give every weight some noise first).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    idx = torch.randint(0, train.lab.vocab_size, (1, train.SEQ_LEN), generator=torch.Generator().manual_seed(5))
    far = idx.clone()
    far[0, :8] = (far[0, :8] + 1) % train.lab.vocab_size
    outputs: list[torch.Tensor] = []
    model.blocks[0].register_forward_hook(lambda module, args, out: outputs.append(out.detach()))
    model(idx)
    model(far)
    reach = 8 + train.SHORT_WINDOW - 1  # the first position no changed token can reach
    assert torch.equal(outputs[0][0, reach:], outputs[1][0, reach:])
    assert not torch.equal(outputs[0][0, 8:reach], outputs[1][0, 8:reach])


def test_mfu_counts_only_the_keys_each_layer_attends_to(prepared_tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = load_template(prepared_tiny, monkeypatch)
    model = train.build_model()
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    attention = train.count_flops_per_token(model) - 6 * matrices
    T, w, width = train.SEQ_LEN, train.SHORT_WINDOW, train.N_HEAD * train.HEAD_DIM
    full_layer = 12 * (T / 2) * width  # causal: half the square
    short_layer = 12 * (w - w * w / (2 * T)) * width
    assert attention == pytest.approx(full_layer + (train.DEPTH - 1) * short_layer)


def test_only_the_value_embeddings_decay_among_the_tables(prepared_tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Decaying the value embeddings (tables indexed by token, pure memorization capacity) lowered
    # val_bpb on the multi-epoch GPU benchmark; the token embedding is normalized, the head is not
    # decayed.
    train = load_template(prepared_tiny, monkeypatch)
    assert train.VALUE_EMBED_WEIGHT_DECAY > 0
    model = train.build_model()
    muon, adam = train.build_optimizers(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    adam.step()
    lr = train.EMBEDDING_LR * (train.MODEL_DIM / 768) ** -0.5
    for name, p in model.named_parameters():
        if name.startswith("value_embeds."):
            torch.testing.assert_close(p.detach(), before[name] * (1 - lr * train.VALUE_EMBED_WEIGHT_DECAY))
        elif name in ("embed.weight", "head.weight"):
            assert torch.equal(p.detach(), before[name]), f"{name} must not decay"
