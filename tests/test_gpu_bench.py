"""``bench/gpu_bench.py``, the benchmark command, run as on a GPU machine but on this CPU with the book sample."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, gutenberg_sample

BENCH = REPO_ROOT / "bench" / "gpu_bench.py"
TEMPLATE = REPO_ROOT / "src" / "nightlab" / "template" / "train.py"


def gpu_bench(*args: str, home: Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "NIGHTLAB_HOME": str(home), "TMPDIR": str(cwd), **(env or {})}
    env.pop("OUT", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


SMALL = ("--budget", "4", "--set", "lab.vocab_size=512", "--set", "lab.eval_max_tokens=20000")


@pytest.mark.slow
def test_one_train_py_two_seeds_one_row_each_named_by_change(tmp_path: Path) -> None:
    books, out = gutenberg_sample(tmp_path / "books"), tmp_path / "results.jsonl"
    done = gpu_bench("--dataset", f"local:{books}", *SMALL, "--seeds", "0,1", "--train-py", str(TEMPLATE),
                     "--change", "baseline", "--out", str(out), home=tmp_path / "home", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["change"], r["seed"], r["status"]) for r in rows] == [("baseline", 0, "ok"), ("baseline", 1, "ok")]
    assert all(r["budget_s"] == 4 and r["val_bpb"] > 0 and "gpu" not in r for r in rows)
    assert all(0 < r["epochs"] < 1 for r in rows)  # where in the train split each run ended
    assert re.search(r"^baseline +0 +[\d.]+ +[\d,]+ +[\d.]+ +\d+ +0\.\d\d ", done.stdout, re.M)  # ... and the table says it
    assert "val_bpb" in done.stdout  # the training output streams to the terminal, not to a log


@pytest.mark.slow
def test_side_by_side_runs_the_variants_at_the_same_time_each_on_its_own_train_py(tmp_path: Path) -> None:
    books = gutenberg_sample(tmp_path / "books")
    says_cache = 'print("compile cache:", __import__("os").environ.get("TORCHINDUCTOR_CACHE_DIR"), flush=True)\n'
    base, one_layer = tmp_path / "base.py", tmp_path / "one_layer.py"
    base.write_text(TEMPLATE.read_text() + says_cache)
    one_layer.write_text(TEMPLATE.read_text().replace("CPU_DEPTH = 2  #", "CPU_DEPTH = 1  #", 1) + says_cache)
    out = tmp_path / "out" / "results.jsonl"

    done = gpu_bench("--dataset", f"local:{books}", *SMALL, "--side-by-side",
                     "--variant", f"base={base}", "--variant", f"shallow={one_layer}", "--out", str(out),
                     home=tmp_path / "home", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rows = {r["change"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"base", "shallow"}
    for row in rows.values():
        assert row["status"] == "ok" and row["val_bpb"] > 0 and row["corpus_hash"] and row["card"] == "cpu", row
    # Each variant trained its own train.py, and its output went to its own log beside --out.
    assert "depth 2," in (out.parent / "base.log").read_text()
    assert "depth 1," in (out.parent / "shallow.log").read_text()
    # Side by side: each run started before the other ended (one after another, they would not overlap).
    when = {name: (dt.datetime.fromisoformat(r["start"]), dt.datetime.fromisoformat(r["end"]))
            for name, r in rows.items()}
    assert when["base"][0] < when["shallow"][1] and when["shallow"][0] < when["base"][1], when
    assert "base" in done.stdout and "shallow" in done.stdout  # the closing table names both
    # Each compiled into an empty cache of its own: two runs of the same graphs compiling into one
    # cache at once slow each other's cold start.
    caches = {name: re.search(r"compile cache: (\S+)", (out.parent / f"{name}.log").read_text()).group(1)
              for name in rows}
    assert caches["base"] != caches["shallow"] and "None" not in caches.values(), caches
    assert all(r["compile_cache"] == "cold" for r in rows.values())


@pytest.mark.slow
def test_side_by_side_seeds_of_one_train_py_run_at_the_same_time_each_in_its_own_lab(tmp_path: Path) -> None:
    books, out = gutenberg_sample(tmp_path / "books"), tmp_path / "out" / "results.jsonl"
    done = gpu_bench("--dataset", f"local:{books}", *SMALL, "--side-by-side", "--seeds", "0,1",
                     "--out", str(out), home=tmp_path / "home", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rows = {r["seed"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {0, 1} and all(r["status"] == "ok" and r["change"] == "template" for r in rows.values())
    for seed in (0, 1):  # each seed's output in its own log, naming its seed
        assert f"with seed {seed} on corpus" in (out.parent / f"template-seed{seed}.log").read_text()
    when = {seed: (dt.datetime.fromisoformat(r["start"]), dt.datetime.fromisoformat(r["end"])) for seed, r in rows.items()}
    assert when[0][0] < when[1][1] and when[1][0] < when[0][1], when
    assert rows[0]["val_bpb"] != rows[1]["val_bpb"]  # two seeds, two trainings


def fake_gpus(tmp_path: Path, count: int) -> dict[str, str]:
    """A PATH whose nvidia-smi lists `count` GPUs, for what gpu_bench decides before any run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + "echo 'NVIDIA H100 80GB HBM3'\n" * count)
    smi.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_side_by_side_refuses_more_runs_than_gpus_naming_the_counts(tmp_path: Path) -> None:
    env = fake_gpus(tmp_path, 2)
    done = gpu_bench("--side-by-side", "--seeds", "0,1,2", home=tmp_path / "home", cwd=tmp_path, env=env)
    assert done.returncode != 0 and "need 3 GPUs" in done.stderr and "2 are visible" in done.stderr
    done = gpu_bench("--side-by-side", "--variant", "a=template", "--variant", "b=template", "--seeds", "0,1",
                     home=tmp_path / "home", cwd=tmp_path, env=env)
    assert done.returncode != 0 and "need 4 GPUs" in done.stderr


def test_seeds_that_are_not_a_list_of_integers_are_named_in_the_error(tmp_path: Path) -> None:
    for bad in ("0,x", "1,1"):
        done = gpu_bench("--seeds", bad, home=tmp_path / "home", cwd=tmp_path)
        assert done.returncode != 0 and repr(bad) in done.stderr, done.stderr


def test_a_variant_that_is_not_name_equals_file_is_named_in_the_error(tmp_path: Path) -> None:
    done = gpu_bench("--variant", "just-a-name", home=tmp_path / "home", cwd=tmp_path)
    assert done.returncode != 0 and "just-a-name" in done.stderr and "NAME=FILE" in done.stderr
    done = gpu_bench("--variant", f"x={tmp_path / 'missing.py'}", home=tmp_path / "home", cwd=tmp_path)
    assert done.returncode != 0 and "missing.py" in done.stderr


def test_side_by_side_takes_only_the_gpus_already_visible() -> None:
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.gpu_pool(4, None) == ["0", "1", "2", "3"]
    assert bench.gpu_pool(8, "4,5") == ["4", "5"]  # a user who pinned two GPUs gets those two, not 0 and 1
    assert bench.gpu_pool(8, "") == []
