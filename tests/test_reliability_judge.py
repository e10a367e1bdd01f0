"""The judge against train.py's that set out to fool it (bench/reliability/trainpy/attack_*.py, the
classes of bench/RELIABILITY.md): each attack through the real runner, with the outcome it must get."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from fixtures.standin.helpers import make_dataset
from reliability.standins import train_py

from nightlab.config import Config
from nightlab.night.git import git
from nightlab.trial.runner import run_trial

# attack fragment -> (status, words the reason must hold); "ok" means harmless: the honest score
ATTACKS = {
    "attack_torch_mode": ("ok", ""),
    "attack_retrain_at_import": ("ok", ""),
    "attack_val_lookup": ("ok", ""),
    "attack_shadow_evaluator": ("invalid", "created files in the worktree outside the allowed files"),
    "attack_clean_daemon": ("invalid", "left processes running after its stage"),
    "attack_poison_cache": ("invalid", "wrote the shared dataset cache"),
    "attack_leak_one_batch": ("invalid", "scoring leak"),
    "attack_huge_logits": ("invalid", "larger than 10000 in magnitude"),
    "attack_wrong_vocab": ("invalid", "logits have shape"),
}  # attack_state_for_next: prevented under bubblewrap only (below); without it /tmp is shared


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> tuple[Path, float]:
    data = make_dataset(tmp_path_factory.mktemp("data"))
    work = tmp_path_factory.mktemp("honest")
    (work / "train.py").write_text(train_py())
    result = run_trial(work, work / "run", _config("none"), 0, data_dir=data)
    assert result.status == "ok", result.reason
    return data, result.val_bpb


def _config(sandbox: str) -> Config:
    return Config().with_overrides(["lab.budget_s=0.5", "lab.startup_allowance_s=30", "lab.device='cpu'",
                                    "lab.eval_timeout_s=60", f"lab.sandbox='{sandbox}'"])


def _attack(tmp_path: Path, data: Path, name: str, sandbox: str = "none"):
    shared = tmp_path / "dataset"  # its own copy: an attack on the cache must not reach the other tests
    shutil.copytree(data, shared)
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text(train_py(name))
    return run_trial(work, tmp_path / "run", _config(sandbox), 0, data_dir=shared)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_each_attack_is_refused_or_harmless(tmp_path, honest, name):
    data, honest_bpb = honest
    status, words = ATTACKS[name]
    result = _attack(tmp_path, data, name)
    assert result.status == status, (name, result.reason)
    assert words in result.reason
    if status == "ok":
        assert result.val_bpb == pytest.approx(honest_bpb, abs=1e-6), name


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
@pytest.mark.parametrize("name", ["attack_val_lookup", "attack_state_for_next", "attack_poison_cache",
                                  "attack_clean_daemon"])
def test_under_bwrap_the_same_attacks_are_refused_or_harmless(tmp_path, honest, name):
    data, honest_bpb = honest
    left = Path("/tmp") / "nightlab_left_for_next.txt"
    left.unlink(missing_ok=True)
    result = _attack(tmp_path, data, name, sandbox="bwrap")
    if name == "attack_poison_cache":  # the cache is read-only: the write itself fails
        assert result.status == "crash" and "Read-only file system" in result.reason, result.reason
    else:
        assert result.status == "ok", (name, result.reason)
        assert result.val_bpb == pytest.approx(honest_bpb, abs=1e-6)
    assert not left.exists()  # the model process's /tmp was its own


def test_the_orchestrators_git_runs_no_hook_a_trial_planted(tmp_path):
    repo = tmp_path / "lab"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    (repo / "train.py").write_text("X = 1\n")
    git(repo, "add", "train.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    hook = repo / ".git" / "hooks" / "post-checkout"
    hook.write_text(f"#!/bin/sh\ntouch {tmp_path / 'hook-ran'}\n")
    hook.chmod(0o755)
    git(repo, "checkout", "-q", "-b", "other")
    git(repo, "worktree", "add", "-q", str(tmp_path / "wt"), "main")
    assert not (tmp_path / "hook-ran").exists()
    subprocess.run(["git", "checkout", "-q", "-b", "third"], cwd=repo, check=True)
    assert (tmp_path / "hook-ran").exists()  # the hook works: it is nightlab's git that skips it
