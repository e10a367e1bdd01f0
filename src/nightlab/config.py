"""One typed configuration for a lab, loaded from ``nightlab.toml``.

Every setting is a field of a frozen dataclass below, with its default and a comment; the TOML
file and the command line (``--set section.field=value``) may only name these fields. An unknown
key is an error that names the key and lists what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_FILE = "nightlab.toml"


class ConfigError(ValueError):
    """A bad setting: the message names the file or flag, the key, and the fix."""


@dataclass(frozen=True)
class LabConfig:
    dataset: str = "pycode"  # pycode | pycode:stdlib | climbmix | local:PATH
    vocab_size: int = 8192  # BPE vocabulary, special tokens included
    num_shards: int = 8  # climbmix: training shards to download (the pinned val shard is extra)
    budget_s: float = 300.0  # training wall-clock budget of one experiment, compile warm-up excluded
    startup_allowance_s: float = 180.0  # hard cap = budget + this (startup, compilation, saving)
    eval_timeout_s: float = 600.0  # hard cap on the trusted evaluation
    eval_max_tokens: int = 0  # 0 = the whole validation split; set for quick CPU labs
    eval_seq_len: int = 2048  # the evaluator's fixed context; CPU labs use 512 (their model trains on 256)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    preset: str = "auto"  # auto | gpu | cpu: which size train.py builds (auto: by device)
    seed: int = 0  # base seed; the policy draws fresh seeds for reruns
    allowed_files: tuple[str, ...] = ("train.py",)  # what agents may change
    sandbox: str = "none"  # none | bwrap: train and evaluate under bubblewrap (see bench/RELIABILITY.md)
    standby: str = "auto"  # auto | on | off: start the next trial while this one trains (auto: on CUDA)


@dataclass(frozen=True)
class RunConfig:
    agent: str = "search"  # search | api | cli | scripted
    policy: str = "noise"  # noise (measured noise decides) | greedy (autoresearch's rule)
    baseline_runs: int = 5  # baseline runs with new seeds to measure the noise (5: see tests/test_policy.py)
    confirm_runs: int = 3  # extra seeds for a close call
    noise_floor: float = 0.0005  # smallest noise width the policy assumes (val_bpb)
    simplicity_tolerance: float = 0.0002  # equal within this and shorter code is a keep
    max_experiments: int = 0  # 0 = no limit
    hours: float = 0.0  # 0 = no limit
    tag: str = ""  # run branch nightlab/<tag>; empty = today's date


@dataclass(frozen=True)
class SearchAgentConfig:
    sampler: str = "tpe"  # tpe | cmaes
    constants: tuple[str, ...] = ()  # which UPPER_CASE constants to tune; empty = every numeric one


@dataclass(frozen=True)
class ApiAgentConfig:
    provider: str = "openai"  # openai (any OpenAI-compatible endpoint) | anthropic
    base_url: str = ""  # e.g. http://127.0.0.1:8000/v1 for a local server
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"  # name of the environment variable holding the key
    max_tokens: int = 8192
    timeout_s: float = 300.0
    max_retries: int = 6


@dataclass(frozen=True)
class CliAgentConfig:
    preset: str = "claude"  # claude | codex | aider | gemini | opencode | custom
    command: str = ""  # custom command template; {prompt_file} and {workdir} are filled in
    timeout_s: float = 900.0


@dataclass(frozen=True)
class NotifyConfig:
    webhook_url: str = ""  # POSTed to when a run ends or finds a new best; empty = no notifications
    on: tuple[str, ...] = ("best", "end")  # which events notify: best, end
    format: str = "auto"  # auto | json ({"text": ...}, Slack-compatible) | ntfy (plain text); auto: ntfy for ntfy hosts


@dataclass(frozen=True)
class Config:
    lab: LabConfig = field(default_factory=LabConfig)
    run: RunConfig = field(default_factory=RunConfig)
    search: SearchAgentConfig = field(default_factory=SearchAgentConfig)
    api: ApiAgentConfig = field(default_factory=ApiAgentConfig)
    cli: CliAgentConfig = field(default_factory=CliAgentConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)

    def with_overrides(self, assignments: list[str]) -> "Config":
        """Apply ``section.field=value`` strings (the ``--set`` flag)."""
        tree: dict[str, dict[str, Any]] = {}
        for item in assignments:
            key, sep, raw = item.partition("=")
            section, dot, name = key.strip().partition(".")
            if not sep or not dot:
                raise ConfigError(f"--set {item!r}: write section.field=value, e.g. lab.budget_s=120")
            tree.setdefault(section, {})[name] = _parse_value(raw.strip())
        return _merge(self, tree, source="--set")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _parse_value(raw: str) -> Any:
    """A --set value: TOML syntax if it parses (numbers, booleans, lists), else a plain string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _coerce(cls: type, name: str, value: Any, where: str) -> Any:
    hint = get_type_hints(cls)[name]
    origin = getattr(hint, "__origin__", None)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if hint in (int, float, str):
            if hint is str and not isinstance(value, str):
                raise TypeError
            if hint in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float, str))):
                raise TypeError
            return hint(value)
        if origin is tuple:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            return tuple(str(v) for v in value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"{where}: {name} = {value!r} is not a valid {getattr(hint, '__name__', hint)}")


def _merge(config: Config, tree: dict[str, Any], source: str) -> Config:
    sections = {f.name: f for f in fields(Config)}
    updates = {}
    for section, values in tree.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section [{section}]; known: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: {section} must be a table ([{section}])")
        current = getattr(config, section)
        known = {f.name for f in fields(current)}
        changes = {}
        for name, value in values.items():
            if name not in known:
                raise ConfigError(
                    f"{source}: unknown key {section}.{name}; known keys of [{section}]: {', '.join(sorted(known))}"
                )
            changes[name] = _coerce(type(current), name, value, f"{source}: {section}")
        updates[section] = replace(current, **changes)
    merged = replace(config, **updates)
    validate(merged, source)
    return merged


def validate(config: Config, source: str = "config") -> None:
    lab, run = config.lab, config.run
    if lab.budget_s <= 0:
        raise ConfigError(f"{source}: lab.budget_s must be positive seconds, got {lab.budget_s}")
    if lab.vocab_size < 260 or lab.vocab_size > 65535:
        raise ConfigError(f"{source}: lab.vocab_size must be between 260 and 65535, got {lab.vocab_size}")
    if lab.preset not in ("auto", "gpu", "cpu"):
        raise ConfigError(f"{source}: lab.preset must be auto, gpu or cpu, got {lab.preset!r}")
    if lab.sandbox not in ("none", "bwrap"):
        raise ConfigError(f"{source}: lab.sandbox must be none or bwrap, got {lab.sandbox!r}")
    if lab.standby not in ("auto", "on", "off"):
        raise ConfigError(f"{source}: lab.standby must be auto, on or off, got {lab.standby!r}")
    if run.policy not in ("noise", "greedy"):
        raise ConfigError(f"{source}: run.policy must be noise or greedy, got {run.policy!r}")
    if run.baseline_runs < 1:
        raise ConfigError(f"{source}: run.baseline_runs must be at least 1, got {run.baseline_runs}")
    if unknown := sorted(set(config.notify.on) - {"best", "end"}):
        raise ConfigError(f"{source}: notify.on has {unknown}; allowed events: best, end")
    if config.notify.format not in ("auto", "json", "ntfy"):
        raise ConfigError(f"{source}: notify.format must be auto, json or ntfy, got {config.notify.format!r}")
    if not lab.allowed_files:
        raise ConfigError(f"{source}: lab.allowed_files is empty; list the files agents may edit, e.g. [\"train.py\"]")


def load(lab_dir: Path | str, overrides: list[str] | None = None) -> Config:
    """Read ``LAB/nightlab.toml`` (defaults when absent) and apply ``--set`` overrides."""
    path = Path(lab_dir) / CONFIG_FILE
    config = Config()
    if path.exists():
        try:
            tree = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e}); fix the line it names") from None
        config = _merge(config, tree, source=str(path))
    return config.with_overrides(overrides or [])


def dumps(config: Config) -> str:
    """The config as TOML text (used by ``nightlab init`` and recorded with each run)."""
    lines = []
    for section in fields(Config):
        lines.append(f"[{section.name}]")
        for f in fields(getattr(config, section.name)):
            value = getattr(getattr(config, section.name), f.name)
            lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    return json.dumps(value)
