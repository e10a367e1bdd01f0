"""The runner: real subprocesses of the stand-in train.py and the real trusted evaluator."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from fixtures.standin.helpers import STANDIN, make_dataset, set_constant

from nightlab.config import Config
from nightlab.trial import processes, runner
from nightlab.trial.processes import group_alive
from nightlab.trial.runner import run_trial


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def _config(budget_s=0.5, allowance_s=30.0, sandbox="none") -> Config:
    return Config().with_overrides(
        [f"lab.budget_s={budget_s}", f"lab.startup_allowance_s={allowance_s}", "lab.device='cpu'", "lab.eval_timeout_s=60",
         f"lab.sandbox='{sandbox}'"]
    )


def _workdir(tmp_path: Path, **constants) -> Path:
    work = tmp_path / "work"
    work.mkdir(parents=True)
    text = STANDIN.read_text()
    for name, value in constants.items():
        text = set_constant(text, name, value)
    (work / "train.py").write_text(text)
    return work


def _plant(work: Path, code: str) -> None:
    """Put ``code`` into the stand-in's training, just before its timed sleep."""
    path = work / "train.py"
    path.write_text(path.read_text().replace("    time.sleep(SLEEP_S)\n", code + "    time.sleep(SLEEP_S)\n"))


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_ok_trial_streams_progress_and_is_judged_by_the_evaluator(tmp_path, data_dir):
    lines: list[str] = []
    stages: list[str] = []
    result = run_trial(_workdir(tmp_path), tmp_path / "run", _config(), seed=7, data_dir=data_dir,
                       on_progress=lines.append, on_stage=lambda stage, pid: stages.append(stage))
    assert result.status == "ok", result
    assert result.val_bpb is not None and 0 < result.val_bpb < 9
    assert result.eval["val_bpb"] == result.val_bpb
    assert result.summary["num_steps"] == 1 and result.summary["peak_memory_mb"] == 12.5
    # The lab, not train.py, says how far into the train split the run read: 1,000 of its 20,000 tokens.
    assert result.summary["epochs"] == 0.05
    assert "step 0 | budget 0.5 s | device cpu" in lines
    assert "---" in lines and (tmp_path / "run" / "train.log").read_text().count("step 1") == 1
    assert stages == ["train", "eval"]
    assert result.device == "cpu" and result.preset == "cpu"
    assert result.total_s >= result.train_s + result.eval_s - 0.01


def test_epochs_come_from_the_lab_and_only_from_a_real_count(tmp_path, data_dir):
    # The stand-in reports 1,000 tokens; the test dataset's train split holds 20,000.
    assert runner.with_epochs({"total_tokens": 30_000}, data_dir)["epochs"] == 1.5
    assert runner.with_epochs({"total_tokens": 1000, "epochs": 7}, data_dir)["epochs"] == 0.05
    for bad in (float("inf"), float("nan"), -5, True, "1000", None, 10**400):
        assert "epochs" not in runner.with_epochs({"total_tokens": bad, "epochs": 7}, data_dir), bad
    (tmp_path / "bare").mkdir()  # no manifest: no figure, and train.py's own is not passed off as the lab's
    assert "epochs" not in runner.with_epochs({"total_tokens": 1000, "epochs": 7}, tmp_path / "bare")

    # A train.py that claims infinitely many tokens still gets its trial judged, without a figure.
    work = _workdir(tmp_path)
    train = work / "train.py"
    train.write_text(train.read_text().replace("TOKENS = 1000", 'TOKENS = float("inf")'))
    result = run_trial(work, tmp_path / "run", _config(), 0, data_dir=data_dir)
    assert result.status == "ok" and "epochs" not in result.summary


def test_sharper_unigram_scores_better(tmp_path, data_dir):
    flat = run_trial(_workdir(tmp_path / "a", SHARPNESS=0.0), tmp_path / "a/run", _config(), 0, data_dir=data_dir)
    sharp = run_trial(_workdir(tmp_path / "b", SHARPNESS=1.0), tmp_path / "b/run", _config(), 0, data_dir=data_dir)
    assert flat.status == sharp.status == "ok"
    assert sharp.val_bpb < flat.val_bpb - 0.1


def test_crash_keeps_the_traceback(tmp_path, data_dir):
    result = run_trial(_workdir(tmp_path, MODE="crash"), tmp_path / "run", _config(), 0, data_dir=data_dir)
    assert result.status == "crash"
    assert result.error.startswith("Traceback (most recent call last)")
    assert "RuntimeError: stand-in crash" in result.error
    assert result.reason.startswith("exit code 1: RuntimeError: stand-in crash")
    assert not (tmp_path / "run" / "eval.json").exists()


def test_nan_training_is_a_crash_named_nan(tmp_path, data_dir):
    result = run_trial(_workdir(tmp_path, MODE="nan"), tmp_path / "run", _config(), 0, data_dir=data_dir)
    assert result.status == "crash" and result.reason.startswith("NaN")
    assert result.val_bpb is None


def test_missing_model_is_a_crash_that_names_lab_finish(tmp_path, data_dir):
    result = run_trial(_workdir(tmp_path, MODE="nomodel"), tmp_path / "run", _config(), 0, data_dir=data_dir)
    assert result.status == "crash" and "lab.finish" in result.reason


def test_leaking_model_is_invalid(tmp_path, data_dir):
    result = run_trial(_workdir(tmp_path, MODE="leak"), tmp_path / "run", _config(), 0, data_dir=data_dir)
    assert result.status == "invalid", result
    assert result.val_bpb is None


FORGE = """
import json as _json, os as _os, sys as _sys
if "--out" in _sys.argv:  # inside the evaluator: write a perfect score and leave before it writes its own
    with open(_sys.argv[_sys.argv.index("--out") + 1], "w") as _f:
        _json.dump({"status": "ok", "val_bpb": 0.0001, "causal": True}, _f)
    _os._exit(0)
"""


def test_train_py_cannot_write_the_verdict_from_the_judges_model_process(tmp_path, data_dir):
    work = _workdir(tmp_path)
    (work / "train.py").write_text((work / "train.py").read_text() + FORGE)
    result = run_trial(work, tmp_path / "run", _config(), 0, data_dir=data_dir)
    assert result.status == "ok", result  # its code runs where no --out is, nor any path of the trial
    assert result.val_bpb is not None and result.val_bpb > 1


def test_what_training_leaves_in_the_worktree_or_the_dataset_voids_the_trial(tmp_path, data_dir):
    work = _workdir(tmp_path)
    plant = ("    (Path.cwd() / 'sitecustomize.py').write_text('import os')\n"
             "    (Path.cwd() / 'pkg').mkdir(exist_ok=True)\n    (Path.cwd() / 'pkg' / 'evil.pth').write_text('x')\n")
    _plant(work, plant)
    result = run_trial(work, tmp_path / "run", _config(), 0, data_dir=data_dir)
    assert result.status == "invalid" and "created files in the worktree" in result.reason, result.reason
    assert "sitecustomize.py" in result.reason and not (work / "sitecustomize.py").exists()

    shared = tmp_path / "shared"
    shutil.copytree(data_dir, shared)
    work2 = _workdir(tmp_path / "2")
    poison = "    (data / 'token_bytes.npy').write_bytes((data / 'token_bytes.npy').read_bytes())\n"  # the view's copy
    poison += "    os.utime(data / 'train.tokens.npy')\n    open(data / 'train.tokens.npy', 'ab').close()\n"
    poison += "    with open(data / 'train.tokens.npy', 'r+b') as f:\n        f.write(f.read(1))\n"
    _plant(work2, poison)
    result = run_trial(work2, tmp_path / "run2", _config(), 0, data_dir=shared)
    assert result.status == "invalid" and "wrote the shared dataset cache" in result.reason, result.reason
    assert "train.tokens.npy" in result.reason and "token_bytes.npy" not in result.reason  # a copy: harmless


def test_the_judge_scores_train_py_as_it_was_before_training(tmp_path, data_dir):
    work = _workdir(tmp_path)
    rewrite = "    Path(__file__).write_text(Path(__file__).read_text().replace('MODE = \"ok\"', 'MODE = \"leak\"'))\n"
    _plant(work, rewrite)
    result = run_trial(work, tmp_path / "run", _config(), 0, data_dir=data_dir)
    assert 'MODE = "leak"' in (work / "train.py").read_text()
    assert result.status == "ok", result.reason  # the leaking rewrite is not what gets judged


def test_a_daemon_with_a_clean_environment_voids_the_trial_and_is_killed(tmp_path, data_dir):
    work = _workdir(tmp_path)
    daemon = ("    pid = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True, "
              "env={}).pid\n    (out / 'child.pid').write_text(str(pid))\n")
    _plant(work, daemon)
    result = run_trial(work, tmp_path / "run", _config(), 0, data_dir=data_dir)
    assert result.status == "invalid" and "left processes running after its stage" in result.reason, result.reason
    assert not _pid_alive(int((tmp_path / "run" / "child.pid").read_text()))


def test_hard_cap_stops_the_whole_group_even_when_it_ignores_sigterm(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(processes, "TERM_GRACE_S", 0.5)
    started = time.monotonic()
    pgids: list[int] = []
    run_dir = tmp_path / "run"
    result = run_trial(_workdir(tmp_path, MODE="stubborn"), run_dir, _config(budget_s=0.5, allowance_s=1.5), 0,
                       data_dir=data_dir, on_stage=lambda stage, pid: pgids.append(pid))
    elapsed = time.monotonic() - started
    assert result.status == "timeout" and "hard cap of 2 s" in result.reason
    assert 2.0 <= elapsed < 8.0
    child = int((run_dir / "child.pid").read_text())
    assert not _pid_alive(child), "the grandchild survived the cap"
    assert not group_alive(pgids[0])


def test_survivors_are_killed_after_a_successful_stage_and_void_it(tmp_path, data_dir):
    # train.py exits 0 but leaves a background process in its group: it must not outlive the trial.
    work = _workdir(tmp_path)
    text = (work / "train.py").read_text().replace(
        "    time.sleep(SLEEP_S)\n",
        "    time.sleep(SLEEP_S)\n    (out / 'child.pid').write_text(str(subprocess.Popen(['sleep', '600']).pid))\n",
    )
    (work / "train.py").write_text(text)
    result = run_trial(work, tmp_path / "run", _config(), 0, data_dir=data_dir)
    assert result.status == "invalid" and "left processes running after its stage" in result.reason
    assert "sleep 600" in result.reason
    assert not _pid_alive(int((tmp_path / "run" / "child.pid").read_text()))


def test_env_contract_resolves_auto_device_in_the_runner(tmp_path, data_dir):
    config = Config().with_overrides(["lab.device='auto'", "lab.preset='auto'"])
    env = processes.train_env(config, tmp_path, data_dir, 5, runner.resolve_device("auto"), "cpu")
    import torch

    assert env["NIGHTLAB_DEVICE"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert env["NIGHTLAB_SEED"] == "5" and env["NIGHTLAB_DATA"] == str(data_dir)
    assert float(env["NIGHTLAB_BUDGET_S"]) == 300.0 and env["NIGHTLAB_OUT"] == str(tmp_path)
    assert runner.resolve_preset("auto", "cuda:1") == "gpu" and runner.resolve_preset("auto", "cpu") == "cpu"
    assert os.environ.get("NIGHTLAB_OUT") is None


def test_train_py_never_sees_an_api_key(monkeypatch, tmp_path):
    from nightlab.config import ApiAgentConfig, Config
    from nightlab.trial.processes import train_env

    monkeypatch.setenv("OPENAI_API_KEY", "sk-canary-1")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-canary-2")
    monkeypatch.setenv("LAB_LLM_CREDENTIAL", "sk-canary-3")
    monkeypatch.setenv("HF_TOKEN", "hf-canary-4")
    monkeypatch.setenv("SOME_SETTING", "kept")
    config = Config(api=ApiAgentConfig(api_key_env="LAB_LLM_CREDENTIAL"))
    env = train_env(config, tmp_path, tmp_path, 0, "cpu", "cpu")
    assert not any("canary" in value for value in env.values())
    assert env["SOME_SETTING"] == "kept" and env["PATH"] == os.environ["PATH"]
