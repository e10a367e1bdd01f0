"""The experiment store: real SQLite files, migrations, crash-safe single-transaction writes."""

from __future__ import annotations

import sqlite3

import pytest

from nightlab.night.migrations import MIGRATIONS, migrate, schema_version
from nightlab.night.store import Store


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "store.db") as s:
        yield s


def test_new_store_is_wal_and_at_the_latest_schema(tmp_path, store):
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert schema_version(store.conn) == len(MIGRATIONS)
    assert Store.open(tmp_path / "lab").path == tmp_path / "lab" / ".nightlab" / "store.db"


def test_migrating_twice_changes_nothing(store):
    assert migrate(store.conn) == len(MIGRATIONS)


def test_a_newer_schema_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "future.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="upgrade nightlab"):
        Store(path)


def test_rows_are_committed_at_once_and_visible_to_another_connection(tmp_path, store):
    store.add_run("t", "nightlab/t", "abc", "search", "[lab]")
    exp = store.add_experiment("t", description="raise lr", commit_sha="c1", parent_commit="p0")
    assert exp.status == "queued" and exp.id == 1 and exp.created_at
    store.update(exp.id, status="running", stage="train", pgid=123)
    with Store(tmp_path / "store.db") as other:  # a second process would see the same
        seen = other.get(exp.id)
    assert (seen.status, seen.stage, seen.pgid, seen.description) == ("running", "train", 123, "raise lr")


def test_bad_fields_and_statuses_are_refused(store):
    exp = store.add_experiment("t")
    with pytest.raises(ValueError, match="unknown experiment field"):
        store.update(exp.id, colour="red")
    with pytest.raises(ValueError, match="status 'won'"):
        store.update(exp.id, status="won")
    with pytest.raises(KeyError, match="no experiment 99"):
        store.get(99)


def test_a_measurement_recorded_twice_is_not_duplicated(store):
    exp = store.add_experiment("t")
    store.add_measurement(exp.id, 0, "first", "ok", 1.5, "/runs/1")
    store.add_measurement(exp.id, 0, "first", "ok", 1.25, "/runs/1")
    store.add_measurement(exp.id, 1, "confirm", "ok", 1.75, "/runs/1/confirm-1")
    store.add_measurement(exp.id, 2, "confirm", "crash", None, "/runs/1/confirm-2", reason="exit code 1")
    store.add_measurement(exp.id, 9, "replay", "ok", 9.0, "/runs/1/replay-9")
    assert [m.val_bpb for m in store.measurements(exp.id)] == [1.25, 1.75, None]
    assert store.values(exp.id) == [1.25, 1.75]  # only ok trials, never replays
    assert len(store.measurements(exp.id, kinds=("replay",))) == 1


def test_results_tsv_has_autoresearchs_columns(tmp_path, store):
    a = store.add_experiment("t", commit_sha="a1b2c3d4e5", description="baseline")
    store.update(a.id, status="keep", val_bpb=0.9979, peak_memory_mb=45060.2)
    b = store.add_experiment("t", commit_sha="b2c3d4e5f6", description="double   the\twidth")
    store.update(b.id, status="crash", peak_memory_mb=None)
    store.add_experiment("t", commit_sha="c3", description="still running", status="running")
    store.add_experiment("other", commit_sha="d4", description="other run", status="discard")
    text = store.export_tsv(tmp_path / "results.tsv", "t").read_text()
    assert text.splitlines() == [
        "commit\tval_bpb\tmemory_gb\tstatus\tdescription",
        "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline",
        "b2c3d4e\t0.000000\t0.0\tcrash\tdouble the width",
    ]
    assert not list(tmp_path.glob(".results.tsv*"))  # written by rename, no temp left behind


def test_runs_are_recorded_once(store):
    run = store.add_run("t", "nightlab/t", "abc", "search", "[lab]")
    assert store.run("t") == run and store.runs() == [run] and store.run("nope") is None
    with pytest.raises(sqlite3.IntegrityError):
        store.add_run("t", "nightlab/t", "abc", "search", "[lab]")


def test_processes_opening_a_new_store_at_once_migrate_it_once(tmp_path):
    code = "import sys; from nightlab.night.store import Store; Store(sys.argv[1]).close()"
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "store.db")], stderr=subprocess.PIPE)
             for _ in range(4)]
    errors = [p.communicate()[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    with Store(tmp_path / "store.db") as store:
        assert schema_version(store.conn) == len(MIGRATIONS)


def test_connections_racing_to_create_a_store_all_open_it_in_wal(tmp_path):
    # The switch to WAL can fail at once with "database is locked" while another connection creates
    # the same file; it happened in a few rounds in a hundred with eight openers, so run many rounds.
    import threading

    for round_ in range(300):
        path = tmp_path / f"store{round_}.db"
        start, errors, modes = threading.Barrier(8), [], []

        def open_store():
            start.wait()
            try:
                with Store(path) as store:
                    modes.append(store.conn.execute("PRAGMA journal_mode").fetchone()[0])
            except Exception as error:  # noqa: BLE001 - collected and asserted below
                errors.append(repr(error))

        threads = [threading.Thread(target=open_store) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == [] and modes == ["wal"] * 8, (round_, errors, modes)
