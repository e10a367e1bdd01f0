"""The changes in bench/leads/ still apply to today's template, and each keeps its promise on the CPU."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import template_env
from nightlab.lab import evaluate as ev

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "src" / "nightlab" / "template" / "train.py"
LEADS = sorted((ROOT / "bench" / "leads").glob("*.patch"))


def patched(tmp_path: Path, *names: str) -> Path:
    """A copy of the template with the named patches applied (git apply, as a user would)."""
    target = tmp_path / "src" / "nightlab" / "template" / "train.py"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(TEMPLATE, target)
    for name in names:
        done = subprocess.run(["git", "apply", str(ROOT / "bench" / "leads" / name)], cwd=tmp_path,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"{name} no longer applies to the template: {done.stderr}"
    assert target.read_text() != TEMPLATE.read_text()
    return target


def load(path: Path, prepared_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str):
    template_env(monkeypatch, prepared_tiny, tmp_path / "out")
    copy = tmp_path / f"{name}.py"
    shutil.copy(path, copy)
    return ev.import_train_py(copy)


def model_and_tokens(train, seed: int = 0):
    """A fresh model whose zero-initialized weights were made non-zero, and two rows of tokens."""
    torch.manual_seed(seed)
    model = train.build_model()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    tokens = torch.randint(0, model.vocab_size, (2, train.SEQ_LEN), generator=torch.Generator().manual_seed(1))
    return model, tokens


def loss_and_grads(train, seed: int = 0):
    """Loss and gradients of ``model_and_tokens``' model on its tokens."""
    model, tokens = model_and_tokens(train, seed)
    loss = model(tokens, tokens.roll(-1, dims=1))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_there_are_leads_to_check() -> None:
    assert {p.name for p in LEADS} >= {"regional_compile.patch", "regional_compile_inputs.patch", "nested_compile_region.patch",
                                       "block_masks_once.patch"}


@pytest.mark.parametrize("lead", [p.name for p in LEADS])
def test_each_lead_applies_and_the_patched_template_trains(lead: str, prepared_tiny: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    train = load(patched(tmp_path, lead), prepared_tiny, tmp_path, monkeypatch, "lead")
    train.main()
    assert (tmp_path / "out" / "model.pt").exists() and (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize("lead", ["regional_compile.patch", "regional_compile_inputs.patch"])
def test_compiling_by_regions_computes_exactly_what_the_template_does(lead: str, prepared_tiny: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    regions = load(patched(tmp_path, lead), prepared_tiny, tmp_path, monkeypatch, "regions")
    template = load(TEMPLATE, prepared_tiny, tmp_path, monkeypatch, "template")
    loss, grads = loss_and_grads(regions)
    loss_t, grads_t = loss_and_grads(template)
    assert torch.equal(loss, loss_t)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_t))


def test_block_masks_made_before_compiling_leave_none_to_build_in_the_graph(prepared_tiny: Path, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    train = load(patched(tmp_path, "block_masks_once.patch"), prepared_tiny, tmp_path, monkeypatch, "masks")
    assert any(train.window_of(i) for i in range(train.DEPTH)), "the CPU preset has no short window to test"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile-cache"))
    model, tokens = model_and_tokens(train)
    with torch.no_grad():
        eager = model(tokens)  # the evaluator's path: SDPA with a boolean band
        train.make_block_masks(train.SEQ_LEN, "cpu")

        def no_mask_in_the_graph(*args, **kwargs):
            raise AssertionError("the compiled model built a block mask of its own")

        monkeypatch.setattr(train, "create_block_mask", no_mask_in_the_graph)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)(tokens)  # FlexAttention with the masks made above
    torch._dynamo.reset()
    assert torch.allclose(compiled, eager, atol=1e-4, rtol=1e-4)
