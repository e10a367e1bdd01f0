"""One typed configuration for a lab, loaded from ``nightlab.toml``.

Every setting is a field of a frozen dataclass below, with its default and a comment; the TOML
file and the command line (``--set section.field=value``) may only name these fields. An unknown
key is an error that names the key and lists what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_FILE = "nightlab.toml"
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
MAX_SEED = 2**31 - 1

# The names a setting may take. The modules that implement them import these, so the config
# (the lowest layer) validates every section without importing what sits above it.
AGENTS = ("search", "api", "cli", "scripted")  # nightlab.agents.create
API_PROVIDERS = ("openai", "anthropic")  # nightlab.agents.api
CLI_PRESETS = ("claude", "codex", "aider", "gemini", "opencode")  # nightlab.agents.cli.PRESETS
SEARCH_MODES = ("local", "global")  # nightlab.agents.search
CLIMBMIX_LAST_SHARD = 6542  # shard_06542.parquet, ClimbMix's pinned validation shard (nightlab.lab.climbmix)
CLIMBMIX_HOLDOUT_SHARD = CLIMBMIX_LAST_SHARD - 1  # shard_06541.parquet, its pinned holdout shard


class ConfigError(ValueError):
    """A bad setting: the message names the file or flag, the key, and the fix."""


@dataclass(frozen=True)
class LabConfig:
    dataset: str = "pycode"  # pycode | pycode:stdlib | hostcode | climbmix | local:PATH
    vocab_size: int = 8192  # BPE vocabulary, special tokens included
    num_shards: int = 8  # climbmix: training shards to download (the pinned val shard is extra)
    budget_s: float = 300.0  # training wall-clock budget of one experiment, compile warm-up excluded
    budget_tokens: int = 0  # 0 = off; else train.py stops at this many training tokens (budget_s stays the cap)
    startup_allowance_s: float = 180.0  # hard cap = budget + this (startup, compilation, saving)
    eval_timeout_s: float = 600.0  # hard cap on the trusted evaluation
    eval_max_tokens: int = 0  # 0 = the whole validation split; set for quick CPU labs
    eval_check_share: float = 0.25  # windows the judge scores twice to catch a leak of later tokens (1.0 = all; at least 64)
    eval_seq_len: int = 2048  # the evaluator's fixed context; CPU labs use 512 (their model trains on 256)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    preset: str = "auto"  # auto | gpu | cpu: which size train.py builds (auto: by device)
    seed: int = 0  # base seed; the policy draws fresh seeds for reruns
    allowed_files: tuple[str, ...] = ("train.py",)  # what agents may change
    sandbox: str = "auto"  # auto | none | bwrap: train and judge under bubblewrap (auto: where installed; bench/RELIABILITY.md)
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
    max_repeats: int = 3  # proposals refused as repeats in a row before an agent is told to change direction
    max_cost_usd: float = 0.0  # 0 = no limit; else no new proposal once the agents' known cost reaches it (USD)
    promote_budget_s: float = 0.0  # 0 = off; else each new best is also trained at this budget and scored


@dataclass(frozen=True)
class SearchAgentConfig:
    mode: str = "local"  # local (one constant of the best at a time, adaptive steps) | global (Optuna over all)
    sampler: str = "tpe"  # tpe | cmaes (global mode)
    constants: tuple[str, ...] = ()  # which UPPER_CASE constants to tune; empty = every numeric one


@dataclass(frozen=True)
class ApiAgentConfig:
    provider: str = "openai"  # openai (any OpenAI-compatible endpoint) | anthropic
    base_url: str = ""  # e.g. http://127.0.0.1:8000/v1 for a local server
    model: str = ""  # the model's name, e.g. gpt-4.1 or claude-sonnet-4-5 (required by the api agent)
    api_key_env: str = "OPENAI_API_KEY"  # name of the environment variable holding the key
    max_tokens: int = 8192  # the most tokens one reply may have
    timeout_s: float = 300.0  # seconds one API call may take before it counts as failed
    max_retries: int = 6  # retries of a call that failed for a passing cause (rate limit, timeout, server error)


@dataclass(frozen=True)
class CliAgentConfig:
    preset: str = "claude"  # claude | codex | aider | gemini | opencode | custom
    command: str = ""  # replaces the preset's command; {prompt_file} {prompt} {workdir} {tmpdir} {files} filled in
    timeout_s: float = 900.0  # seconds one agent run may take; then it and every process it started are stopped


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
        return _anchor_local_dataset(_merge(self, tree, source="--set"), Path.cwd())

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
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError  # int() would cut 8192.9 to 8192 without a word
            return hint(value)
        if origin is tuple:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            return tuple(str(v) for v in value)
    except (TypeError, ValueError, OverflowError):
        pass
    else:
        return value
    kind = "int (a whole number)" if hint is int else getattr(hint, "__name__", hint)
    raise ConfigError(f"{where}: {name} = {value!r} is not a valid {kind}")


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

    def need(ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {key} must be {allowed}, got {value!r}")

    for key, seconds in (("lab.budget_s", lab.budget_s), ("lab.eval_timeout_s", lab.eval_timeout_s),
                         ("api.timeout_s", config.api.timeout_s), ("cli.timeout_s", config.cli.timeout_s)):
        need(math.isfinite(seconds) and seconds > 0, key, seconds, "positive seconds (a finite number above 0)")
    for key, amount in (("lab.startup_allowance_s", lab.startup_allowance_s), ("run.hours", run.hours),
                        ("run.noise_floor", run.noise_floor), ("run.simplicity_tolerance", run.simplicity_tolerance)):
        need(math.isfinite(amount) and amount >= 0, key, amount, "0 or more (a finite number)")
    need(260 <= lab.vocab_size <= 65535, "lab.vocab_size", lab.vocab_size, "between 260 and 65535")
    need(1 <= lab.num_shards <= CLIMBMIX_HOLDOUT_SHARD, "lab.num_shards", lab.num_shards,
         f"between 1 and {CLIMBMIX_HOLDOUT_SHARD}")
    need(lab.eval_seq_len >= 2, "lab.eval_seq_len", lab.eval_seq_len, "at least 2 tokens")
    need(lab.budget_tokens >= 0, "lab.budget_tokens", lab.budget_tokens, "0 (wall-clock budget only) or more")
    need(lab.eval_max_tokens >= 0, "lab.eval_max_tokens", lab.eval_max_tokens, "0 (the whole split) or more")
    need(0 < lab.eval_check_share <= 1, "lab.eval_check_share", lab.eval_check_share, "above 0 and at most 1")
    need(0 <= lab.seed <= MAX_SEED, "lab.seed", lab.seed, f"between 0 and {MAX_SEED}")
    need(DEVICE.fullmatch(lab.device) is not None, "lab.device", lab.device, "auto, cpu, cuda or cuda:N")
    need(lab.preset in ("auto", "gpu", "cpu"), "lab.preset", lab.preset, "auto, gpu or cpu")
    need(lab.sandbox in ("auto", "none", "bwrap"), "lab.sandbox", lab.sandbox, "auto, none or bwrap")
    need(lab.standby in ("auto", "on", "off"), "lab.standby", lab.standby, "auto, on or off")
    need(bool(lab.allowed_files), "lab.allowed_files", list(lab.allowed_files),
         'a list of the files agents may edit, e.g. ["train.py"]')
    need(run.agent in AGENTS, "run.agent", run.agent, f"one of {', '.join(AGENTS)}")
    need(run.policy in ("noise", "greedy"), "run.policy", run.policy, "noise or greedy")
    need(run.baseline_runs >= 1, "run.baseline_runs", run.baseline_runs, "at least 1")
    need(run.confirm_runs >= 0, "run.confirm_runs", run.confirm_runs, "0 or more")
    need(run.max_experiments >= 0, "run.max_experiments", run.max_experiments, "0 (no limit) or more")
    need(run.max_repeats >= 1, "run.max_repeats", run.max_repeats, "at least 1")
    need(math.isfinite(run.promote_budget_s) and run.promote_budget_s >= 0, "run.promote_budget_s",
         run.promote_budget_s, "0 (off) or a budget in seconds")
    need(math.isfinite(run.max_cost_usd) and run.max_cost_usd >= 0, "run.max_cost_usd", run.max_cost_usd,
         "0 (no limit) or more US dollars")
    need(config.search.mode in SEARCH_MODES, "search.mode", config.search.mode, f"one of {', '.join(SEARCH_MODES)}")
    need(config.api.provider in API_PROVIDERS, "api.provider", config.api.provider, f"one of {', '.join(API_PROVIDERS)}")
    need(config.api.max_tokens >= 1, "api.max_tokens", config.api.max_tokens, "at least 1")
    need(config.api.max_retries >= 0, "api.max_retries", config.api.max_retries, "0 or more")
    need(config.cli.preset in CLI_PRESETS or bool(config.cli.command.strip()), "cli.preset", config.cli.preset,
         f"one of {', '.join(CLI_PRESETS)} (or set cli.command for another program)")
    need(set(config.notify.on) <= {"best", "end"}, "notify.on", list(config.notify.on), "a list of best, end")
    need(config.notify.format in ("auto", "json", "ntfy"), "notify.format", config.notify.format,
         "auto, json or ntfy")


def nearest_lab(start: Path | str) -> Path | None:
    """The nearest folder at or above ``start`` that holds nightlab.toml, or None."""
    here = Path(start).resolve()
    return next((folder for folder in (here, *here.parents) if (folder / CONFIG_FILE).exists()), None)


def load(lab_dir: Path | str, overrides: list[str] | None = None) -> Config:
    """Read ``LAB/nightlab.toml`` (defaults when absent) and apply ``--set`` overrides."""
    path = Path(lab_dir) / CONFIG_FILE
    return loads(path.read_text() if path.exists() else "", overrides, source=str(path), base=Path(lab_dir))


def loads(text: str, overrides: list[str] | None = None, source: str = "recorded settings",
          base: Path | None = None) -> Config:
    """Settings from TOML text (a nightlab.toml, or what ``dumps`` recorded with a run), then ``--set``
    overrides; a relative ``local:`` dataset in the text is taken from ``base`` where given."""
    try:
        tree = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML ({e}); fix the line it names") from None
    config = _merge(Config(), tree, source=source)
    if base is not None:
        config = _anchor_local_dataset(config, base)
    return config.with_overrides(overrides or [])


def differences(a: Config, b: Config, section: str = "lab") -> list[str]:
    """``section.key`` of every setting in ``section`` where ``a`` and ``b`` differ."""
    left, right = getattr(a, section), getattr(b, section)
    return [f"{section}.{f.name}" for f in fields(left) if getattr(left, f.name) != getattr(right, f.name)]


def _anchor_local_dataset(config: Config, base: Path) -> Config:
    """Make a relative ``local:PATH`` dataset absolute from the folder it was written in: the lab's
    for nightlab.toml, the cwd for ``--set`` and the shortcut flags. Otherwise a command run from a
    subfolder of the lab, or a trial in its worktree, would look for the data somewhere else."""
    kind, _, arg = config.lab.dataset.partition(":")
    if kind != "local" or not arg or Path(arg).expanduser().is_absolute():
        return config
    absolute = (Path(base) / arg).resolve()
    return dataclasses.replace(config, lab=dataclasses.replace(config.lab, dataset=f"local:{absolute}"))


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
