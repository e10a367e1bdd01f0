"""``nightlab sample``: text from the best model of the night, so the user sees what they woke up to.

The model is rebuilt the way the trusted evaluator rebuilds it: the experiment's own ``train.py``
(taken from its commit) is imported without training, ``build_model()`` is called with the lab's
environment (dataset, preset, device) and the saved weights are loaded. Text goes in and out
through the dataset's tokenizer. Sampling is plain ancestral sampling with temperature and top-k
over the last ``context`` tokens; special tokens and unused ids are never sampled, so the result
has exactly the number of text tokens asked for.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nightlab.lab.session import resolve_device
from nightlab.lab.tokenizer import Tokenizer
from nightlab.paths import state_dir
from nightlab.night import git
from nightlab.night.store import Experiment, Store

WEIGHTS_FILE = "model.pt"
BEST_DIR = "best"
CONTEXT = 2048  # tokens the model sees: the evaluator's window, which every valid model handles


@dataclass(frozen=True)
class ModelSource:
    """Where a trained model's code and weights are."""

    weights: Path
    files: dict[str, str]  # the experiment's allowed files (train.py, ...) by name, as committed
    preset: str | None  # the preset it was trained with (from summary.json), if recorded
    exp_id: int | None
    val_bpb: float | None
    description: str


@dataclass(frozen=True)
class Sample:
    prompt: str
    text: str  # the generated continuation, decoded
    token_ids: tuple[int, ...]  # the generated tokens
    source: ModelSource


def find_model(lab_dir: Path | str, allowed_files: tuple[str, ...] = ("train.py",), exp_id: int | None = None,
               run_tag: str | None = None) -> ModelSource:
    """Experiment ``exp_id``'s model, else the best kept one of ``run_tag`` (default: the latest run)
    whose weights are still on disk, else the copy in ``LAB/.nightlab/best/``."""
    lab_dir = Path(lab_dir)
    with Store.open(lab_dir) as store:
        if exp_id is not None:
            try:
                exp = store.get(exp_id)
            except KeyError as e:
                raise LookupError(str(e.args[0])) from None
            return _from_experiment(lab_dir, exp, allowed_files, required=True)  # type: ignore[return-value]
        runs = sorted(store.runs(), key=lambda r: r.created_at)
        if run_tag is not None:
            runs = [r for r in runs if r.tag == run_tag]
            if not runs:
                raise LookupError(f"no run {run_tag!r} in {lab_dir}")
        kept = [e for e in store.experiments(runs[-1].tag) if e.status == "keep"] if runs else []
    for exp in sorted(kept, key=lambda e: e.val_bpb if e.val_bpb is not None else float("inf")):
        source = _from_experiment(lab_dir, exp, allowed_files, required=False)
        if source is not None:
            return source
    best = state_dir(lab_dir) / BEST_DIR
    if (best / WEIGHTS_FILE).is_file() and all((best / name).is_file() for name in allowed_files):
        return ModelSource(best / WEIGHTS_FILE, {name: (best / name).read_text() for name in allowed_files},
                           _preset(best), None, None, (best / "experiment.txt").read_text().strip()
                           if (best / "experiment.txt").is_file() else "")
    raise LookupError(f"no trained model in {lab_dir}: no kept experiment has {WEIGHTS_FILE} in its run folder and "
                      f"{best} is empty; run `nightlab run` (or pass --id of an experiment that trained)")


def _from_experiment(lab_dir: Path, exp: Experiment, allowed_files: tuple[str, ...],
                     required: bool) -> ModelSource | None:
    run_dir = state_dir(lab_dir) / "runs" / str(exp.id)
    problem = ""
    if not exp.commit_sha:
        problem = f"experiment {exp.id} has no commit (it was {exp.status}: {exp.reason})"
    elif not (run_dir / WEIGHTS_FILE).is_file():
        problem = f"experiment {exp.id} ({exp.status}) left no weights at {run_dir / WEIGHTS_FILE}"
    files = {}
    if not problem:
        for name in allowed_files:
            text = git.read_file(lab_dir, exp.commit_sha or "", name)
            if text is None:
                problem = f"{name} is missing from experiment {exp.id}'s commit {(exp.commit_sha or '')[:10]}"
                break
            files[name] = text + "\n"
    if problem:
        if required:
            raise LookupError(problem)
        return None
    return ModelSource(run_dir / WEIGHTS_FILE, files, _preset(run_dir), exp.id, exp.val_bpb, exp.description)


def _preset(run_dir: Path) -> str | None:
    try:
        preset = json.loads((run_dir / "summary.json").read_text()).get("preset")
    except (OSError, ValueError, AttributeError):
        return None
    return preset if isinstance(preset, str) else None


def sample(source: ModelSource, data_dir: Path | str, prompt: str = "", *, tokens: int = 200,
           temperature: float = 0.8, top_k: int = 50, seed: int = 0, device: str = "cpu",
           preset: str | None = None) -> Sample:
    """Generate ``tokens`` text tokens after ``prompt`` with the model of ``source``."""
    import torch  # deferred: heavy; `nightlab report` and `status` import this module without it

    from nightlab.lab.evaluate import load_model  # deferred: imports torch

    if tokens < 1:
        raise ValueError(f"tokens = {tokens}: ask for at least 1")
    if temperature < 0:
        raise ValueError(f"temperature = {temperature}: use 0 (always the likeliest token) or more")
    tokenizer = Tokenizer.load(Path(data_dir))
    device = resolve_device(device)
    preset = preset or source.preset or ("cpu" if device == "cpu" else "gpu")
    with tempfile.TemporaryDirectory(prefix="nightlab-sample-") as tmp:
        for name, text in source.files.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_text(text)
        model = load_model(Path(tmp) / "train.py", source.weights, device, data_dir=Path(data_dir), preset=preset)
    allowed = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
    allowed[torch.from_numpy(tokenizer.token_bytes > 0)] = True
    ids = generate(model, tokenizer.encode(prompt, bos=True), tokens, allowed=allowed, temperature=temperature,
                   top_k=top_k, seed=seed, device=device)
    return Sample(prompt, tokenizer.decode(ids), tuple(ids), source)


def generate(model, ids: list[int], n: int, *, allowed, temperature: float, top_k: int, seed: int,
             device: str, context: int = CONTEXT) -> list[int]:
    """``n`` new token ids after ``ids``, drawn only from the ``allowed`` (bool[vocab]) ids."""
    import torch  # deferred: heavy

    generator = torch.Generator(device="cpu").manual_seed(seed)
    window = list(ids)
    out: list[int] = []
    cuda = device.startswith("cuda")
    with torch.inference_mode():
        for _ in range(n):
            x = torch.tensor([window[-context:]], dtype=torch.long, device=device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                logits = model(x)[0, -1].float().cpu()
            vocab = min(logits.numel(), allowed.numel())
            logits = logits[:vocab].masked_fill(~allowed[:vocab], float("-inf"))
            if temperature == 0:
                token = int(logits.argmax())
            else:
                logits = logits / temperature
                if 0 < top_k < vocab:
                    cutoff = torch.topk(logits, top_k).values[-1]
                    logits = logits.masked_fill(logits < cutoff, float("-inf"))
                token = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
            window.append(token)
            out.append(token)
    return out
