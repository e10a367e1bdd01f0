"""The one typed config: nightlab.toml and --set, checked against the dataclass fields."""

from __future__ import annotations

from pathlib import Path

import pytest

from nightlab import config as cfg


def test_defaults_round_trip_through_toml(tmp_path: Path) -> None:
    changed = cfg.Config().with_overrides(["lab.budget_s=120", 'run.agent="api"', 'lab.allowed_files=["train.py", "optim.py"]'])
    (tmp_path / cfg.CONFIG_FILE).write_text(cfg.dumps(changed))
    assert cfg.load(tmp_path) == changed


def test_set_parses_toml_values_and_plain_strings() -> None:
    conf = cfg.Config().with_overrides(["lab.budget_s=90", "lab.dataset=local:/data/books", "run.hours=7.5"])
    assert conf.lab.budget_s == 90.0 and conf.lab.dataset == "local:/data/books" and conf.run.hours == 7.5


@pytest.mark.parametrize(
    ("assignment", "named"),
    [
        ("lab.budget=60", "unknown key lab.budget"),
        ("labs.budget_s=60", "unknown section [labs]"),
        ("budget_s=60", "section.field=value"),
        ("lab.budget_s=soon", "lab: budget_s = 'soon' is not a valid float"),
        ("lab.budget_s=0", "lab.budget_s must be positive"),
        ("run.policy=lucky", "run.policy must be noise or greedy"),
    ],
)
def test_a_bad_setting_is_an_error_that_names_it(assignment: str, named: str) -> None:
    with pytest.raises(cfg.ConfigError) as e:
        cfg.Config().with_overrides([assignment])
    assert named in str(e.value)


@pytest.mark.parametrize(
    ("assignment", "named"),
    [
        ("lab.seed=-1", "lab.seed must be between 0 and 2147483647, got -1"),
        ("lab.budget_s=nan", "lab.budget_s must be positive seconds (a finite number above 0), got nan"),
        ("lab.eval_timeout_s=inf", "lab.eval_timeout_s must be positive seconds (a finite number above 0), got inf"),
        ("lab.startup_allowance_s=-500", "lab.startup_allowance_s must be 0 or more (a finite number), got -500.0"),
        ("run.hours=nan", "run.hours must be 0 or more (a finite number), got nan"),
        ("lab.eval_seq_len=1", "lab.eval_seq_len must be at least 2 tokens, got 1"),
        ("lab.eval_max_tokens=-5", "lab.eval_max_tokens must be 0 (the whole split) or more, got -5"),
        ("lab.num_shards=0", "lab.num_shards must be between 1 and 6541, got 0"),
        ("lab.num_shards=6542", "lab.num_shards must be between 1 and 6541, got 6542"),  # 6541: the holdout shard
        ('lab.device="gpu"', "lab.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        ('lab.device="cuda:x"', "lab.device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
        ("lab.vocab_size=8192.9", "vocab_size = 8192.9 is not a valid int (a whole number)"),
        ("lab.seed=inf", "seed = inf is not a valid int (a whole number)"),
        ('run.agent="gpt"', "run.agent must be one of search, api, cli, scripted, got 'gpt'"),
        ('api.provider="gemini"', "api.provider must be one of openai, anthropic, got 'gemini'"),
        ('cli.preset="cursor"', "cli.preset must be one of claude, codex, aider, gemini, opencode"),
    ],
)
def test_a_value_out_of_range_names_the_key_the_value_and_the_range(assignment: str, named: str) -> None:
    with pytest.raises(cfg.ConfigError) as e:
        cfg.Config().with_overrides([assignment])
    assert named in str(e.value)


def test_values_in_range_pass() -> None:
    conf = cfg.Config().with_overrides(['lab.device="cuda:1"', "lab.vocab_size=4096.0", "lab.startup_allowance_s=0",
                                        'cli.preset="custom"', 'cli.command="my-agent {prompt_file}"'])
    assert conf.lab.device == "cuda:1" and conf.lab.vocab_size == 4096 and conf.cli.preset == "custom"


def test_a_bad_file_names_the_file_and_the_key(tmp_path: Path) -> None:
    (tmp_path / cfg.CONFIG_FILE).write_text("[lab]\nbudget_s = 60\nwarp = 9\n")
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(tmp_path)
    assert str(tmp_path / cfg.CONFIG_FILE) in str(e.value) and "lab.warp" in str(e.value)
    (tmp_path / cfg.CONFIG_FILE).write_text("[lab\n")
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load(tmp_path)
    assert "not valid TOML" in str(e.value)


def test_a_relative_local_dataset_means_the_folder_it_was_written_in(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    lab = tmp_path / "lab"
    (lab / "sub").mkdir(parents=True)
    (lab / cfg.CONFIG_FILE).write_text('[lab]\ndataset = "local:data"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # in nightlab.toml: from the lab, wherever the command runs
    assert cfg.load(lab).lab.dataset == f"local:{(lab / 'data').resolve()}"
    # on the command line: from where the user typed it
    assert cfg.load(lab, ["lab.dataset=local:books"]).lab.dataset == f"local:{(elsewhere / 'books').resolve()}"
    assert cfg.load(lab, ["lab.dataset=local:/srv/books"]).lab.dataset == "local:/srv/books"
    assert cfg.load(lab, ["lab.dataset=pycode"]).lab.dataset == "pycode"
    assert cfg.nearest_lab(lab / "sub") == lab.resolve()
    assert cfg.nearest_lab(elsewhere) != lab.resolve()
