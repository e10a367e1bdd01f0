"""The sealed holdout split: disjoint from train and val by document for every dataset kind, and
added to a dataset prepared before it existed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nightlab.lab import climbmix, datasets, pycode
from nightlab.lab.shards import SPLITS, TextIndex, iter_text_batches, shard_paths

VOCAB = 300


def documents(directory: Path, split: str) -> list[str]:
    return [t for batch in iter_text_batches(shard_paths(directory / "text", split)) for t in batch]


def assert_disjoint(directory: Path) -> dict[str, list[str]]:
    """Every split's documents, checked to share no document (by the SHA-1 of its text) with another."""
    split_docs = {split: documents(directory, split) for split in SPLITS}
    ids = {split: {hashlib.sha1(t.encode()).hexdigest() for t in docs} for split, docs in split_docs.items()}
    assert all(ids[s] for s in SPLITS), "every split holds documents"
    assert not ids["holdout"] & ids["train"] and not ids["holdout"] & ids["val"] and not ids["train"] & ids["val"]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["holdout_documents"] == len(split_docs["holdout"]) > 0
    assert len(np.load(directory / "holdout.docs.npy")) == len(split_docs["holdout"]) + 1
    return split_docs


def python_file(prefix: str, first_bytes: set[int], n: int) -> str:
    """A small Python file, several passages long, whose SHA-1 starts with one of ``first_bytes``."""
    for i in range(200_000):
        text = "\n\n".join(f"{prefix}_{k} = {i}" for k in range(n)) + "\n"
        if hashlib.sha1(text.encode()).digest()[0] in first_bytes:
            return text
    raise AssertionError("no such file")


def test_pycode_holdout_is_its_own_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for name, wanted in (("v", {0, 1, 2}), ("h", {3, 4, 5}), ("t1", set(range(6, 256))), ("t2", set(range(6, 256)))):
        (root / f"{name}.py").write_text(python_file(name.upper(), wanted, 3))
    monkeypatch.setattr(pycode, "roots", lambda scope: [root])
    directory = datasets.prepare("pycode", VOCAB, home=tmp_path / "home", progress=False)
    docs = assert_disjoint(directory)
    assert docs["holdout"] == pycode.passages((root / "h.py").read_text())


def test_local_holdout_by_hash_and_by_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(["lab", "night", "bits", "loss"], 20)) + f" {i}" for i in range(300)]
    by_hash = tmp_path / "by_hash"
    by_hash.mkdir()
    (by_hash / "all.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert_disjoint(datasets.prepare(f"local:{by_hash}", VOCAB, home=tmp_path / "home", progress=False))

    by_file = tmp_path / "by_file"
    by_file.mkdir()
    for name, part in (("train.jsonl", texts[:200]), ("val.jsonl", texts[200:250]), ("holdout-a.jsonl", texts[250:])):
        (by_file / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    docs = assert_disjoint(datasets.prepare(f"local:{by_file}", VOCAB, home=tmp_path / "home", progress=False))
    assert docs["holdout"] == texts[250:] and docs["val"] == texts[200:250] and docs["train"] == texts[:200]


def fake_downloads(home: Path, indices: list[int]) -> None:
    """ClimbMix shards already in the download cache, so ``prepare`` needs no network."""
    folder = home / "downloads" / "climbmix"
    folder.mkdir(parents=True, exist_ok=True)
    for i in indices:
        texts = [f"shard {i} document {k}: " + "climb mix " * (k % 7 + 1) for k in range(120)]
        pq.write_table(pa.table({"text": texts}), folder / climbmix.shard_name(i))


def test_climbmix_prepared_before_gets_its_holdout_in_place(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    home = tmp_path / "home"
    fake_downloads(home, [0, climbmix.HOLDOUT_SHARD, climbmix.LAST_SHARD])
    directory = datasets.prepare("climbmix", VOCAB, num_shards=1, home=home, progress=False)
    assert_disjoint(directory)
    # as a folder prepared before the holdout existed: no holdout in its index, tokens or manifest
    index = json.loads((directory / "text" / "index.json").read_text())
    index["holdout"] = ""
    index["sources"] = [s for s in index["sources"] if s["split"] != "holdout"]
    (directory / "text" / "index.json").write_text(json.dumps(index))
    for name in ("holdout.tokens.npy", "holdout.docs.npy", "text/holdout-00000.parquet"):
        (directory / name).unlink()
    manifest = json.loads((directory / "manifest.json").read_text())
    old = {k: v for k, v in manifest.items() if not k.startswith("holdout")}
    (directory / "manifest.json").write_text(json.dumps(old))
    kept = {name: (directory / name).read_bytes() for name in
            ("tokenizer.pkl", "token_bytes.npy", "train.tokens.npy", "val.tokens.npy", "val.docs.npy")}

    assert datasets.prepare("climbmix", VOCAB, num_shards=1, home=home, progress=True) == directory
    assert "adding the sealed holdout split" in capsys.readouterr().out
    assert all((directory / name).read_bytes() == data for name, data in kept.items()), "train, val, tokenizer kept"
    upgraded = json.loads((directory / "manifest.json").read_text())
    assert upgraded["corpus_hash"] == old["corpus_hash"] and upgraded["val_tokens"] == old["val_tokens"]
    assert upgraded["holdout_documents"] == 120 and "06541" in upgraded["holdout"]
    assert_disjoint(directory)


def test_pycode_prepared_before_is_left_as_it_was_and_prepare_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for name, wanted in (("v", {0, 1, 2}), ("h", {3, 4, 5}), ("t", set(range(6, 256)))):
        (root / f"{name}.py").write_text(python_file(name.upper(), wanted, 3))
    monkeypatch.setattr(pycode, "roots", lambda scope: [root])
    old = tmp_path / "home" / "datasets" / f"pycode-v{VOCAB}"
    old.mkdir(parents=True)
    (old / "manifest.json").write_text("{}")
    directory = datasets.prepare("pycode", VOCAB, home=tmp_path / "home", progress=True)
    said = capsys.readouterr().out
    assert directory.name == f"pycode-r2-v{VOCAB}" and (old / "manifest.json").read_text() == "{}"
    assert f"pycode-v{VOCAB} has no holdout split" in said and "train changes, val stays the same" in said


def test_training_is_never_handed_the_holdout(tmp_path: Path) -> None:
    from nightlab.trial import sandbox

    folder = tmp_path / "corpus"
    folder.mkdir()
    texts = [f"night lab token {i} " * 5 for i in range(200)]
    (folder / "all.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    directory = datasets.prepare(f"local:{folder}", VOCAB, home=tmp_path / "home", progress=False)
    sealed = {(directory / f"holdout.{kind}.npy").read_bytes() for kind in ("tokens", "docs")}
    view = sandbox.train_view(directory, tmp_path / "run")
    names = sorted(p.name for p in view.iterdir())
    assert names and not [n for n in names if n.startswith(("holdout", "val", "text"))]
    assert all(p.read_bytes() not in sealed for p in view.iterdir() if p.is_file())


def test_the_simulators_holdout_is_the_true_value_with_noise_of_its_own() -> None:
    from nightlab.sim.simulate import SEED_NOISE, Surface

    source = "LR = 0.01  # learning rate\nDEPTH = 4  # layers\n"
    surface = Surface.flat(source)
    val = [surface.measure(source, seed)[1] for seed in range(400)]
    held = [surface.holdout(source, seed) for seed in range(400)]
    assert abs(np.mean(held) - surface.floor) < 4 * SEED_NOISE / 20 and abs(np.std(held) - SEED_NOISE) < 2e-4
    assert abs(np.corrcoef(val, held)[0, 1]) < 0.15  # drawn apart from the val measurement
    assert surface.expected(source.replace("0.01", "0.02")) == surface.floor  # flat: no change does anything


def test_offline_a_climbmix_folder_prepared_before_stays_usable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    home = tmp_path / "home"
    fake_downloads(home, [0, climbmix.LAST_SHARD])  # no holdout shard downloaded, and no network
    monkeypatch.setattr(climbmix, "build", lambda n, text_dir, downloads, progress=True: _old_index(n, text_dir, downloads))
    directory = datasets.prepare("climbmix", VOCAB, num_shards=1, home=home, progress=False)
    manifest = (directory / "manifest.json").read_text()
    monkeypatch.undo()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(datasets.DatasetError, match="shard_06541"):
        datasets.prepare("climbmix", VOCAB, num_shards=1, home=home, progress=False)
    assert (directory / "manifest.json").read_text() == manifest  # still ready, as it was
    assert datasets.open_prepared("climbmix", VOCAB, 1, home=home).dir == directory


def _old_index(num_shards: int, text_dir: Path, downloads: Path):
    """What ``climbmix.build`` wrote before the holdout existed: train and val only."""
    train, val = climbmix.shard_names(num_shards)
    sources = []
    for i, name in enumerate(train + [val]):
        split = "val" if name == val else "train"
        climbmix.link(downloads / name, text_dir / ("val-00000.parquet" if split == "val" else f"train-{i:05d}.parquet"))
        sources.append({"name": name, "sha256": "0" * 64, "bytes": 0, "split": split})
    return TextIndex(sources=sources, split=climbmix.SPLIT_RULE, corpus_hash="0" * 16, details={"num_shards": num_shards})
