"""The cli proposer with a stand-in agent script as the command."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import pytest

from nightlab.config import CliAgentConfig, Config, ConfigError
from nightlab import agents
from nightlab.night.proposals import Context, ProposalError
from nightlab.agents.cli import PRESETS, CliProposer, command_template, render, wants_stdin

AGENT = Path(__file__).parent / "fixtures" / "agents" / "standin_agent.py"
TRAIN = "LR = 0.01  # learning rate\n"


@pytest.fixture
def worktree(tmp_path: Path) -> Path:
    work = tmp_path / "worktree"
    work.mkdir()
    (work / "train.py").write_text(TRAIN)
    return work


def context() -> Context:
    return Context(program="PROGRAM TEXT", best_source={"train.py": TRAIN}, history="#1 keep baseline")


def proposer(mode: str, evidence: Path, tail: str = "{prompt_file}", timeout_s: float = 30.0) -> CliProposer:
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(AGENT))} {mode} {shlex.quote(str(evidence))} {tail}"
    return CliProposer(CliAgentConfig(preset="custom", command=command, timeout_s=timeout_s))


def test_edit_and_description_file_from_a_prompt_file(worktree: Path, tmp_path: Path) -> None:
    evidence = tmp_path / "evidence.json"
    proposal = proposer("describe", evidence).propose(context(), worktree)
    assert (worktree / "train.py").read_text() == "LR = 0.02  # learning rate\n"
    assert proposal.description == "double the learning rate"
    assert proposal.rationale == "the loss still falls fast at the end"
    assert sorted(p.name for p in worktree.iterdir()) == ["train.py"]  # DESCRIPTION read and removed
    seen = json.loads(evidence.read_text())
    assert Path(seen["cwd"]) == worktree.resolve()
    prompt_file = Path(seen["argv"][3])
    assert worktree.resolve() not in prompt_file.parents and not prompt_file.exists()  # outside, and cleaned up
    assert "PROGRAM TEXT" in seen["prompt"] and TRAIN in seen["prompt"] and "DESCRIPTION" in seen["prompt"]


def test_prompt_on_stdin_and_description_from_the_last_output_line(worktree: Path, tmp_path: Path) -> None:
    evidence = tmp_path / "evidence.json"
    proposal = proposer("stdout", evidence, tail="").propose(context(), worktree)
    assert "PROGRAM TEXT" in json.loads(evidence.read_text())["prompt"]
    assert proposal.description == "halve the step size of nothing, double LR"
    assert "LR = 0.02" in (worktree / "train.py").read_text()


def test_prompt_as_an_argument_and_the_fallback_description(worktree: Path, tmp_path: Path) -> None:
    evidence = tmp_path / "evidence.json"
    proposal = proposer("silent", evidence, tail="{prompt}").propose(context(), worktree)
    assert json.loads(evidence.read_text())["argv"][3].count("PROGRAM TEXT") == 1
    assert proposal.description == "cli edit"


def test_no_edit_is_a_proposal_error(worktree: Path, tmp_path: Path) -> None:
    with pytest.raises(ProposalError, match="made no edits.*changed nothing"):
        proposer("noop", tmp_path / "evidence.json").propose(context(), worktree)


def test_a_failing_agent_is_a_proposal_error_with_its_stderr(worktree: Path, tmp_path: Path) -> None:
    with pytest.raises(ProposalError, match="status 3.*something broke"):
        proposer("fail", tmp_path / "evidence.json").propose(context(), worktree)


@pytest.mark.parametrize("mode", ["hang", "stubborn"])
def test_a_hanging_agent_and_its_children_are_killed_at_the_timeout(worktree: Path, tmp_path: Path, mode: str) -> None:
    evidence = tmp_path / "evidence.json"
    agent = proposer(mode, evidence, timeout_s=1.0)
    agent.kill_grace_s = 0.5
    started = time.monotonic()
    with pytest.raises(ProposalError, match="cli.timeout_s = 1 s"):
        agent.propose(context(), worktree)
    assert time.monotonic() - started < 10
    seen = json.loads(evidence.read_text())
    for pid in (seen["pid"], seen["child"]):
        assert not _alive(pid), pid


def _alive(pid: int) -> bool:
    for _ in range(50):  # the child was reparented; give init a moment to reap it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z":
            return False  # a zombie: dead, waiting to be reaped
        time.sleep(0.05)
    return True


def test_presets_render_headless_commands(tmp_path: Path) -> None:
    def argv(preset: str) -> list[str]:
        template = command_template(CliAgentConfig(preset=preset))
        return render(
            template,
            prompt="P",
            prompt_file=tmp_path / "p.md",
            workdir=tmp_path / "w",
            tmpdir=tmp_path,
            files=("train.py", "model.py"),
        )

    claude = argv("claude")
    assert claude[:2] == ["claude", "-p"] and "--dangerously-skip-permissions" not in claude
    assert claude[claude.index("--permission-mode") + 1] == "acceptEdits"
    assert claude[claude.index("--allowedTools") + 1] == "Edit Write Read"
    assert wants_stdin(PRESETS["claude"]) and wants_stdin(PRESETS["gemini"]) and wants_stdin(PRESETS["codex"])
    codex = argv("codex")
    assert codex[:2] == ["codex", "exec"] and codex[codex.index("-C") + 1] == str(tmp_path / "w")
    aider = argv("aider")
    assert aider[aider.index("--message-file") + 1] == str(tmp_path / "p.md")
    assert aider[-2:] == ["train.py", "model.py"] and "--no-auto-commits" in aider
    assert argv("gemini")[0] == "gemini" and argv("opencode")[:2] == ["opencode", "run"]
    with pytest.raises(ConfigError, match="cli.preset = 'cursor'"):
        command_template(CliAgentConfig(preset="cursor"))


def test_factory_refuses_a_missing_program(tmp_path: Path) -> None:
    config = Config().with_overrides(["cli.command=nightlab-no-such-agent {prompt_file}"])
    with pytest.raises(ConfigError, match="nightlab-no-such-agent"):
        agents.create("cli", config, tmp_path)
    config = Config().with_overrides([f"cli.command={sys.executable} {AGENT} describe {tmp_path / 'e.json'}"])
    assert agents.create("cli", config, tmp_path).name == "cli"


@pytest.mark.parametrize("loop", ["plain", "scheduler"])
def test_an_agent_still_thinking_when_the_loop_stops_is_stopped_with_it(tmp_path: Path, loop: str) -> None:
    import threading

    from fixtures.standin.helpers import lab_toml, make_dataset, make_lab, open_lab
    from nightlab.night.executors import local_workers
    from nightlab.night.scheduler import run_single
    from nightlab.night.scheduler import Researcher, Scheduler

    lab_dir = make_lab(tmp_path / "lab", lab_toml(baseline_runs=1, confirm_runs=0))
    lab = open_lab(lab_dir, make_dataset(tmp_path / "data"))
    marker = tmp_path / "agent.pid"
    agent = CliProposer(CliAgentConfig(preset="custom", command=f"sh -c 'echo $$ > {marker}; sleep 60'", timeout_s=60))
    stop = threading.Event()
    threading.Thread(target=lambda: (_wait_for(marker), stop.set()), daemon=True).start()  # Ctrl-C while it thinks
    if loop == "plain":
        run_single(lab, agent, stop=stop)
    else:
        Scheduler(lab, [Researcher("a", agent)], local_workers(["cpu"])).run(stop=stop)
    assert not _alive(int(marker.read_text()))


def _wait_for(path: Path) -> None:
    while not path.exists() or not path.read_text().strip():
        time.sleep(0.05)
