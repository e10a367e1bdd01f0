"""``nightlab sample``: text from a tiny model trained on the CPU by the template train.py through the runner."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures.standin.helpers import make_lab
from nightlab.cli import main
from nightlab.config import Config, dumps
from nightlab.lab.tokenizer import Tokenizer
from nightlab.paths import state_dir
from nightlab.report.sample import find_model, sample
from nightlab.night import git
from nightlab.trial.runner import run_trial
from nightlab.night.store import Store

TEMPLATE = Path(__file__).resolve().parents[1] / "src" / "nightlab" / "template" / "train.py"
SETTINGS = ["lab.budget_s=3", "lab.device='cpu'", "lab.preset='cpu'", "lab.eval_max_tokens=4096",
            "lab.startup_allowance_s=120"]


@dataclass(frozen=True)
class TrainedLab:
    lab: Path
    data: Path
    exp_id: int
    crashed_id: int


@pytest.fixture(scope="module")
def trained(prepared_tiny: Path, tmp_path_factory) -> TrainedLab:
    """A lab whose baseline is the template train.py trained for 3 s on the CPU, recorded as kept."""
    lab = make_lab(tmp_path_factory.mktemp("sample") / "lab", train_py=TEMPLATE.read_text())
    config = Config().with_overrides(SETTINGS)
    base = git.resolve(lab, "HEAD")
    with Store.open(lab) as store:
        store.add_run("t", "nightlab/t", base, "search", dumps(config))
        exp = store.add_experiment("t", kind="baseline", parent_commit=base, commit_sha=base, description="baseline")
        result = run_trial(lab, state_dir(lab) / "runs" / str(exp.id), config, 0, data_dir=prepared_tiny)
        assert result.status == "ok", result.error or result.reason
        store.update(exp.id, status="keep", stage="done", val_bpb=result.val_bpb)
        crashed = store.add_experiment("t", parent_commit=base, commit_sha=base, description="oom",
                                       status="crash", stage="done", reason="exit code 1: OutOfMemoryError")
    return TrainedLab(lab, prepared_tiny, exp.id, crashed.id)


def test_sample_decodes_the_requested_number_of_tokens(trained: TrainedLab) -> None:
    source = find_model(trained.lab)
    assert source.exp_id == trained.exp_id and source.preset == "cpu"
    out = sample(source, trained.data, "It was a dark and stormy night", tokens=40, temperature=0.9, seed=1)
    tokenizer = Tokenizer.load(trained.data)
    assert len(out.token_ids) == 40
    assert bos_free(out.token_ids, tokenizer)
    assert out.text == tokenizer.decode(out.token_ids) and out.text.strip()
    again = sample(source, trained.data, "It was a dark and stormy night", tokens=40, temperature=0.9, seed=1)
    assert again.token_ids == out.token_ids  # a seed makes it reproducible
    other = sample(source, trained.data, "It was a dark and stormy night", tokens=40, temperature=0.9, seed=2)
    assert other.token_ids != out.token_ids


def bos_free(ids, tokenizer: Tokenizer) -> bool:
    return all(tokenizer.token_bytes[i] > 0 for i in ids)


def test_greedy_sampling_follows_the_model(trained: TrainedLab) -> None:
    """Temperature 0 takes the likeliest token each time: the model's own argmax, recomputed here."""
    import torch

    from nightlab.lab.evaluate import load_model

    source = find_model(trained.lab)
    out = sample(source, trained.data, "The", tokens=5, temperature=0)
    tokenizer = Tokenizer.load(trained.data)
    model = load_model(trained.lab / "train.py", source.weights, "cpu", data_dir=trained.data, preset="cpu")
    ids = tokenizer.encode("The", bos=True)
    with torch.inference_mode():
        for token in out.token_ids:
            logits = model(torch.tensor([ids]))[0, -1]
            logits[torch.from_numpy(tokenizer.token_bytes == 0)] = float("-inf")
            assert int(logits.argmax()) == token
            ids.append(token)


def test_sample_command_prints_the_text(trained: TrainedLab, capsys: pytest.CaptureFixture) -> None:
    code = main(["sample", "--lab", str(trained.lab), "--data", str(trained.data), "--prompt", "Once upon a time",
                 "--tokens", "12", "--seed", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["prompt"] == "Once upon a time" and len(out["token_ids"]) == 12
    assert out["experiment"] == trained.exp_id and out["text"] == Tokenizer.load(trained.data).decode(out["token_ids"])


def test_an_experiment_without_weights_is_a_clear_error(trained: TrainedLab, capsys: pytest.CaptureFixture) -> None:
    code = main(["sample", "--lab", str(trained.lab), "--data", str(trained.data), "--id", str(trained.crashed_id)])
    assert code == 2
    assert f"experiment {trained.crashed_id} (crash) left no weights" in capsys.readouterr().err
