"""The cli proposer: a stand-in agent script as the command, and the real Claude Code CLI against a
scripted Anthropic Messages API on localhost (skipped, saying so, where ``claude`` is not installed)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest

from fixtures.agents.llm_server import ScriptedServer, claude_edit, error, not_a_tool_loop, tool_use

from nightlab.config import CliAgentConfig, Config, ConfigError
from nightlab import agents
from nightlab.night.proposals import Context, ProposalError
from nightlab.agents.cli import INSTALL, PRESETS, CliProposer, command_template, render, usage, wants_stdin

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
    assert claude[claude.index("--output-format") + 1] == "json"  # its cost and tokens
    assert wants_stdin(PRESETS["claude"]) and wants_stdin(PRESETS["gemini"]) and wants_stdin(PRESETS["codex"])
    codex = argv("codex")
    assert codex[:2] == ["codex", "exec"] and codex[codex.index("-C") + 1] == str(tmp_path / "w")
    assert "--json" in codex  # its events, with tokens
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


# -- what an agent cost -------------------------------------------------------------------------

CLAUDE_RESULT = {"type": "result", "subtype": "success", "is_error": False, "result": "Done: doubled LR.",
                 "total_cost_usd": 0.0325, "usage": {"input_tokens": 3000, "cache_creation_input_tokens": 500,
                                                     "cache_read_input_tokens": 500, "output_tokens": 500}}
CODEX_EVENTS = [{"type": "thread.started", "thread_id": "t1"}, {"type": "turn.started"},
                {"type": "item.completed", "item": {"id": "i0", "type": "agent_message", "text": "doubled LR"}},
                {"type": "turn.completed", "usage": {"input_tokens": 1200, "cached_input_tokens": 200,
                                                     "output_tokens": 300}},
                {"type": "turn.completed", "usage": {"input_tokens": 800, "output_tokens": 100}}]


def test_cost_and_tokens_from_claude_code_json_and_codex_events() -> None:
    claude = usage(json.dumps(CLAUDE_RESULT))
    assert (claude.cost_usd, claude.tokens_in, claude.tokens_out, claude.text) == (0.0325, 4000, 500, "Done: doubled LR.")
    codex = usage("\n".join(json.dumps(e) for e in CODEX_EVENTS) + "\n")
    assert (codex.cost_usd, codex.tokens_in, codex.tokens_out, codex.text) == (None, 2000, 400, "doubled LR")
    for text in ("", "Reading train.py ...\ndouble LR\n", "[1, 2]", '{"type": "other"}'):
        assert usage(text) == type(claude)()  # unknown, never 0


def test_a_cli_that_is_not_installed_is_one_line_naming_the_preset_and_its_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing installed
    for preset in PRESETS:
        with pytest.raises(ConfigError) as caught:
            CliProposer(CliAgentConfig(preset=preset))
        message = str(caught.value)
        assert "\n" not in message and f"cli.preset = {preset!r}" in message and INSTALL[preset] in message


# -- the real Claude Code CLI against a scripted Messages API ----------------------------------

needs_claude = pytest.mark.skipif(shutil.which("claude") is None,
                                  reason="Claude Code is not installed: npm install -g @anthropic-ai/claude-code")


@pytest.fixture
def claude_at(tmp_path: Path, monkeypatch):
    """Point the real ``claude`` at a scripted server: ``claude_at(responses)`` starts and returns it."""
    servers = []

    def start(responses) -> ScriptedServer:
        server = ScriptedServer(responses, aside=not_a_tool_loop).__enter__()
        servers.append(server)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
        monkeypatch.setenv("HOME", str(tmp_path / "home"))  # its settings and sessions stay in the test
        for name in ("DISABLE_TELEMETRY", "DISABLE_ERROR_REPORTING", "DISABLE_AUTOUPDATER",
                     "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"):
            monkeypatch.setenv(name, "1")
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)


@needs_claude
def test_claude_code_edits_the_worktree_and_reports_what_it_cost(worktree: Path, claude_at) -> None:
    server = claude_at(claude_edit(worktree.resolve(), "LR = 0.01", "LR = 0.02", "double the learning rate"))
    proposal = CliProposer(CliAgentConfig(preset="claude", timeout_s=120)).propose(context(), worktree)
    assert (worktree / "train.py").read_text() == "LR = 0.02  # learning rate\n"
    assert proposal.description == "double the learning rate" and not (worktree / "DESCRIPTION").exists()
    assert (proposal.tokens_in, proposal.tokens_out) == server.usage() == (4000, 500)
    assert proposal.cost_usd is not None and proposal.cost_usd > 0
    asked = [r for r in server.requests if r.body.get("tools")]
    assert "PROGRAM TEXT" in json.dumps(asked[0].body["messages"])  # the prompt went in on standard input


@needs_claude
def test_claude_code_against_a_failing_server_is_one_error_that_still_counts_the_cost(worktree: Path,
                                                                                     claude_at) -> None:
    train = str(worktree.resolve() / "train.py")
    server = claude_at([tool_use([("Read", {"file_path": train})]), error(400, "prompt is too long")])
    with pytest.raises(ProposalError) as caught:
        CliProposer(CliAgentConfig(preset="claude", timeout_s=120)).propose(context(), worktree)
    assert caught.value.reason.startswith("claude exited with status 1: ")
    assert (caught.value.tokens_in, caught.value.tokens_out) == server.usage() == (1000, 100)
    assert caught.value.cost_usd is not None and caught.value.cost_usd > 0


@needs_claude
def test_a_night_with_claude_code_refuses_a_repeat_and_records_what_it_cost(tmp_path: Path, claude_at) -> None:
    from fixtures.standin.helpers import lab_toml, make_dataset, make_lab, open_lab
    from nightlab.night.scheduler import run_single
    from nightlab.report.data import costs, load_night

    lab_dir = make_lab(tmp_path / "lab", lab_toml(baseline_runs=1, confirm_runs=0))
    lab = open_lab(lab_dir, make_dataset(tmp_path / "data"))
    work = (lab_dir / ".nightlab" / "worktrees" / "propose-cli").resolve()
    server = claude_at([*claude_edit(work, "SHARPNESS = 1.0", "SHARPNESS = 0.8", "flatter unigram"),
                        # asked while the first trains: the same edit, in other words
                        *claude_edit(work, "SHARPNESS = 1.0", "SHARPNESS = 0.8", "a little flatter"),
                        *claude_edit(work, "NOISE = 0.0", "NOISE = 0.3", "noisier logits")])
    run_single(lab, CliProposer(CliAgentConfig(preset="claude", timeout_s=120)), max_experiments=3)

    rows = [e for e in lab.experiments() if e.kind == "experiment"]
    assert [(e.description, e.status) for e in rows][1] == ("a little flatter", "repeat")
    assert f"repeats #{rows[0].id} (flatter unigram; in flight)" in rows[1].reason and not rows[1].commit_sha
    assert rows[2].description == "noisier logits" and rows[2].commit_sha
    prompts = [json.dumps(r.body["messages"]) for r in server.requests  # the first turn of each session
               if r.body.get("tools") and "tool_result" not in json.dumps(r.body["messages"])]
    assert len(prompts) == 3
    assert "In flight" in prompts[1] and "flatter unigram" in prompts[1] and "tok/s" in prompts[1]
    assert f"repeats #{rows[0].id}" in prompts[2]  # told, then asked again
    assert (sum(e.tokens_in for e in rows), sum(e.tokens_out for e in rows)) == server.usage()
    night = costs(load_night(lab_dir).rows)
    assert night.usd == pytest.approx(sum(e.cost_usd for e in rows)) and night.usd > 0 and night.unknown == 0
