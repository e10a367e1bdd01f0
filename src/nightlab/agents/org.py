"""The org in Markdown: ``LAB/org/*.md`` role files, each a small front matter and instructions.

::

    ---
    name: explorer          # unique; instances are explorer-1, explorer-2, ...
    kind: researcher        # researcher | reviewer | lead
    backend: api            # researcher: search | api | cli | scripted | simulated (default: run.agent)
                            # reviewer: rules | api    lead: stats | api
    model: gpt-4.1          # api backends (default: api.model)
    count: 2                # researchers only: how many work at once
    edits: [train.py]       # researchers: files it may change, within lab.allowed_files
    every: 10               # lead only: rewrite the agenda after every N experiments
    ---
    The role's instructions (Markdown).

A researcher's brief is ``program.md`` followed by its role's instructions. With no researcher
role, ``program.md`` alone programs one researcher with ``run.agent``: the default org. Front
matter is YAML (PyYAML, which optuna already requires), checked strictly: an unknown field, a
wrong type or a bad value is an ``OrgError`` naming the file, the field and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nightlab import agents
from nightlab.agents.api import ApiProposer
from nightlab.agents.lead import ApiLead, StatsLead
from nightlab.agents.reviewer import ApiReviewer, RulesReviewer
from nightlab.config import Config
from nightlab.night.scheduler import Lead, Researcher
from nightlab.night.state import Reviewer

ORG_DIR = "org"
KINDS = ("researcher", "reviewer", "lead")
BACKENDS = {
    "researcher": ("search", "api", "cli", "scripted", "simulated"),
    "reviewer": ("rules", "api"),
    "lead": ("stats", "api"),
}
DEFAULT_BACKEND = {"reviewer": "rules", "lead": "stats"}  # researchers default to run.agent
DEFAULT_EVERY = 10
FIELDS = ("name", "kind", "backend", "model", "count", "edits", "every")


class OrgError(ValueError):
    """A role file that cannot be used; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class Role:
    name: str
    kind: str  # researcher | reviewer | lead
    backend: str
    instructions: str  # the file's body
    path: Path | None = None  # None: the default researcher made from program.md
    model: str = ""
    count: int = 1
    edits: tuple[str, ...] = ()  # empty: every file of lab.allowed_files
    every: int = 0  # lead: experiments between two agendas

    def instances(self) -> list[str]:
        """Names of the agents this role runs: the name itself, or name-1 .. name-N."""
        return [self.name] if self.count == 1 else [f"{self.name}-{k}" for k in range(1, self.count + 1)]


@dataclass(frozen=True)
class Org:
    researchers: tuple[Role, ...]
    reviewer: Role | None = None
    lead: Role | None = None

    @property
    def is_default(self) -> bool:
        """One researcher, nobody else: what ``program.md`` alone programs."""
        return len(self.researchers) == 1 and self.researchers[0].count == 1 and not self.reviewer and not self.lead

    def describe(self) -> str:
        parts = [f"{r.count} x {r.name} ({r.backend}{', ' + r.model if r.model else ''})" for r in self.researchers]
        if self.reviewer:
            parts.append(f"reviewer {self.reviewer.name} ({self.reviewer.backend})")
        if self.lead:
            parts.append(f"lead {self.lead.name} ({self.lead.backend}, every {self.lead.every})")
        return ", ".join(parts)


def split_front_matter(text: str, where: str) -> tuple[dict[str, Any], str]:
    """(front matter, body) of a role file that starts with a ``---`` line and closes it with one."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        raise OrgError(f"{where}: no front matter; start the file with a line '---', the fields "
                       f"({', '.join(FIELDS)}), and another '---'")
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
    if end is None:
        raise OrgError(f"{where}: the front matter is never closed; add a line '---' after its fields")
    try:
        data = yaml.safe_load("".join(lines[1:end])) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 2}" if mark is not None else ""
        raise OrgError(f"{where}: front matter is not valid YAML{at} ({getattr(e, 'problem', e)}); "
                       "write one 'field: value' per line") from None
    if not isinstance(data, dict):
        raise OrgError(f"{where}: front matter must be 'field: value' lines, got {type(data).__name__}")
    return data, "".join(lines[end + 1:]).strip()


def parse_role(path: Path, config: Config, where: str | None = None) -> Role:
    where = where or str(path)
    data, body = split_front_matter(path.read_text(), where)
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        raise OrgError(f"{where}: unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")

    def text(name: str, default: str = "") -> str:
        value = data.get(name, default)
        if value is None:
            return default
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise OrgError(f"{where}: field '{name}' must be a word, got {value!r}")
        return str(value).strip()

    def number(name: str, default: int, low: int) -> int:
        value = data.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise OrgError(f"{where}: field '{name}' must be a whole number of at least {low}, got {value!r}")
        return value

    kind = text("kind")
    if kind not in KINDS:
        said = f"is {kind!r}" if kind else "is missing"
        raise OrgError(f"{where}: field 'kind' {said}; write kind: researcher, reviewer or lead")
    name = text("name", path.stem)
    if not name or any(c.isspace() or c in "/\\" for c in name):
        raise OrgError(f"{where}: field 'name' {name!r} must be one word without slashes, e.g. name: explorer")
    backend = text("backend", config.run.agent if kind == "researcher" else DEFAULT_BACKEND[kind])
    if backend not in BACKENDS[kind]:
        raise OrgError(f"{where}: field 'backend' is {backend!r}; a {kind} can use {', '.join(BACKENDS[kind])}")
    model = text("model")
    if backend == "api" and not (model or config.api.model):
        raise OrgError(f"{where}: field 'model' is empty for the api backend; name the model (model: gpt-4.1) or "
                       "set api.model in nightlab.toml")
    count = number("count", 1, 1)
    if kind != "researcher" and count != 1:
        raise OrgError(f"{where}: field 'count' is {count}, but an org has one {kind}; remove the field")
    every = number("every", DEFAULT_EVERY if kind == "lead" else 0, 0)
    if kind == "lead" and every < 1:
        raise OrgError(f"{where}: field 'every' must be at least 1 for a lead, e.g. every: 10")
    if kind != "lead" and "every" in data:
        raise OrgError(f"{where}: field 'every' is for a lead only; remove it from this {kind}")
    edits = data.get("edits", [])
    if isinstance(edits, str):
        edits = [e.strip() for e in edits.split(",") if e.strip()]
    if not isinstance(edits, list) or not all(isinstance(e, str) for e in edits):
        raise OrgError(f"{where}: field 'edits' must be a list of files, e.g. edits: [train.py]")
    outside = [e for e in edits if e not in config.lab.allowed_files]
    if outside:
        raise OrgError(f"{where}: field 'edits' names {', '.join(outside)}, not in lab.allowed_files "
                       f"({', '.join(config.lab.allowed_files)}); add it there or remove it here")
    if edits and kind != "researcher":
        raise OrgError(f"{where}: field 'edits' is for researchers; a {kind} edits nothing")
    return Role(name, kind, backend, body, path, model, count, tuple(edits), every)


def load(lab_dir: Path, config: Config) -> Org:
    """The lab's org; raises ``OrgError`` on the first bad file (``check`` lists all of them)."""
    roles, errors = _read(Path(lab_dir), config)
    if errors:
        raise OrgError(errors[0])
    return _assemble(roles, config, Path(lab_dir))


def check(lab_dir: Path, config: Config) -> tuple[Org | None, list[str]]:
    """The org and every problem found (each names the file, the field and the fix)."""
    roles, errors = _read(Path(lab_dir), config)
    try:
        org = _assemble(roles, config, Path(lab_dir))
    except OrgError as e:
        return None, [*errors, str(e)]
    return (org if not errors else None), errors


def _read(lab_dir: Path, config: Config) -> tuple[list[Role], list[str]]:
    roles, errors = [], []
    for path in sorted((lab_dir / ORG_DIR).glob("*.md")):
        try:
            roles.append(parse_role(path, config, f"{ORG_DIR}/{path.name}"))
        except OrgError as e:
            errors.append(str(e))
    return roles, errors


def _assemble(roles: list[Role], config: Config, lab_dir: Path) -> Org:
    seen: dict[str, Role] = {}
    for role in roles:
        if role.name in seen:
            raise OrgError(f"{_where(role)}: field 'name' {role.name!r} is also used by {_where(seen[role.name])}; "
                           "give each role its own name")
        seen[role.name] = role
    for kind in ("reviewer", "lead"):
        several = [r for r in roles if r.kind == kind]
        if len(several) > 1:
            raise OrgError(f"{_where(several[1])}: field 'kind': {_where(several[0])} is the {kind} already; "
                           f"an org has one {kind}")
    researchers = tuple(r for r in roles if r.kind == "researcher")
    if not researchers:
        researchers = (Role("researcher", "researcher", config.run.agent, "", None),)
    by_kind = {r.kind: r for r in roles}
    return Org(researchers, by_kind.get("reviewer"), by_kind.get("lead"))


def _where(role: Role) -> str:
    return f"{ORG_DIR}/{role.path.name}" if role.path else "program.md"


def brief(role: Role, program: str) -> str:
    """What a researcher of ``role`` is told: program.md, then its role's instructions."""
    if not role.instructions:
        return program
    if not program.strip():
        return role.instructions
    return f"{program.rstrip()}\n\n## Your role: {role.name}\n\n{role.instructions}\n"


def role_config(role: Role, config: Config) -> Config:
    """The config an agent of ``role`` is built with (its model for the api backend)."""
    if role.model:
        return dataclasses.replace(config, api=dataclasses.replace(config.api, model=role.model))
    return config


def staff(org: Org, config: Config, lab_dir: Path) -> tuple[list[Researcher], Reviewer | None, Lead | None]:
    """The agents of ``org``: (scheduler researchers, the reviewer or None, the lead or None)."""
    program = (Path(lab_dir) / "program.md").read_text() if (Path(lab_dir) / "program.md").exists() else ""
    researchers = []
    for role in org.researchers:
        if role.backend == "simulated":
            raise OrgError(f"{_where(role)}: backend 'simulated' plays a researcher in `nightlab simulate` only; "
                           f"choose one of {', '.join(agents.AGENTS)} for nightlab run")
        for name in role.instances():
            proposer = agents.create(role.backend, role_config(role, config), lab_dir)
            researchers.append(Researcher(name, proposer, brief(role, program), role.edits))
    return researchers, _reviewer(org.reviewer, config), _lead(org.lead, config)


def _reviewer(role: Role | None, config: Config) -> Reviewer | None:
    """The reviewer a role file describes (``Lab.reviewer``)."""
    if role is None:
        return None
    if role.backend == "rules":
        return RulesReviewer(role.name)
    return ApiReviewer(ApiProposer(role_config(role, config).api), role.instructions, role.name)


def _lead(role: Role | None, config: Config) -> Lead | None:
    """The lead a role file describes: a callable ``(lab, board) -> one line`` with ``every``."""
    if role is None:
        return None
    if role.backend == "stats":
        return StatsLead(role.name, role.every)
    return ApiLead(ApiProposer(role_config(role, config).api), role.instructions, role.name, role.every)
