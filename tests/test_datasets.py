from __future__ import annotations

import fcntl
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nightlab.lab import datasets, pycode
from nightlab.lab.shards import iter_text_batches, shard_paths
from nightlab.lab.tokenizer import Tokenizer

VOCAB = 300


def served_documents(directory: Path, split: str) -> list[str]:
    """Decode a prepared split back into its documents."""
    tok = Tokenizer.load(directory)
    tokens = np.load(directory / f"{split}.tokens.npy")
    starts = np.load(directory / f"{split}.docs.npy")
    assert (tokens[starts[:-1]] == tok.bos_id).all(), "every document starts with BOS"
    assert (np.count_nonzero(tokens == tok.bos_id) == len(starts) - 1), "and BOS appears nowhere else"
    return [tok.decode(tokens[a + 1:b].tolist()) for a, b in zip(starts[:-1], starts[1:])]


def text_documents(directory: Path, split: str) -> list[str]:
    return [t for batch in iter_text_batches(shard_paths(directory / "text", split)) for t in batch]


def words(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = ["night", "lab", "token", "model", "loss", "bits", "byte", "the", "of", "ünï", "🌙"]
    return [" ".join(rng.choice(vocab, size=int(rng.integers(5, 60)))) + f" #{seed}-{i}" for i in range(n)]


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    (folder / "more").mkdir(parents=True)
    pq.write_table(pa.table({"text": words(1, 30), "id": list(range(30))}), folder / "a.parquet")
    (folder / "more" / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in words(2, 20)) + "\n")
    (folder / "c.txt").write_text("a whole text file is one document\n\nwith blank lines kept")
    pq.write_table(pa.table({"text": words(3, 10)}), folder / "val.parquet")
    (folder / "holdout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in words(5, 8)))
    (folder / "notes.md").write_text("not data")
    return folder


def test_local_folder_with_a_val_file(mixed_folder: Path, tmp_path: Path) -> None:
    spec = f"local:{mixed_folder}"
    directory = datasets.prepare(spec, VOCAB, home=tmp_path / "home", progress=False)
    assert directory == datasets.dataset_dir(spec, VOCAB, home=tmp_path / "home")
    expected_train = words(1, 30) + words(2, 20) + ["a whole text file is one document\n\nwith blank lines kept"]
    assert sorted(served_documents(directory, "train")) == sorted(expected_train)
    assert served_documents(directory, "val") == words(3, 10)
    assert served_documents(directory, "holdout") == words(5, 8)

    prepared = datasets.open_prepared(spec, VOCAB, home=tmp_path / "home")
    m = prepared.manifest
    assert prepared.vocab_size == m["vocab_size"] == VOCAB and prepared.bos_id == m["bos_id"] == VOCAB - 1
    assert "start" in m["split"] and "val" in m["split"]
    assert {s["name"]: s["split"] for s in m["sources"]} == {
        "a.parquet": "train", "c.txt": "train", "more/b.jsonl": "train", "val.parquet": "val",
        "holdout.jsonl": "holdout"}
    for s in m["sources"]:
        assert s["sha256"] == hashlib.sha256((mixed_folder / s["name"]).read_bytes()).hexdigest()
    assert len(prepared.corpus_hash) == 16 and int(prepared.corpus_hash, 16) >= 0
    assert m["train_documents"] == 51 and m["val_documents"] == 10 and m["holdout_documents"] == 8
    assert "holdout" in m["holdout"]
    assert m["train_tokens"] == len(np.load(directory / "train.tokens.npy"))
    assert m["val_bytes"] == sum(len(t.encode()) for t in words(3, 10))


def test_corpus_hash_follows_the_content(mixed_folder: Path, tmp_path: Path) -> None:
    first = datasets.prepare(f"local:{mixed_folder}", VOCAB, home=tmp_path / "h1", progress=False)
    (mixed_folder / "c.txt").write_text("changed")
    second = datasets.prepare(f"local:{mixed_folder}", VOCAB, home=tmp_path / "h2", progress=False)
    hashes = [json.loads((d / "manifest.json").read_text())["corpus_hash"] for d in (first, second)]
    assert hashes[0] != hashes[1]


def test_local_folder_without_a_val_file_splits_by_document_hash(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    docs = words(4, 400)
    (folder / "all.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    directory = datasets.prepare(f"local:{folder}", VOCAB, home=tmp_path / "home", progress=False)
    val = [t for t in docs if hashlib.sha1(t.encode()).digest()[0] < 13]
    assert 0 < len(val) < 60
    holdout = [t for t in docs if 13 <= hashlib.sha1(t.encode()).digest()[0] < 26]
    assert served_documents(directory, "val") == val
    assert 0 < len(holdout) < 60 and served_documents(directory, "holdout") == holdout
    assert served_documents(directory, "train") == [t for t in docs if t not in val and t not in holdout]
    assert "SHA-1" in json.loads((directory / "manifest.json").read_text())["split"]


def test_bad_local_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(datasets.DatasetError, match="no such folder"):
        datasets.prepare(f"local:{tmp_path / 'absent'}", VOCAB, home=tmp_path, progress=False)
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "x.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(datasets.DatasetError, match=r"x\.jsonl:2"):
        datasets.prepare(f"local:{folder}", VOCAB, home=tmp_path, progress=False)


def test_prepare_skips_finished_steps_and_finishes_missing_ones(mixed_folder: Path, tmp_path: Path) -> None:
    spec, home = f"local:{mixed_folder}", tmp_path / "home"
    directory = datasets.prepare(spec, VOCAB, home=home, progress=False)
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    datasets.prepare(spec, VOCAB, home=home, progress=False)
    assert {p: p.stat().st_mtime_ns for p in files} == stamps, "a finished dataset is left alone"

    val_tokens = np.load(directory / "val.tokens.npy")
    (directory / "val.tokens.npy").unlink()
    (directory / "manifest.json").unlink()
    with pytest.raises(datasets.DatasetNotPrepared):
        datasets.open_prepared(spec, VOCAB, home=home)
    datasets.prepare(spec, VOCAB, home=home, progress=False)
    np.testing.assert_array_equal(np.load(directory / "val.tokens.npy"), val_tokens)
    for name in ("train.tokens.npy", "tokenizer.pkl", "text/train-00000.parquet"):
        assert (directory / name).stat().st_mtime_ns == stamps[directory / name], f"{name} was not redone"
    assert not [p for p in directory.rglob("*") if "tmp" in p.name or "partial" in p.name]

    (directory / "tokenizer.pkl").unlink()  # a new tokenizer makes the token cache stale
    datasets.prepare(spec, VOCAB, home=home, progress=False)
    assert (directory / "train.tokens.npy").stat().st_mtime_ns != stamps[directory / "train.tokens.npy"]
    assert (directory / "text/train-00000.parquet").stat().st_mtime_ns == stamps[directory / "text/train-00000.parquet"]


def test_a_second_prepare_of_a_dataset_waits_for_the_first(mixed_folder: Path, tmp_path: Path) -> None:
    spec, home = f"local:{mixed_folder}", tmp_path / "home"
    directory = datasets.dataset_dir(spec, VOCAB, home=home)
    directory.mkdir(parents=True)
    code = ("import sys; from pathlib import Path; from nightlab.lab import datasets; "
            "datasets.prepare(sys.argv[1], int(sys.argv[2]), home=Path(sys.argv[3]))")
    with open(directory / datasets.LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a prepare at work on it (another lab sharing the cache)
        second = subprocess.Popen([sys.executable, "-c", code, spec, str(VOCAB), str(home)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert "another nightlab prepare is preparing" in second.stdout.readline()
        time.sleep(0.5)
        assert second.poll() is None and list(directory.iterdir()) == [directory / datasets.LOCK_FILE]
    _, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    assert datasets.open_prepared(spec, VOCAB, home=home).manifest["val_documents"] == 10


def test_a_split_without_documents_is_never_marked_ready(mixed_folder: Path, tmp_path: Path) -> None:
    spec, home = f"local:{mixed_folder}", tmp_path / "home"
    directory = datasets.prepare(spec, VOCAB, home=home, progress=False)
    (directory / "manifest.json").unlink()
    np.save(directory / "val.tokens.npy", np.load(directory / "val.tokens.npy")[:0])  # as a broken earlier prepare
    np.save(directory / "val.docs.npy", np.load(directory / "val.docs.npy")[:1])
    with pytest.raises(datasets.DatasetError, match="the val split has no documents"):
        datasets.prepare(spec, VOCAB, home=home, progress=False)
    assert not (directory / "manifest.json").exists()


def test_open_prepared_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nightlab prepare --dataset pycode:stdlib --vocab-size 4096"):
        datasets.open_prepared("pycode:stdlib", 4096, home=tmp_path)


def test_dataset_dirs_and_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIGHTLAB_HOME", str(tmp_path))
    assert datasets.dataset_dir("pycode", 8192) == tmp_path / "datasets" / "pycode-r2-v8192"
    assert datasets.dataset_dir("pycode:stdlib", 8192).name == "pycode-stdlib-r2-v8192"
    assert datasets.dataset_dir("climbmix", 4096).name == "climbmix-s8-v4096"
    assert datasets.dataset_dir("climbmix", 4096, 2).name == "climbmix-s2-v4096"
    assert datasets.dataset_dir("pycode", 8192, 2) == datasets.dataset_dir("pycode", 8192)  # shards are ClimbMix's
    local = datasets.dataset_dir(f"local:{tmp_path}/My Data", 8192).name
    assert local.startswith("local-My-Data-") and local.endswith("-r2-v8192") and len(local.split("-")[3]) == 8
    assert datasets.dataset_dir(f"local:{tmp_path}/a/x", 512) != datasets.dataset_dir(f"local:{tmp_path}/b/x", 512)
    assert datasets.dataset_dir("hostcode", 8192).name == "hostcode-r2-v8192"
    for bad in ("pycod", "climbmix:5", "local:", "pycode:all", "pycode:host", "hostcode:x"):
        with pytest.raises(datasets.DatasetError, match="pycode, pycode:stdlib, hostcode, climbmix or local:PATH"):
            datasets.dataset_dir(bad, 8192)


def test_prepared_tiny_tokens_decode_to_its_text(prepared_tiny: Path) -> None:
    assert served_documents(prepared_tiny, "train") == text_documents(prepared_tiny, "train")
    assert served_documents(prepared_tiny, "val") == text_documents(prepared_tiny, "val")
    token_bytes = np.load(prepared_tiny / "token_bytes.npy")
    manifest = json.loads((prepared_tiny / "manifest.json").read_text())
    val = np.load(prepared_tiny / "val.tokens.npy")
    assert int(token_bytes[val].sum()) == manifest["val_bytes"] == sum(
        len(t.encode()) for t in text_documents(prepared_tiny, "val"))


# --- pycode ------------------------------------------------------------------------------------


def test_passages_follow_the_recipe() -> None:
    text = "a" * 7000 + "\n\n" + "b" * 10 + "\n  \t\n" + "c" * 5990 + "\n\n\n" + "d" + "\n\n"
    assert pycode.passages(text) == ["a" * 6000, "a" * 1000 + "\n\n" + "b" * 10, "c" * 5990 + "\n\nd"]
    assert pycode.passages("x = 1\n\n\ny = 2\n") == ["x = 1\n\ny = 2\n"]
    assert pycode.passages("\n\n") == []


def with_first_byte(prefix: str, wanted: set[int]) -> str:
    """A small Python file whose SHA-1 starts with one of the wanted bytes."""
    for i in range(100_000):
        text = f"{prefix} = {i}\n\n\ndef f():\n    return {i}\n"
        if hashlib.sha1(text.encode()).digest()[0] in wanted:
            return text
    raise AssertionError("no such file")


def test_pycode_recipe_on_a_small_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    (root / "pkg" / "sub").mkdir(parents=True)
    val_text = with_first_byte("VAL", {0, 1, 2})
    train_text = with_first_byte("TRAIN", set(range(6, 256)))
    holdout_text = with_first_byte("HOLDOUT", {3, 4, 5})
    (root / "pkg" / "v.py").write_text(val_text)
    (root / "pkg" / "h.py").write_text(holdout_text)
    (root / "pkg" / "t.py").write_text(train_text)
    (root / "pkg" / "sub" / "copy_of_t.py").write_text(train_text)  # same bytes: kept once
    (root / "latin1.py").write_bytes("café = 1\n".encode("latin-1"))  # not UTF-8: left out
    (root / "long.py").write_text("x" * 6500 + "\n\n" + "# end\n")
    (root / "readme.txt").write_text("not a .py file")
    monkeypatch.setattr(pycode, "roots", lambda scope: [root])

    directory = datasets.prepare("pycode", VOCAB, home=tmp_path / "home", progress=False)
    assert directory.name == f"pycode-r2-v{VOCAB}"
    kept = [train_text, val_text, holdout_text, (root / "long.py").read_text()]
    digests = sorted(hashlib.sha1(t.encode()).digest() for t in kept)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["corpus_hash"] == hashlib.sha256(b"".join(digests)).hexdigest()[:16]
    assert manifest["details"]["files"] == 4
    assert manifest["details"]["duplicates"] == 1 and manifest["details"]["not_utf8"] == 1
    assert served_documents(directory, "val") == pycode.passages(val_text)
    assert served_documents(directory, "holdout") == pycode.passages(holdout_text)
    assert sorted(served_documents(directory, "train")) == sorted(
        pycode.passages(train_text) + ["x" * 6000, "x" * 500 + "\n\n# end\n"])


def test_pycode_stdlib_scope_leaves_out_installed_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "lib"
    (root / "site-packages" / "thirdparty").mkdir(parents=True)
    (root / "json").mkdir()
    (root / "json" / "decoder.py").write_text("STD = 1\n")
    (root / "site-packages" / "thirdparty" / "mod.py").write_text("THIRD = 1\n")
    monkeypatch.setattr(pycode, "roots", lambda scope: [root])
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    index = pycode.build("stdlib", text_dir, progress=False)
    assert text_documents(tmp_path, "train") + text_documents(tmp_path, "val") == ["STD = 1\n"]
    assert index.details["files"] == 1


def test_hostcode_keeps_source_and_text_files_and_leaves_out_links_and_large_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert pycode.roots("host") == [Path("/usr"), Path("/opt"), Path("/etc")]
    root = tmp_path / "usr"
    (root / "include").mkdir(parents=True)
    kept = {"include/a.h": "int a;\n", "b.cu": "__global__ void k() {}\n", "c.pyi": "def f() -> int: ...\n",
            "notes.md": "# notes\n", "d.txt": "plain text\n"}
    for name, text in kept.items():
        (root / name).write_text(text)
    (root / "image.png").write_bytes(b"\x89PNG not text")  # not a kept suffix
    (root / "big.txt").write_text("y" * (pycode.HOST_MAX_BYTES + 1))  # too large: generated, not written
    (root / "link.h").symlink_to(root / "include" / "a.h")  # a link is not walked into the corpus twice
    monkeypatch.setattr(pycode, "roots", lambda scope: [root])
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    index = pycode.build("host", text_dir, progress=False)
    served = sorted(text_documents(tmp_path, "train") + text_documents(tmp_path, "val")
                    + text_documents(tmp_path, "holdout"))
    assert served == sorted(kept.values()) and index.details["files"] == len(kept)


def test_pycode_roots_are_the_interpreters_own() -> None:
    import site
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert pycode.roots("stdlib") == [stdlib]
    assert pycode.roots("all") == [*map(Path, site.getsitepackages()), stdlib]
    assert (stdlib / "json" / "decoder.py") in set(pycode.source_files([stdlib / "json"]))
