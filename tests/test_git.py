"""Git work of the loop against real repositories."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.standin.helpers import git as run_git
from fixtures.standin.helpers import make_lab
from nightlab.night import git


@pytest.fixture
def lab(tmp_path):
    return make_lab(tmp_path / "lab", train_py="A = 1\nB = 2\n\n# comment\n")


def test_worktree_is_a_clean_detached_checkout_that_leaves_the_lab_alone(lab):
    base = git.resolve(lab, "HEAD")
    work = git.worktree(lab, "propose", base)
    assert work == lab / ".nightlab" / "worktrees" / "propose"
    (work / "train.py").write_text("A = 5\n")
    (work / "scratch.txt").write_text("x")
    again = git.worktree(lab, "propose", base)
    assert (again / "train.py").read_text() == (lab / "train.py").read_text()
    assert not (again / "scratch.txt").exists()
    assert git.current_branch(lab) == "main" and git.changed_files(lab) == []


def test_a_worktree_git_refuses_to_check_out_is_made_again(lab):
    base = git.resolve(lab, "HEAD")
    work = git.worktree(lab, "propose", base)
    (work / "train.py").write_text("A = 5\n")
    admin = Path(run_git(work, "rev-parse", "--absolute-git-dir"))
    (admin / "index.lock").write_text("")  # left by a git command killed in the worktree
    with pytest.raises(git.GitError, match="index.lock"):
        git.commit_all(work, "edit")
    again = git.worktree(lab, "propose", base)
    assert again == work and (again / "train.py").read_text() == (lab / "train.py").read_text()
    (again / "train.py").write_text("A = 6\n")
    assert git.resolve(lab, git.commit_all(again, "edit")) and "propose" in run_git(lab, "worktree", "list")


def test_changed_files_sees_edits_new_files_deletions_and_renames(lab):
    work = git.worktree(lab, "w", git.resolve(lab, "HEAD"))
    (work / "train.py").write_text("A = 2\n")
    (work / "sub").mkdir()
    (work / "sub" / "new.py").write_text("x = 1\n")
    (work / "program.md").unlink()
    assert git.changed_files(work) == ["program.md", "sub/new.py", "train.py"]
    assert git.disallowed(git.changed_files(work), ("train.py",)) == ["program.md", "sub/new.py"]
    git.worktree_reset(work, git.resolve(lab, "HEAD"))
    run_git(work, "mv", "program.md", "brief.md")
    assert git.changed_files(work) == ["brief.md", "program.md"]


def test_commit_stats_refs_and_branch(lab):
    base = git.resolve(lab, "HEAD")
    work = git.worktree(lab, "w", base)
    (work / "train.py").write_text("A = 3\n\n# comment\n")
    commit = git.commit_all(work, "drop B\n\nsimpler\n")
    assert run_git(lab, "log", "-1", "--format=%s%n%b", commit) == "drop B\nsimpler"
    assert git.resolve(lab, f"{commit}^") == base
    stats = git.diff_stats(lab, base, commit)
    assert stats == git.DiffStats(("train.py",), 1, 2)
    assert git.code_lines(lab, base, ("train.py",)) == 3 and git.code_lines(lab, commit, ("train.py",)) == 2
    git.set_ref(lab, git.experiment_ref(7), commit)
    git.set_branch(lab, git.branch_name("night"), commit)
    assert git.resolve(lab, "refs/nightlab/exp/7") == commit == git.resolve(lab, "nightlab/night")
    assert git.read_file(lab, commit, "train.py") == "A = 3\n\n# comment\n"  # exact, final newline kept
    assert git.read_file(lab, commit, "absent.py") is None
    assert git.resolve(lab, "refs/nightlab/exp/8") is None


def test_move_changes_rebases_an_edit_or_reports_a_conflict(lab):
    middle = "".join(f"C{i} = {i}\n" for i in range(8))
    text = lambda a, b: f"A = {a}\n{middle}B = {b}\n"  # noqa: E731
    base_work = git.worktree(lab, "base", git.resolve(lab, "HEAD"))
    (base_work / "train.py").write_text(text(1, 2))
    base = git.commit_all(base_work, "spread out")
    (base_work / "train.py").write_text(text(1, 20))
    new_best = git.commit_all(base_work, "B up")

    work = git.worktree(lab, "w", base)
    (work / "train.py").write_text(text(10, 2))  # another line than the new best's: applies
    assert git.move_changes(work, new_best)
    assert (work / "train.py").read_text() == text(10, 20)
    assert git.resolve(work, "HEAD") == new_best

    git.worktree_reset(work, base)
    (work / "train.py").write_text(text(1, 99))  # the same line as the new best's: conflict
    assert not git.move_changes(work, new_best)
    assert (work / "train.py").read_text() == text(1, 20) and git.changed_files(work) == []


def test_errors_name_the_command(lab):
    with pytest.raises(git.GitError, match="git rev-parse nosuchref"):
        git.git(lab, "rev-parse", "nosuchref")
    assert not git.is_repo(lab.parent)
