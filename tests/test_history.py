"""What a researcher sees: how each trial trained, what is in flight, and no trial spent twice.

A real store, real run folders (summary.json, train.log), the simulated trainer with the scheduler
and a scripted researcher: only the LLM is scripted.
"""

from __future__ import annotations

import json
from pathlib import Path

from fixtures.standin.helpers import constant_step
from nightlab.agents.prompt import build_prompt
from nightlab.agents.scripted import ScriptedProposer
from nightlab.night import history
from nightlab.night.scheduler import Researcher, Scheduler
from nightlab.night.store import Store
from test_scheduler import _simulated_lab, _workers

LOG = "".join(f"step {s:05d} | loss {4.0 - s / 1000:.4f} | lr x1.00 | 1.00M tok/s\n" for s in range(100, 1300, 100))


def _trial_folder(root: Path, name: str, summary: dict, log: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "train.log").write_text(log)
    return folder


def _night(tmp_path: Path, store: Store) -> int:
    """A baseline, a slower discard, a crash, one training, one queued, one refused repeat; returns the crash's id."""
    store.add_run("t", "nightlab/t", "0" * 40, "cli", "")
    base = store.add_experiment("t", kind="baseline", description="baseline", status="keep", val_bpb=1.0,
                                total_tokens=600_000_000, training_seconds=300.0, num_steps=1200,
                                mfu_percent=38.5, peak_memory_mb=12_800.0)
    folder = _trial_folder(tmp_path, "1", {"tok_per_s": 2_000_000, "startup_seconds": 34.6}, LOG)
    store.add_measurement(base.id, 0, "baseline", "ok", 1.0, folder)
    slower = store.add_experiment("t", description="wider mlp", status="discard", val_bpb=1.002,
                                  num_steps=900, total_tokens=450_000_000, training_seconds=300.0,
                                  reason="not better than the best beyond the noise")
    store.add_measurement(slower.id, 0, "first", "ok", 1.002, _trial_folder(tmp_path, "2", {}, LOG[:200]))
    crashed = store.add_experiment("t", description="fused attention", status="crash",
                                   reason="exit code 1", error="Traceback ...\nRuntimeError: shapes do not match")
    store.add_experiment("t", description="lower lr", status="running", stage="train", worker="gpu1")
    store.add_experiment("t", description="deeper", status="queued")
    store.add_experiment("t", description="wider mlp again", status="repeat", reason="repeats #2")
    return crashed.id


def test_the_history_shows_how_each_trial_trained_and_what_is_in_flight(tmp_path):
    with Store(tmp_path / "store.db") as store:
        crashed = _night(tmp_path, store)
        text = history.digest(store, "t", noise=0.001)

    assert "3 experiments" in text and "1 proposal(s) refused as repeats" in text
    flight = text.split("In flight")[1].split("Path to the best")[0]
    assert "#4 training on gpu1: lower lr" in flight and "#5 queued: deeper" in flight
    assert "2.00M tok/s, 1200 steps, MFU 38.5%, 12.5 GB, startup 35 s" in text
    assert "loss 3.9000@100 3.6000@400 3.3000@700 3.1000@900 2.8000@1200" in text
    assert "#2 discard 1.002000 (+0.002000, +2.0 noise) wider mlp" in text
    assert "1.50M tok/s, 900 steps" in text  # tokens over seconds where summary.json has no tok_per_s
    assert f"#{crashed} crash" in text and "error: Traceback ... | RuntimeError: shapes do not match" in text
    assert "wider mlp again" not in text


def test_nightlab_status_json_has_the_same_facts(tmp_path):
    from nightlab.report.live import take_snapshot

    with Store(tmp_path / "store.db") as store:
        _night(tmp_path, store)
        snap = json.loads(json.dumps(take_snapshot(store, tmp_path, "t").to_dict()))
    assert [(e["id"], e["status"], e["description"]) for e in snap["in_flight"]] == [
        (4, "running", "lower lr"), (5, "queued", "deeper")]
    best = snap["best"]
    assert best["id"] == 1 and best["training"].startswith("2.00M tok/s, 1200 steps, MFU 38.5%, 12.5 GB, startup 35 s")
    assert "1.50M tok/s, 900 steps" in next(e for e in snap["leaderboard"] if e["id"] == 2)["training"]


def test_a_repeat_of_an_in_flight_proposal_is_refused_and_asked_again(tmp_path):
    lab = _simulated_lab(tmp_path)
    steps = [constant_step("deeper", "DEPTH", 12),
             constant_step("deeper, said differently", "DEPTH", 12),  # prepared while "deeper" trains
             constant_step("lower lr", "MATRIX_LR", 0.02)]
    researcher = ScriptedProposer(steps)
    Scheduler(lab, [Researcher("a", researcher)], _workers(lab, 1)).run(max_experiments=3)

    rows = [e for e in lab.experiments() if e.kind == "experiment"]
    assert [(e.description, e.status) for e in rows][1] == ("deeper, said differently", "repeat")
    first, repeat, third = rows
    assert f"repeats #{first.id} (deeper; in flight)" in repeat.reason
    assert not repeat.commit_sha and not lab.store.measurements(repeat.id)
    assert third.description == "lower lr" and third.commit_sha
    asked_while_training, asked_again = researcher.contexts[1], researcher.contexts[2]
    assert f"#{first.id} " in asked_while_training.history and "deeper" in asked_while_training.history
    assert "In flight" in asked_while_training.history
    assert asked_again.repeats == 1 and f"repeats #{first.id}" in asked_again.last_error
    assert "## Your last proposal repeated an experiment" in build_prompt(asked_again, "answer").user
    assert lab.store.status_counts(lab.run.tag)["repeat"] == 1


def test_after_max_repeats_in_a_row_the_agent_is_asked_for_another_direction(tmp_path):
    lab = _simulated_lab(tmp_path)
    same = [constant_step(f"deeper {i}", "DEPTH", 12) for i in range(3)]
    researcher = ScriptedProposer([*same, constant_step("lower lr", "MATRIX_LR", 0.02)])
    lab.config = lab.config.with_overrides(["run.max_repeats=2"])
    Scheduler(lab, [Researcher("a", researcher)], _workers(lab, 1)).run(max_experiments=4)
    statuses = [e.status for e in lab.experiments() if e.kind == "experiment"]
    assert statuses[1:3] == ["repeat", "repeat"]
    once, twice = researcher.contexts[2], researcher.contexts[3]
    assert once.repeats == 1 and "different direction" not in once.last_error
    assert twice.repeats == 2 and "different direction" in twice.last_error


def test_an_edit_that_differs_only_in_comments_and_spacing_is_a_repeat(tmp_path):
    lab = _simulated_lab(tmp_path)

    def restyled(worktree: Path) -> str:
        path = worktree / "train.py"
        path.write_text(path.read_text().replace("DEPTH = 8  # layers", "DEPTH  =  12    # deeper, as before"))
        return "deeper, restyled"

    researcher = ScriptedProposer([constant_step("deeper", "DEPTH", 12), restyled, constant_step("lr", "MATRIX_LR", 0.02)])
    Scheduler(lab, [Researcher("a", researcher)], _workers(lab, 1)).run(max_experiments=3)
    assert [e.status for e in lab.experiments() if e.kind == "experiment"][1] == "repeat"


def test_the_kept_diffs_are_shown_newest_first_within_their_share(tmp_path):
    with Store(tmp_path / "store.db") as store:
        store.add_experiment("t", kind="baseline", description="baseline", status="keep", val_bpb=1.0)
        for i in range(1, 30):
            store.add_experiment("t", description=f"idea {i}", status="keep" if i % 3 == 0 else "discard",
                                 val_bpb=1.0 - i / 1000, commit_sha=f"c{i}", parent_commit=f"c{i - 1}")
        text = history.digest(store, "t", noise=0.001, max_chars=3000,
                              diff_of=lambda e: f"-OLD = {e.id - 1}\n+NEW = {e.id}\n" + "# context\n" * 20)
    assert len(text) <= 3000
    chain = text.split("The chain of kept changes")[1].split("Near misses")[0]
    assert "#30 idea 29" not in chain and "#28 idea 27" in chain and "+NEW = 28" in chain  # the newest keep
    assert "#4 idea 3\n" not in chain  # the oldest did not fit its share
    assert "Recent experiments" in text  # the diffs leave room for the other outcomes


def test_the_prompt_says_repeats_are_refused_and_shows_the_history():
    from nightlab.night.proposals import Context

    ctx = Context(program="p", best_source={"train.py": "X = 1\n"}, history="In flight (queued ...):\n#4 queued: deeper")
    user = build_prompt(ctx, "answer").user
    assert "repeats an experiment of the history, measured or in flight, is refused" in user
    assert "## History of experiments\n\nIn flight" in user and "## The last experiment failed" not in user
