"""What a trial's processes may touch, and the checks that catch a trial that touched more.

Always on:

- ``train_view``: ``train.py`` is handed a dataset folder holding only what training needs
  (``TRAIN_FILES``: the train split, the tokenizer, the token byte counts, the manifest), never
  the validation split, the sealed holdout or the text shards. The small files are copies; the
  train split is a symbolic link into the cache (not a hard link: making one changes the file's
  change time, which a trial beside it, a standby or another worker's, would take for a write).
  ``fingerprint`` / ``changed`` catch a trial that wrote the shared dataset cache anyway (a link is
  writable without the sandbox): size, modification and change times of every file, taken
  before training and compared before scoring.
- ``escaped``: processes that left the trial's process group (a new session, a daemon) but still
  carry its ``NIGHTLAB_OUT`` are found (psutil) and killed after each stage; the trial is
  ``invalid``. The runner also follows every stage's session and descendants
  (``nightlab.lab.reaper``).
- ``Guard``: around each trial, the lab's own files (``program.md``, ``nightlab.toml``, ``org/``,
  everything in the checkout but ``notes/``, which the lead writes while trials run), the best
  model in ``.nightlab/best/`` and the store's finished experiments and their measurements are
  compared with what they were before; anything the trial changed is put back and the trial is
  ``invalid``.

The sandbox (``lab.sandbox``: ``auto``, the default, is bubblewrap where it is installed):
training runs under bubblewrap, the root file system read-only, a private ``/tmp``, only the
worktree and the run folder writable, the dataset folder replaced by the train view's files
(read-only), and every process of the trial in its own PID namespace that dies with it. The
model process that answers the judge runs in a root of only what Python needs, read-only, with
no network (``nightlab.lab.model_client``). Not covered: GPU devices (shared as they are), the
network during training, reading other files the user can read. Without bubblewrap
``resolve`` says once what is then not protected. ``bench/RELIABILITY.md`` has the list.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from nightlab.lab import reaper

SANDBOXES = ("auto", "none", "bwrap")
TRAIN_FILES = ("train.tokens.npy", "train.docs.npy", "tokenizer.pkl", "token_bytes.npy", "manifest.json")
LINKED = ("train.tokens.npy", "train.docs.npy")  # large: linked, not copied
VIEW_DIR = "data"  # the train-only view, inside the trial's run folder
UNPROTECTED = ("bubblewrap is not installed, so trials run without the sandbox: training can read the validation "
               "split from the dataset cache, write outside its run folder (the lab, the store, the cache, nightlab's "
               "code) and leave processes that change session; these are detected after the fact where they can be "
               "(bench/RELIABILITY.md), not prevented. Install it: apt-get install bubblewrap")
UNGUARDED = (".git", ".nightlab", "notes", "__pycache__")  # lab folders a trial's guard does not compare
MAX_GUARDED_BYTES = 4 << 20  # lab files larger than this are compared by hash only and not restored


class SandboxError(RuntimeError):
    """The sandbox was asked for but cannot run here; the message names the fix."""


# -- the training data view --------------------------------------------------------------------


def train_view(data_dir: Path, run_dir: Path) -> Path:
    """``run_dir/data``: what training may read of ``data_dir`` (``TRAIN_FILES``), nothing else.
    Under bubblewrap the links lead into the dataset folder mounted read-only with only these files."""
    view = run_dir / VIEW_DIR
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for name in TRAIN_FILES:
        source = Path(data_dir) / name
        if not source.is_file():
            continue
        if name not in LINKED:
            shutil.copyfile(source, view / name)
            continue
        (view / name).symlink_to(source.resolve())
    return view


Fingerprint = dict[str, tuple[int, int, int, int]]


def fingerprint(data_dir: Path) -> Fingerprint:
    """Size, inode, modification and change time of every file in the dataset folder (``ctime``
    cannot be set back by a process, so a write shows even if the modification time is restored)."""
    found = {}
    for path in sorted(Path(data_dir).rglob("*")):
        try:
            st = path.stat()
        except OSError:
            continue
        if path.is_file():
            found[path.relative_to(data_dir).as_posix()] = (st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    return found


def changed(data_dir: Path, before: Fingerprint) -> list[str]:
    """The dataset files created, changed or deleted since ``before``."""
    now = fingerprint(data_dir)
    return sorted(name for name in set(before) | set(now) if before.get(name) != now.get(name))


_said: set[str] = set()


def resolve(sandbox: str, say=None) -> str:
    """``bwrap`` or ``none`` for ``lab.sandbox``: ``auto`` is bubblewrap where it is installed; without
    it, what is not protected is said once per process (on stderr, or to ``say``)."""
    check_available(sandbox)
    if sandbox != "auto":
        return sandbox
    if shutil.which("bwrap") is not None:
        return "bwrap"
    if UNPROTECTED not in _said:
        _said.add(UNPROTECTED)
        (say or (lambda line: print(line, file=sys.stderr)))(f"nightlab: {UNPROTECTED}")
    return "none"


# -- bubblewrap ------------------------------------------------------------------------------


def check_available(sandbox: str) -> None:
    """Raise ``SandboxError`` when ``sandbox`` is unknown or its program is missing."""
    if sandbox not in SANDBOXES:
        raise SandboxError(f"lab.sandbox = {sandbox!r}; choose one of {', '.join(SANDBOXES)}")
    if sandbox == "bwrap" and shutil.which("bwrap") is None:
        raise SandboxError("lab.sandbox = \"bwrap\" but bubblewrap is not installed: apt-get install bubblewrap "
                           "(or set lab.sandbox = \"none\")")


def bwrap(command: list[str], *, cwd: Path, writable: list[Path], readable: list[Path] = (),
          data_dir: Path | None = None) -> list[str]:
    """``command`` run in ``cwd`` under bubblewrap: all read-only but ``writable``, a private ``/tmp``
    (``readable`` and ``writable`` paths inside it are bound again), ``data_dir`` holding only
    ``TRAIN_FILES``."""
    check_available("bwrap")
    args = ["bwrap", "--ro-bind", "/", "/", "--dev-bind", "/dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            "--unshare-pid", "--die-with-parent"]
    for path in _python_under_tmp():  # a virtual environment in /tmp: the private /tmp would hide it
        args += ["--ro-bind", str(path), str(path)]
    for path in readable:
        args += ["--ro-bind", str(path), str(path)]
    for path in writable:
        args += ["--bind", str(path), str(path)]
    if data_dir is not None:
        real = Path(data_dir).resolve()
        args += ["--tmpfs", str(real)]
        for name in TRAIN_FILES:
            if (real / name).is_file():
                args += ["--ro-bind", str(real / name), str(real / name)]
    return [*args, "--chdir", str(cwd), "--", *command]


def _python_under_tmp() -> list[Path]:
    """The interpreter's folders and its import path (site-packages, an editable install's source)
    that lie under ``/tmp``, outermost first, so the sandbox can bind them back read-only."""
    roots = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).parent}
    roots |= {Path(p) for p in sys.path if p and Path(p).is_dir()}
    roots |= {Path(__file__).resolve().parents[2]}  # the folder nightlab is imported from
    under = [r.resolve() for r in roots if r.resolve().is_relative_to("/tmp") and r.resolve() != Path("/tmp")]
    return sorted(set(under), key=lambda p: len(p.parts))


# -- processes that escaped the trial's group ----------------------------------------------------


def escaped(run_dir: Path) -> list[str]:
    """Kill live processes whose environment has ``NIGHTLAB_OUT=run_dir`` (and wait until they are gone);
    describe each one killed."""
    return kill_marked(f"\0NIGHTLAB_OUT={Path(run_dir).resolve()}\0".encode())


def kill_marked(marker: bytes) -> list[str]:
    """Kill live processes whose environment (NUL-separated, with a NUL in front) contains
    ``marker``, and wait until they are gone; describe each one killed."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            environ = proc.environ()
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        if marker in b"\0" + "\0".join(f"{k}={v}" for k, v in environ.items()).encode() + b"\0":
            found.append(proc)
    return reaper.kill(found)


# -- the guard around a trial --------------------------------------------------------------------


@dataclass
class Guard:
    """What a trial must leave as it was: the lab's files, the best model, the store's finished rows."""

    lab_dir: Path
    store_path: Path
    exp_id: int
    files: dict[str, tuple[str, bytes | None]] = field(default_factory=dict)  # path -> (sha256, content)
    best_id: str = ""
    rows: dict[int, tuple] = field(default_factory=dict)  # finished experiment -> its judged fields
    measured: dict[int, list[tuple]] = field(default_factory=dict)  # experiment -> its measurement rows

    @classmethod
    def take(cls, lab_dir: Path, store_path: Path, exp_id: int) -> Guard:
        guard = cls(Path(lab_dir), Path(store_path), exp_id)
        guard.files = _lab_files(guard.lab_dir)
        guard.best_id = best_id(guard.lab_dir)
        guard.rows, guard.measured = _store_rows(guard.store_path, exp_id)
        return guard

    def accept(self, exp_id: int, seed: int) -> None:
        """Take the measurement the orchestrator just recorded for a sibling trial (``exp_id``,
        ``seed``: the same experiment, another seed, trained beside this one) as part of the
        store as it should be."""
        if exp_id != self.exp_id:
            return
        _, measured = _store_rows(self.store_path, self.exp_id, only={self.exp_id})
        known = set(self.measured.get(exp_id, []))
        self.measured.setdefault(exp_id, []).extend(
            r for r in measured.get(exp_id, []) if r not in known and r[2] == seed)
        self.measured[exp_id].sort()

    def check(self) -> list[str]:
        """What the trial changed, each put back; empty when nothing was touched."""
        changes = self._check_files() + self._check_store()
        return changes

    def _check_files(self) -> list[str]:
        changes = []
        now = _lab_files(self.lab_dir)
        best_now = best_id(self.lab_dir)
        for name in sorted(set(self.files) | set(now)):
            if name.startswith(".nightlab/best/") and best_now != self.best_id and _is_kept(self.store_path, best_now):
                continue  # another worker saved a new best
            before, after = self.files.get(name), now.get(name)
            if before is not None and after is not None and before[0] == after[0]:
                continue
            path = self.lab_dir / name
            if before is None:
                path.unlink(missing_ok=True)
                changes.append(f"created {name} (removed)")
            elif before[1] is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(before[1])
                changes.append(f"{'changed' if after else 'deleted'} {name} (restored)")
            else:
                changes.append(f"changed {name} (too large to restore)")
        return changes

    def _check_store(self) -> list[str]:
        rows, measured = _store_rows(self.store_path, self.exp_id, only=set(self.rows) | {self.exp_id})
        changes = []
        conn = sqlite3.connect(self.store_path, timeout=30.0, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")  # restored whole or not at all: never measurements deleted, not put back
            try:
                for exp_id, before in self.rows.items():
                    if rows.get(exp_id) != before:
                        conn.execute("UPDATE experiments SET status = ?, val_bpb = ?, commit_sha = ?, "
                                     "parent_commit = ? WHERE id = ?", (*before, exp_id))
                        changes.append(f"changed experiment #{exp_id} in the store (restored)")
                for exp_id in set(self.measured) | set(measured):
                    if measured.get(exp_id, []) != self.measured.get(exp_id, []):
                        conn.execute("DELETE FROM measurements WHERE experiment_id = ? AND kind != 'replay'", (exp_id,))
                        conn.executemany("INSERT INTO measurements (id, experiment_id, seed, kind, status, val_bpb, "
                                         "reason, run_dir, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                         self.measured.get(exp_id, []))
                        changes.append(f"changed the measurements of #{exp_id} in the store (restored)")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()
        return changes


def _lab_files(lab_dir: Path) -> dict[str, tuple[str, bytes | None]]:
    found = {}
    for folder, dirs, names in os.walk(lab_dir):
        rel = Path(folder).relative_to(lab_dir)
        if rel == Path("."):
            dirs[:] = [d for d in dirs if d not in UNGUARDED]
        for name in names:
            path = Path(folder) / name
            try:
                data = path.read_bytes()
            except OSError:
                continue
            found[(rel / name).as_posix()] = (hashlib.sha256(data).hexdigest(),
                                              data if len(data) <= MAX_GUARDED_BYTES else None)
    best = lab_dir / ".nightlab" / "best"
    if best.is_dir():
        for path in sorted(best.rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                found[path.relative_to(lab_dir).as_posix()] = (hashlib.sha256(data).hexdigest(), data)
    return found


def best_id(lab_dir: Path) -> str:
    try:
        return (lab_dir / ".nightlab" / "best" / "experiment.txt").read_text().split("\t", 1)[0]
    except OSError:
        return ""


def _is_kept(store_path: Path, exp_id: str) -> bool:
    if not exp_id.isdigit():
        return False
    conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=30.0)
    try:
        row = conn.execute("SELECT status FROM experiments WHERE id = ?", (int(exp_id),)).fetchone()
    finally:
        conn.close()
    return row is not None and row[0] == "keep"


def _store_rows(store_path: Path, exp_id: int, only: set[int] | None = None) -> tuple[dict, dict]:
    """Finished experiments' judged fields (or those of ``only``) and the judged measurements of
    those and of ``exp_id``."""
    conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=30.0)
    try:
        if only is None:
            found = conn.execute("SELECT id, status, val_bpb, commit_sha, parent_commit FROM experiments WHERE status "
                                 "NOT IN ('queued', 'running')").fetchall()  # every finished status
        else:
            marks = ", ".join("?" * len(only))
            found = conn.execute(f"SELECT id, status, val_bpb, commit_sha, parent_commit FROM experiments WHERE id "
                                 f"IN ({marks})", tuple(only)).fetchall()
        rows = {r[0]: tuple(r[1:]) for r in found if r[0] != exp_id}
        measured: dict[int, list[tuple]] = {}
        for r in conn.execute("SELECT id, experiment_id, seed, kind, status, val_bpb, reason, run_dir, created_at "
                              "FROM measurements WHERE kind != 'replay' ORDER BY id"):
            if r[1] in rows or r[1] == exp_id:
                measured.setdefault(r[1], []).append(tuple(r))
    finally:
        conn.close()
    return rows, measured
