"""The research loop end to end: scripted proposer, stand-in train.py, real evaluator, git and SQLite."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fixtures.standin.helpers import STANDIN, constant_step, git, lab_toml, make_dataset, make_lab, open_lab, set_constant
from nightlab.cli import main
from nightlab.night.proposals import ProposalError
from nightlab.agents.scripted import ScriptedProposer
from nightlab.night.proposals import context
from nightlab.night.scheduler import run_single
from nightlab.night.store import Store


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def _lab(tmp_path: Path, toml: str) -> Path:
    return make_lab(tmp_path / "lab", toml, set_constant(STANDIN.read_text(), "SHARPNESS", 0.5))


def _fail(worktree: Path) -> str:
    raise ProposalError("the reply had no edit", cost_usd=0.01, tokens_in=100, tokens_out=5)


def _drop_docstring_line(worktree: Path) -> str:
    path = worktree / "train.py"
    path.write_text(path.read_text().replace("measurable change. MODE picks a failure to act out.\n", ""))
    return "shorter docstring"


@pytest.mark.slow
def test_every_status_path_is_recorded_and_the_loop_goes_on(tmp_path, data_dir):
    lab_dir = _lab(tmp_path, lab_toml(allowance_s=8.0))
    lab = open_lab(lab_dir, data_dir)
    proposer = ScriptedProposer([
        constant_step("sharper unigram", "SHARPNESS", 1.0),
        constant_step("noisy logits", "NOISE", 0.5),
        constant_step("crashing", "MODE", "crash"),
        constant_step("diverging", "MODE", "nan"),
        constant_step("hanging", "MODE", "hang"),
        ("scratch notes", {"notes.txt": "outside the allowed files"}),
        _fail,
        _drop_docstring_line,
    ])
    new = run_single(lab, proposer, max_experiments=8)

    rows = {e.description: e for e in lab.experiments()}
    assert sorted(e.id for e in new) == [e.id for e in lab.experiments()[1:]]  # in the order verdicts came
    assert {d: e.status for d, e in rows.items()} == {
        "baseline": "keep", "sharper unigram": "keep", "noisy logits": "discard", "crashing": "crash",
        "diverging": "crash", "hanging": "timeout", "scratch notes": "invalid", "(agent failed)": "agent_failed",
        "shorter docstring": "keep",
    }
    base, sharper, simpler = rows["baseline"], rows["sharper unigram"], rows["shorter docstring"]
    assert sharper.val_bpb < base.val_bpb - 0.1 and "beyond the noise" in sharper.reason
    assert "fewer lines" in simpler.reason and simpler.val_bpb == pytest.approx(sharper.val_bpb)
    assert rows["noisy logits"].val_bpb > sharper.val_bpb
    assert sharper.epochs == base.epochs == 0.05  # the stand-in's 1,000 tokens of the 20,000 in the train split
    assert rows["crashing"].epochs is None
    assert "RuntimeError: stand-in crash" in rows["crashing"].error
    assert rows["diverging"].reason.startswith("NaN")
    assert "hard cap" in rows["hanging"].reason
    assert "notes.txt" in rows["scratch notes"].reason and rows["scratch notes"].commit_sha is None
    assert rows["(agent failed)"].cost_usd == 0.01 and "no edit" in rows["(agent failed)"].reason
    # Measurements: baseline and keeps confirmed with extra seeds, failures measured once.
    counts = {d: len(lab.store.measurements(e.id)) for d, e in rows.items()}
    assert counts == {"baseline": 2, "sharper unigram": 2, "noisy logits": 1, "crashing": 1, "diverging": 1,
                      "hanging": 1, "scratch notes": 0, "(agent failed)": 0, "shorter docstring": 2}

    # Git: the branch tip is the last keep, kept commits chain, every committed experiment has its ref.
    assert git(lab_dir, "rev-parse", "nightlab/t") == simpler.commit_sha
    assert git(lab_dir, "rev-parse", f"{simpler.commit_sha}^") == sharper.commit_sha == simpler.parent_commit
    assert git(lab_dir, "rev-parse", f"{sharper.commit_sha}^") == base.commit_sha
    for e in lab.experiments():
        if e.commit_sha:
            assert git(lab_dir, "rev-parse", f"refs/nightlab/exp/{e.id}") == e.commit_sha
            if e.kind != "baseline":
                assert git(lab_dir, "log", "-1", "--format=%s", e.commit_sha) == e.description
    every_commit_file = git(lab_dir, "log", "--all", "--name-only", "--format=").split()
    assert "notes.txt" not in every_commit_file
    # the lab's own checkout was never touched, but for the findings the night writes in notes/
    assert git(lab_dir, "status", "--porcelain", "--", ".", ":!notes") == ""

    # The agent was told: outcomes of its proposals, and why the refused edit was refused.
    assert [(o.description, o.status) for o in proposer.observations][:3] == [
        ("sharper unigram", "keep"), ("noisy logits", "discard"), ("crashing", "crash")]
    told = [c.last_error for c in proposer.contexts]
    assert any("notes.txt" in t and "reverted" in t for t in told)
    assert any("the reply had no edit" in t for t in told)
    assert "#2 keep" in proposer.contexts[-1].history
    assert (lab_dir / ".nightlab" / "best" / "model.pt").exists()
    assert "SHARPNESS = 1.0" in (lab_dir / ".nightlab" / "best" / "train.py").read_text()


def test_a_verdict_says_when_the_runs_ended_in_different_epochs(tmp_path, data_dir):
    lab = open_lab(_lab(tmp_path, lab_toml(baseline_runs=1, confirm_runs=0)), data_dir)
    proposer = ScriptedProposer([constant_step("reads more", "TOKENS", 30_000), constant_step("sharper", "SHARPNESS", 0.95)])
    more, sharper = run_single(lab, proposer, max_experiments=2)
    assert more.epochs == 1.5 and lab.experiments()[0].epochs == 0.05  # 30,000 and 1,000 of 20,000 train tokens
    assert more.status == "discard" and more.reason.endswith(
        "it ended at 1.50 epochs of the train split, its reference at 0.05: on data read more than once, "
        "where in an epoch a run ends moves val_bpb too")
    assert sharper.epochs == 0.05 and "epochs" not in sharper.reason  # both within the first pass


def test_theepoch_note_is_for_runs_that_ended_in_different_epochs():
    from types import SimpleNamespace

    from nightlab.night.verdict import epoch_note

    def note(ran, ref):
        return epoch_note(SimpleNamespace(epochs=ran), SimpleNamespace(epochs=ref))

    assert note(2.05, 1.95) == ("; it ended at 2.05 epochs of the train split, its reference at 1.95: on data read "
                                "more than once, where in an epoch a run ends moves val_bpb too")
    assert note(4.99, 5.06).startswith("; it ended at 4.99 epochs")
    assert note(1.2, 1.8) == note(0.4, 0.9) == note(None, 3.0) == note(3.0, None) == ""


def test_next_proposal_is_prepared_while_the_current_experiment_trains(tmp_path, data_dir):
    lab_dir = _lab(tmp_path, lab_toml(baseline_runs=1, confirm_runs=0))
    lab = open_lab(lab_dir, data_dir)
    seen: list[tuple[str, str]] = []

    def peek_then_edit(worktree: Path) -> str:
        with Store.open(lab_dir) as store:  # what another process sees while this proposal is made
            for _ in range(100):
                first = [e for e in store.experiments() if e.description == "sharper"][0]
                if first.status != "queued":
                    break
                time.sleep(0.01)
            seen.append((first.status, first.stage))
        return constant_step("more noise", "NOISE", 0.5)(worktree)

    proposer = ScriptedProposer([
        constant_step("sharper", "SHARPNESS", 1.0),
        peek_then_edit,
        constant_step("never asked", "NOISE", 0.1),
    ])
    run_single(lab, proposer, max_experiments=2)
    assert seen == [("running", "train")]
    rows = lab.experiments()
    assert [e.description for e in rows] == ["baseline", "sharper", "more noise"]
    assert [e.status for e in rows] == ["keep", "keep", "discard"]
    # Prepared on the baseline while the first trained, measured on top of the new best.
    assert rows[2].parent_commit == rows[1].commit_sha == git(lab_dir, "rev-parse", f"{rows[2].commit_sha}^")
    assert "SHARPNESS = 1.0" in git(lab_dir, "show", f"{rows[2].commit_sha}:train.py")
    assert len(proposer.contexts) == 2


def test_stop_ends_after_the_current_experiment(tmp_path, data_dir):
    lab_dir = _lab(tmp_path, lab_toml(baseline_runs=1, confirm_runs=0))
    lab = open_lab(lab_dir, data_dir)
    stop = threading.Event()

    def stop_while_training(worktree: Path) -> str:
        stop.set()  # as Ctrl-C would, while experiment 1 trains
        return constant_step("not run", "NOISE", 0.5)(worktree)

    proposer = ScriptedProposer([constant_step("sharper", "SHARPNESS", 1.0), stop_while_training])
    run_single(lab, proposer, stop=stop)
    # The proposal that came back while "sharper" trained is kept for --resume, not trained now.
    assert [(e.description, e.status) for e in lab.experiments()] == [
        ("baseline", "keep"), ("sharper", "keep"), ("not run", "queued")]
    assert context(lab).best_val_bpb == lab.experiments()[1].val_bpb


def test_nightlab_experiment_and_replay_commands(tmp_path, data_dir, capsys):
    lab_dir = _lab(tmp_path, lab_toml(baseline_runs=1, confirm_runs=0))
    git(lab_dir, "switch", "-q", "-c", "nightlab/manual")
    args = ["--lab", str(lab_dir), "--data", str(data_dir)]
    train = lab_dir / "train.py"
    start = git(lab_dir, "rev-parse", "HEAD")

    train.write_text(set_constant(train.read_text(), "SHARPNESS", 1.0))
    assert main(["experiment", "-m", "sharper", *args]) == 0
    assert "status: keep" in capsys.readouterr().out
    kept = git(lab_dir, "rev-parse", "HEAD")
    assert git(lab_dir, "rev-parse", "HEAD^") == start and git(lab_dir, "log", "-1", "--format=%s") == "sharper"

    train.write_text(set_constant(train.read_text(), "SHARPNESS", 0.2))
    assert main(["experiment", "-m", "flatter", *args]) == 1
    assert "status: discard" in capsys.readouterr().out
    assert git(lab_dir, "rev-parse", "HEAD") == kept and git(lab_dir, "status", "--porcelain") == ""

    (lab_dir / "program.md").write_text("edited by the agent\n")
    assert main(["experiment", "-m", "edit the brief", *args]) == 1
    out = capsys.readouterr().out
    assert "status: invalid" in out and "program.md; restore them" in out
    assert git(lab_dir, "rev-parse", "HEAD") == kept and "program.md" in git(lab_dir, "status", "--porcelain")

    git(lab_dir, "checkout", "program.md")
    assert main(["experiment", "-m", "nothing", *args]) == 2  # no edit: a user error, no row
    assert "no edits to test" in capsys.readouterr().err

    (lab_dir / "NOTES.txt").write_text("a commit of the user's own\n")
    git(lab_dir, "add", "NOTES.txt")
    git(lab_dir, "commit", "-qm", "notes")
    train.write_text(set_constant(train.read_text(), "SHARPNESS", 0.9))
    assert main(["experiment", "-m", "off the best", *args]) == 2  # HEAD is no longer the run's best: refused
    assert f"the best of run 'manual' is {kept[:10]}" in capsys.readouterr().err
    git(lab_dir, "checkout", "train.py")
    with Store.open(lab_dir) as store:
        rows = store.experiments("manual")
    assert [(e.kind, e.status) for e in rows] == [("baseline", "keep"), ("manual", "keep"), ("manual", "discard"),
                                                  ("manual", "invalid")]
    tsv = (lab_dir / ".nightlab" / "results.tsv").read_text().splitlines()
    assert tsv[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription" and tsv[2].startswith(kept[:7])

    flatter = rows[2]
    assert main(["replay", str(flatter.id), *args]) == 0
    out = capsys.readouterr().out
    assert f"val_bpb: {flatter.val_bpb:.6f}" in out and "seed: 1" in out
    with Store.open(lab_dir) as store:
        assert [m.kind for m in store.measurements(flatter.id, kinds=("first", "replay"))] == ["first", "replay"]

    # Today's nightlab.toml has a longer budget: the replay still trains with the budget it was measured with.
    toml = lab_dir / "nightlab.toml"
    toml.write_text(toml.read_text().replace("budget_s = 0.5", "budget_s = 0.75"))
    assert main(["replay", str(flatter.id), *args]) == 0
    out = capsys.readouterr().out
    assert "replays with run 'manual''s settings; today's nightlab.toml differs in lab.budget_s" in out
    replay_log = lab_dir / ".nightlab" / "runs" / str(flatter.id) / "replay-2" / "train.log"
    assert "budget 0.5 s" in replay_log.read_text()
    assert main(["replay", str(flatter.id), "--set", "lab.budget_s=0.75", *args]) == 0  # unless told otherwise
    assert "budget 0.75 s" in (replay_log.parent.parent / "replay-3" / "train.log").read_text()


def test_replay_needs_only_the_dataset_the_experiment_was_measured_on(tmp_path, monkeypatch, capsys):
    from nightlab.lab import datasets

    home = tmp_path / "home"
    monkeypatch.setenv("NIGHTLAB_HOME", str(home))
    make_dataset(datasets.dataset_dir("pycode:stdlib", 8192, home=home))  # prepared; climbmix is not
    toml = lab_toml(baseline_runs=1, confirm_runs=0).replace("[lab]\n", '[lab]\ndataset = "pycode:stdlib"\n')
    lab_dir = _lab(tmp_path, toml)
    git(lab_dir, "switch", "-q", "-c", "nightlab/manual")
    train = lab_dir / "train.py"
    train.write_text(set_constant(train.read_text(), "SHARPNESS", 1.0))
    assert main(["experiment", "-m", "sharper", "--lab", str(lab_dir)]) == 0
    with Store.open(lab_dir) as store:
        sharper = store.experiments("manual")[-1]
    capsys.readouterr()

    # Today's nightlab.toml names a dataset nobody prepared: the replay trains on the recorded one.
    (lab_dir / "nightlab.toml").write_text(toml.replace('"pycode:stdlib"', '"climbmix"'))
    assert main(["replay", str(sharper.id), "--lab", str(lab_dir)]) == 0
    out = capsys.readouterr().out
    assert "today's nightlab.toml differs in lab.dataset" in out and f"val_bpb: {sharper.val_bpb:.6f}" in out
    assert main(["experiment", "-m", "again", "--lab", str(lab_dir)]) == 2  # a new experiment needs today's
    assert "nightlab prepare" in capsys.readouterr().err


def test_a_second_command_on_a_lab_with_a_run_in_progress_is_refused(tmp_path, data_dir, capsys):
    """A second `nightlab run --resume` would take the live run's experiment for a killed run's and stop its trial."""
    lab_dir = _lab(tmp_path, lab_toml(baseline_runs=1, confirm_runs=0))
    (lab_dir / ".nightlab").mkdir()
    sharper = {"file": "train.py", "old": "SHARPNESS = 0.5", "new": "SHARPNESS = 1.0"}
    longer = {"file": "train.py", "old": "SLEEP_S = 0.0", "new": "SLEEP_S = 4.0"}
    slow = {"description": "sharper", "replace": [sharper, longer]}
    (lab_dir / ".nightlab" / "scripted.json").write_text(json.dumps([slow]))
    args = ["--lab", str(lab_dir), "--data", str(data_dir)]
    first = subprocess.Popen([sys.executable, "-m", "nightlab", "run", "--agent", "scripted", "--tag", "t",
                              "--max-experiments", "1", *args],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        rows = []
        while not (len(rows) == 2 and rows[1].stage == "train") and time.monotonic() < deadline:
            time.sleep(0.1)
            if (lab_dir / ".nightlab" / "store.db").exists():
                with Store.open(lab_dir) as store:
                    rows = store.experiments("t")
        assert len(rows) == 2 and rows[1].stage == "train"
        # No edit to the lab's train.py for `nightlab experiment`: the lock comes before it looks at
        # the lab, and the live trial's guard would take any edit for the trial's own.
        for command in (["run", "--resume", "--tag", "t", "--agent", "scripted", "--max-experiments", "1"],
                        ["experiment", "-m", "noisy"], ["replay", "1"]):
            assert main([*command, *args]) == 2
            err = capsys.readouterr().err.strip()
            assert err == (f"nightlab: error: another nightlab run is working on the lab {lab_dir} (pid {first.pid}): "
                           f"wait for it to end, or stop it first")
        out, _ = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 0, out
    with Store.open(lab_dir) as store:
        rows = store.experiments("t")
    assert [(e.description, e.status) for e in rows] == [("baseline", "keep"), ("sharper", "keep")]
    assert main(["replay", "2", *args]) == 0  # the lab is free again


def test_a_git_killed_in_the_propose_worktree_costs_one_proposal(tmp_path, data_dir):
    lab_dir = _lab(tmp_path, lab_toml(baseline_runs=1, confirm_runs=0))
    lab = open_lab(lab_dir, data_dir)

    def edit_then_git_dies(worktree: Path) -> str:
        description = constant_step("sharper", "SHARPNESS", 1.0)(worktree)
        admin = Path(git(worktree, "rev-parse", "--absolute-git-dir"))
        (admin / "index.lock").write_text("")  # as an agent's `git status` killed at its timeout leaves it
        return description

    steps = [edit_then_git_dies, constant_step("sharper again", "SHARPNESS", 1.0),
             constant_step("noisier", "NOISE", 2.0)]
    run_single(lab, ScriptedProposer(steps), max_experiments=3)
    rows = [(e.description, e.status) for e in lab.experiments() if e.kind == "experiment"]
    assert rows == [("sharper", "agent_failed"), ("sharper again", "keep"), ("noisier", "discard")]


def test_history_says_where_in_an_epoch_a_run_ended_once_it_repeats_data(tmp_path):
    from nightlab.night import history

    with Store(tmp_path / "store.db") as store:
        first = store.add_experiment("t", description="one pass", status="keep", val_bpb=1.0, epochs=0.62)
        again = store.add_experiment("t", description="faster", status="discard", val_bpb=1.01, epochs=5.06)
    assert "epochs" not in history.line(first, best_val=1.0)
    assert history.line(again, best_val=1.0).startswith("#2 discard 1.010000 (+0.010000) [5.06 epochs] faster")


def test_history_keeps_every_keep_and_the_newest_rest_within_budget(tmp_path):
    from nightlab.night import history

    with Store(tmp_path / "store.db") as store:
        store.add_experiment("t", kind="baseline", description="baseline", status="keep", val_bpb=1.0)
        for i in range(40):
            status = "keep" if i in (3, 20) else "discard" if i % 5 else "crash"
            store.add_experiment("t", description=f"idea {i}", status=status, val_bpb=None if status == "crash" else 1.0 - i / 1000,
                                 reason="exit code 1: boom" if status == "crash" else "not better")
        store.add_experiment("t", description="still training", status="running")
        text = history.render(store.experiments("t"), noise=0.001, max_chars=1200)
    lines = text.splitlines()
    assert len(text) <= 1200 and lines[0].startswith("41 experiments") and "best 0.980000 at #22" in lines[0]
    assert lines[1].startswith("(") and "older experiments not shown" in lines[1]
    assert any(line.startswith("#5 keep") for line in lines) and any(line.startswith("#22 keep") for line in lines)
    assert lines[-1].startswith("#41 ") and "still training" not in text
    assert "#37 crash   -" in text and "exit code 1: boom" in text


def test_a_proposal_that_cannot_be_admitted_is_recorded_against_its_agent(tmp_path, monkeypatch):
    import nightlab.night.scheduler as loop_module

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    lab_dir = make_lab(tmp_path / "lab", lab_toml(baseline_runs=1, confirm_runs=0),
                       set_constant(STANDIN.read_text(), "SHARPNESS", 0.5))
    lab = open_lab(lab_dir, make_dataset(tmp_path / "data"))
    monkeypatch.setattr(loop_module, "admit", full_disk)
    run_single(lab, ScriptedProposer([constant_step("sharper", "SHARPNESS", 1.0)]), max_experiments=1)
    (row,) = [e for e in lab.experiments() if e.kind == "experiment"]
    assert row.status == "agent_failed" and row.agent == "scripted" and "No space left on device" in row.reason
