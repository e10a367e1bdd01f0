"""The store's schema, as numbered migrations.

Migration N brings a database from version N-1 to N (``PRAGMA user_version``). Each runs in one
transaction with the version bump, so a database is always at a whole version. Never edit a
released migration: append a new one.
"""

from __future__ import annotations

import sqlite3

# ``invalid`` is the judge's word (a model caught cheating, an edit outside the allowed files);
# an agent that produced no edit is ``agent_failed``; a proposal that repeats a change already
# measured or in flight is a ``repeat`` and is never trained.
STATUSES = ("queued", "running", "keep", "discard", "crash", "timeout", "invalid", "agent_failed", "repeat")
_STATUSES_1 = STATUSES[:7]  # what migration 1 allowed

MIGRATIONS: tuple[str, ...] = (
    # 1: experiments and their measurements
    f"""
    CREATE TABLE experiments (
        id INTEGER PRIMARY KEY,
        run_tag TEXT NOT NULL,
        kind TEXT NOT NULL DEFAULT 'experiment',   -- baseline | experiment | manual
        worker TEXT NOT NULL DEFAULT 'local',
        agent TEXT NOT NULL DEFAULT '',
        parent_commit TEXT,
        commit_sha TEXT,                           -- NULL when the edit was refused (invalid)
        description TEXT NOT NULL DEFAULT '',
        rationale TEXT NOT NULL DEFAULT '',
        files_changed INTEGER NOT NULL DEFAULT 0,
        lines_added INTEGER NOT NULL DEFAULT 0,
        lines_removed INTEGER NOT NULL DEFAULT 0,
        code_lines INTEGER,                        -- non-blank lines of the allowed files
        status TEXT NOT NULL DEFAULT 'queued' CHECK (status IN ({", ".join(repr(s) for s in _STATUSES_1)})),
        stage TEXT NOT NULL DEFAULT 'queued',      -- queued | train | eval | judge | done
        pgid INTEGER,                              -- process group of the stage now running
        val_bpb REAL,                              -- the judged value: mean of the measurements
        training_seconds REAL,
        total_seconds REAL,
        total_tokens INTEGER,
        num_steps INTEGER,
        num_params INTEGER,
        peak_memory_mb REAL,
        mfu_percent REAL,
        seed INTEGER,
        cost_usd REAL NOT NULL DEFAULT 0,
        tokens_in INTEGER NOT NULL DEFAULT 0,
        tokens_out INTEGER NOT NULL DEFAULT 0,
        noise REAL,                                -- the noise width the verdict used
        reason TEXT NOT NULL DEFAULT '',           -- the policy's reason, or why it failed
        error TEXT NOT NULL DEFAULT '',            -- traceback or log tail
        created_at TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT
    );
    CREATE INDEX experiments_run ON experiments (run_tag, id);
    CREATE TABLE measurements (
        id INTEGER PRIMARY KEY,
        experiment_id INTEGER NOT NULL REFERENCES experiments (id),
        seed INTEGER NOT NULL,
        kind TEXT NOT NULL,                        -- first | baseline | confirm | replay
        status TEXT NOT NULL,                      -- the trial's: ok | crash | timeout | invalid
        val_bpb REAL,
        reason TEXT NOT NULL DEFAULT '',
        run_dir TEXT NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (experiment_id, seed, kind)
    );
    CREATE TABLE runs (
        tag TEXT PRIMARY KEY,
        branch TEXT NOT NULL,
        base_commit TEXT NOT NULL,
        agent TEXT NOT NULL,
        config TEXT NOT NULL,                      -- the config as TOML, as the run started
        created_at TEXT NOT NULL
    );
    """,
    # 2: the org: a reviewer's verdict, the experiment a change was re-applied from, the agenda item claimed
    """
    ALTER TABLE experiments ADD COLUMN review TEXT NOT NULL DEFAULT '';   -- reviewer: approve/veto and why
    ALTER TABLE experiments ADD COLUMN origin_id INTEGER;                  -- re-applied from this experiment
    ALTER TABLE experiments ADD COLUMN claim TEXT NOT NULL DEFAULT '';    -- the agenda item it worked on
    CREATE INDEX experiments_commit ON experiments (run_tag, commit_sha);
    CREATE INDEX experiments_status ON experiments (run_tag, status, id);
    """,
    # 3: passes over the train split, as a fraction (where in an epoch a run ends moves its val_bpb)
    """
    ALTER TABLE experiments ADD COLUMN epochs REAL;
    """,
    # 4: an agent's failure and a refused repeat are statuses of their own; an agent's cost and
    # tokens may be unknown (NULL), never a made-up 0. SQLite cannot alter a CHECK or a NOT NULL,
    # so the table is rebuilt (the store runs migrations before it turns foreign keys on).
    f"""
    CREATE TABLE experiments_4 (
        id INTEGER PRIMARY KEY,
        run_tag TEXT NOT NULL,
        kind TEXT NOT NULL DEFAULT 'experiment',
        worker TEXT NOT NULL DEFAULT 'local',
        agent TEXT NOT NULL DEFAULT '',
        parent_commit TEXT,
        commit_sha TEXT,
        description TEXT NOT NULL DEFAULT '',
        rationale TEXT NOT NULL DEFAULT '',
        files_changed INTEGER NOT NULL DEFAULT 0,
        lines_added INTEGER NOT NULL DEFAULT 0,
        lines_removed INTEGER NOT NULL DEFAULT 0,
        code_lines INTEGER,
        status TEXT NOT NULL DEFAULT 'queued' CHECK (status IN ({", ".join(repr(s) for s in STATUSES)})),
        stage TEXT NOT NULL DEFAULT 'queued',
        pgid INTEGER,
        val_bpb REAL,
        training_seconds REAL,
        total_seconds REAL,
        total_tokens INTEGER,
        num_steps INTEGER,
        num_params INTEGER,
        peak_memory_mb REAL,
        mfu_percent REAL,
        seed INTEGER,
        cost_usd REAL DEFAULT 0,                   -- NULL: the agent does not report it
        tokens_in INTEGER DEFAULT 0,
        tokens_out INTEGER DEFAULT 0,
        noise REAL,
        reason TEXT NOT NULL DEFAULT '',
        error TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT,
        review TEXT NOT NULL DEFAULT '',
        origin_id INTEGER,
        claim TEXT NOT NULL DEFAULT '',
        epochs REAL
    );
    INSERT INTO experiments_4 SELECT id, run_tag, kind, worker, agent, parent_commit, commit_sha, description,
        rationale, files_changed, lines_added, lines_removed, code_lines, status, stage, pgid, val_bpb,
        training_seconds, total_seconds, total_tokens, num_steps, num_params, peak_memory_mb, mfu_percent, seed,
        cost_usd, tokens_in, tokens_out, noise, reason, error, created_at, started_at, finished_at, review,
        origin_id, claim, epochs FROM experiments;
    DROP TABLE experiments;
    ALTER TABLE experiments_4 RENAME TO experiments;
    CREATE INDEX experiments_run ON experiments (run_tag, id);
    CREATE INDEX experiments_commit ON experiments (run_tag, commit_sha);
    CREATE INDEX experiments_status ON experiments (run_tag, status, id);
    """,
    # 5: trials disturbed from outside (re-run, never judged) and the budget a trial trained under
    """
    ALTER TABLE experiments ADD COLUMN disturbed INTEGER NOT NULL DEFAULT 0;  -- its trials re-run as disturbed
    ALTER TABLE experiments ADD COLUMN budget TEXT NOT NULL DEFAULT '';       -- "300s" or "2000000 tokens"
    ALTER TABLE measurements ADD COLUMN tok_per_s REAL;                       -- the trial's training throughput
    ALTER TABLE measurements ADD COLUMN shape TEXT NOT NULL DEFAULT '';       -- params:tokens per step
    """,
    # 6: the sealed holdout, scored after a keep's verdict; trials that check keeps afterwards
    """
    ALTER TABLE experiments ADD COLUMN holdout_bpb REAL;     -- mean of its trials' holdout scores (keeps only)
    ALTER TABLE measurements ADD COLUMN holdout_bpb REAL;    -- this trial's model scored on the holdout
    ALTER TABLE experiments ADD COLUMN at_scale TEXT NOT NULL DEFAULT '';  -- holds | fails: the best at promote_budget_s
    CREATE TABLE checks (
        id INTEGER PRIMARY KEY,
        run_tag TEXT NOT NULL,
        kind TEXT NOT NULL,                        -- ablation | pruned | scale
        best_id INTEGER NOT NULL,                  -- the best the check starts from
        keep_id INTEGER NOT NULL DEFAULT 0,        -- ablation: the keep reverted; 0: none
        commit_sha TEXT NOT NULL,                  -- the code trained
        seed INTEGER NOT NULL,
        budget_s REAL NOT NULL,
        status TEXT NOT NULL,                      -- running | ok | crash | timeout | invalid
        val_bpb REAL,
        holdout_bpb REAL,
        pgid INTEGER,                              -- the process group of the trial while it runs
        reason TEXT NOT NULL DEFAULT '',
        run_dir TEXT NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (run_tag, kind, best_id, keep_id, seed, budget_s)
    );
    """,
    # 7: how busy the machine was outside a trial while it trained (a slow trial is disturbed only then)
    """
    ALTER TABLE measurements ADD COLUMN outside_cores REAL;  -- cores other processes kept busy, on average
    """,
)


def schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations the database lacks; return its version.

    Each migration runs under a write lock and re-reads the version inside it, so two processes
    opening a new store at once (a loop and a report) apply it once.
    """
    for number in range(schema_version(conn) + 1, len(MIGRATIONS) + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            if schema_version(conn) < number:
                for statement in _statements(MIGRATIONS[number - 1]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    version = schema_version(conn)
    if version > len(MIGRATIONS):
        raise RuntimeError(
            f"the store is at schema version {version}, newer than this nightlab knows ({len(MIGRATIONS)}); "
            "upgrade nightlab"
        )
    return version


def _statements(script: str) -> list[str]:
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        raise ValueError(f"migration ends in an incomplete statement: {buffer.strip()[:80]}")
    return statements
