"""Words that mean one thing: an agent that fails is ``agent_failed`` (never the judge's
``invalid``), a refused repeat is ``repeat``; results.tsv says them in autoresearch's words."""

from __future__ import annotations

import sqlite3

from fixtures.standin.helpers import constant_step
from nightlab.agents.scripted import ScriptedProposer
from nightlab.night import migrations
from nightlab.night.proposals import ProposalError
from nightlab.night.scheduler import Researcher, Scheduler
from nightlab.night.store import Store
from test_scheduler import _simulated_lab, _workers


class FailsFirst(ScriptedProposer):
    def propose(self, context, worktree):
        if not self.contexts:
            self.contexts.append(context)
            raise ProposalError("the reply had no edit block", cost_usd=0.01, tokens_in=900, tokens_out=40)
        return super().propose(context, worktree)


def test_an_agent_failure_is_agent_failed_and_a_crash_with_its_reason_in_results_tsv(tmp_path):
    lab = _simulated_lab(tmp_path, seconds=0.05)
    steps = [constant_step("deeper", "DEPTH", 12), constant_step("deeper again", "DEPTH", 12)]
    Scheduler(lab, [Researcher("a", FailsFirst(steps))], _workers(lab, 1)).run(max_experiments=3)
    failed, kept, repeat = [e for e in lab.experiments() if e.kind == "experiment"]
    assert failed.status == "agent_failed" and "the reply had no edit block" in failed.reason
    assert (failed.cost_usd, failed.tokens_in, failed.tokens_out) == (0.01, 900, 40)
    assert repeat.status == "repeat"
    rows = lab.store.export_tsv(tmp_path / "results.tsv", lab.run.tag).read_text().splitlines()
    statuses = [line.split("\t")[3] for line in rows[1:]]
    assert statuses == ["keep", "crash", "keep"]  # baseline, the failure, the keep; the repeat never trained
    crash = next(line for line in rows if line.split("\t")[3] == "crash")
    assert "agent a failed: the reply had no edit block" in crash.split("\t")[4]


def test_a_store_from_before_takes_the_new_statuses_and_unknown_costs(tmp_path):
    path = tmp_path / "store.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for number, script in enumerate(migrations.MIGRATIONS[:3], start=1):
        for statement in migrations._statements(script):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {number}")
    conn.execute("INSERT INTO experiments (run_tag, status, cost_usd, created_at, epochs) VALUES ('t', 'keep', 0.5, 'x', 1.5)")
    conn.execute("INSERT INTO measurements (experiment_id, seed, kind, status, run_dir, created_at) "
                 "VALUES (1, 0, 'first', 'ok', 'runs/1', 'x')")
    conn.close()
    with Store(path) as store:
        old = store.get(1)
        assert (old.status, old.cost_usd, old.epochs) == ("keep", 0.5, 1.5) and len(store.measurements(1)) == 1
        new = store.add_experiment("t", status="agent_failed", cost_usd=None, tokens_in=None, tokens_out=None)
        assert (new.status, new.cost_usd, new.tokens_in) == ("agent_failed", None, None)
        assert store.add_experiment("t", status="repeat").status == "repeat"
        assert store.conn.execute("PRAGMA foreign_key_check").fetchall() == []
