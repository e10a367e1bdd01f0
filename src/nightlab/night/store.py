"""The experiment store: SQLite in WAL mode at ``LAB/.nightlab/store.db``.

One row per experiment, written before each stage and updated after it, and one row per
measurement (a trial's val_bpb for one seed). Every write is its own committed transaction, so a
kill at any instant leaves the last completed step on disk and nothing half-written.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nightlab.paths import state_dir
from nightlab.night.migrations import STATUSES, migrate

STORE_FILE = "store.db"
FINISHED = ("keep", "discard", "crash", "timeout", "invalid", "agent_failed", "repeat")
FAILED = ("crash", "timeout", "invalid", "agent_failed")  # finished with no val_bpb; a repeat is refused, not failed
BUSY_TIMEOUT_S = 600.0  # wait this long for another connection's lock: a late write beats a lost result
JUDGED_KINDS = ("first", "baseline", "confirm")  # measurements the policy averages; replays are not


def _enter_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL, retrying while another connection holds the file.

    The switch needs the file to itself, and SQLite answers "database is locked" at once rather
    than calling the busy handler when another process is creating or switching the same new
    store, so the connection's timeout does not cover it.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def last_judged(rows: list[Experiment]) -> Experiment:
    """The row whose verdict came last (the best, among keeps): not always the highest id, since a
    queued experiment moved onto a new best can be judged after a row with a higher id. Rows without
    a verdict's time (written by hand) come before any with one, by id."""
    return max(rows, key=lambda e: (e.finished_at is not None, e.finished_at or "", e.id))


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Experiment:
    id: int
    run_tag: str
    kind: str
    worker: str
    agent: str
    parent_commit: str | None
    commit_sha: str | None
    description: str
    rationale: str
    files_changed: int
    lines_added: int
    lines_removed: int
    code_lines: int | None
    status: str
    stage: str
    pgid: int | None
    val_bpb: float | None
    training_seconds: float | None
    total_seconds: float | None
    total_tokens: int | None
    num_steps: int | None
    num_params: int | None
    peak_memory_mb: float | None
    mfu_percent: float | None
    seed: int | None
    cost_usd: float | None  # None: the agent does not report what it cost
    tokens_in: int | None
    tokens_out: int | None
    noise: float | None
    reason: str
    error: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    review: str = ""  # the reviewer's verdict on a winning diff: "approve: ..." or "veto: ..."
    origin_id: int | None = None  # the experiment whose change this one re-applies on a newer best
    claim: str = ""  # the agenda item the proposer worked on
    epochs: float | None = None  # passes over the train split the first trial made (tokens / train tokens)
    disturbed: int = 0  # trials re-run because something outside train.py slowed them (never judged)
    budget: str = ""  # what a trial trained for: "300s", or "2000000 tokens" under lab.budget_tokens
    holdout_bpb: float | None = None  # the sealed holdout's score (baseline and keeps, after the verdict)
    at_scale: str = ""  # holds | fails: a new best trained again at run.promote_budget_s; "" not checked


    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclass(frozen=True)
class Measurement:
    id: int
    experiment_id: int
    seed: int
    kind: str
    status: str
    val_bpb: float | None
    reason: str
    run_dir: str
    created_at: str
    tok_per_s: float | None = None  # training throughput (tokens/s)
    shape: str = ""  # the model's shape, "params:tokens per step": throughputs compare within one
    holdout_bpb: float | None = None  # this trial's model on the sealed holdout (scored after the verdict)
    outside_cores: float | None = None  # cores other processes kept busy, on average, while it trained


@dataclass(frozen=True)
class Check:
    """A trial that checks kept work after its verdict, never read by the policy: the best with one
    keep reverted (``ablation``), the night's chain without its idle keeps (``pruned``), the best
    trained at a larger budget (``scale``). Written as it starts and again when it ends."""

    id: int
    run_tag: str
    kind: str
    best_id: int
    keep_id: int
    commit_sha: str
    seed: int
    budget_s: float
    status: str  # running | ok | crash | timeout | invalid
    val_bpb: float | None
    holdout_bpb: float | None
    pgid: int | None
    reason: str
    run_dir: str
    created_at: str


@dataclass(frozen=True)
class Run:
    tag: str
    branch: str
    base_commit: str
    agent: str
    config: str
    created_at: str


_EXPERIMENT_COLUMNS = tuple(f.name for f in fields(Experiment))
_WRITABLE = frozenset(_EXPERIMENT_COLUMNS) - {"id", "created_at"}


class Store:
    """Typed reads and single-transaction writes of experiments, measurements and runs."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        _enter_wal(self.conn)
        self.conn.execute("PRAGMA synchronous = NORMAL")
        migrate(self.conn)  # first: a migration that rebuilds a table needs foreign keys off
        self.conn.execute("PRAGMA foreign_keys = ON")

    @classmethod
    def open(cls, lab_dir: Path | str) -> "Store":
        return cls(state_dir(lab_dir) / STORE_FILE)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- runs ---------------------------------------------------------------------------------

    def add_run(self, tag: str, branch: str, base_commit: str, agent: str, config: str) -> Run:
        self.conn.execute(
            "INSERT INTO runs (tag, branch, base_commit, agent, config, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (tag, branch, base_commit, agent, config, now()),
        )
        return self.run(tag)  # type: ignore[return-value]

    def run(self, tag: str) -> Run | None:
        row = self.conn.execute("SELECT * FROM runs WHERE tag = ?", (tag,)).fetchone()
        return Run(**dict(row)) if row else None

    def runs(self) -> list[Run]:
        return [Run(**dict(r)) for r in self.conn.execute("SELECT * FROM runs ORDER BY created_at, tag")]

    # -- experiments --------------------------------------------------------------------------

    def add_experiment(self, run_tag: str, **values: Any) -> Experiment:
        """A new row (status ``queued`` unless given); returns it with its id."""
        self._check_columns(values)
        values = {"created_at": now(), **values}
        names = ", ".join(["run_tag", *values])
        marks = ", ".join("?" * (len(values) + 1))
        cursor = self.conn.execute(f"INSERT INTO experiments ({names}) VALUES ({marks})", (run_tag, *values.values()))
        return self.get(cursor.lastrowid)

    def update(self, exp_id: int, **values: Any) -> Experiment:
        self._check_columns(values)
        if values:
            assignments = ", ".join(f"{name} = ?" for name in values)
            cursor = self.conn.execute(f"UPDATE experiments SET {assignments} WHERE id = ?", (*values.values(), exp_id))
            if cursor.rowcount != 1:
                raise KeyError(f"no experiment {exp_id} in {self.path}")
        return self.get(exp_id)

    def get(self, exp_id: int) -> Experiment:
        row = self.conn.execute("SELECT * FROM experiments WHERE id = ?", (exp_id,)).fetchone()
        if row is None:
            raise KeyError(f"no experiment {exp_id} in {self.path}; `nightlab report` lists them")
        return Experiment(**dict(row))

    def experiments(self, run_tag: str | None = None) -> list[Experiment]:
        if run_tag is None:
            rows = self.conn.execute("SELECT * FROM experiments ORDER BY id")
        else:
            rows = self.conn.execute("SELECT * FROM experiments WHERE run_tag = ? ORDER BY id", (run_tag,))
        return [Experiment(**dict(r)) for r in rows]

    def select(
        self, run_tag: str, *, statuses: tuple[str, ...] = (), agent: str | None = None, commit: str | None = None,
        kind: str | None = None, origin: int | None = None, limit: int | None = None, newest_first: bool = False,
        by_val_bpb: bool = False,
    ) -> list[Experiment]:
        """Experiments of a run that match every given filter, by id or (``by_val_bpb``) lowest val_bpb first."""
        where, args = ["run_tag = ?"], [run_tag]
        if statuses:
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            args += statuses
        for column, value in (("agent", agent), ("commit_sha", commit), ("kind", kind), ("origin_id", origin)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if by_val_bpb:
            where.append("val_bpb IS NOT NULL")
        order = "val_bpb, id" if by_val_bpb else f"id {'DESC' if newest_first else 'ASC'}"
        sql = f"SELECT * FROM experiments WHERE {' AND '.join(where)} ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [Experiment(**dict(r)) for r in self.conn.execute(sql, args)]

    def commits(self, run_tag: str) -> list[tuple[int, str | None, str]]:
        """(id, parent commit, commit) of every experiment of a run that has a commit, oldest first:
        what the repeat check compares a proposal with, without reading whole rows."""
        rows = self.conn.execute("SELECT id, parent_commit, commit_sha FROM experiments WHERE run_tag = ? AND "
                                 "commit_sha IS NOT NULL ORDER BY id", (run_tag,))
        return [(i, parent, commit) for i, parent, commit in rows]

    def status_counts(self, run_tag: str, kind: str | None = None) -> dict[str, int]:
        sql = "SELECT status, COUNT(*) FROM experiments WHERE run_tag = ?" + (" AND kind = ?" if kind else "")
        rows = self.conn.execute(sql + " GROUP BY status", (run_tag, kind) if kind else (run_tag,))
        return {status: n for status, n in rows}

    def cost_usd(self, run_tag: str) -> float:
        """What the agents of a run are known to have cost (rows that do not say are left out)."""
        row = self.conn.execute("SELECT SUM(cost_usd) FROM experiments WHERE run_tag = ?", (run_tag,)).fetchone()
        return float(row[0] or 0.0)

    def _check_columns(self, values: dict[str, Any]) -> None:
        unknown = set(values) - _WRITABLE
        if unknown:
            raise ValueError(f"unknown experiment field(s) {sorted(unknown)}; known: {sorted(_WRITABLE)}")
        if "status" in values and values["status"] not in STATUSES:
            raise ValueError(f"status {values['status']!r} is not one of {STATUSES}")

    # -- measurements -------------------------------------------------------------------------

    def add_measurement(
        self, exp_id: int, seed: int, kind: str, status: str, val_bpb: float | None, run_dir: Path | str,
        reason: str = "", tok_per_s: float | None = None, shape: str = "", outside_cores: float | None = None,
    ) -> Measurement:
        """Record one trial; recording the same (experiment, seed, kind) again replaces it."""
        self.conn.execute(
            "INSERT OR REPLACE INTO measurements (experiment_id, seed, kind, status, val_bpb, reason, run_dir,"
            " created_at, tok_per_s, shape, outside_cores) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (exp_id, seed, kind, status, val_bpb, reason, str(run_dir), now(), tok_per_s, shape, outside_cores),
        )
        row = self.conn.execute(
            "SELECT * FROM measurements WHERE experiment_id = ? AND seed = ? AND kind = ?", (exp_id, seed, kind)
        ).fetchone()
        return Measurement(**dict(row))

    def measurements(self, exp_id: int, kinds: tuple[str, ...] = JUDGED_KINDS) -> list[Measurement]:
        marks = ", ".join("?" * len(kinds))
        rows = self.conn.execute(
            f"SELECT * FROM measurements WHERE experiment_id = ? AND kind IN ({marks}) ORDER BY id", (exp_id, *kinds)
        )
        return [Measurement(**dict(r)) for r in rows]

    def mark_disturbed(self, measurement_id: int, reason: str) -> None:
        """Set a trial aside as disturbed (kind ``disturbed``): never judged, its seed runs again.
        Its experiment's ``disturbed`` count goes up in the same transaction."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("UPDATE OR REPLACE measurements SET kind = 'disturbed', reason = ? WHERE id = ?",
                              (reason, measurement_id))
            self.conn.execute("UPDATE experiments SET disturbed = disturbed + 1 WHERE id = "
                              "(SELECT experiment_id FROM measurements WHERE id = ?)", (measurement_id,))

    def speeds(self, run_tag: str) -> list[tuple[int, str, float]]:
        """(measurement id, shape, tokens/s) of the run's judged ok trials that recorded a throughput."""
        marks = ", ".join("?" * len(JUDGED_KINDS))
        rows = self.conn.execute(
            "SELECT m.id, m.shape, m.tok_per_s FROM measurements m JOIN experiments e ON e.id = m.experiment_id"
            f" WHERE e.run_tag = ? AND m.status = 'ok' AND m.tok_per_s > 0 AND m.kind IN ({marks})",
            (run_tag, *JUDGED_KINDS))
        return [(i, shape, speed) for i, shape, speed in rows]

    def set_holdout(self, measurement_id: int, holdout_bpb: float | None) -> None:
        """Record a trial's holdout score (after its experiment's verdict)."""
        self.conn.execute("UPDATE measurements SET holdout_bpb = ? WHERE id = ?", (holdout_bpb, measurement_id))

    # -- checks after the verdict -------------------------------------------------------------

    def start_check(self, run_tag: str, kind: str, best_id: int, keep_id: int, commit: str, seed: int,
                    budget_s: float, run_dir: Path | str) -> Check:
        """Record that a check's trial starts (a check started before, and not finished, starts over)."""
        self.conn.execute(
            "INSERT OR REPLACE INTO checks (run_tag, kind, best_id, keep_id, commit_sha, seed, budget_s, status, "
            "run_dir, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, ?)",
            (run_tag, kind, best_id, keep_id, commit, seed, budget_s, str(run_dir), now()))
        return self.checks(run_tag, kind, best_id, keep_id=keep_id, seed=seed, budget_s=budget_s)[0]

    def update_check(self, check_id: int, **values: Any) -> None:
        unknown = set(values) - {"status", "val_bpb", "holdout_bpb", "pgid", "reason"}
        if unknown:
            raise ValueError(f"unknown check field(s) {sorted(unknown)}")
        assignments = ", ".join(f"{name} = ?" for name in values)
        self.conn.execute(f"UPDATE checks SET {assignments} WHERE id = ?", (*values.values(), check_id))

    def checks(self, run_tag: str, kind: str | None = None, best_id: int | None = None, *,
               keep_id: int | None = None, seed: int | None = None, budget_s: float | None = None) -> list[Check]:
        """The run's checks that match every given filter, oldest first."""
        where, args = ["run_tag = ?"], [run_tag]
        for column, value in (("kind", kind), ("best_id", best_id), ("keep_id", keep_id), ("seed", seed),
                              ("budget_s", budget_s)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        rows = self.conn.execute(f"SELECT * FROM checks WHERE {' AND '.join(where)} ORDER BY id", args)
        return [Check(**dict(r)) for r in rows]

    def values(self, exp_id: int) -> list[float]:
        """The judged val_bpb values of an experiment (ok trials only)."""
        return [m.val_bpb for m in self.measurements(exp_id) if m.status == "ok" and m.val_bpb is not None]

    # -- export -------------------------------------------------------------------------------

    def export_tsv(self, path: Path | str, run_tag: str | None = None) -> Path:
        """``results.tsv`` in autoresearch's columns: commit, val_bpb, memory_gb, status, description."""
        lines = ["commit\tval_bpb\tmemory_gb\tstatus\tdescription"]
        for e in self.experiments(run_tag):
            if not e.finished:
                continue
            if e.status == "repeat":  # refused before it trained: no trial to list
                continue
            commit = (e.commit_sha or "")[:7]
            val = f"{e.val_bpb:.6f}" if e.val_bpb is not None else "0.000000"
            memory = f"{(e.peak_memory_mb or 0.0) / 1024:.1f}"
            description = " ".join(e.description.split())
            status = e.status
            if status == "agent_failed":  # autoresearch's word for a run that produced nothing is crash
                status, description = "crash", f"{description} -- {' '.join(e.reason.split())}"
            lines.append(f"{commit}\t{val}\t{memory}\t{status}\t{description}")
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
        return path
