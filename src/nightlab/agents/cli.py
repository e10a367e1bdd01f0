"""The ``cli`` proposer: a coding-agent CLI run headless in the experiment's worktree.

The command comes from a preset (``cli.preset``) or a template of your own (``cli.command``),
split like a shell line and then filled in argument by argument (so nothing in the prompt is
ever interpreted by a shell):

- ``{prompt_file}``: a file holding the prompt, in a temporary folder outside the worktree;
- ``{prompt}``: the prompt text as one argument;
- ``{workdir}``: the worktree; ``{tmpdir}``: the temporary folder;
- ``{files}``: the files the agent may edit, as separate arguments.

A template that names neither ``{prompt}`` nor ``{prompt_file}`` gets the prompt on standard
input; otherwise standard input is empty. The agent runs with the worktree as its current
directory and in its own process group, which is ended when it returns or when it runs past
``cli.timeout_s``. Its edits are the proposal. It may write ``DESCRIPTION`` in the worktree (the
first line is the description, the rest the rationale); nightlab reads and removes that file.
Without it, the description is the agent's last line of output, else "cli edit".
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from nightlab.config import CliAgentConfig, ConfigError
from nightlab.night.proposals import Context, Proposal, ProposalError
from nightlab.agents.prompt import build_prompt

DESCRIPTION_FILE = "DESCRIPTION"
ON_STDIN = "Follow the instructions on standard input."

# Claude Code refuses --dangerously-skip-permissions when run as root, so its preset accepts
# edits and allows only the file tools. aider must not commit or touch .gitignore (the loop
# commits, and only the allowed files may change) and keeps its history files out of the worktree.
PRESETS: dict[str, str] = {
    "claude": f'claude -p "{ON_STDIN}" --permission-mode acceptEdits --allowedTools "Edit Write Read"',
    "codex": f'codex exec --sandbox workspace-write --skip-git-repo-check -C {{workdir}} "{ON_STDIN}"',
    "aider": (
        "aider --yes --no-auto-commits --no-gitignore --no-check-update --no-show-model-warnings "
        "--chat-history-file {tmpdir}/chat.md --input-history-file {tmpdir}/input.md "
        "--message-file {prompt_file} {files}"
    ),
    "gemini": f'gemini --approval-mode auto_edit -p "{ON_STDIN}"',
    "opencode": 'opencode run --file {prompt_file} "Follow the instructions in the attached file."',
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
            raise ConfigError(
                f"the cli agent runs {program or '(an empty command)'!r}, which is not on PATH; "
                f"install it, or pick another cli.preset ({', '.join(PRESETS)}) or cli.command"
            )

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
        description, rationale = _read_description(worktree, outcome.stdout)
        if outcome.returncode is None:
            raise ProposalError(
                f"{argv[0]} ran past cli.timeout_s = {self.config.timeout_s:g} s and was stopped; "
                f"its output ended: {_tail(outcome.stdout + outcome.stderr)}"
            )
        if outcome.returncode != 0:
            raise ProposalError(
                f"{argv[0]} exited with status {outcome.returncode}: {_tail(outcome.stderr or outcome.stdout)}"
            )
        after = _snapshot(worktree)
        changed = [path for path in before.keys() | after.keys() if before.get(path) != after.get(path)]
        if not changed:
            raise ProposalError(f"{argv[0]} made no edits; its output ended: {_tail(outcome.stdout + outcome.stderr)}")
        return Proposal(description=description, rationale=rationale)

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
