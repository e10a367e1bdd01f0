"""``nightlab init``, ``prepare`` and ``train`` as a user runs them: real subprocesses, git, tiny CPU training."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import gutenberg_sample
from nightlab import config as cfg
from nightlab.cli import main


def nightlab(*args: str, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NIGHTLAB_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "nightlab", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1500)  # a guard against a hang; a loaded 2-core machine needs long


@pytest.mark.slow
def test_init_prepare_train_on_the_gutenberg_sample(tmp_path: Path) -> None:
    home, text = tmp_path / "home", gutenberg_sample(tmp_path / "books")
    lab = tmp_path / "lab"
    done = nightlab("init", str(lab), "--dataset", f"local:{text}", "--device", "cpu", "--budget", "40",
                    "--set", "lab.eval_max_tokens=60000", cwd=tmp_path, home=home)
    assert done.returncode == 0, done.stderr
    assert {"train.py", "program.md", "nightlab.toml", ".gitignore", "notes"} <= {p.name for p in lab.iterdir()}
    log = subprocess.run(["git", "-C", str(lab), "log", "--format=%s"], capture_output=True, text=True).stdout
    assert log.strip() == "nightlab init: baseline train.py"
    assert subprocess.run(["git", "-C", str(lab), "status", "--porcelain"], capture_output=True,
                          text=True).stdout == ""

    done = nightlab("prepare", cwd=lab, home=home)
    assert done.returncode == 0, done.stderr
    assert "corpus " in done.stdout and "val tokens" in done.stdout

    done = nightlab("train", cwd=lab, home=home)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = dict(line.split(": ", 1) for line in done.stdout.split("---")[-1].strip().splitlines())
    runs = [json.loads(line) for line in (lab / ".nightlab/train_runs.jsonl").read_text().splitlines()]
    assert len(runs) == 1 and runs[0]["status"] == "ok"
    run_dir = Path(runs[0]["run_dir"])
    assert {"train.log", "summary.json", "eval.json", "model.pt"} <= {p.name for p in run_dir.iterdir()}
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["status"] == "ok" and ev["causal"] and ev["seq_len"] == 512 and ev["tokens"] <= 60000
    assert float(summary["val_bpb"]) == pytest.approx(ev["val_bpb"], abs=1e-6)
    assert summary["corpus_hash"] == ev["corpus_hash"] == runs[0]["corpus_hash"]
    # Far below a model that knows nothing: log2(vocab) bits per token, spread over the bytes.
    uniform = math.log2(8192) * ev["tokens"] / ev["bytes"]
    assert math.isfinite(ev["val_bpb"]) and ev["val_bpb"] < 0.85 * uniform
    trained = json.loads((run_dir / "summary.json").read_text())
    manifest = json.loads((run_dir / "data/manifest.json").read_text())
    assert float(summary["epochs"]) == round(trained["total_tokens"] / manifest["train_tokens"], 3) > 0
    assert trained["training_seconds"] >= 40 and trained["num_steps"] > 0 and trained["preset"] == "cpu"
    # The record keeps the trial's wall times: all of it, the training process's and the evaluator's.
    run = runs[0]
    assert run["train_wall_s"] > run["training_seconds"] + run["startup_seconds"]
    assert run["eval_wall_s"] > ev["eval_s"]
    # Each is rounded to hundredths, so the sum of the parts may pass the whole by up to 0.01 s.
    assert run["wall_s"] >= run["train_wall_s"] + run["eval_wall_s"] - 0.011


def test_init_refuses_a_folder_that_is_not_empty(tmp_path: Path, capsys) -> None:
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "notes.txt").write_text("mine")
    assert main(["init", str(tmp_path / "lab")]) == 2
    err = capsys.readouterr().err
    assert "already exists and is not empty" in err and str(tmp_path / "lab") in err
    assert [p.name for p in (tmp_path / "lab").iterdir()] == ["notes.txt"]


def test_init_writes_a_config_that_loads_back_with_its_settings(tmp_path: Path) -> None:
    assert main(["init", str(tmp_path / "lab"), "--device", "cpu", "--budget", "45",
                 "--set", "run.baseline_runs=4"]) == 0
    conf = cfg.load(tmp_path / "lab")
    assert conf.lab.device == "cpu" and conf.lab.budget_s == 45 and conf.run.baseline_runs == 4
    assert conf.lab.eval_seq_len == 512  # the CPU model's context
    assert "MATRIX_LR" in conf.search.constants and "DEPTH" not in conf.search.constants


def test_a_zero_shortcut_flag_is_checked_not_dropped(tmp_path: Path, capsys) -> None:
    assert main(["init", str(tmp_path / "lab"), "--budget", "0"]) == 2
    assert "lab.budget_s must be positive" in capsys.readouterr().err
    assert not (tmp_path / "lab").exists()


def test_train_with_a_negative_seed_names_the_setting(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("NIGHTLAB_HOME", str(tmp_path / "home"))
    assert main(["init", str(tmp_path / "lab"), "--dataset", "pycode:stdlib"]) == 0
    assert main(["train", "--lab", str(tmp_path / "lab"), "--seed", "-1"]) == 2
    assert "lab.seed must be between 0 and 2147483647, got -1" in capsys.readouterr().err


def test_init_where_no_folder_can_be_made_is_one_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["init", "/proc/nightlab-lab"]) == 2
    assert "cannot create the lab folder /proc/nightlab-lab" in capsys.readouterr().err
    (tmp_path / "file").write_text("mine")
    assert main(["init", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_prepare_flags_are_checked_before_any_work(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("NIGHTLAB_HOME", str(tmp_path / "home"))
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text("A short book.\n" * 50)
    monkeypatch.chdir(tmp_path)
    for flags, named in ((["--vocab-size", "10"], "lab.vocab_size must be between 260 and 65535, got 10"),
                         (["--num-shards", "0"], "lab.num_shards must be between 1 and 6541, got 0")):
        assert main(["prepare", "--dataset", f"local:{books}", *flags]) == 2
        assert named in capsys.readouterr().err
    assert not (tmp_path / "home").exists()


def test_demo_refuses_zero_experiments(tmp_path: Path, capsys) -> None:
    assert main(["demo", str(tmp_path / "night"), "--experiments", "0"]) == 2
    assert "--experiments 0: run at least 1 experiment" in capsys.readouterr().err
    assert not (tmp_path / "night").exists()


def test_commands_outside_a_lab_say_how_to_make_one(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    for command in (["train"], ["prepare"], ["run"]):
        assert main(command) == 2, command
        assert "nightlab init" in capsys.readouterr().err


def test_train_before_prepare_names_the_command_to_run(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("NIGHTLAB_HOME", str(tmp_path / "home"))
    assert main(["init", str(tmp_path / "lab"), "--dataset", "pycode:stdlib"]) == 0
    assert main(["train", "--lab", str(tmp_path / "lab")]) == 2
    assert "nightlab prepare" in capsys.readouterr().err


def test_help_teaches_the_commands(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("init", "prepare", "train", "run", "experiment", "replay", "report", "status", "sample", "demo"):
        assert f"    {command}" in text, command
    with pytest.raises(SystemExit):
        main(["init", "--help"])
    assert "program.md" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_runs_a_short_night_and_says_where_the_results_are(tmp_path: Path) -> None:
    done = nightlab("demo", "night", "--experiments", "1", "--budget", "5", cwd=tmp_path, home=tmp_path / "home")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = tmp_path / "night" / ".nightlab" / "results.tsv"
    rows = [line.split("\t") for line in results.read_text().splitlines()]
    assert rows[0] == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert rows[1][4] == "baseline" and len(rows) >= 3  # the baseline, then the search agent's edit
    assert rows[2][4].startswith("search: ") and rows[2][3] in ("keep", "discard", "crash", "invalid")
    assert f"results: {Path('night') / '.nightlab' / 'results.tsv'}" in done.stdout
    assert "nightlab report --open" in done.stdout
    conf = cfg.load(tmp_path / "night")
    assert conf.lab.dataset == "pycode:stdlib" and conf.lab.device == "cpu"
    again = nightlab("demo", "night", "--experiments", "1", cwd=tmp_path, home=tmp_path / "home")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    more = [line.split("\t") for line in results.read_text().splitlines()]
    assert len(more) == len(rows) + 1 and more[-1][4].startswith("search: ")  # one more experiment


def test_init_with_a_relative_local_dataset_records_where_the_user_meant(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init", "lab", "--device", "cpu", "--dataset", "local:books"]) == 0
    # read from inside the lab, "books" must still be tmp_path/books, not lab/books
    assert cfg.load(tmp_path / "lab").lab.dataset == f"local:{(tmp_path / 'books').resolve()}"


def test_train_py_run_from_a_subfolder_of_the_lab_reads_the_lab_settings(tmp_path: Path, monkeypatch) -> None:
    from nightlab.lab import datasets, session

    lab = tmp_path / "lab"
    (lab / "notes").mkdir(parents=True)
    (lab / cfg.CONFIG_FILE).write_text('[lab]\ndataset = "local:data"\nbudget_s = 42.0\ndevice = "cpu"\n')
    monkeypatch.setenv("NIGHTLAB_HOME", str(tmp_path / "home"))
    for name in ("NIGHTLAB_DATA", "NIGHTLAB_OUT", "NIGHTLAB_BUDGET_S", "NIGHTLAB_DEVICE", "NIGHTLAB_PRESET",
                 "NIGHTLAB_SEED"):
        monkeypatch.delenv(name, raising=False)
    prepared = datasets.dataset_dir(f"local:{(lab / 'data').resolve()}", 8192)
    prepared.mkdir(parents=True)
    (prepared / "manifest.json").write_text(json.dumps({"vocab_size": 8192, "bos_id": 8191, "corpus_hash": "abc"}))
    monkeypatch.chdir(lab / "notes")

    s = session.connect()

    assert s.budget_s == 42.0 and s.data_dir == prepared and s.corpus_hash == "abc"
    assert s.out_dir == lab.resolve() / ".nightlab" / "scratch"


def test_prepare_of_another_dataset_inside_a_lab_says_the_lab_still_trains_on_its_own(tmp_path: Path, monkeypatch,
                                                                                      capsys) -> None:
    monkeypatch.setenv("NIGHTLAB_HOME", str(tmp_path / "home"))
    books = tmp_path / "books"
    books.mkdir()
    for i in range(40):
        (books / f"{i}.txt").write_text(f"Book {i}. " + "The cat sat on the mat and read a book. " * 40)
    assert main(["init", str(tmp_path / "lab"), "--device", "cpu", "--dataset", f"local:{books}",
                 "--set", "lab.vocab_size=300"]) == 0
    monkeypatch.chdir(tmp_path / "lab")
    capsys.readouterr()
    assert main(["prepare"]) == 0
    assert "still trains on" not in capsys.readouterr().out
    assert main(["prepare", "--vocab-size", "320"]) == 0
    out = capsys.readouterr().out
    assert f"still trains on local:{books.resolve()} (vocab 300)" in out
    assert 'vocab_size = 320 under [lab]' in out
