"""What a lab must look like after any fault: nothing lost, nothing duplicated, nothing against the wrong commit.

``audit(lab_dir, tag)`` reads the store, the run folders and git, and lists every breach:

- lost: an experiment without a verdict; a committed one whose ``refs/nightlab/exp/<id>`` is
  missing; a finished trial (``eval.json`` in a run folder) with no measurement for that folder;
  a row that was finished in an earlier ``snapshot`` and is gone or changed;
- duplicated: two experiments on one commit; more measurements of an experiment than the policy
  ever takes;
- wrong commit: a ref that names another commit than the row; a commit whose parent is not the
  row's parent; a measured trial whose ``source.sha256`` (written by the suite's stand-in) is not
  the SHA-256 of train.py at the row's commit; the run branch's tip not at the last keep;
- stray: a live process whose environment names a run folder of this lab.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from nightlab.night.store import Store


@dataclass
class Audit:
    experiments: int = 0
    measurements: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    wrong_commit: list[str] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.wrong_commit or self.stray)

    def breaches(self) -> list[str]:
        return [f"{kind}: {what}" for kind in ("lost", "duplicated", "wrong_commit", "stray")
                for what in getattr(self, kind)]


Snapshot = dict[int, tuple]  # finished experiment id -> (status, val_bpb, commit, measurements)


def _git(lab_dir: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=lab_dir, capture_output=True)
    return done.stdout.decode(errors="replace").strip() if done.returncode == 0 else ""


def _blob_sha256(lab_dir: Path, commit: str, path: str = "train.py") -> str:
    done = subprocess.run(["git", "cat-file", "blob", f"{commit}:{path}"], cwd=lab_dir, capture_output=True)
    return hashlib.sha256(done.stdout).hexdigest() if done.returncode == 0 else ""


def snapshot(lab_dir: Path, tag: str) -> Snapshot:
    """The finished experiments of run ``tag`` as they are now (read without migrating anything)."""
    path = Path(lab_dir) / ".nightlab" / "store.db"
    if not path.exists():
        return {}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:
            return {}
        rows = conn.execute("SELECT id, status, val_bpb, commit_sha FROM experiments WHERE run_tag = ? AND status "
                            "IN ('keep', 'discard', 'crash', 'timeout', 'invalid')", (tag,)).fetchall()
        result = {}
        for exp_id, status, val_bpb, commit in rows:
            measured = conn.execute("SELECT seed, kind, status, val_bpb FROM measurements WHERE experiment_id = ? "
                                    "AND kind != 'replay' ORDER BY seed, kind", (exp_id,)).fetchall()
            result[exp_id] = (status, val_bpb, commit, tuple(measured))
        return result
    finally:
        conn.close()


def audit(lab_dir: Path, tag: str, *, earlier: Snapshot | None = None, max_trials: int = 0,
          finished: bool = True) -> Audit:
    """Every breach of the invariants in run ``tag`` of the lab (see the module docstring).

    ``max_trials`` > 0: at most this many measurements per experiment. ``finished``: the run has
    ended normally, so an experiment without a verdict is lost (not merely in flight).
    """
    lab_dir = Path(lab_dir)
    result = Audit()
    with Store.open(lab_dir) as store:
        rows = store.experiments(tag)
        measured = {e.id: store.measurements(e.id) for e in rows}
        run = store.run(tag)
    result.experiments = len(rows)
    result.measurements = sum(len(m) for m in measured.values())
    for e in rows:
        result.statuses[e.status] = result.statuses.get(e.status, 0) + 1
    by_id = {e.id: e for e in rows}

    current = snapshot(lab_dir, tag) if earlier else {}
    for exp_id, before in (earlier or {}).items():
        now = current.get(exp_id)
        if now != before:
            result.lost.append(f"#{exp_id} was {before[:3]} and is now {now[:3] if now else 'gone'}")

    commits: dict[str, int] = {}
    for e in rows:
        if finished and not e.finished:
            result.lost.append(f"#{e.id} ({e.description}) has no verdict: {e.status}/{e.stage}")
        if max_trials and len(measured[e.id]) > max_trials:
            result.duplicated.append(f"#{e.id} has {len(measured[e.id])} measurements (at most {max_trials})")
        seeds = [(m.seed, m.kind) for m in measured[e.id]]
        if len(seeds) != len(set(seeds)):
            result.duplicated.append(f"#{e.id} measured a seed twice: {seeds}")
        if not e.commit_sha:
            continue
        if e.kind != "baseline":
            if e.commit_sha in commits:
                result.duplicated.append(f"#{e.id} and #{commits[e.commit_sha]} share commit {e.commit_sha[:10]}")
            commits[e.commit_sha] = e.id
            parent = _git(lab_dir, "rev-parse", f"{e.commit_sha}^")
            if parent != e.parent_commit:
                result.wrong_commit.append(f"#{e.id}: commit {e.commit_sha[:10]}'s parent is {parent[:10]}, "
                                           f"the row says {str(e.parent_commit)[:10]}")
        ref = _git(lab_dir, "rev-parse", "--verify", "--quiet", f"refs/nightlab/exp/{e.id}")
        if not ref and not finished and not e.finished:
            pass  # killed between the row and its ref: the next start re-creates the ref
        elif not ref:
            result.lost.append(f"#{e.id}: refs/nightlab/exp/{e.id} is missing")
        elif ref != e.commit_sha:
            result.wrong_commit.append(f"#{e.id}: its ref names {ref[:10]}, the row {e.commit_sha[:10]}")
        expected = _blob_sha256(lab_dir, e.commit_sha)
        for m in measured[e.id]:
            fingerprint = Path(m.run_dir) / "source.sha256"
            if fingerprint.exists() and fingerprint.read_text().strip() != expected:
                result.wrong_commit.append(f"#{e.id} seed {m.seed}: trained a train.py that is not "
                                           f"{e.commit_sha[:10]}'s")

    recorded = {str(Path(m.run_dir).resolve()) for ms in measured.values() for m in ms}
    runs = lab_dir / ".nightlab" / "runs"
    for eval_json in sorted(runs.glob("*/eval.json")) + sorted(runs.glob("*/*/eval.json")):
        folder = eval_json.parent
        parts = folder.relative_to(runs).parts
        if not parts[0].isdigit() or parts[-1].startswith("replay-") or int(parts[0]) not in by_id:
            continue
        if not by_id[int(parts[0])].finished:  # in flight: a resumed loop measures it again
            continue
        if str(folder.resolve()) not in recorded:
            result.lost.append(f"#{parts[0]}: the trial in {'/'.join(parts)} finished but is not recorded")

    if finished and run is not None:
        kept = [e for e in rows if e.status == "keep"]
        best = kept[-1].commit_sha if kept else run.base_commit
        tip = _git(lab_dir, "rev-parse", f"refs/heads/{run.branch}")
        if tip != best:
            result.wrong_commit.append(f"branch {run.branch} is at {tip[:10]}, the last keep at {str(best)[:10]}")
    result.stray = stray_processes(lab_dir)
    return result


def stray_processes(lab_dir: Path) -> list[str]:
    """Live processes whose environment points NIGHTLAB_OUT into this lab's run folders."""
    marker = f"NIGHTLAB_OUT={Path(lab_dir).resolve() / '.nightlab' / 'runs'}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in environ and state not in ("Z", "X"):
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            found.append(f"pid {entry.name}: {command[:100]}")
    return found


def summary_line(result: Audit) -> str:
    return json.dumps({"experiments": result.experiments, "measurements": result.measurements,
                       "statuses": result.statuses, "lost": len(result.lost), "duplicated": len(result.duplicated),
                       "wrong_commit": len(result.wrong_commit), "stray": len(result.stray)})
