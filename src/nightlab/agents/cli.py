"""The ``cli`` proposer: a coding-agent CLI run headless in the experiment's worktree.

The command comes from a preset (``cli.preset``) or a template of your own (``cli.command``),
split like a shell line and then filled in argument by argument (so nothing in the prompt is
ever interpreted by a shell):

- ``{prompt_file}``: a file holding the prompt, in a temporary folder outside the worktree;
- ``{prompt}``: the prompt text as one argument;
- ``{workdir}``: the worktree; ``{tmpdir}``: the temporary folder;
- ``{files}``: the files the agent may edit, as separate arguments.

A template that names neither ``{prompt}`` nor ``{prompt_file}`` gets the prompt on standard
input; otherwise standard input is empty. What the agent cost is read from its machine-readable
output where it prints one (Claude Code's ``--output-format json``: dollars and tokens; Codex's
``exec --json`` events: tokens); elsewhere it is unknown (None), never 0. The agent runs with the worktree as its current
directory and in its own process group, which is ended when it returns or when it runs past
``cli.timeout_s``. Its edits are the proposal. It may write ``DESCRIPTION`` in the worktree (the
first line is the description, the rest the rationale); nightlab reads and removes that file.
Without it, the description is the agent's last line of output, else "cli edit".
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from nightlab.agents import pricing
from nightlab.config import CliAgentConfig, ConfigError
from nightlab.night.proposals import Context, Proposal, ProposalError
from nightlab.agents.prompt import build_prompt

DESCRIPTION_FILE = "DESCRIPTION"
ON_STDIN = "Follow the instructions on standard input."

# Claude Code refuses --dangerously-skip-permissions when run as root, so its preset accepts
# edits and allows only the file tools. aider must not commit or touch .gitignore (the loop
# commits, and only the allowed files may change) and keeps its history files out of the worktree.
# Claude Code and Codex print what they spent as JSON (``--output-format json``, ``--json``).
PRESETS: dict[str, str] = {
    "claude": (f'claude -p "{ON_STDIN}" --output-format json --permission-mode acceptEdits '
               '--allowedTools "Edit Write Read"'),
    "codex": f'codex exec --json --sandbox workspace-write --skip-git-repo-check -C {{workdir}} "{ON_STDIN}"',
    "aider": (
        "aider --yes --no-auto-commits --no-gitignore --no-check-update --no-show-model-warnings "
        "--chat-history-file {tmpdir}/chat.md --input-history-file {tmpdir}/input.md "
        "--message-file {prompt_file} {files}"
    ),
    "gemini": f'gemini --approval-mode auto_edit -p "{ON_STDIN}"',
    "opencode": 'opencode run --file {prompt_file} "Follow the instructions in the attached file."',
}

# How to install each preset's program, for the error when it is missing.
INSTALL: dict[str, str] = {
    "claude": "npm install -g @anthropic-ai/claude-code",
    "codex": "npm install -g @openai/codex",
    "aider": "python -m pip install aider-install && aider-install",
    "gemini": "npm install -g @google/gemini-cli",
    "opencode": "npm install -g opencode-ai",
}

INSTRUCTIONS = """Make one focused change for the next experiment by editing the files in the current
directory yourself: only {files}. Do not run the training or the evaluation (the lab does that
with a fixed budget), do not commit, and create no other files.

When you are done, write a file named DESCRIPTION in the current directory. Its first line says
in at most about 80 characters what this experiment changes; the following lines say why it
should lower val_bpb. nightlab reads and removes it."""

_TAIL = 3000  # characters of output kept for error messages


def command_template(config: CliAgentConfig) -> str:
    """The template to run: ``cli.command`` when given, else the preset's."""
    if config.command.strip():
        return config.command
    if config.preset not in PRESETS:
        known = ", ".join(PRESETS)
        raise ConfigError(
            f"cli.preset = {config.preset!r} with no cli.command; choose one of {known}, or set cli.command"
        )
    return PRESETS[config.preset]


def render(
    template: str, *, prompt: str, prompt_file: Path, workdir: Path, tmpdir: Path, files: tuple[str, ...]
) -> list[str]:
    """The argument list: the template split like a shell line, each part filled in."""
    argv: list[str] = []
    for part in shlex.split(template):
        if part == "{files}":
            argv.extend(files)
            continue
        for token, value in (
            ("{prompt_file}", str(prompt_file)),
            ("{workdir}", str(workdir)),
            ("{tmpdir}", str(tmpdir)),
            ("{files}", " ".join(files)),
            ("{prompt}", prompt),
        ):
            part = part.replace(token, value)
        argv.append(part)
    return argv


def wants_stdin(template: str) -> bool:
    return "{prompt}" not in template and "{prompt_file}" not in template


@dataclass(frozen=True)
class Outcome:
    returncode: int | None  # None: stopped at the timeout
    stdout: str
    stderr: str


class CliProposer:
    """Runs the agent command once per ``propose``; what it changed in the worktree is the edit."""

    name = "cli"

    def __init__(self, config: CliAgentConfig, *, kill_grace_s: float = 3.0) -> None:
        self.config = config
        self.kill_grace_s = kill_grace_s  # between SIGTERM and SIGKILL at the timeout
        self.template = command_template(config)
        self._running: set[int] = set()  # process groups of the agent commands under way
        self._lock = threading.Lock()
        program = shlex.split(self.template)[0] if shlex.split(self.template) else ""
        if not program or shutil.which(program) is None:
            others = f"choose another cli.preset ({', '.join(PRESETS)}) or set cli.command"
            if not config.command.strip():
                raise ConfigError(f"cli.preset = {config.preset!r} runs {program!r}, which is not installed (not on "
                                  f"PATH); install it with `{INSTALL[config.preset]}`, or {others}")
            raise ConfigError(f"cli.command runs {program or '(an empty command)'!r}, which is not on PATH; "
                              f"install it, or {others}")

    def propose(self, context: Context, worktree: Path) -> Proposal:
        worktree = Path(worktree).resolve()
        files = context.allowed_files
        prompt = build_prompt(context, INSTRUCTIONS.format(files=", ".join(files))).text()
        (worktree / DESCRIPTION_FILE).unlink(missing_ok=True)
        before = _snapshot(worktree)
        with tempfile.TemporaryDirectory(prefix="nightlab-cli-") as tmp:
            tmpdir = Path(tmp)
            prompt_file = tmpdir / "prompt.md"
            prompt_file.write_text(prompt)
            argv = render(
                self.template, prompt=prompt, prompt_file=prompt_file, workdir=worktree, tmpdir=tmpdir, files=files
            )
            outcome = self._run(argv, worktree, prompt_file if wants_stdin(self.template) else None, tmpdir)
        spent = usage(outcome.stdout)
        cost = {"cost_usd": spent.cost_usd, "tokens_in": spent.tokens_in, "tokens_out": spent.tokens_out}
        description, rationale = _read_description(worktree, spent.text if spent.text is not None else outcome.stdout)
        if outcome.returncode is None:
            raise ProposalError(
                f"{argv[0]} ran past cli.timeout_s = {self.config.timeout_s:g} s and was stopped; "
                f"its output ended: {_tail(outcome.stdout + outcome.stderr)}", **cost
            )
        if outcome.returncode != 0:
            raise ProposalError(
                f"{argv[0]} exited with status {outcome.returncode}: {_tail(spent.text or outcome.stderr or outcome.stdout)}",
                **cost
            )
        after = _snapshot(worktree)
        changed = [path for path in before.keys() | after.keys() if before.get(path) != after.get(path)]
        if not changed:
            raise ProposalError(f"{argv[0]} made no edits; its output ended: {_tail(outcome.stdout + outcome.stderr)}",
                                **cost)
        return Proposal(description=description, rationale=rationale, **cost)

    def observe(self, proposal: Proposal, status: str, val_bpb: float | None) -> None:
        """The outcome reaches the agent through the history in the next context."""

    def close(self) -> None:
        """Kill the agent command under way, with its process group (the loop is over: its proposal
        would be dropped, and it runs in a session of its own that no Ctrl-C reaches)."""
        with self._lock:
            for pid in self._running:
                _signal_group(pid, signal.SIGKILL)

    def _run(self, argv: list[str], cwd: Path, stdin_file: Path | None, tmpdir: Path) -> Outcome:
        out_path, err_path = tmpdir / "stdout.txt", tmpdir / "stderr.txt"
        with (
            open(out_path, "wb") as out,
            open(err_path, "wb") as err,
            open(stdin_file, "rb") if stdin_file else open(os.devnull, "rb") as stdin,
        ):
            try:
                process = subprocess.Popen(argv, cwd=cwd, stdin=stdin, stdout=out, stderr=err, start_new_session=True)
            except OSError as e:
                raise ProposalError(f"could not start {argv[0]}: {e}") from None
            with self._lock:
                self._running.add(process.pid)
            try:
                returncode: int | None = process.wait(timeout=self.config.timeout_s)
            except subprocess.TimeoutExpired:
                returncode = None
                _signal_group(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=self.kill_grace_s)
                except subprocess.TimeoutExpired:
                    pass
            finally:
                with self._lock:  # forgotten before it is reaped: its pid cannot name another group yet
                    self._running.discard(process.pid)
                    _signal_group(process.pid, signal.SIGKILL)  # whatever it left running in its group
            process.wait()
        return Outcome(returncode, out_path.read_text(errors="replace"), err_path.read_text(errors="replace"))


@dataclass(frozen=True)
class Usage:
    """What one agent run spent, as its own output says; None where it does not say."""

    cost_usd: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    text: str | None = None  # the agent's final message, where its output is JSON


def usage(stdout: str) -> Usage:
    """Cost, tokens and final message from an agent's machine-readable output: Claude Code's
    ``--output-format json`` result, or Codex's ``exec --json`` events. Anything else: unknown."""
    events = []
    for line in stdout.splitlines() if stdout.strip() else []:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    if not events:
        try:
            whole = json.loads(stdout)
        except ValueError:
            return Usage()
        events = [whole] if isinstance(whole, dict) else []
    result = next((e for e in reversed(events) if e.get("type") == "result"), None)
    if result is not None:  # Claude Code
        tokens = result.get("usage") if isinstance(result.get("usage"), dict) else {}
        cost = result.get("total_cost_usd")
        return Usage(float(cost) if _count(cost) else None, _sum(tokens, _CLAUDE_IN), _sum(tokens, ("output_tokens",)),
                     str(result["result"]) if isinstance(result.get("result"), str) else None)
    turns = [e["usage"] for e in events if e.get("type") == "turn.completed" and isinstance(e.get("usage"), dict)]
    if turns:  # Codex: one turn.completed per turn, each with that turn's tokens; it prints no price
        tokens_in = sum(_sum(u, ("input_tokens",)) or 0 for u in turns)
        tokens_out = sum(_sum(u, ("output_tokens",)) or 0 for u in turns)
        said = [e["item"].get("text") for e in events if e.get("type") == "item.completed"
                and isinstance(e.get("item"), dict) and e["item"].get("type") == "agent_message"]
        model = next((e.get("model") for e in events if isinstance(e.get("model"), str)), "")
        return Usage(pricing.cost_usd(model, tokens_in, tokens_out) if model else None, tokens_in, tokens_out,
                     said[-1] if said and isinstance(said[-1], str) else None)
    return Usage()


# Claude Code's input tokens: new ones, those written to its prompt cache, and those read from it.
_CLAUDE_IN = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _count(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0


def _sum(tokens: dict, keys: tuple[str, ...]) -> int | None:
    found = [int(tokens[k]) for k in keys if _count(tokens.get(k))]
    return sum(found) if found else None


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _read_description(worktree: Path, stdout: str) -> tuple[str, str]:
    path = worktree / DESCRIPTION_FILE
    if path.is_file():
        text = path.read_text(errors="replace").strip()
        path.unlink()
        first, _, rest = text.partition("\n")
        if first.strip():
            return first.strip()[:200], rest.strip()
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if lines:
        return lines[-1][:200], _tail(stdout)
    return "cli edit", ""


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (git's own and caches aside) and a hash of its content."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in (".git", "__pycache__")]
        for name in filenames:
            path = Path(dirpath) / name
            relative = path.relative_to(root).as_posix()
            if relative == ".git":  # a worktree's pointer to its repository
                continue
            try:
                found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                continue
    return found


def _tail(text: str) -> str:
    text = text.strip()
    return ("..." + text[-_TAIL:]) if len(text) > _TAIL else (text or "(no output)")
