"""Git work of the loop, through the real ``git`` command.

A run lives on branch ``nightlab/<tag>``: its tip is always the current best. Each experiment is a
commit whose parent is the best it was measured against, kept reachable by the ref
``refs/nightlab/exp/<id>`` whether it was kept or not. Proposals are edited and trained in
worktrees under ``LAB/.nightlab/worktrees/``, so the lab's own checkout is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from nightlab.paths import state_dir

IDENTITY = ("-c", "user.name=nightlab", "-c", "user.email=nightlab@localhost")  # when the repo has none


class GitError(RuntimeError):
    """A git command failed; the message holds the command and git's own words."""


@dataclass(frozen=True)
class DiffStats:
    files: tuple[str, ...]
    added: int
    removed: int


def _env() -> dict[str, str]:
    return {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}


def git(cwd: Path, *args: str, input: str | None = None) -> str:
    """Run git with hooks off: a hook a trial planted in ``.git/hooks`` never runs as the orchestrator."""
    done = subprocess.run(["git", "-c", "core.hooksPath=/dev/null", *args], cwd=cwd, capture_output=True, text=True,
                          input=input, env=_env())
    if done.returncode != 0:
        raise GitError(f"git {' '.join(args)} (in {cwd}) failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.rstrip("\n")


def branch_name(tag: str) -> str:
    return f"nightlab/{tag}"


def experiment_ref(exp_id: int) -> str:
    return f"refs/nightlab/exp/{exp_id}"


def is_repo(path: Path) -> bool:
    try:
        return git(path, "rev-parse", "--is-inside-work-tree") == "true"
    except (GitError, FileNotFoundError, NotADirectoryError):
        return False


def resolve(repo: Path, ref: str) -> str | None:
    """The commit ``ref`` names, or None when it names nothing."""
    try:
        return git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except GitError:
        return None


def current_branch(repo: Path) -> str:
    """The checked-out branch's short name; empty on a detached HEAD."""
    try:
        return git(repo, "symbolic-ref", "--quiet", "--short", "HEAD")
    except GitError:
        return ""


def set_ref(repo: Path, ref: str, commit: str) -> None:
    git(repo, "update-ref", ref, commit)


def set_branch(repo: Path, branch: str, commit: str) -> None:
    set_ref(repo, f"refs/heads/{branch}", commit)


def worktree(repo: Path, name: str, commit: str) -> Path:
    """A clean detached checkout of ``commit`` at ``LAB/.nightlab/worktrees/<name>``.

    The worktree is nightlab's own: one that git refuses to check out (a stale ``index.lock`` left
    by a killed git, broken metadata) is removed and made again."""
    path = state_dir(repo) / "worktrees" / name
    if (path / ".git").exists():
        try:
            git(path, "checkout", "--force", "--quiet", "--detach", commit)
            git(path, "clean", "-fdxq")
            return path
        except GitError:
            _remove_worktree(repo, path)
    git(repo, "worktree", "prune")
    path.parent.mkdir(parents=True, exist_ok=True)
    git(repo, "worktree", "add", "--force", "--detach", str(path), commit)
    git(path, "clean", "-fdxq")
    return path


def _remove_worktree(repo: Path, path: Path) -> None:
    try:
        git(repo, "worktree", "remove", "--force", "--force", str(path))
    except GitError:
        pass  # its folder goes below, and prune forgets it
    shutil.rmtree(path, ignore_errors=True)
    git(repo, "worktree", "prune")


def changed_files(work: Path) -> list[str]:
    """Paths that differ from HEAD in a working tree: modified, deleted, renamed or untracked."""
    out = git(work, "status", "--porcelain", "-z", "--untracked-files=all")
    paths, entries = [], out.split("\0")
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if not entry:
            continue
        paths.append(entry[3:])
        if entry[0] in "RC":  # a rename is followed by its source path
            paths.append(entries[i])
            i += 1
    return sorted(set(paths))


def disallowed(paths: list[str], allowed: tuple[str, ...]) -> list[str]:
    return [p for p in paths if p not in allowed]


def commit_all(work: Path, message: str) -> str:
    """Commit every change in ``work``; return the new commit."""
    git(work, "add", "--all")
    identity = () if _has_identity(work) else IDENTITY
    git(work, *identity, "commit", "--quiet", "--no-verify", "--allow-empty", "-F", "-", input=message)
    return git(work, "rev-parse", "HEAD")


def _has_identity(repo: Path) -> bool:
    try:
        return bool(git(repo, "config", "user.email")) and bool(git(repo, "config", "user.name"))
    except GitError:
        return False


def diff_stats(repo: Path, parent: str, commit: str) -> DiffStats:
    files, added, removed = [], 0, 0
    for line in git(repo, "diff", "--numstat", parent, commit).splitlines():
        plus, minus, path = line.split("\t", 2)
        files.append(path)
        added += int(plus) if plus != "-" else 0
        removed += int(minus) if minus != "-" else 0
    return DiffStats(tuple(files), added, removed)


def diff(repo: Path, parent: str, commit: str) -> str:
    return git(repo, "diff", parent, commit)


def read_file(repo: Path, commit: str, path: str) -> str | None:
    """The file's exact text at ``commit`` (trailing newlines kept), or None where it is absent."""
    return _show(repo, commit, path, text=True)


def read_bytes(repo: Path, commit: str, path: str) -> bytes | None:
    """The file's bytes at ``commit``, or None where it is absent."""
    return _show(repo, commit, path, text=False)


def _show(repo: Path, commit: str, path: str, text: bool):
    done = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=repo, capture_output=True, text=text, env=_env())
    return done.stdout if done.returncode == 0 else None


def code_lines(repo: Path, commit: str, files: tuple[str, ...]) -> int:
    """Non-blank lines of ``files`` at ``commit``: the size the simplicity criterion compares."""
    total = 0
    for name in files:
        text = read_file(repo, commit, name) or ""
        total += sum(1 for line in text.splitlines() if line.strip())
    return total


def move_changes(work: Path, onto: str) -> bool:
    """Carry the uncommitted changes in ``work`` onto commit ``onto``; False if they do not apply."""
    git(work, "add", "--all")
    patch = git(work, "diff", "--cached", "--binary") + "\n"
    worktree_reset(work, onto)
    if patch.strip():
        try:
            git(work, "apply", "--index", "--3way", "-", input=patch)
        except GitError:
            worktree_reset(work, onto)
            return False
    return True


def reapply(work: Path, parent: str, commit: str, onto: str) -> bool:
    """Leave the change ``parent..commit`` in ``work`` as uncommitted edits on top of ``onto``;
    False (and ``work`` clean at ``onto``) when it does not apply there."""
    worktree_reset(work, commit)
    git(work, "reset", "--quiet", parent)
    return move_changes(work, onto)


def worktree_reset(work: Path, commit: str) -> None:
    git(work, "reset", "--quiet", "--hard", commit)
    git(work, "clean", "-fdxq")
